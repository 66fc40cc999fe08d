"""Where graphopt talks to people: one stderr console, and progress for long loops.

Results (tables, reports) go to stdout through `out`; progress and warnings go to stderr
through `err`, so `graphopt inspect --json > stats.json` stays clean.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Tables are wide; when the output is a file or a pipe, do not squeeze them to 80 columns.
_PIPE_WIDTH = 160
out = Console(highlight=False)
if not out.is_terminal:
    out = Console(highlight=False, width=_PIPE_WIDTH)
err = Console(stderr=True, highlight=False)
if not err.is_terminal:
    err = Console(stderr=True, highlight=False, width=_PIPE_WIDTH)

T = TypeVar("T")


def track(items: Iterable[T], *, total: int | None, description: str) -> Iterator[T]:
    """Yield from `items` while showing a progress bar on stderr (silent when not a terminal)."""
    if not err.is_terminal:
        yield from items
        return
    with Progress(*_columns(), console=err, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


class Bar:
    """A progress bar a loop advances by hand, e.g. to show a running loss."""

    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress = progress
        self._task = task

    def advance(self, description: str | None = None) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=1, description=description)


@contextmanager
def progress(total: int | None, description: str) -> Iterator[Bar]:
    """A `Bar` on stderr for `total` steps (silent when stderr is not a terminal)."""
    if not err.is_terminal:
        yield Bar(None, None)
        return
    with Progress(*_columns(), console=err, transient=True) as bar:
        yield Bar(bar, bar.add_task(description, total=total))


def _columns() -> list[ProgressColumn]:
    return [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]


def warn(message: str) -> None:
    """A warning a person should see, on stderr."""
    err.print(f"[bold yellow]warning:[/] {message}", soft_wrap=True)

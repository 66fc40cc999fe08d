"""Where graphopt talks to people: one stderr console, and progress for long loops.

Results (tables, reports) go to stdout through `out`; progress and warnings go to stderr
through `err`, so `graphopt inspect --json > stats.json` stays clean.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
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
    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


def warn(message: str) -> None:
    """A warning a person should see, on stderr."""
    err.print(f"[bold yellow]warning:[/] {message}", soft_wrap=True)

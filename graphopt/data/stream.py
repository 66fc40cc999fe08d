"""The streaming core: columns read a few rows at a time, chunks group them, and one dataset
turns a list of chunks into batches."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np

from graphopt.data.base import Batch, Dataset
from graphopt.data.checks import convert
from graphopt.data.rules import Input, fixed_batch
from graphopt.errors import DataError

LABELS = "\0labels"  # column key of the labels inside a chunk (no input can be named so)


class Column(abc.ABC):
    """Reads the rows of one array in order, a few at a time."""

    @abc.abstractmethod
    def read(self, n: int) -> np.ndarray: ...


class SliceColumn(Column):
    """Rows of an in-memory or memory-mapped array (or a single sample without the axis)."""

    def __init__(self, array: np.ndarray, single: bool = False) -> None:
        self.array = array[None] if single else array
        self.pos = 0

    def read(self, n: int) -> np.ndarray:
        rows = np.ascontiguousarray(self.array[self.pos : self.pos + n])
        self.pos += n
        return rows


# Opens a chunk's columns (input name or LABELS -> column); files it opens go on the stack.
Opener = Callable[[ExitStack], dict[str, Column]]


@dataclass
class Chunk:
    """A run of samples from one place (a file, an .npz, an image, the random generator).

    `shapes` are the trailing (per-sample) shapes per input when known before reading; they
    let `open_dataset` check the fixed-batch rule up front.
    """

    where: str
    count: int
    shapes: dict[str, tuple[int, ...]] | None
    open_columns: Opener


def _shape_runs(chunks: Sequence[Chunk]) -> Iterator[int]:
    """Sample counts of consecutive chunks of one shape (a chunk of unknown shape continues)."""
    run, shapes = 0, None
    for chunk in chunks:
        if run and chunk.shapes is not None and chunk.shapes != shapes:
            yield run
            run = 0
        shapes = chunk.shapes if chunk.shapes is not None else shapes
        run += chunk.count
    if run:
        yield run


class StreamingDataset(Dataset):
    """The one `Dataset`: batches of the chunks' samples, cut where the sample shape changes."""

    def __init__(
        self,
        *,
        description: str,
        rules: Sequence[Input],
        chunks: Sequence[Chunk],
        has_labels: bool,
        is_random: bool = False,
    ) -> None:
        self._rules = list(rules)
        self._chunks = [c for c in chunks if c.count > 0]
        self._fixed = fixed_batch(rules)
        self._len = sum(c.count for c in self._chunks)
        self.has_labels = has_labels
        self.is_random = is_random
        self.classes: list[str] | None = None
        if self._fixed is not None and self._fixed > 1:
            self._check_fixed_batch(description, self._fixed)
        note = f"{self._len} samples"
        if self._fixed is not None:
            note += f", batches of {self._fixed} fixed by the model"
        self.description = f"{description} ({note})"

    def __len__(self) -> int:
        return self._len

    def batches(self, batch_size: int) -> Iterator[Batch]:
        size = self._batch_size(batch_size)
        return self._stream(size)

    def num_batches(self, batch_size: int) -> int:
        size = self._batch_size(batch_size)
        return sum((run + size - 1) // size for run in _shape_runs(self._chunks))

    def _batch_size(self, batch_size: int) -> int:
        if self._fixed is not None:
            return self._fixed
        if batch_size < 1:
            raise DataError(f"Batch size {batch_size} must be at least 1.")
        return batch_size

    def _check_fixed_batch(self, description: str, fixed: int) -> None:
        """Runs of same-shaped samples must fill whole batches (a shape change cuts a batch).

        Skipped when some shapes are known only after reading (images kept at their own
        size); `_flush` then raises when a short batch turns up.
        """
        if any(chunk.shapes is None for chunk in self._chunks):
            return
        for run in _shape_runs(self._chunks):
            if run % fixed:
                raise DataError(
                    f"The model's batch axis is fixed to {fixed}, but {description} "
                    f"holds {run} samples{' of one shape' if len(self._chunks) > 1 else ''}, "
                    f"not a multiple of {fixed}; graphopt neither drops nor pads samples.",
                    hint=f"Give a multiple of {fixed} samples, or export the model "
                    "with a dynamic batch axis.",
                )

    def _stream(self, size: int) -> Iterator[Batch]:
        parts: list[dict[str, np.ndarray]] = []
        pending = 0
        shapes: dict[str, tuple[int, ...]] | None = None
        for chunk in self._chunks:
            with ExitStack() as stack:
                columns = chunk.open_columns(stack)
                left = chunk.count
                while left:
                    take = min(left, size - pending)
                    part = self._read(chunk, columns, take)
                    left -= take
                    part_shapes = {k: v.shape[1:] for k, v in part.items() if k != LABELS}
                    if pending and part_shapes != shapes:
                        yield self._flush(parts, size, chunk.where)
                        parts, pending = [], 0
                    parts.append(part)
                    pending += take
                    shapes = part_shapes
                    if pending == size:
                        yield self._flush(parts, size, chunk.where)
                        parts, pending = [], 0
        if pending:
            yield self._flush(parts, size, "the end of the data")

    def _read(self, chunk: Chunk, columns: dict[str, Column], n: int) -> dict[str, np.ndarray]:
        part = {}
        for rule in self._rules:
            part[rule.name] = convert(rule, columns[rule.name].read(n), chunk.where)
        if LABELS in columns:
            part[LABELS] = columns[LABELS].read(n)
        return part

    def _flush(self, parts: list[dict[str, np.ndarray]], size: int, where: str) -> Batch:
        count = sum(next(iter(p.values())).shape[0] for p in parts)
        if self._fixed is not None and count != self._fixed:
            raise DataError(
                f"The model's batch axis is fixed to {self._fixed}, but only {count} sample(s) "
                f"of one shape are left before {where}.",
                hint="Give a multiple of the batch size per shape, or export the model with a "
                "dynamic batch axis.",
            )

        def join(key: str) -> np.ndarray:
            arrays = [p[key] for p in parts]
            return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

        feeds = {rule.name: join(rule.name) for rule in self._rules}
        labels = join(LABELS) if LABELS in parts[0] else None
        return Batch(feeds=feeds, labels=labels)

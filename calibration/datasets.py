"""Datasets for calibration: the first n samples of one, and ONNX Runtime's data readers.

`dataset_from_reader` wraps anything that follows ONNX Runtime's `CalibrationDataReader`
protocol (`get_next()` returns a feed dict, then None when done) as a `Dataset`, so users
of `onnxruntime.quantization.quantize_static` can switch in one line. A reader can be read
only once unless it has `rewind()`:

- with `rewind()`, every pass over the dataset rewinds the reader and reads it again;
- without, the first read spills the samples to raw files in a temporary folder (one per
  input, written as they arrive, never all in memory), and every pass reads those back
  through memory maps. The folder goes when the dataset does (or on `close()`).

Either way the reader is read once when the dataset is made, to count the samples and to
check each feed dict against the model's inputs (names, dtypes, shapes) before any work
starts. The feed dicts may hold any number of samples each; batches are cut anew to the
size asked for (and at a change of sample shape), as for every other `Dataset`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from graphopt.console import track
from graphopt.data import Batch, Dataset
from graphopt.data.checks import check_dtype, check_shape, convert, names
from graphopt.data.rules import Input, fixed_batch, input_rules
from graphopt.errors import DataError
from graphopt.model import TensorSpec

Part = dict[str, np.ndarray]  # input name -> rows; every array has the same row count


class CalibrationDataReader(Protocol):
    """ONNX Runtime's reader protocol: `get_next()` gives a feed dict, then None."""

    def get_next(self) -> Mapping[str, Any] | None: ...


# ---------------------------------------------------------------------------- head


class HeadDataset(Dataset):
    """The first `count` samples of another dataset, in its order."""

    def __init__(self, dataset: Dataset, count: int) -> None:
        self._dataset = dataset
        self._count = min(count, len(dataset))
        self.has_labels = dataset.has_labels
        self.is_random = dataset.is_random
        self.description = f"the first {self._count} samples of {dataset.description}"

    def __len__(self) -> int:
        return self._count

    def batches(self, batch_size: int) -> Iterator[Batch]:
        left = self._count
        stream = self._dataset.batches(batch_size)
        try:
            for batch in stream:
                if left <= 0:
                    break
                if batch.size > left:
                    batch = Batch(
                        feeds={k: v[:left] for k, v in batch.feeds.items()},
                        labels=None if batch.labels is None else batch.labels[:left],
                    )
                left -= batch.size
                yield batch
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()


def head(dataset: Dataset, count: int | None, inputs: Sequence[TensorSpec]) -> Dataset:
    """`dataset` limited to its first `count` samples (all when None or more).

    Raises:
        DataError: `count` is not a multiple of a batch size the model fixes.
    """
    if count is None or count >= len(dataset):
        return dataset
    fixed = fixed_batch(input_rules(inputs, {}))
    if fixed is not None and count % fixed:
        raise DataError(
            f"samples={count} is not a multiple of the batch size {fixed} that the model "
            "fixes; graphopt neither drops nor pads samples.",
            hint=f"Ask for a multiple of {fixed} samples.",
        )
    return HeadDataset(dataset, count)


# ---------------------------------------------------------------------------- readers


def dataset_from_reader(
    reader: CalibrationDataReader,
    inputs: Sequence[TensorSpec],
    *,
    workdir: Path | None = None,
    description: str = "the CalibrationDataReader",
) -> Dataset:
    """A `Dataset` over an ONNX Runtime `CalibrationDataReader`.

    Args:
        reader: has `get_next()`; `rewind()` too if it can be read more than once.
        inputs: the model's inputs (`Model.input_specs()`).
        workdir: where a reader without `rewind()` spills its samples (a temporary folder is
            made inside it; the system's temporary folder when None).
        description: how reports and errors name the data.

    Raises:
        DataError: the reader has no `get_next`, yields no samples, or yields something that
            does not fit the model's inputs.
    """
    if not callable(getattr(reader, "get_next", None)):
        raise DataError(
            f"{type(reader).__name__} is not a CalibrationDataReader: it has no get_next().",
            hint="Pass an object whose get_next() returns {input name: array} and then None.",
        )
    rules = input_rules(inputs, {})
    if callable(getattr(reader, "rewind", None)):
        return _RewindingDataset(reader, rules, description)
    return _SpilledDataset(reader, rules, description, workdir)


class _ReaderDataset(Dataset):
    """What both reader datasets share: checked parts, and batches cut from them."""

    has_labels = False

    def __init__(self, rules: Sequence[Input], description: str) -> None:
        self._rules = list(rules)
        self._fixed = fixed_batch(rules)
        self._source = description
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def _finish(self) -> None:
        if self._count == 0:
            raise DataError(
                f"{_cap(self._source)} yielded no samples (its first get_next() returned None).",
                hint="Check the reader; call rewind() or make a new one if it was used before.",
            )
        note = f"{self._count} samples"
        if self._fixed is not None:
            note += f", batches of {self._fixed} fixed by the model"
        self.description = f"{self._source} ({note})"

    def _parts(self) -> Iterator[Part]:
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[Batch]:
        if self._fixed is None and batch_size < 1:
            raise DataError(f"Batch size {batch_size} must be at least 1.")
        return _rebatch(self._parts(), self._fixed or batch_size, self._fixed)

    def _checked(self, feeds: object, call: int) -> Part:
        """One get_next() result checked against the inputs, cast to their dtypes."""
        where = f"get_next() call {call} of {self._source}"
        if not isinstance(feeds, Mapping):
            raise DataError(
                f"{_cap(where)} returned a {type(feeds).__name__}, not a dict of arrays.",
                hint="Return {input name: array} from get_next(), and None at the end.",
            )
        wanted = [rule.name for rule in self._rules]
        missing = [n for n in wanted if n not in feeds]
        extra = [str(n) for n in feeds if n not in wanted]
        if missing or extra:
            problems = []
            if missing:
                problems.append(f"lacks {names(missing)}")
            if extra:
                problems.append(f"has {names(extra)}, which the model does not take")
            raise DataError(
                f"{_cap(where)} {' and '.join(problems)}.",
                hint=f"The model's inputs are {names(wanted)}.",
            )
        part: Part = {}
        counts = set()
        for rule in self._rules:
            array = np.asarray(feeds[rule.name])
            label = f"input '{rule.name}' of {where}"
            check_dtype(rule, array.dtype, label)
            counts.add(check_shape(rule, array.shape, label, single_ok=False))
            part[rule.name] = np.ascontiguousarray(convert(rule, array, label))
        if len(counts) > 1:
            raise DataError(
                f"The arrays of {where} hold different numbers of samples "
                f"({', '.join(f'{k} {v.shape[0]}' for k, v in part.items())}).",
                hint="Give every input the same number of samples along axis 0.",
            )
        return part


class _RewindingDataset(_ReaderDataset):
    """Reads the reader again, after `rewind()`, for every pass."""

    def __init__(self, reader: Any, rules: Sequence[Input], description: str) -> None:
        super().__init__(rules, description)
        self._reader = reader
        for part in self._read():
            self._count += _rows(part)
        self._finish()

    def _read(self) -> Iterator[Part]:
        self._reader.rewind()
        for call, feeds in enumerate(_feeds(self._reader, self._source), start=1):
            part = self._checked(feeds, call)
            if _rows(part):
                yield part

    def _parts(self) -> Iterator[Part]:
        seen = 0
        for part in self._read():
            seen += _rows(part)
            yield part
        if seen != self._count:
            raise DataError(
                f"{_cap(self._source)} yielded {seen} samples after rewind(), but "
                f"{self._count} the first time.",
                hint="A reader must give the same samples on every pass; make rewind() "
                "restart it at the first sample.",
            )


@dataclass
class _Run:
    """Consecutive spilled samples of one shape and dtype per input."""

    count: int
    layout: dict[str, tuple[np.dtype, tuple[int, ...]]]  # input -> (dtype, trailing shape)
    offsets: dict[str, int]  # input -> byte offset of the run's first row in its file


class _SpilledDataset(_ReaderDataset):
    """Reads the reader once, into one raw file per input, and every pass from those."""

    def __init__(
        self, reader: Any, rules: Sequence[Input], description: str, workdir: Path | None
    ) -> None:
        super().__init__(rules, description)
        if workdir is not None:
            Path(workdir).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="calib-reader-", dir=workdir))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)
        self._files = {rule.name: self.folder / f"input{i}.bin" for i, rule in enumerate(rules)}
        self._runs: list[_Run] = []
        try:
            self._spill(reader)
            self._finish()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove the spilled samples now (the dataset is unusable afterwards)."""
        self._cleanup()

    def _spill(self, reader: Any) -> None:
        handles = {name: open(path, "wb") for name, path in self._files.items()}  # noqa: SIM115
        try:
            for call, feeds in enumerate(_feeds(reader, self._source), start=1):
                part = self._checked(feeds, call)
                rows = _rows(part)
                if not rows:
                    continue
                layout = {k: (v.dtype, v.shape[1:]) for k, v in part.items()}
                if self._runs and self._runs[-1].layout == layout:
                    self._runs[-1].count += rows
                else:
                    offsets = {k: handles[k].tell() for k in part}
                    self._runs.append(_Run(rows, layout, offsets))
                for name, array in part.items():
                    handles[name].write(array.reshape(-1).view(np.uint8).data)
                self._count += rows
        finally:
            for handle in handles.values():
                handle.close()

    def _parts(self) -> Iterator[Part]:
        if not self.folder.exists():
            raise DataError(f"The samples spilled from {self._source} were removed (closed).")
        for run in self._runs:
            arrays = {
                name: _mapped(self._files[name], run.offsets[name], run.count, dtype, shape)
                for name, (dtype, shape) in run.layout.items()
            }
            yield arrays
            del arrays


def _mapped(
    path: Path, offset: int, count: int, dtype: np.dtype, shape: tuple[int, ...]
) -> np.ndarray:
    full = (count, *shape)
    if count * int(np.prod(shape, dtype=np.int64)) == 0:
        return np.empty(full, dtype=dtype)
    return np.memmap(os.fspath(path), dtype=dtype, mode="r", offset=offset, shape=full)


def _feeds(reader: Any, source: str) -> Iterator[object]:
    """get_next() until None, with progress (a reader does not say how long it is)."""

    def calls() -> Iterator[object]:
        while (feeds := reader.get_next()) is not None:
            yield feeds

    return track(calls(), total=None, description=f"reading {source}")


# ---------------------------------------------------------------------------- batching


def _rows(part: Part) -> int:
    return int(next(iter(part.values())).shape[0]) if part else 0


def _rebatch(parts: Iterator[Part], size: int, fixed: int | None) -> Iterator[Batch]:
    """Batches of `size` rows cut from the parts, closed early where the sample shape
    changes. Rows are copied out of the parts, so memory-mapped parts are not held."""
    pending: list[Part] = []
    count = 0
    shapes: dict[str, tuple[int, ...]] | None = None
    for part in parts:
        part_shapes = {k: v.shape[1:] for k, v in part.items()}
        if pending and part_shapes != shapes:
            yield _flush(pending, count, fixed)
            pending, count = [], 0
        shapes = part_shapes
        rows, start = _rows(part), 0
        while start < rows:
            take = min(rows - start, size - count)
            pending.append({k: v[start : start + take] for k, v in part.items()})
            count += take
            start += take
            if count == size:
                yield _flush(pending, count, fixed)
                pending, count = [], 0
    if pending:
        yield _flush(pending, count, fixed)


def _flush(pending: list[Part], count: int, fixed: int | None) -> Batch:
    if fixed is not None and count != fixed:
        raise DataError(
            f"The model's batch axis is fixed to {fixed}, but the reader leaves {count} "
            "sample(s) of one shape that do not fill a batch.",
            hint=f"Give a multiple of {fixed} samples per shape.",
        )
    feeds = {
        name: np.concatenate([p[name] for p in pending])
        if len(pending) > 1
        else np.array(pending[0][name])
        for name in pending[0]
    }
    return Batch(feeds=feeds)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]

"""`calibrate`: the range of each requested tensor over a dataset, streamed.

minmax is one pass of in-graph reductions. The histogram methods take one pass too: each
tensor is captured batch by batch and counted into a `Histogram` whose bins are powers of
two wide and widen (merging in pairs) as larger values arrive, so no range needs to be
known beforehand, [0, max |x|] spans between `bins` and 2 * `bins` bins, and the counts
come out the same whatever the batch size, chunking or order. Before it, one sample runs
through a copy of the model that reports only the tensors' element counts (and checks
their types), which sizes the batches.

The pass holds about one batch of the captured tensors at a time. It sizes that batch to
stay within `max_batch_bytes` (ranges do not depend on the batch size), and only when a
single sample's tensors are larger than that does it capture them in groups, one pass per
group. ONNX Runtime computes the next batch in a worker thread while the histograms count
the one before.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np

from graphopt import runtime
from graphopt.calibration.cache import CalibrationCache, range_keys
from graphopt.calibration.datasets import CalibrationDataReader, dataset_from_reader, head
from graphopt.calibration.histogram import (
    MIN_BINS,
    Grid,
    Histogram,
    entropy_bins,
    entropy_sides,
    mse_bins,
    percentile_value,
)
from graphopt.calibration.ranges import (
    HISTOGRAM_METHODS,
    METHODS,
    CalibrationError,
    Method,
    TensorRange,
    symmetric_range,
)
from graphopt.calibration.reduce import Extremes, Target, reduce_ranges, resolve_targets
from graphopt.console import warn
from graphopt.data import Dataset
from graphopt.data.rules import fixed_batch, input_rules
from graphopt.errors import DataError
from graphopt.model import Model

DEFAULT_BATCH_BYTES = 128 * 2**20
NonFinite = Literal["raise", "skip"]
T = TypeVar("T")


def calibrate(
    model: Model,
    dataset: Dataset | CalibrationDataReader,
    tensors: Sequence[str],
    *,
    method: Method = "minmax",
    symmetric: bool = True,
    percentile: float = 99.99,
    bins: int = 2048,
    samples: int | None = None,
    per_channel: Mapping[str, int] | None = None,
    batch_size: int = 32,
    device: runtime.Device = "auto",
    threads: int | None = None,
    workdir: Path | None = None,
    cache: CalibrationCache | None = None,
    max_batch_bytes: int = DEFAULT_BATCH_BYTES,
    nonfinite: NonFinite = "raise",
    precision: Grid = "int8",
) -> dict[str, TensorRange]:
    """Calibrate the range of each named tensor on the dataset.

    Args:
        model: the float model; never modified (the reductions go on a copy).
        dataset: the calibration data: a `Dataset` (`open_dataset`), or an ONNX Runtime
            `CalibrationDataReader`, wrapped with `dataset_from_reader` (spilled into
            `workdir` when it cannot rewind).
        tensors: names of float tensors of the main graph (node outputs, graph inputs).
        method: "minmax" (the observed range); "percentile" (the range holding
            `percentile` % of the values); "entropy" (TensorRT's KL-divergence threshold for
            int8, or fp8, searched for each sign apart); "mse" (the clip threshold with the least expected squared error
            under int8, or fp8, rounding).
        symmetric: ranges of the form [-t, t]. With False: minmax gives [min, max];
            percentile cuts (100 - percentile) / 2 % off each tail of a signed histogram;
            mse computes the symmetric threshold t on |x| and returns
            [max(min, -t), min(max, t)]; entropy searches a threshold for each side of a
            tensor of both signs apart (`entropy_sides`), t+ and t-, and returns
            [max(min, -t-), min(max, t+)] (symmetric: the larger of the two).
        percentile: for "percentile", in (0, 100].
        bins: for the histogram methods, the least number of bins [0, max |x|] spans (at
            least 128; rounded up to a power of two; it spans at most twice that).
        samples: use at most this many samples, the first ones in the dataset's order.
        per_channel: tensor name -> channel axis, for per-channel ranges (minmax only).
        batch_size: samples per ONNX Runtime run (the ranges do not depend on it).
        device, threads, workdir: where and how ONNX Runtime runs (see graphopt.runtime).
        cache: serve ranges computed before for the same model, data and options from
            here, and store new ones.
        max_batch_bytes: the most bytes of one batch of captured tensors (peak memory is
            about twice that: the batch ONNX Runtime makes in the worker thread while the
            one before is counted; plus what the model itself needs for a batch).
        nonfinite: what to do with a tensor that holds inf or NaN on this data: "raise"
            a CalibrationError naming it, or "skip" it (left out of the result, with a
            warning).
        precision: the number format the ranges are for, which "entropy" and "mse" search
            thresholds under: "int8" (127 even steps up to the threshold) or "fp8" (float8
            e4m3fn scaled so that 448 is the threshold, whose steps grow with magnitude).
            minmax and percentile do not depend on it.

    Returns:
        {tensor name: TensorRange}, in the order of `tensors` (duplicates once).

    Raises:
        CalibrationError: an unknown option value, tensor name, a non-float tensor, a
            per-channel request for a histogram method, or non-finite values.
        DataError: no samples, or `samples` does not fit a batch size the model fixes.
        RuntimeFailed: ONNX Runtime could not load or run the model.
    """
    per_channel = dict(per_channel or {})
    names = list(dict.fromkeys(tensors))
    _check_options(
        method, percentile, bins, samples, batch_size, max_batch_bytes, nonfinite, precision
    )
    _check_per_channel(method, per_channel, names)
    if not names:
        return {}
    targets = resolve_targets(model, names, per_channel)
    if not isinstance(dataset, Dataset):
        dataset = dataset_from_reader(dataset, model.input_specs(), workdir=workdir)
    data = head(dataset, samples, model.input_specs())
    if len(data) == 0:
        raise DataError(
            f"{data.description} holds no samples to calibrate on.",
            hint="Give calibration data with at least one sample.",
        )
    settings = _Settings(method, symmetric, percentile, bins, precision)

    found: dict[str, TensorRange] = {}
    keys: dict[str, str] = {}
    if cache is not None:
        keys = range_keys(
            model, data, [(t.name, settings.key(t)) for t in targets], batch_size=batch_size
        )
        for target in targets:
            hit = cache.get(keys[target.name], target.name)
            if hit is not None:
                found[target.name] = hit
    todo = [t for t in targets if t.name not in found]
    if todo:
        run = _Run(model, data, batch_size, device, threads, workdir, max_batch_bytes, nonfinite)
        fresh = run.ranges(todo, settings)
        if cache is not None:
            for name, computed in fresh.items():
                cache.put(keys[name], computed)
        found.update(fresh)
    return {name: found[name] for name in names if name in found}


# ---------------------------------------------------------------------------- options


@dataclass(frozen=True)
class _Settings:
    method: str
    symmetric: bool
    percentile: float
    bins: int
    precision: str = "int8"

    def key(self, target: Target) -> dict[str, object]:
        """What changes a range besides model and data (the cache key's options)."""
        key: dict[str, object] = {
            "method": self.method,
            "symmetric": self.symmetric,
            "axis": target.axis,
        }
        if self.method in HISTOGRAM_METHODS:
            key["bins"] = self.bins
            key["histogram"] = "pow2"  # one pass, power-of-two bins (was: edges from pass one)
        if self.method == "percentile":
            key["percentile"] = self.percentile
        if self.method in ("entropy", "mse") and self.precision != "int8":
            key["precision"] = self.precision  # int8 keys stay as they were before fp8
        if self.method == "entropy":
            key["signs"] = "apart"  # ranges cached before the sides were kept apart differ
        return key


def _check_options(
    method: str,
    percentile: float,
    bins: int,
    samples: int | None,
    batch_size: int,
    max_batch_bytes: int,
    nonfinite: str,
    precision: str = "int8",
) -> None:
    problems = []
    if method not in METHODS:
        problems.append(f"method '{method}' is not one of {', '.join(METHODS)}")
    if not 0.0 < percentile <= 100.0:
        problems.append(f"percentile={percentile} is not in (0, 100]")
    if bins < MIN_BINS:
        problems.append(f"bins={bins} is fewer than {MIN_BINS}")
    if samples is not None and samples < 1:
        problems.append(f"samples={samples} is not at least 1")
    if batch_size < 1:
        problems.append(f"batch_size={batch_size} is not at least 1")
    if max_batch_bytes < 1:
        problems.append(f"max_batch_bytes={max_batch_bytes} is not at least 1")
    if nonfinite not in ("raise", "skip"):
        problems.append(f"nonfinite='{nonfinite}' is not 'raise' or 'skip'")
    if precision not in ("int8", "fp8"):
        problems.append(f"precision='{precision}' is not 'int8' or 'fp8'")
    if problems:
        raise CalibrationError(
            "Calibration options are invalid: " + "; ".join(problems) + ".",
            hint="See graphopt.calibration.calibrate for the allowed values.",
        )


def _check_per_channel(method: str, per_channel: Mapping[str, int], names: Sequence[str]) -> None:
    if not per_channel:
        return
    stray = [n for n in per_channel if n not in names]
    if stray:
        raise CalibrationError(
            f"per_channel names {', '.join(repr(n) for n in stray)}, which is not among the "
            "tensors to calibrate.",
            hint="Name the tensor in `tensors` too, or drop it from per_channel.",
            tensors=tuple(stray),
        )
    if method != "minmax":
        raise CalibrationError(
            f"Per-channel ranges are supported with method 'minmax' only, not '{method}'.",
            hint="Calibrate per-channel tensors (weights) with minmax, or these per tensor.",
            tensors=tuple(per_channel),
        )


# ---------------------------------------------------------------------------- running


@dataclass
class _Run:
    model: Model
    data: Dataset
    batch_size: int
    device: runtime.Device
    threads: int | None
    workdir: Path | None
    max_batch_bytes: int
    nonfinite: str

    def ranges(self, targets: Sequence[Target], settings: _Settings) -> dict[str, TensorRange]:
        if settings.method in HISTOGRAM_METHODS:
            return self._histogram_ranges(targets, settings)
        extremes = reduce_ranges(
            self.model,
            self.data,
            targets,
            histograms=False,
            batch_size=self.batch_size,
            device=self.device,
            threads=self.threads,
            workdir=self.workdir,
        )
        self._check_empty([t.name for t in targets if extremes[t.name].empty()])
        bad = [t.name for t in targets if not extremes[t.name].finite()]
        self._nonfinite(bad)
        return {
            t.name: _minmax_range(t, extremes[t.name], settings)
            for t in targets
            if t.name not in bad
        }

    def _check_empty(self, empty: Sequence[str]) -> None:
        if empty:
            raise CalibrationError(
                f"Tensor(s) {', '.join(repr(n) for n in empty)} held no values on the "
                "calibration data (zero elements in every batch), so they have no range.",
                hint="Leave them out of the tensors to calibrate.",
                tensors=tuple(empty),
            )

    def _nonfinite(self, bad: Sequence[str]) -> None:
        if not bad:
            return
        listing = ", ".join(repr(n) for n in bad)
        if self.nonfinite == "skip":
            warn(f"not calibrating {listing}: inf or NaN values on the calibration data.")
            return
        raise CalibrationError(
            f"Tensor(s) {listing} hold inf or NaN values on the calibration data, so they "
            "have no finite range.",
            hint="Check the data and the model; or pass nonfinite='skip' to leave such "
            "tensors unquantized.",
            tensors=tuple(bad),
        )

    def _histogram_ranges(
        self, targets: Sequence[Target], settings: _Settings
    ) -> dict[str, TensorRange]:
        sizes = self._sample_sizes(targets)
        bins = 1 << (settings.bins - 1).bit_length()  # a power of two, at least `bins`
        signed = settings.method == "entropy" or (
            settings.method == "percentile" and not settings.symmetric
        )
        histograms = {
            t.name: Histogram(bins, signed=signed, track_max=settings.method == "mse")
            for t in targets
        }
        # In graph order, so that each group's session (cut after its last tensor) runs only
        # the part of the model it needs.
        position = {
            value.name: i
            for i, node in enumerate(self.model.graph)
            for value in node.outputs
            if value.name
        }
        ordered = sorted(targets, key=lambda t: position.get(t.name, -1))
        for group, batch_size in self._groups(ordered, sizes):
            batches = runtime.captured(
                self.model,
                self.data,
                group,
                batch_size=batch_size,
                device=self.device,
                threads=self._capture_threads(),
                workdir=self.workdir,
            )

            for _batch, values in _in_background(batches):
                for name in group:
                    histograms[name].add(values[name])
        self._check_empty([n for n, h in histograms.items() if h.low > h.high and not h.nonfinite])
        bad = [n for n, h in histograms.items() if h.nonfinite]
        self._nonfinite(bad)
        samples = len(self.data)
        return {
            t.name: _histogram_range(t, histograms[t.name], settings, samples)
            for t in targets
            if t.name not in bad
        }

    def _capture_threads(self) -> int | None:
        """ONNX Runtime's threads while the histograms count in the caller's thread: one
        core fewer than asked for (or than this process may use), so that the two do not
        contend (on 2 cores, PP-OCRv4's mse pass took 19.7 s with 2 ORT threads, 14.6 s
        with 1)."""
        if runtime.resolve_providers(self.device)[0] != runtime.CPU:
            return self.threads
        cores = self.threads or (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        )
        return max(1, (cores or 1) - 1)

    def _sample_sizes(self, targets: Sequence[Target]) -> dict[str, int]:
        """Elements per sample of every target, from the first sample (or the first batch
        a model with a fixed batch takes), run through a copy of the model that outputs
        only their counts and extremes; this also checks the types ONNX could not infer."""
        first = fixed_batch(input_rules(self.model.input_specs(), {})) or 1
        extremes = reduce_ranges(
            self.model,
            head(self.data, first, self.model.input_specs()),
            targets,
            histograms=True,
            batch_size=first,
            device=self.device,
            threads=self.threads,
            workdir=self.workdir,
        )
        return {name: found.per_sample for name, found in extremes.items()}

    def _groups(
        self, targets: Sequence[Target], sizes: Mapping[str, int]
    ) -> list[tuple[list[str], int]]:
        """Tensors captured together, and the batch size to capture them with."""
        if not targets:
            return []
        cost = {t.name: max(1, sizes[t.name]) * t.itemsize for t in targets}
        fixed = fixed_batch(input_rules(self.model.input_specs(), {}))
        if fixed is not None:
            batch = fixed
        else:
            batch = max(1, min(self.batch_size, self.max_batch_bytes // sum(cost.values())))
        groups: list[list[str]] = [[]]
        held = 0
        for target in targets:
            size = cost[target.name] * batch
            if groups[-1] and held + size > self.max_batch_bytes:
                groups.append([])
                held = 0
            groups[-1].append(target.name)
            held += size
        return [(group, batch) for group in groups]


_DONE = object()


def _in_background(items: Iterator[T]) -> Iterator[T]:
    """`items`, each made in a worker thread while the caller works on the one before.

    ONNX Runtime releases the GIL while it runs, so capturing batch k + 1 overlaps counting
    batch k. (Binning in the worker too was slower: on 2 cores the pass took 19.7 s
    instead of 13.5 s on PP-OCRv4, the two threads' Python loops contending.)"""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="graphopt-calibration")
    try:
        pending = pool.submit(next, items, _DONE)
        while (item := pending.result()) is not _DONE:
            pending = pool.submit(next, items, _DONE)
            yield item  # type: ignore[misc]
    finally:
        pool.shutdown(wait=True)
        close = getattr(items, "close", None)
        if close is not None:
            close()


def _minmax_range(target: Target, seen: Extremes, settings: _Settings) -> TensorRange:
    method, samples = settings.method, seen.samples
    if settings.symmetric:
        amax = np.maximum(np.abs(seen.low), np.abs(seen.high))
        return symmetric_range(target.name, amax, axis=target.axis, method=method, samples=samples)
    return TensorRange(target.name, seen.low, seen.high, target.axis, method, samples)


def _entropy_thresholds(hist: Histogram, precision: Grid) -> tuple[float, float]:
    """The entropy thresholds (of the values >= 0, of the magnitudes of those < 0): for a
    tensor of one sign one threshold from its magnitudes, for one of both signs one per
    side, each searched on its own (`entropy_sides`)."""
    if not hist.low < 0.0 < hist.high:
        threshold = entropy_bins(hist.magnitudes(), grid=precision) * hist.width
        return threshold, threshold
    found = entropy_sides(*hist.sides(), grid=precision)
    return found[0] * hist.width, found[1] * hist.width


def _histogram_range(
    target: Target, hist: Histogram, settings: _Settings, samples: int
) -> TensorRange:
    method, amax = settings.method, hist.amax
    if hist.low == hist.high:  # a constant tensor: its range is that value
        seen = Extremes(np.array(hist.low), np.array(hist.high), 0, samples)
        return _minmax_range(target, seen, settings)
    if method == "percentile" and not settings.symmetric:
        cut = (100.0 - settings.percentile) / 200.0
        counts, start = hist.signed_counts()
        low = percentile_value(counts, cut, width=hist.width, low=start)
        high = percentile_value(counts, 1.0 - cut, width=hist.width, low=start)
        low, high = max(low, hist.low), min(high, hist.high)
        return TensorRange(target.name, np.array(low), np.array(high), None, method, samples)
    if method == "entropy":
        above, below = _entropy_thresholds(hist, settings.precision)  # type: ignore[arg-type]
    elif method == "percentile":
        fraction = settings.percentile / 100.0
        above = below = percentile_value(hist.magnitudes(), fraction, width=hist.width)
    else:
        found = mse_bins(hist.magnitudes(), top=hist.top, grid=settings.precision)  # type: ignore[arg-type]
        above = below = found * hist.width
    # The last bin reaches past the largest value: clamp to the observed range.
    if settings.symmetric:
        threshold = min(max(above, below), amax)
        return symmetric_range(target.name, threshold, axis=None, method=method, samples=samples)
    low = max(hist.low, -below)
    high = min(hist.high, above)
    return TensorRange(target.name, np.array(low), np.array(high), None, method, samples)

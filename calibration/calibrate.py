"""`calibrate`: the range of each requested tensor over a dataset, streamed.

minmax is one pass of in-graph reductions. The histogram methods take two: pass one finds
the global range (as minmax), which fixes the edges of a histogram of >= 128 (default 2048)
bins; pass two captures the tensors batch by batch and counts them into those bins. Counts
are integers and edges are fixed before any data is seen, so the ranges come out the same
whatever the batch size or chunking.

Pass two holds one batch of the captured tensors at a time. It sizes that batch to stay
within `max_batch_bytes` (ranges do not depend on the batch size), and only when a single
sample's tensors are larger than that does it capture them in groups, one pass per group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
        bins: histogram bins for the histogram methods (at least 128).
        samples: use at most this many samples, the first ones in the dataset's order.
        per_channel: tensor name -> channel axis, for per-channel ranges (minmax only).
        batch_size: samples per ONNX Runtime run (the ranges do not depend on it).
        device, threads, workdir: where and how ONNX Runtime runs (see graphopt.runtime).
        cache: serve ranges computed before for the same model, data and options from
            here, and store new ones.
        max_batch_bytes: the most bytes of captured tensors held at once in pass two (peak
            memory is about twice that, ONNX Runtime's copy and numpy's, plus what the
            model itself needs for one batch).
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
        histograms = settings.method in HISTOGRAM_METHODS
        extremes = reduce_ranges(
            self.model,
            self.data,
            targets,
            histograms=histograms,
            batch_size=self.batch_size,
            device=self.device,
            threads=self.threads,
            workdir=self.workdir,
        )
        self._check_empty(targets, extremes)
        bad = [t.name for t in targets if not extremes[t.name].finite()]
        good = [t for t in targets if t.name not in bad]
        if not histograms:
            self._nonfinite(bad)
            return {t.name: _minmax_range(t, extremes[t.name], settings) for t in good}
        # Pass two finds the NaNs pass one cannot see: report them all at once.
        found, more = self._histogram_ranges(good, extremes, settings)
        self._nonfinite([t.name for t in targets if t.name in bad or t.name in more])
        return found

    def _check_empty(self, targets: Sequence[Target], extremes: Mapping[str, Extremes]) -> None:
        empty = [t.name for t in targets if extremes[t.name].empty()]
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
        self, targets: Sequence[Target], extremes: Mapping[str, Extremes], settings: _Settings
    ) -> tuple[dict[str, TensorRange], list[str]]:
        """Ranges from pass two, and the tensors it found inf or NaN in."""
        histograms: dict[str, Histogram] = {}
        results: dict[str, TensorRange] = {}
        for target in targets:
            seen = extremes[target.name]
            hist = _histogram_for(float(seen.low), float(seen.high), settings)
            if hist is not None:
                histograms[target.name] = hist
            else:  # a constant tensor: its range is that value
                results[target.name] = _minmax_range(target, seen, settings)
        todo = [t for t in targets if t.name in histograms]
        # In graph order, so that each group's session (cut after its last tensor) runs only
        # the part of the model it needs.
        position = {
            value.name: i
            for i, node in enumerate(self.model.graph)
            for value in node.outputs
            if value.name
        }
        ordered = sorted(todo, key=lambda t: position.get(t.name, -1))
        for group, batch_size in self._groups(ordered, extremes):

            def count(_batch: object, values: Mapping[str, np.ndarray], group=group) -> None:
                for name in group:
                    histograms[name].add(values[name])

            runtime.capture(
                self.model,
                self.data,
                group,
                count,
                batch_size=batch_size,
                device=self.device,
                threads=self.threads,
                workdir=self.workdir,
            )
        bad = [t.name for t in todo if histograms[t.name].nonfinite]
        for target in todo:
            if target.name not in bad:
                results[target.name] = _histogram_range(
                    target, histograms[target.name], extremes[target.name], settings
                )
        return results, bad

    def _groups(
        self, targets: Sequence[Target], extremes: Mapping[str, Extremes]
    ) -> list[tuple[list[str], int]]:
        """Tensors captured together, and the batch size to capture them with."""
        if not targets:
            return []
        cost = {t.name: max(1, extremes[t.name].per_sample) * t.itemsize for t in targets}
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


def _minmax_range(target: Target, seen: Extremes, settings: _Settings) -> TensorRange:
    method, samples = settings.method, seen.samples
    if settings.symmetric:
        amax = np.maximum(np.abs(seen.low), np.abs(seen.high))
        return symmetric_range(target.name, amax, axis=target.axis, method=method, samples=samples)
    return TensorRange(target.name, seen.low, seen.high, target.axis, method, samples)


def _histogram_for(low: float, high: float, settings: _Settings) -> Histogram | None:
    """The empty histogram pass two counts a tensor seen in [low, high] into (None for a
    constant tensor).

    Symmetric ranges, entropy and mse count |x| over [0, amax], except entropy on a tensor
    of both signs: it counts x over [-amax, amax] in twice the bins (the same bin width), so
    that its search keeps the two sides apart (`entropy_sides`). Signed percentile ranges
    count x over [low, high]."""
    amax = max(abs(low), abs(high))
    if settings.method == "entropy" and low < 0.0 < high:
        return Histogram(-amax, amax, 2 * settings.bins, absolute=False)
    absolute = settings.symmetric or settings.method != "percentile"
    if absolute:
        low, high = 0.0, amax
    if not high > low:
        return None
    return Histogram(
        low, high, settings.bins, absolute=absolute, track_top=settings.method == "mse"
    )


def _entropy_thresholds(hist: Histogram, precision: Grid) -> tuple[float, float]:
    """The entropy thresholds (of the values >= 0, of the magnitudes of those < 0): from an
    |x| histogram one threshold for both, from a signed one over [-amax, amax] one per
    side, each searched on its own (`entropy_sides`)."""
    if hist.absolute:
        threshold = hist.edge(entropy_bins(hist.counts, grid=precision))
        return threshold, threshold
    half = hist.bins // 2
    positive, negative = hist.counts[half:], hist.counts[:half][::-1]
    found = entropy_sides(positive, negative, grid=precision)
    return found[0] * hist.width, found[1] * hist.width


def _histogram_range(
    target: Target, hist: Histogram, seen: Extremes, settings: _Settings
) -> TensorRange:
    method, samples = settings.method, seen.samples
    if method == "percentile" and not settings.symmetric:
        cut = (100.0 - settings.percentile) / 200.0
        low = percentile_value(hist, cut)
        high = percentile_value(hist, 1.0 - cut)
        return TensorRange(target.name, low, high, None, method, samples)
    if method == "entropy":
        above, below = _entropy_thresholds(hist, settings.precision)  # type: ignore[arg-type]
        if settings.symmetric:
            threshold = max(above, below)
            return symmetric_range(
                target.name, threshold, axis=None, method=method, samples=samples
            )
        low = max(float(seen.low), -below)
        high = min(float(seen.high), above)
        return TensorRange(target.name, low, high, None, method, samples)
    if method == "percentile":
        threshold = percentile_value(hist, settings.percentile / 100.0)
    else:
        threshold = hist.edge(
            mse_bins(hist.counts, top_position=hist.top_position, grid=settings.precision)  # type: ignore[arg-type]
        )
    if settings.symmetric:
        return symmetric_range(target.name, threshold, axis=None, method=method, samples=samples)
    low = max(float(seen.low), -threshold)
    high = min(float(seen.high), threshold)
    return TensorRange(target.name, low, high, None, method, samples)

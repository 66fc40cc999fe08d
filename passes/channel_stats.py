"""Per-channel activation statistics streamed over the calibration data, for the passes that
rescale or correct weights ahead of quantization (`smoothquant`, `bias-correction`).

One ONNX Runtime run over the first `samples` calibration samples (`runtime.capture`) gives,
for every requested (tensor, channel axis): each channel's abs-max and mean, and optionally a
uniform random subsample of at most `rows` rows (a row is one position's vector of channels:
one token of a [N, S, C] tensor, one pixel of a [N, C, H, W] one). The subsample is a
reservoir: every row gets a random key from a generator seeded with the context's seed, and
the rows with the largest keys are kept, so it is uniform over all rows, bounded in memory and
the same on every run. On request it also averages each tensor over its samples (the mean
image of a [N, C, H, W] tensor), which convolutions need to see the borders right, and sums
the channels' products over every row (the second-moment matrix E[x xᵀ], C×C, exact and
bounded in memory), which regressions of channels on each other need. Memory is one batch of
the captured tensors plus the statistics; the activations are never all held at once.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt import runtime
from graphopt.calibration.datasets import head
from graphopt.context import Context
from graphopt.errors import GraphoptError
from graphopt.model import Model
from graphopt.passes.quantize.graphutil import NameSource
from graphopt.passes.quantize.ranges import usable_samples

Request = tuple[str, int]  # (tensor name, channel axis; negative counts from the end)


def add_square(graph: ir.Graph, source: ir.Value, names: NameSource, tag: str) -> str:
    """Append Mul(source, source) to a probe copy of a model and return its output's name
    (`<source>__<tag>_sq`): the mean of what `collect` reports for it is E[x²] per channel,
    the activation norms Wanda-style scores need."""
    out = names.take(f"{source.name}__{tag}_sq")
    square = ir.Value(name=out, type=source.type, shape=source.shape)
    graph.append(ir.node("Mul", [source, source], outputs=[square]))
    return out


@dataclass(frozen=True)
class ChannelStats:
    """What one tensor looked like per channel on the calibration data.

    Attributes:
        absmax: float64 (C,), the largest |value| of each channel.
        mean: float64 (C,), each channel's mean over every sample and position.
        count: how many rows (positions) the statistics cover.
        finite: False when the tensor held inf or NaN (the other fields then mean little).
        rows: float32 (R, C), a uniform random subsample of the rows (None when not asked for).
        sample_mean: float64, the mean sample (the tensor averaged over its leading, sample
            axis, e.g. [C, H, W]) when asked for and every batch had the same shape, else None.
        second_moment: float64 (C, C), E[x xᵀ] over every row, when asked for, else None.
    """

    absmax: np.ndarray
    mean: np.ndarray
    count: int
    finite: bool
    rows: np.ndarray | None
    sample_mean: np.ndarray | None = None
    second_moment: np.ndarray | None = None

    @property
    def channels(self) -> int:
        return int(self.absmax.shape[0])


def require_data(ctx: Context, pass_name: str, why: str) -> None:
    """Raise the user-facing error of a pass that cannot run without calibration data."""
    if ctx.calib_data is not None:
        return
    raise GraphoptError(
        f"The {pass_name} pass needs calibration data {why}, and none was given.",
        hint="Pass --data with a few hundred representative inputs (an .npz keyed by input "
        "name, a folder of arrays or images), the same data the quantize pass calibrates on.",
    )


def collect(
    model: Model,
    ctx: Context,
    requests: Sequence[Request],
    *,
    samples: int,
    rows: int = 0,
    sample_means: bool = False,
    second_moments: Collection[Request] = (),
) -> dict[Request, ChannelStats]:
    """Stream the first `samples` calibration samples and return each request's statistics.

    Args:
        model: the model as it is now (never modified; the capture runs on a copy).
        ctx: gives the data, device, threads, batch size, seed and scratch folder.
        requests: (tensor name, channel axis) pairs; a tensor may be asked for on two axes.
        samples: calibration samples used, rounded to a batch size the model fixes.
        rows: keep a random subsample of at most this many rows per request (0: none).
        sample_means: also average each tensor over its sample axis (memory: one sample).
        second_moments: the requests that also accumulate E[x xᵀ] over their channels
            (C×C float64: mind wide tensors).
    """
    assert ctx.calib_data is not None
    wanted = list(dict.fromkeys(requests))
    if not wanted:
        return {}
    data = head(ctx.calib_data, usable_samples(model, samples), model.input_specs())
    wanted_moments = set(second_moments)
    collectors = {
        request: _Collector(
            request[1],
            rows,
            np.random.default_rng([ctx.seed, i]),
            sample_means=sample_means,
            second_moments=request in wanted_moments,
        )
        for i, request in enumerate(wanted)
    }

    def on_batch(_batch: object, values: Mapping[str, np.ndarray]) -> None:
        for (name, _), collector in collectors.items():
            collector.add(values[name])

    runtime.capture(
        model,
        data,
        [name for name, _ in wanted],
        on_batch,
        batch_size=ctx.batch_size,
        device=ctx.device,
        threads=ctx.threads,
        workdir=ctx.workdir,
    )
    return {request: collector.result() for request, collector in collectors.items()}


class _Collector:
    """Running abs-max, sum and reservoir of one (tensor, axis)."""

    def __init__(
        self,
        axis: int,
        keep: int,
        rng: np.random.Generator,
        *,
        sample_means: bool,
        second_moments: bool = False,
    ) -> None:
        self.axis = axis
        self.products: np.ndarray | None = None
        self.second_moments = second_moments
        self.sample_means = sample_means
        self.sample_sum: np.ndarray | None = None
        self.samples = 0
        self.same_shape = True
        self.keep = keep
        self.rng = rng
        self.absmax: np.ndarray | None = None
        self.total: np.ndarray | None = None
        self.count = 0
        self.finite = True
        self.rows: np.ndarray | None = None
        self.keys = np.empty(0)

    def add(self, array: np.ndarray) -> None:
        x = np.asarray(array)
        rows = np.moveaxis(x, self.axis, -1).reshape(-1, x.shape[self.axis])
        if not np.isfinite(rows).all():
            self.finite = False
        absmax = np.max(np.abs(rows), axis=0).astype(np.float64) if len(rows) else None
        total = rows.sum(axis=0, dtype=np.float64)
        if self.absmax is None or self.total is None:
            self.absmax = absmax if absmax is not None else np.zeros(rows.shape[1])
            self.total = total
        else:
            if absmax is not None:
                self.absmax = np.maximum(self.absmax, absmax)
            self.total = self.total + total
        self.count += len(rows)
        if self.second_moments:
            wide = rows.astype(np.float64)
            products = wide.T @ wide
            self.products = products if self.products is None else self.products + products
        if self.sample_means and x.ndim:
            self._sum_samples(x)
        if self.keep:
            self._sample(rows)

    def _sum_samples(self, x: np.ndarray) -> None:
        total = x.sum(axis=0, dtype=np.float64)
        if self.sample_sum is None:
            self.sample_sum = total
        elif self.sample_sum.shape == total.shape:
            self.sample_sum = self.sample_sum + total
        else:
            self.same_shape = False
        self.samples += x.shape[0]

    def _sample(self, rows: np.ndarray) -> None:
        keys = self.rng.random(len(rows))
        if len(rows) > self.keep:
            top = np.argpartition(keys, -self.keep)[-self.keep :]
            rows, keys = rows[top], keys[top]
        rows = np.asarray(rows, np.float32)
        if self.rows is None:
            self.rows, self.keys = rows.copy(), keys
            return
        self.rows = np.concatenate([self.rows, rows])
        self.keys = np.concatenate([self.keys, keys])
        if len(self.keys) > self.keep:
            top = np.argpartition(self.keys, -self.keep)[-self.keep :]
            self.rows, self.keys = self.rows[top], self.keys[top]

    def result(self) -> ChannelStats:
        absmax = np.zeros(0) if self.absmax is None else self.absmax
        total = np.zeros(0) if self.total is None else self.total
        return ChannelStats(
            absmax=absmax,
            mean=total / max(self.count, 1),
            count=self.count,
            finite=self.finite,
            rows=self.rows,
            sample_mean=(
                self.sample_sum / max(self.samples, 1)
                if self.sample_sum is not None and self.same_shape
                else None
            ),
            second_moment=(
                self.products / max(self.count, 1) if self.products is not None else None
            ),
        )

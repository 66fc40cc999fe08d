"""Calibration for the quantize pass: the ranges of the tensors a plan quantizes.

`graphopt.calibration.calibrate` (streaming, in-graph statistics, minmax / percentile /
entropy / mse) does the work when it is installed. Until then a streaming min/max over the
calibration data stands in, and only `minmax` is available.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.context import Context
from graphopt.errors import GraphoptError
from graphopt.model import Model
from graphopt.passes.quantize.qparams import RangeLike


@dataclass(frozen=True)
class MinMaxRange:
    """A per-tensor range: the smallest and largest value seen."""

    name: str
    low: np.ndarray
    high: np.ndarray
    samples: int = 0
    method: str = "minmax"
    axis: int | None = None

    def amax(self) -> np.ndarray:
        return np.maximum(np.abs(self.low), np.abs(self.high))


def _calibrate_function() -> Callable[..., Mapping[str, RangeLike]] | None:
    try:
        module = importlib.import_module("graphopt.calibration")
    except ImportError:
        return None
    return getattr(module, "calibrate", None)


def collect(
    model: Model,
    ctx: Context,
    tensors: Sequence[str],
    *,
    method: str,
    symmetric: bool,
    percentile: float,
    samples: int,
) -> Mapping[str, RangeLike]:
    """Per-tensor ranges of `tensors` over the first `samples` calibration samples."""
    dataset = ctx.calib_data
    assert dataset is not None
    calibrate = _calibrate_function()
    if calibrate is not None:
        kwargs: dict[str, Any] = dict(
            method=method,
            symmetric=symmetric,
            percentile=percentile,
            samples=samples,
            batch_size=ctx.batch_size,
            device=ctx.device,
            threads=ctx.threads,
            workdir=ctx.workdir,
        )
        return calibrate(model, dataset, list(tensors), **kwargs)
    if method != "minmax":
        raise GraphoptError(
            f"Calibrator '{method}' is not available in this installation (graphopt.calibration "
            "has no calibrate function).",
            hint="Use calibrator=minmax.",
        )
    return minmax(model, ctx, tensors, samples=samples)


def minmax(
    model: Model, ctx: Context, tensors: Sequence[str], *, samples: int
) -> dict[str, MinMaxRange]:
    """Streaming per-tensor min/max: one batch of activations in memory at a time."""
    from graphopt.runtime import create_session, run_dataset

    dataset = ctx.calib_data
    assert dataset is not None
    inputs = {v.name for v in model.graph.inputs}
    fetched = [name for name in dict.fromkeys(tensors) if name not in inputs]
    session = create_session(
        model, device=ctx.device, threads=ctx.threads, extra_outputs=fetched, workdir=ctx.workdir
    )
    low: dict[str, float] = {}
    high: dict[str, float] = {}
    seen = 0
    batches = run_dataset(
        session, dataset, batch_size=ctx.batch_size, outputs=fetched, description="calibrating"
    )
    for batch, values in batches:
        take = min(batch.size, samples - seen)
        arrays = dict(values)
        arrays.update({name: batch.feeds[name] for name in tensors if name in inputs})
        for name in tensors:
            array = np.asarray(arrays[name])[:take]
            if array.size == 0:
                continue
            low[name] = min(low.get(name, np.inf), float(np.min(array)))
            high[name] = max(high.get(name, -np.inf), float(np.max(array)))
        seen += take
        if seen >= samples:
            break
    return {
        name: MinMaxRange(
            name,
            np.asarray(low.get(name, 0.0), np.float32),
            np.asarray(high.get(name, 0.0), np.float32),
            seen,
        )
        for name in tensors
    }

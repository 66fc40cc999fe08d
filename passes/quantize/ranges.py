"""Calibration for the quantize pass: the ranges of the tensors a plan quantizes, from
`graphopt.calibration.calibrate` (streamed, the same whatever the batch size).

Tensors calibration cannot range are left out rather than failing the pass: those it names in
a `CalibrationError` (e.g. a tensor that is not float after all), and those holding inf or NaN
on the calibration data (an attention mask, say). The pass leaves them, and the ops that read
them, in float and says so.
"""

from __future__ import annotations

from collections.abc import Sequence

from graphopt.calibration import CalibrationError, TensorRange, calibrate
from graphopt.context import Context
from graphopt.data.rules import fixed_batch, input_rules
from graphopt.model import Model

# A CalibrationError naming tensors leads to a retry without them, this many times at most.
_MAX_RETRIES = 3


def collect(
    model: Model,
    ctx: Context,
    tensors: Sequence[str],
    *,
    method: str,
    symmetric: bool,
    percentile: float,
    samples: int,
    precision: str = "int8",
) -> tuple[dict[str, TensorRange], dict[str, str]]:
    """Per-tensor ranges over the first `samples` calibration samples (entropy and mse
    thresholds searched for `precision`'s number grid, int8 or fp8).

    Returns:
        (ranges by tensor name, reason by tensor name for those left out).
    """
    dataset = ctx.calib_data
    assert dataset is not None
    samples = usable_samples(model, samples)
    wanted = list(dict.fromkeys(tensors))
    left_out: dict[str, str] = {}
    for attempt in range(_MAX_RETRIES + 1):
        try:
            measured = calibrate(
                model,
                dataset,
                wanted,
                method=method,  # type: ignore[arg-type]
                symmetric=symmetric,
                percentile=percentile,
                samples=samples,
                batch_size=ctx.batch_size,
                device=ctx.device,
                threads=ctx.threads,
                workdir=ctx.workdir,
                nonfinite="skip",
                precision=precision,  # type: ignore[arg-type]
            )
        except CalibrationError as exc:
            named = [name for name in exc.tensors if name in wanted]
            if not named or attempt == _MAX_RETRIES:
                raise
            for name in named:
                left_out[name] = " ".join(exc.message.split())
            wanted = [name for name in wanted if name not in named]
            continue
        for name in wanted:
            if name not in measured:
                left_out[name] = "it holds inf or NaN on the calibration data"
        return dict(measured), left_out
    raise AssertionError("unreachable")


def usable_samples(model: Model, samples: int) -> int:
    """`samples` rounded down to a multiple of the batch size the model fixes, if it fixes
    one (calibration neither drops nor pads samples), and at least one batch."""
    fixed = fixed_batch(input_rules(model.input_specs(), {}))
    if fixed is None or samples % fixed == 0:
        return samples
    return max(fixed, samples - samples % fixed)

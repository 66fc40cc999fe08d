"""Quantization parameters as numbers: activation scales and zero points from calibrated
ranges, int8 or fp8 (float8 e4m3fn) weights with per-channel scales, int32 biases. Pure
numpy (and ml_dtypes for fp8), no graph.

Rounding follows QuantizeLinear: divide in float32, round half to even, saturate (for fp8:
to +-448, the largest finite e4m3fn value, as QuantizeLinear's default saturate=1 does).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

import ml_dtypes
import numpy as np

INT8_MAX = 127
UINT8_MAX = 255
#: The largest finite float8 e4m3fn value (it has no infinity): the fp8 scale is amax / 448.
FP8_E4M3_MAX = 448.0
FP8 = ml_dtypes.float8_e4m3fn
Precision = Literal["int8", "fp8"]
# A range narrower than this is treated as empty: its scale stays a normal float32.
_MIN_RANGE = 1e-12


class RangeLike(Protocol):
    """What `graphopt.calibration.TensorRange` offers and the quantize pass reads."""

    low: np.ndarray
    high: np.ndarray

    def amax(self) -> np.ndarray: ...


@dataclass(frozen=True)
class QParams:
    """Per-tensor parameters of one activation group."""

    scale: np.float32
    zero_point: np.generic  # np.int8, np.uint8 or ml_dtypes.float8_e4m3fn

    @property
    def signed(self) -> bool:
        return not isinstance(self.zero_point, np.uint8)


def qmax(precision: Precision) -> float:
    """The largest quantized magnitude: 127 for int8 (narrow range), 448 for fp8."""
    return FP8_E4M3_MAX if precision == "fp8" else float(INT8_MAX)


def activation_params(
    ranges: Iterable[RangeLike], *, symmetric: bool, precision: Precision = "int8"
) -> QParams:
    """Parameters covering every range: symmetric int8 or fp8 (zero point 0, scale
    amax / 127 or amax / 448), or uint8 asymmetric with 0 exactly representable (zero padding
    must stay zero)."""
    ranges = list(ranges)
    if precision == "fp8" and not symmetric:
        raise ValueError("fp8 quantization is symmetric only")
    if symmetric:
        amax = max(float(np.max(np.abs(np.asarray(r.amax(), np.float64)))) for r in ranges)
        if not np.isfinite(amax):
            raise ValueError("a calibrated range is not finite")
        scale = np.float32(max(amax, _MIN_RANGE) / qmax(precision))
        return QParams(scale, FP8(0) if precision == "fp8" else np.int8(0))
    low = min(float(np.min(np.asarray(r.low, np.float64))) for r in ranges)
    high = max(float(np.max(np.asarray(r.high, np.float64))) for r in ranges)
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError("a calibrated range is not finite")
    low, high = min(low, 0.0), max(high, 0.0)
    if high - low < _MIN_RANGE:
        return QParams(np.float32(1.0), np.uint8(0))
    scale = np.float32((high - low) / UINT8_MAX)
    zero_point = int(np.clip(np.rint(-low / float(scale)), 0, UINT8_MAX))
    return QParams(scale, np.uint8(zero_point))


def weight_scales(
    weight: np.ndarray,
    axis: int | None,
    precision: Precision = "int8",
    *,
    limit: int = INT8_MAX,
) -> np.ndarray:
    """Symmetric scales: abs-max / 127 (int8; / `limit` for a narrower int8 range) or / 448
    (fp8) along `axis` (a vector), or of the whole tensor (a scalar) when `axis` is None. An
    all-zero channel gets scale 1."""
    w = np.asarray(weight, np.float32)
    if axis is None:
        amax = np.max(np.abs(w)) if w.size else np.float32(0)
    else:
        others = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.max(np.abs(w), axis=others) if w.size else np.zeros(w.shape[axis], np.float32)
    amax = np.asarray(amax, np.float32)
    top = qmax(precision) if precision == "fp8" else float(limit)
    scales = (amax / np.float32(top)).astype(np.float32)
    return np.where(amax > 0, scales, np.float32(1.0)).astype(np.float32)


def quantize_weight(
    weight: np.ndarray, scales: np.ndarray, axis: int | None, *, limit: int = INT8_MAX
) -> np.ndarray:
    """int8 values of `weight` under `scales` (narrow range [-limit, limit], 127 by
    default; 63 keeps ONNX Runtime's U8S8 kernels from saturating, see `ortcpu`)."""
    w = np.asarray(weight, np.float32)
    s = _broadcast(scales, w.ndim, axis)
    return np.clip(np.rint(w / s), -limit, limit).astype(np.int8)


def quantize_weight_fp8(weight: np.ndarray, scales: np.ndarray, axis: int | None) -> np.ndarray:
    """float8 e4m3fn values of `weight` under `scales`: w / s in float32, saturated to
    +-448, rounded to the nearest e4m3fn value, ties to even (QuantizeLinear, saturate=1).
    ml_dtypes' cast rounds the same way but turns values above 448 into NaN (e4m3fn has no
    infinity), hence the clip first."""
    w = np.asarray(weight, np.float32)
    s = _broadcast(scales, w.ndim, axis)
    scaled = np.clip(w / s, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(np.float32)
    return scaled.astype(FP8)


def as_unsigned(values: np.ndarray) -> np.ndarray:
    """int8 values shifted to uint8 with zero point 128: the same numbers after dequantizing."""
    return (np.asarray(values, np.int16) + 128).astype(np.uint8)


def quantize_bias(bias: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int32 values of a 1-D bias under per-element scales (zero point 0)."""
    b = np.asarray(bias, np.float32)
    q = np.rint(b.astype(np.float64) / np.asarray(scales, np.float64))
    info = np.iinfo(np.int32)
    return np.clip(q, info.min, info.max).astype(np.int32)


def _broadcast(scales: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    scales = np.asarray(scales, np.float32)
    if axis is None or scales.ndim == 0:
        return scales
    shape = [1] * ndim
    shape[axis] = scales.shape[0]
    return scales.reshape(shape)

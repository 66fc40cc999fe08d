"""Quantization parameters as numbers: activation scales and zero points from calibrated
ranges, int8 weights with per-channel scales, int32 biases. Pure numpy, no graph.

Rounding follows QuantizeLinear: divide in float32, round half to even, saturate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

INT8_MAX = 127
UINT8_MAX = 255
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
    zero_point: np.int8 | np.uint8

    @property
    def signed(self) -> bool:
        return isinstance(self.zero_point, np.int8)


def activation_params(ranges: Iterable[RangeLike], *, symmetric: bool) -> QParams:
    """Parameters covering every range: int8 symmetric (zero point 0), or uint8 asymmetric
    with 0 exactly representable (zero padding must stay zero)."""
    ranges = list(ranges)
    if symmetric:
        amax = max(float(np.max(np.abs(np.asarray(r.amax(), np.float64)))) for r in ranges)
        if not np.isfinite(amax):
            raise ValueError("a calibrated range is not finite")
        return QParams(np.float32(max(amax, _MIN_RANGE) / INT8_MAX), np.int8(0))
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


def weight_scales(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """Symmetric int8 scales: abs-max / 127 along `axis` (a vector), or of the whole tensor
    (a scalar) when `axis` is None. An all-zero channel gets scale 1."""
    w = np.asarray(weight, np.float32)
    if axis is None:
        amax = np.max(np.abs(w)) if w.size else np.float32(0)
    else:
        others = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.max(np.abs(w), axis=others) if w.size else np.zeros(w.shape[axis], np.float32)
    amax = np.asarray(amax, np.float32)
    scales = (amax / np.float32(INT8_MAX)).astype(np.float32)
    return np.where(amax > 0, scales, np.float32(1.0)).astype(np.float32)


def quantize_weight(weight: np.ndarray, scales: np.ndarray, axis: int | None) -> np.ndarray:
    """int8 values of `weight` under `scales` (narrow range [-127, 127])."""
    w = np.asarray(weight, np.float32)
    s = _broadcast(scales, w.ndim, axis)
    return np.clip(np.rint(w / s), -INT8_MAX, INT8_MAX).astype(np.int8)


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

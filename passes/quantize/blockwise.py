"""Blockwise int4 weights as numbers: scales per block of `block_size` rows along the
reduction axis K, the int4 values, and what DequantizeLinear gives back. Pure numpy, no graph.

Weights are taken as [K, N] (K the reduction axis, N the output channels), the layout
ONNX Runtime fuses with MatMul into MatMulNBits. A K that is not a multiple of the block size
ends in a shorter block (opset 21's blocked DequantizeLinear allows it, and ORT runs it).

Symmetric (zero point 0, left out of the graph): the scale of a block is
``max(max(w) / 7, -min(w) / 8)``, so every value lies in the int4 range [-8, 7] before
rounding (nothing is clipped) and -8 is used when the negative side is the wider one. The
more common ``amax / 7`` wastes the -8 code and gives a step up to 8/7 as large;
``amax / 8`` would clip the largest positive weight by up to one step.
Asymmetric: ``scale = (max - min) / 15`` over a range that includes 0, zero point
``round(-8 - min / scale)``.

Rounding follows QuantizeLinear: divide in float32, round half to even, saturate.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

INT4_MIN, INT4_MAX = -8, 7


@dataclass(frozen=True)
class BlockQuantized:
    """int4 values ([K, N], as int8 holding -8..7), scales and zero points ([ceil(K/B), N])."""

    values: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    block_size: int

    def dequantize(self) -> np.ndarray:
        """What DequantizeLinear computes: (q - zero point) * scale, in float32."""
        k = self.values.shape[0]
        scales = np.repeat(self.scales, self.block_size, axis=0)[:k]
        q = self.values.astype(np.float32)
        if self.zero_points is not None:
            q = q - np.repeat(self.zero_points, self.block_size, axis=0)[:k].astype(np.float32)
        return (q * scales).astype(np.float32)

    def int4_values(self) -> np.ndarray:
        return self.values.astype(ml_dtypes.int4)

    def int4_zero_points(self) -> np.ndarray | None:
        return None if self.zero_points is None else self.zero_points.astype(ml_dtypes.int4)


def check_block_size(block_size: int) -> None:
    """Raises ValueError unless `block_size` is a power of two of at least 16 (what ONNX
    Runtime's MatMulNBits accepts)."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size} must be a power of two, at least 16")


def quantize(weight: np.ndarray, block_size: int, *, symmetric: bool) -> BlockQuantized:
    """Round-to-nearest int4 of a [K, N] weight, one scale per block of rows and column."""
    w = np.asarray(weight, np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a [K, N] weight, got shape {w.shape}")
    k, n = w.shape
    blocks = -(-k // block_size)
    # Zero rows pad the last block; 0 is inside every block's range, so they change nothing.
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = w
    grouped = padded.reshape(blocks, block_size, n)
    low = np.minimum(grouped.min(axis=1), 0).astype(np.float32)
    high = np.maximum(grouped.max(axis=1), 0).astype(np.float32)
    if symmetric:
        scales = np.maximum(high / np.float32(INT4_MAX), -low / np.float32(-INT4_MIN))
    else:
        scales = (high - low) / np.float32(INT4_MAX - INT4_MIN)
    scales = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)
    per_row = np.repeat(scales, block_size, axis=0)[:k]
    q = np.rint(w / per_row)
    zero_points = None
    if not symmetric:
        zero_points = np.clip(np.rint(np.float32(INT4_MIN) - low / scales), INT4_MIN, INT4_MAX)
        q = q + np.repeat(zero_points, block_size, axis=0)[:k]
        zero_points = zero_points.astype(np.int8)
    values = np.clip(q, INT4_MIN, INT4_MAX).astype(np.int8)
    return BlockQuantized(values, scales, zero_points, block_size)


def fake_quantize(weight: np.ndarray, block_size: int, *, symmetric: bool) -> np.ndarray:
    """The weight as the int4 model sees it: quantized, then dequantized."""
    return quantize(weight, block_size, symmetric=symmetric).dequantize()

"""Reading a target's weight as the float values its readers see, and writing it pruned.

A float initializer is pruned by setting entries to 0. An integer initializer behind a
DequantizeLinear is pruned by setting entries to their zero point, which dequantizes to
exactly 0 whatever the scale, so the readers see zeros there and nowhere else changes.
A float initializer behind QuantizeLinear -> DequantizeLinear needs nothing special: 0
quantizes to the zero point and dequantizes back to 0.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.prune.targets import Target
from graphopt.passes.quantize.graphutil import constant, plain_attr


def float_values(target: Target) -> np.ndarray:
    """The weight as float32 in the initializer's layout (dequantized when it is integer)."""
    tensor = target.value.const_value
    assert tensor is not None
    raw = tensor.numpy()
    if target.dequantize is None:
        return np.asarray(raw, dtype=np.float32)
    scale = _expanded(target, 1, raw.shape)
    zero = _expanded(target, 2, raw.shape)
    assert scale is not None
    centred = raw.astype(np.float32) if zero is None else raw.astype(np.float32) - zero
    return centred * scale


def write(target: Target, keep: np.ndarray) -> tuple[int, int]:
    """Zero the entries where `keep` is False.

    Returns:
        (entries that were not zero before, entries that are zero now).
    """
    tensor = target.value.const_value
    assert tensor is not None
    raw = tensor.numpy()
    if target.dequantize is None:
        pruned = np.where(keep, raw, raw.dtype.type(0))
        nonzero_after = int(np.count_nonzero(pruned))
        newly = int(np.count_nonzero(raw)) - nonzero_after
    else:
        zero = _expanded(target, 2, raw.shape)
        fill = np.zeros(raw.shape, raw.dtype) if zero is None else zero.astype(raw.dtype)
        pruned = np.where(keep, raw, fill)
        nonzero_after = int(np.count_nonzero(pruned != fill))
        newly = int(np.count_nonzero(raw != fill)) - nonzero_after
    if newly:
        target.value.const_value = ir.tensor(pruned, dtype=tensor.dtype, name=target.value.name)
    return newly, raw.size - nonzero_after


def _expanded(target: Target, index: int, shape: tuple[int, ...]) -> np.ndarray | None:
    """DequantizeLinear's scale (1) or zero point (2) broadcast to the weight's shape."""
    node = target.dequantize
    assert node is not None
    if index >= len(node.inputs) or node.inputs[index] is None:
        return None
    tensor = constant(node.inputs[index])
    if tensor is None:
        return None
    param = np.asarray(tensor.numpy(), dtype=np.float32)
    if param.ndim == 0 or param.size == 1:
        return np.broadcast_to(param.reshape(()), shape)
    axis = (plain_attr(node, "axis", 1) or 0) % len(shape)
    block = plain_attr(node, "block_size", 0) or 0
    if block > 0:
        param = np.repeat(param, block, axis=axis)
        param = param[tuple(slice(0, d) for d in shape)]
        return param
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(param.reshape(view), shape)

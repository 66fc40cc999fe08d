"""QuantizeLinear and DequantizeLinear: the straight-through estimator (STE).

Rounding has a zero derivative almost everywhere, so quantization-aware training uses the
straight-through estimator, as PyTorch's fake quantization does:

- DequantizeLinear, y = (x - zp) * scale: dx = dy * scale (the scale broadcast along `axis`
  per channel, repeated `block_size` times along it for blocked quantization).
- QuantizeLinear, y = saturate(round(x / scale) + zp): dx = dy / scale where the rounded value
  lies inside the output type's range, bounds included (int8 [-128, 127], uint8 [0, 255],
  int16, uint16, int4, uint4; float8 types: |x / scale + zp| <= their largest finite value,
  448 for e4m3fn), 0 where it saturates. The mask is computed in the graph from x, the scale
  and the zero point, with the same division and rounding (half to even) as QuantizeLinear.

A QuantizeLinear whose only consumer is a DequantizeLinear with the same scale, zero point
and axis (a fake-quantization pair) gives dy * mask, without the scale going out and back.

Scales and zero points are not differentiable: learned scales (LSQ, PACT) are out of scope.
"""

from __future__ import annotations

import weakref

import numpy as np
import onnx

from graphopt.train.graph import Emitter, attributes
from graphopt.train.rules import rule

Grads = list[str | None]

#: Ops whose quantized (integer or float8) output carries a straight-through gradient,
#: which the builder's dependency analysis follows although the output is not a float.
STRAIGHT_THROUGH = frozenset({"QuantizeLinear"})

_T = onnx.TensorProto
#: The saturation range of each QuantizeLinear output type: (lowest, highest, is_integer).
RANGES: dict[int, tuple[float, float, bool]] = {
    _T.INT8: (-128, 127, True),
    _T.UINT8: (0, 255, True),
    _T.INT16: (-32768, 32767, True),
    _T.UINT16: (0, 65535, True),
    _T.INT4: (-8, 7, True),
    _T.UINT4: (0, 15, True),
    _T.FLOAT8E4M3FN: (-448.0, 448.0, False),
    _T.FLOAT8E4M3FNUZ: (-240.0, 240.0, False),
    _T.FLOAT8E5M2: (-57344.0, 57344.0, False),
    _T.FLOAT8E5M2FNUZ: (-57344.0, 57344.0, False),
}

# Per emitter: the gradient a DequantizeLinear rule returned for its input -> (its dy, the
# quantization key), so the QuantizeLinear before it can skip the scale's round trip.
_LINKS: weakref.WeakKeyDictionary[Emitter, dict[str, tuple[str, tuple]]] = (
    weakref.WeakKeyDictionary()
)


def _inputs(node: onnx.NodeProto) -> tuple[str, str, str]:
    names = list(node.input) + ["", ""]
    return names[0], names[1], names[2]


def _key(node: onnx.NodeProto, rank: int) -> tuple:
    _, scale, zero_point = _inputs(node)
    attrs = attributes(node)
    axis = int(attrs.get("axis", 1))
    return (scale, zero_point, axis % rank if rank else 0, int(attrs.get("block_size", 0)))


def _broadcast(em: Emitter, name: str, like: str, key: tuple) -> str:
    """`name` (a scale or zero point) shaped to broadcast against `like` along the axis."""
    _, _, axis, block = key
    rank = em.rank(like)
    value = em.const_value(name)
    if value is not None:
        return em.const(_expand(em, value, like, rank, axis, block))
    # A scale or zero point computed in the graph (rare: the quantize pass stores constants).
    shape = em.shape(name)
    if block:
        raise em.error(
            f"the blocked scale or zero point '{name}' is computed in the graph; blocked "
            "quantization is differentiated only with constant scales and zero points",
            hint="Fold the constants first (the cleanup pass).",
        )
    if shape is None:
        raise em.error(f"the rank of '{name}' is unknown after shape inference")
    out = name
    if len(shape) == 1 and shape[0] != 1 and rank > 1:
        dims = [1] * rank
        dims[axis] = -1
        out = em.op("Reshape", [out, em.ints(dims)])
    if em.types.get(name) != em.elem_type:
        out = em.op("Cast", [out], to=em.elem_type)
    return out


def _expand(
    em: Emitter, value: np.ndarray, like: str, rank: int, axis: int, block: int
) -> np.ndarray:
    value = np.asarray(value).astype(np.float64 if em.elem_type == _T.DOUBLE else np.float32)
    if block:
        dim = em.static_shape(like, "a blocked-quantized tensor")[axis]
        if value.ndim != rank:
            raise em.error(f"the blocked scale has rank {value.ndim}, the tensor {rank}")
        return np.take(np.repeat(value, block, axis=axis), np.arange(dim), axis=axis)
    if value.size == 1:
        return value.reshape(())
    dims = [1] * rank
    dims[axis] = -1
    return value.reshape(dims)


@rule("DequantizeLinear", inputs=(0,))
def _dequantize(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    (dy,) = dys
    x, scale, _ = _inputs(node)
    key = _key(node, em.rank(x))
    dx = em.op("Mul", [dy, _broadcast(em, scale, x, key)], shape=em.shape(x))
    _LINKS.setdefault(em, {})[dx] = (dy, key)
    return [dx]


@rule("QuantizeLinear", inputs=(0,))
def _quantize(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    (dq,) = dys
    x, scale, zero_point = _inputs(node)
    out_type = em.types.get(node.output[0])
    if out_type not in RANGES:
        name = onnx.TensorProto.DataType.Name(out_type) if out_type else "unknown"
        raise em.error(
            f"its output type {name} has no known saturation range (supported: "
            + ", ".join(onnx.TensorProto.DataType.Name(t) for t in RANGES)
            + ")"
        )
    lowest, highest, integer = RANGES[out_type]
    key = _key(node, em.rank(x))
    scale_b = _broadcast(em, scale, x, key)
    scaled = em.op("Div", [x, scale_b])
    if integer:
        scaled = em.op("Round", [scaled])  # half to even, as QuantizeLinear
    if zero_point:
        zp = _broadcast(em, zero_point, x, key)
        scaled = em.op("Add", [scaled, zp])
    inside = em.op(
        "And",
        [
            em.op("GreaterOrEqual", [scaled, em.const(lowest)]),
            em.op("LessOrEqual", [scaled, em.const(highest)]),
        ],
    )
    mask = em.mask(inside)
    link = _LINKS.get(em, {}).get(dq)
    if link is not None and link[1] == key:
        return [em.op("Mul", [link[0], mask], shape=em.shape(x))]  # Q -> DQ: dy * mask
    return [em.op("Mul", [em.op("Div", [dq, scale_b]), mask], shape=em.shape(x))]

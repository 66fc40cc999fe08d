"""Softmax, LogSoftmax and reductions along axes."""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.train.graph import Emitter, attributes, is_static
from graphopt.train.rules import rule

Grads = list[str | None]


def _axis(em: Emitter, node: onnx.NodeProto) -> int:
    return int(attributes(node).get("axis", -1))  # opset >= 13: one axis


@rule("Softmax")
def _softmax(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    # dx = y * (dy - sum(dy * y))
    dy, y = dys[0], node.output[0]
    dot = em.reduce("ReduceSum", em.op("Mul", [dy, y]), [_axis(em, node)], keepdims=True)
    return [em.op("Mul", [y, em.op("Sub", [dy, dot])])]


@rule("LogSoftmax")
def _log_softmax(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    # dx = dy - softmax(x) * sum(dy)
    dy, y = dys[0], node.output[0]
    total = em.reduce("ReduceSum", dy, [_axis(em, node)], keepdims=True)
    return [em.op("Sub", [dy, em.op("Mul", [em.op("Exp", [y]), total])])]


def _reduce_axes(em: Emitter, node: onnx.NodeProto) -> list[int] | None:
    """The reduced axes, normalized; None for 'no axes' (which may mean all or none)."""
    attrs = attributes(node)
    if len(node.input) > 1 and node.input[1]:
        value = em.const_value(node.input[1])
        if value is None:
            raise em.error("its axes are computed at run time; constant axes are needed")
        axes = [int(a) for a in np.asarray(value).reshape(-1)]
    elif "axes" in attrs:
        axes = [int(a) for a in attrs["axes"]]
    else:
        return None
    rank = em.rank(node.input[0])
    return sorted(a % rank for a in axes) if axes else None


@rule("ReduceSum", "ReduceMean", inputs=(0,))
def _reduce(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    attrs = attributes(node)
    dy, x = dys[0], node.input[0]
    axes = _reduce_axes(em, node)
    rank = em.rank(x)
    if axes is None:
        if int(attrs.get("noop_with_empty_axes", 0)):
            return [dy] + [None] * (len(node.input) - 1)
        axes = list(range(rank))
    kept = dy if int(attrs.get("keepdims", 1)) else em.unsqueeze(dy, axes)
    dx = em.op("Expand", [kept, em.shape_tensor(x)], shape=em.shape(x))
    if node.op_type == "ReduceMean":
        x_shape = em.shape(x)
        dims = [x_shape[a] for a in axes] if x_shape is not None else None
        if dims is not None and is_static(tuple(dims)):
            dx = em.op("Mul", [dx, em.const(1.0 / float(np.prod(dims)))])
        else:
            sizes = em.op("Gather", [em.op("Shape", [x]), em.ints(axes)], axis=0)
            count = em.op(
                "Cast", [em.reduce("ReduceProd", sizes, None, keepdims=False)], to=em.elem_type
            )
            dx = em.op("Div", [dx, count])
    return [dx] + [None] * (len(node.input) - 1)

"""LayerNormalization, InstanceNormalization, GroupNormalization: statistics of the input
itself, so the gradient flows through the mean and the variance too.

With x̂ = (x - mean) * inv_std over the normalized axes and g = dY * scale, the input's
gradient is inv_std * (g - mean(g) - x̂ * mean(g * x̂)). The statistics are recomputed in
the gradient's dtype (LayerNormalization's Mean/InvStdDev outputs are reused when present
in that dtype: stash_type may hold them in float32).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from graphopt.train.graph import Emitter, attributes, is_static
from graphopt.train.rules import rule

Grads = list[str | None]


def _statistics(
    em: Emitter, x: str, axes: Sequence[int], eps: float, mean: str = "", inv_std: str = ""
) -> tuple[str, str, str]:
    """(x - mean, inv_std, x̂) over `axes`, kept as size-1 axes; reuses given mean/inv_std."""
    if not mean:
        mean = em.reduce("ReduceMean", x, axes, keepdims=True)
    centered = em.op("Sub", [x, mean])
    if not inv_std:
        var = em.reduce("ReduceMean", em.op("Mul", [centered, centered]), axes, keepdims=True)
        inv_std = em.op("Reciprocal", [em.op("Sqrt", [em.op("Add", [var, em.const(eps)])])])
    return centered, inv_std, em.op("Mul", [centered, inv_std])


def _standardize_backward(em: Emitter, g: str, xhat: str, inv_std: str, axes: Sequence[int]) -> str:
    """The gradient of x̂ = standardize(x) over `axes`, given g = dL/dx̂."""
    mean_g = em.reduce("ReduceMean", g, axes, keepdims=True)
    mean_gx = em.reduce("ReduceMean", em.op("Mul", [g, xhat]), axes, keepdims=True)
    inner = em.op("Sub", [em.op("Sub", [g, mean_g]), em.op("Mul", [xhat, mean_gx])])
    return em.op("Mul", [inv_std, inner])


def _per_channel(em: Emitter, v: str, rank: int) -> str:
    """(C,) -> (C, 1, ..., 1) against (N, C, ...)."""
    return em.unsqueeze(v, list(range(1, rank - 1))) if rank > 2 else v


def _own_statistic(em: Emitter, node: onnx.NodeProto, index: int) -> str:
    """LayerNormalization's Mean/InvStdDev output when present in the gradient's dtype."""
    name = node.output[index] if len(node.output) > index else ""
    return name if name and em.types.get(name) == em.elem_type else ""


@rule("LayerNormalization")
def _layer_norm(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    attrs = attributes(node)
    x, scale = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 else ""
    rank = em.rank(x)
    axes = list(range(int(attrs.get("axis", -1)) % rank, rank))
    eps = float(attrs.get("epsilon", 1e-5))
    dy = dys[0]
    d_mean, d_inv = (list(dys[1:]) + [None, None])[:2]
    y_shape = em.shape(node.output[0])
    out: Grads = [None] * len(node.input)
    if bias and needed[2] and dy is not None:
        out[2] = em.unbroadcast(dy, y_shape, bias)
    if not (needed[0] or needed[1]):
        return out
    centered, inv_std, xhat = _statistics(
        em, x, axes, eps, _own_statistic(em, node, 1), _own_statistic(em, node, 2)
    )
    if needed[0]:
        parts = []
        if dy is not None:
            g = em.op("Mul", [dy, scale])
            parts.append(_standardize_backward(em, g, xhat, inv_std, axes))
        if d_mean is not None or d_inv is not None:
            parts.append(_statistics_backward(em, x, axes, centered, inv_std, d_mean, d_inv))
        out[0] = em.add_all(parts)
    if needed[1] and dy is not None:
        out[1] = em.unbroadcast(em.op("Mul", [dy, xhat]), y_shape, scale)
    return out


def _statistics_backward(
    em: Emitter,
    x: str,
    axes: Sequence[int],
    centered: str,
    inv_std: str,
    d_mean: str | None,
    d_inv: str | None,
) -> str:
    # d mean / dx = 1/n; d inv_std / dx = -inv_std³ (x - mean) / n
    shape = em.shape(x)
    dims = [shape[a] for a in axes] if shape is not None else None
    if dims is None or not is_static(tuple(dims)):
        raise em.error(
            f"the gradient through its Mean/InvStdDev outputs needs the normalized size of "
            f"'{x}' ({'unknown' if shape is None else list(shape)})",
            hint="Fix the input shapes (input_shapes=) so shape inference knows them.",
        )
    terms = []
    if d_mean is not None:
        terms.append(em.op("Expand", [d_mean, em.shape_tensor(x)]))
    if d_inv is not None:
        cube = em.op("Mul", [em.op("Mul", [inv_std, inv_std]), inv_std])
        terms.append(em.op("Neg", [em.op("Mul", [em.op("Mul", [d_inv, cube]), centered])]))
    return em.op("Mul", [em.add_all(terms), em.const(1.0 / float(np.prod(dims)))])


@rule("InstanceNormalization")
def _instance_norm(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    (dy,) = dys
    x, scale, _bias = node.input
    rank = em.rank(x)
    axes = list(range(2, rank))
    reduce_axes = [0, *axes]
    out: Grads = [None, None, None]
    if needed[2]:
        out[2] = em.reduce("ReduceSum", dy, reduce_axes, keepdims=False)
    if not (needed[0] or needed[1]):
        return out
    _, inv_std, xhat = _statistics(em, x, axes, float(attributes(node).get("epsilon", 1e-5)))
    if needed[0]:
        g = em.op("Mul", [dy, _per_channel(em, scale, rank)])
        out[0] = _standardize_backward(em, g, xhat, inv_std, axes)
    if needed[1]:
        out[1] = em.reduce("ReduceSum", em.op("Mul", [dy, xhat]), reduce_axes, keepdims=False)
    return out


@rule("GroupNormalization")
def _group_norm(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    # Statistics over (N, G, C/G * spatial); scale and bias are per group in opset 18 (the
    # version opset 21 replaced) and per channel from opset 21 on.
    (dy,) = dys
    attrs = attributes(node)
    x, scale, _bias = node.input
    rank = em.rank(x)
    groups = int(attrs["num_groups"])
    eps = float(attrs.get("epsilon", 1e-5))
    per_channel = em.opset >= 21
    as_groups = em.ints([0, groups, -1])
    x3 = em.op("Reshape", [x, as_groups])
    _, inv_std, xhat3 = _statistics(em, x3, [2], eps)
    dy3 = em.op("Reshape", [dy, as_groups])
    out: Grads = [None, None, None]
    if needed[0]:
        if per_channel:
            g3 = em.op("Reshape", [em.op("Mul", [dy, _per_channel(em, scale, rank)]), as_groups])
        else:
            g3 = em.op("Mul", [dy3, em.unsqueeze(scale, [1])])
        dx3 = _standardize_backward(em, g3, xhat3, inv_std, [2])
        out[0] = em.reshape_like(dx3, x)
    if per_channel:
        reduce_axes = [0, *range(2, rank)]
        if needed[1]:
            xhat = em.reshape_like(xhat3, x)
            out[1] = em.reduce("ReduceSum", em.op("Mul", [dy, xhat]), reduce_axes, keepdims=False)
        if needed[2]:
            out[2] = em.reduce("ReduceSum", dy, reduce_axes, keepdims=False)
    else:
        if needed[1]:
            out[1] = em.reduce("ReduceSum", em.op("Mul", [dy3, xhat3]), [0, 2], keepdims=False)
        if needed[2]:
            out[2] = em.reduce("ReduceSum", dy3, [0, 2], keepdims=False)
    return out

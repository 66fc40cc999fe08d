"""Ops that combine values along some axes: pools (spatial axes), reductions and ArgMax/Min
(their `axes`), Softmax/LogSoftmax/Hardmax (their `axis`). Channels pass through untouched
when the op works on other axes.

A reduction *over* the channel axis (RMSNorm as LLaMA-style code exports it:
Pow(x, 2) -> ReduceMean(axis=-1, keepdims) -> Add(eps) -> Sqrt -> Div or Reciprocal -> Mul,
then Mul(gamma)) ties nothing: its output has one value for all channels. A sum-like
reduction (ReduceSum, ReduceSumSquare, ReduceL1, ReduceL2, ReduceLogSum) is then exact for
removed channels that were zero, and ReduceMean is made so: it keeps dividing by the
original channel count, i.e. its output is multiplied by kept/original (a Mul after it),
because mean over the kept = sum over the kept / kept, while the model computed
sum / original. For channels that were not zero this is an approximation, the same as for
LayerNormalization (`norm`): their energy drops out of the normaliser, so the kept channels
come out scaled up by sqrt(total / kept energy) — small when the removed channels carried
little, which is what the importance scorers pick; the other choice (averaging over the
kept) would be exact only when the removed channels had exactly the average energy.
ReduceMax/Min/Prod/LogSumExp and ArgMax/Min over the channel axis are refused: removing
zero channels changes them. A mean over the channels that is then subtracted from a tensor
(LayerNorm as opset < 17 exporters write it: x - ReduceMean(x), Pow, ReduceMean, Sqrt, Div)
marks the group lossy, as LayerNormalization does: the centred removed channels are not zero.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.passes.channels.handlers.base import (
    GraphView,
    Handler,
    Link,
    Port,
    Rewriter,
    Visit,
    int_attr,
    ints_attr,
    normalize_axis,
    refuse,
    where,
)

POOL_OPS = (
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
)  # fmt: skip
REDUCE_OPS = (
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin",
)  # fmt: skip
SOFTMAX_OPS = ("Softmax", "LogSoftmax", "Hardmax")


def _other(port: Port) -> Port:
    return ("out", 0) if port == ("in", 0) else ("in", 0)


class PoolHandler(Handler):
    """Pools keep axes 0 (batch) and 1 (channels) and combine the spatial ones."""

    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        del g
        if port not in (("in", 0), ("out", 0)):
            return refuse(f"the Indices output of {where(node)} is used")
        if len(node.outputs) > 1 and node.outputs[1].uses():
            return refuse(f"the Indices output of {where(node)} is used")
        if axis > 1:
            return refuse(f"{where(node)} pools over the channel axis")
        return Visit(links=[Link(_other(port), axis)])


#: reductions over the channel axis that stay exact when the removed channels are zero
#: (ReduceMean once rescaled, see `ReduceHandler.rewrite`)
_ZERO_SAFE = ("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum")


class ReduceHandler(Handler):
    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        if port not in (("in", 0), ("out", 0)):
            return refuse(f"the axes of {where(node)} are not channels")
        reduced = _reduced_axes(node, g)
        if isinstance(reduced, str):
            return refuse(reduced)
        if reduced is None:  # noop_with_empty_axes
            return Visit(links=[Link(_other(port), axis)])
        rank = g.rank(node.inputs[0])
        assert rank is not None
        keepdims = int_attr(node, "keepdims", 1)
        kept = [a for a in range(rank) if keepdims or a not in reduced]
        if port == ("in", 0):
            if axis in reduced:
                if node.op_type not in _ZERO_SAFE:
                    return refuse(f"{where(node)} reduces over the channel axis")
                # one value for all channels: nothing is tied
                return Visit(lossy=_centering(node, g))
            return Visit(links=[Link(("out", 0), kept.index(axis))])
        if kept[axis] in reduced:
            return refuse(f"axis {axis} of the output of {where(node)} is reduced")
        return Visit(links=[Link(("in", 0), kept[axis])])

    def rewrite(self, node: ir.Node, rw: Rewriter) -> None:
        """ReduceMean over removed channels keeps its original denominator."""
        if node.op_type != "ReduceMean":
            return
        reduced = _reduced_axes(node, rw.view)
        shape = rw.view.shape(node.inputs[0])
        if not isinstance(reduced, list) or shape is None:
            return
        factor = 1.0
        for axis in reduced:
            removed = len(rw.removed(node.inputs[0], axis))
            if removed:
                factor *= (int(shape[axis]) - removed) / int(shape[axis])  # type: ignore[arg-type]
        if factor != 1.0:
            rw.scale_output(node, factor)


def _centering(node: ir.Node, g: GraphView) -> str | None:
    """Why removing zero channels changes what follows a mean that is added to or
    subtracted from a tensor (LayerNorm written out: x - ReduceMean(x)), else None.

    A removed channel that was zero holds -mean after the Sub, so it is no longer zero where
    the variance sums the squares; an Add of a constant (RMSNorm's epsilon) is harmless."""
    for use in node.outputs[0].uses():
        user = use.node
        if user.op_type not in ("Add", "Sub") or len(user.inputs) != 2:
            continue
        other = user.inputs[1 - use.idx]
        if not g.weight_like(other):
            return (
                f"{where(user)} subtracts the mean over the channels ({where(node)}, a "
                "LayerNorm written out): the variance after it changes with the channel count"
            )
    return None


def _reduced_axes(node: ir.Node, g: GraphView) -> list[int] | str | None:
    """The reduced axes (non-negative, sorted), None for a no-op, or why they are unknown."""
    rank = g.rank(node.inputs[0])
    if rank is None:
        return f"the input rank of {where(node)} is unknown"
    if node.op_type in ("ArgMax", "ArgMin"):
        one = int_attr(node, "axis", 0)
        axes: list[int] | None = None if one is None else [one]
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = g.ints(node.inputs[1])
        if axes is None:
            return f"the axes of {where(node)} are computed at run time"
    else:
        axes = ints_attr(node, "axes")
    if axes is None or not axes:
        if int_attr(node, "noop_with_empty_axes", 0):
            return None
        return f"{where(node)} reduces over every axis, the channel axis too"
    return sorted(a % rank for a in axes)


class SoftmaxHandler(Handler):
    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        rank = g.rank(node.inputs[0])
        if rank is None:
            return refuse(f"the input rank of {where(node)} is unknown")
        if g.opset >= 13:
            k = normalize_axis(int_attr(node, "axis", -1) or 0, rank)
            crosses = axis == k
        else:  # coerced to 2-D: [d0 * ... * d(k-1), dk * ... ]
            k = normalize_axis(int_attr(node, "axis", 1) or 0, rank)
            crosses = k is not None and axis >= k
        if k is None or crosses:
            return refuse(f"{where(node)} normalizes over the channel axis")
        return Visit(links=[Link(_other(port), axis)])

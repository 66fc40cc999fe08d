"""Ops that combine values along some axes: pools (spatial axes), reductions and ArgMax/Min
(their `axes`), Softmax/LogSoftmax/Hardmax (their `axis`). Channels pass through untouched
when the op works on other axes; an op that combines values across channels stops the
analysis there."""

from __future__ import annotations

import onnx_ir as ir

from graphopt.passes.channels.handlers.base import (
    GraphView,
    Handler,
    Link,
    Port,
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


class ReduceHandler(Handler):
    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        if port not in (("in", 0), ("out", 0)):
            return refuse(f"the axes of {where(node)} are not channels")
        rank = g.rank(node.inputs[0])
        if rank is None:
            return refuse(f"the input rank of {where(node)} is unknown")
        if node.op_type in ("ArgMax", "ArgMin"):
            one = int_attr(node, "axis", 0)
            axes: list[int] | None = None if one is None else [one]
        elif len(node.inputs) > 1 and node.inputs[1] is not None:
            axes = g.ints(node.inputs[1])
            if axes is None:
                return refuse(f"the axes of {where(node)} are computed at run time")
        else:
            axes = ints_attr(node, "axes")
        keepdims = int_attr(node, "keepdims", 1)
        if axes is None or not axes:
            if int_attr(node, "noop_with_empty_axes", 0):
                return Visit(links=[Link(_other(port), axis)])
            return refuse(f"{where(node)} reduces over every axis, the channel axis too")
        reduced = sorted(a % rank for a in axes)
        kept = [a for a in range(rank) if keepdims or a not in reduced]
        if port == ("in", 0):
            if axis in reduced:
                return refuse(f"{where(node)} reduces over the channel axis")
            return Visit(links=[Link(("out", 0), kept.index(axis))])
        return Visit(links=[Link(("in", 0), kept[axis])])


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

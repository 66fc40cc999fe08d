"""QuantizeLinear and DequantizeLinear: per-tensor parameters pass every axis through; per-axis
scales and zero points along the channel axis are channel slots and get sliced."""

from __future__ import annotations

import onnx_ir as ir

from graphopt.passes.channels.handlers.base import (
    GraphView,
    Handler,
    Link,
    Port,
    Visit,
    int_attr,
    normalize_axis,
    refuse,
    where,
)


class QDQHandler(Handler):
    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        if int_attr(node, "block_size", 0):
            return refuse(f"{where(node)} is blocked (block_size), not per axis")
        rank = g.rank(node.inputs[0])
        scale_rank = g.rank(node.inputs[1])
        q_axis = int_attr(node, "axis", 1)
        if rank is None or scale_rank is None or q_axis is None:
            return refuse(f"the shapes or axis of {where(node)} are unknown")
        per_axis = scale_rank == 1 and (g.shape(node.inputs[1]) or (1,))[0] != 1
        q_axis = normalize_axis(q_axis, rank) if per_axis else None
        data: list[Port] = [("in", 0), ("out", 0)]
        params: list[Port] = [("in", i) for i in (1, 2) if i < len(node.inputs) and node.inputs[i]]
        if port in params:
            if not per_axis:
                return refuse(f"the parameters of {where(node)} are per tensor")
            return Visit(
                links=[Link(p, q_axis) for p in data]  # type: ignore[arg-type]
                + [Link(p, 0) for p in params if p != port]
            )
        links = [Link(p, axis) for p in data if p != port]
        if per_axis and axis == q_axis:
            links += [Link(p, 0) for p in params]
        return Visit(links=links)

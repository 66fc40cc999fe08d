"""Gemm and MatMul: each operand axis is a row (M), reduction (K), output-column (N) or batch
axis. N channels are created from the weight's columns (a source when the weight is a
constant); K channels are read through the weight's rows (a consumer); M and batch axes carry
through to the output."""

from __future__ import annotations

import onnx_ir as ir

from graphopt.passes.channels.handlers.base import (
    GraphView,
    Handler,
    Link,
    Port,
    Visit,
    int_attr,
    refuse,
    where,
)

_A: Port = ("in", 0)
_B: Port = ("in", 1)
_C: Port = ("in", 2)
_Y: Port = ("out", 0)


class GemmHandler(Handler):
    """Y = alpha * A' B' + beta * C, A' = A or A^T, B' = B or B^T; C broadcasts to [M, N]."""

    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        trans_a, trans_b = int_attr(node, "transA", 0), int_attr(node, "transB", 0)
        if trans_a is None or trans_b is None:
            return refuse(f"transA/transB of {where(node)} are not plain ints")
        roles = {
            (_A, trans_a): "M", (_A, 1 - trans_a): "K",
            (_B, trans_b): "K", (_B, 1 - trans_b): "N",
            (_Y, 0): "M", (_Y, 1): "N",
        }  # fmt: skip
        c_axis = None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c_shape = g.shape(node.inputs[2])
            y_shape = g.shape(node.outputs[0])
            if c_shape is None or y_shape is None:
                return refuse(f"the shape of C or Y of {where(node)} is unknown")
            if len(c_shape) >= 1 and c_shape[-1] == y_shape[1] and y_shape[1] != 1:
                c_axis = len(c_shape) - 1
                roles[(_C, c_axis)] = "N"
        kind = roles.get((port, axis))
        if kind is None:
            return refuse(f"axis {axis} of {port[0]}put {port[1]} of {where(node)} is a row axis")
        if kind == "M":
            return refuse(f"the row axis (M) of {where(node)} is not a channel axis")
        links = [
            Link(p, a, role="weight" if p == _B else "")
            for (p, a), k in roles.items()
            if k == kind and (p, a) != (port, axis)
        ]
        weighted = g.weight_like(node.inputs[1])
        return Visit(
            links=links,
            source=kind == "N" and weighted,
            consumer=kind == "K" and weighted,
            role="weight" if port == _B else "",
        )


class MatMulHandler(Handler):
    """numpy.matmul of operands of rank >= 2, batch axes broadcast."""

    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        shapes = [g.shape(node.inputs[0]), g.shape(node.inputs[1]), g.shape(node.outputs[0])]
        if any(s is None for s in shapes):
            return refuse(f"the operand shapes of {where(node)} are unknown")
        a, b, y = shapes  # type: ignore[misc]
        if len(a) < 2 or len(b) < 2:  # type: ignore[arg-type]
            return refuse(f"{where(node)} multiplies a vector (rank-1 operand)")
        ra, rb, ry = len(a), len(b), len(y)  # type: ignore[arg-type]
        members: dict[str, list[tuple[Port, int]]] = {
            "K": [(_A, ra - 1), (_B, rb - 2)],
            "N": [(_B, rb - 1), (_Y, ry - 1)],
            "M": [(_A, ra - 2), (_Y, ry - 2)],
        }
        kind = next((k for k, ms in members.items() if (port, axis) in ms), None)
        if kind is None:
            # a batch axis: align from the right; an operand with 1 there broadcasts.
            out_axis = axis + ry - (ra if port == _A else rb if port == _B else ry)
            group = [(_Y, out_axis)]
            for p, shape in ((_A, a), (_B, b)):
                p_axis = out_axis - (ry - len(shape))  # type: ignore[arg-type]
                if p_axis < 0:
                    continue
                if shape[p_axis] == y[out_axis]:  # type: ignore[index]
                    group.append((p, p_axis))
                elif shape[p_axis] != 1:  # type: ignore[index]
                    return refuse(f"batch axes of {where(node)} do not broadcast")
            members["batch"] = group
            kind = "batch"
        links = [
            Link(p, a_, role="weight" if p == _B and kind != "batch" else "")
            for p, a_ in members[kind]
            if (p, a_) != (port, axis)
        ]
        weighted = g.weight_like(node.inputs[1])
        return Visit(
            links=links,
            source=kind == "N" and weighted,
            consumer=kind == "K" and weighted,
            role="weight" if port == _B and weighted else "",
        )

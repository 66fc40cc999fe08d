"""Conv and ConvTranspose, plain, grouped and depthwise (with a channel multiplier).

Conv weights are [C_out, C_in/group, k...]; ConvTranspose weights are [C_in, C_out/group, k...].
The axis that counts channels of the whole tensor (Conv: outputs, ConvTranspose: inputs) is a
slot tied to the activation; the per-group axis of a grouped weight is not (its index i means
channel i of *each* group), so `rewrite` slices it per group, and every group keeps the same
number of channels. A depthwise op (one input channel per group) ties each input channel to
its group's outputs, and loses whole groups: its `group` attribute is rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.passes.channels.handlers.base import (
    GraphView,
    Handler,
    Link,
    Port,
    Rewriter,
    Visit,
    int_attr,
    refuse,
    where,
)


@dataclass(frozen=True)
class _Layout:
    groups: int
    c_in: int
    c_out: int
    depthwise: bool  # one input channel per group (and group > 1)
    transpose: bool

    @property
    def multiplier(self) -> int:
        return self.c_out // self.groups


def _layout(node: ir.Node, g: GraphView) -> _Layout | str:
    transpose = node.op_type == "ConvTranspose"
    groups = int_attr(node, "group", 1)
    if groups is None or groups < 1:
        return f"the group attribute of {where(node)} is not a plain positive int"
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return f"{where(node)} has no weight"
    shape = g.shape(node.inputs[1])
    if shape is None or len(shape) < 3 or not all(isinstance(d, int) for d in shape):
        return f"the weight shape of {where(node)} is unknown"
    if transpose:
        c_in, c_out = shape[0], shape[1] * groups  # type: ignore[operator]
        per_group_in = c_in // groups  # type: ignore[operator]
    else:
        c_out, c_in = shape[0], shape[1] * groups  # type: ignore[operator]
        per_group_in = shape[1]
    if c_in % groups or c_out % groups:  # type: ignore[operator]
        return f"the channels of {where(node)} do not divide into {groups} groups"
    return _Layout(groups, c_in, c_out, groups > 1 and per_group_in == 1, transpose)  # type: ignore[arg-type]


class ConvHandler(Handler):
    """Conv and ConvTranspose."""

    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        lay = _layout(node, g)
        if isinstance(lay, str):
            return refuse(lay)
        grouped = lay.groups > 1 and not lay.depthwise
        weight: Port = ("in", 1)
        w_out_axis, w_in_axis = (1, 0) if lay.transpose else (0, 1)
        # The weight axis that counts all channels of a side is tied to that side; a
        # per-group axis (grouped) or a size-1 / multiplier axis (depthwise) is not.
        out_side: list[tuple[Port, int]] = [(("out", 0), 1)]
        if lay.groups == 1 or not lay.transpose:
            out_side.append((weight, w_out_axis))
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            out_side.append((("in", 2), 0))
        in_side: list[tuple[Port, int]] = [(("in", 0), 1)]
        if lay.groups == 1 or lay.transpose:
            in_side.append((weight, w_in_axis))
        here = (port, axis)
        if here in out_side:
            side, other = out_side, in_side
        elif here in in_side:
            side, other = in_side, out_side
        elif port == weight:
            return refuse(f"weight axis {axis} of grouped {where(node)} counts channels per group")
        else:
            return refuse(
                f"axis {axis} of {port[0]}put {port[1]} of {where(node)} is not a channel axis"
            )
        if grouped:
            if len(node.inputs[1].uses()) > 1:
                return refuse(f"the weight of grouped {where(node)} is shared with other nodes")
            if g.array(node.inputs[1]) is None:
                return refuse(f"the weight of grouped {where(node)} is not a constant")
        links = [
            Link(p, a, role="weight" if p == weight else "") for p, a in side if (p, a) != here
        ]
        if lay.depthwise:
            # input channel c feeds outputs [c*m, (c+1)*m)
            outs = np.arange(lay.c_out)
            ins = outs // lay.multiplier
            pairs = (ins, outs) if side is in_side else (outs, ins)
            links += [
                Link(p, a, pairs=pairs, role="weight" if p == weight else "") for p, a in other
            ]
        weighted = g.weight_like(node.inputs[1]) and not lay.depthwise
        is_out = side is out_side
        return Visit(
            links=links,
            source=is_out and weighted,
            consumer=not is_out and weighted,
            role="weight" if port == weight else "",
            blocks=lay.groups if grouped else 1,
        )

    def rewrite(self, node: ir.Node, rw: Rewriter) -> None:
        lay = _layout(node, rw.view)
        assert not isinstance(lay, str)
        x, y, w = node.inputs[0], node.outputs[0], node.inputs[1]
        if lay.depthwise:
            new_in = rw.new_size(x, 1)
            if new_in is not None and new_in != lay.c_in:
                node.attributes["group"] = ir.AttrInt64("group", new_in)
            return
        if lay.groups == 1:
            return
        array = rw.view.array(w)
        assert array is not None
        # rows: the weight axis 0 (all channels of one side); cols: axis 1, per group.
        row_value, col_value = (x, y) if lay.transpose else (y, x)
        rows_total, cols_total = (lay.c_in, lay.c_out) if lay.transpose else (lay.c_out, lay.c_in)
        row_removed = rw.removed(row_value, 1)
        col_removed = rw.removed(col_value, 1)
        if not len(row_removed) and not len(col_removed):
            return
        rows = np.setdiff1d(np.arange(rows_total), row_removed)
        per_group = cols_total // lay.groups
        keep_cols = np.setdiff1d(np.arange(cols_total), col_removed)
        local = [keep_cols[keep_cols // per_group == k] - k * per_group for k in range(lay.groups)]
        if len({len(c) for c in local}) != 1:
            raise RuntimeError(f"{where(node)}: groups keep unequal channel counts")
        table = np.stack(local)  # [groups, kept per group]
        cols = table[rows // (rows_total // lay.groups)]
        rw.set_weight(w, array[rows[:, None], cols])

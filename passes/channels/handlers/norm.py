"""Normalizations: BatchNormalization and InstanceNormalization (per channel, so removing a
channel leaves the others exact) and LayerNormalization (normalizes over its trailing axes:
every channel there is one residual stream, and removing channels changes the statistics of
the others, so such groups are marked lossy), GroupNormalization (whole groups).

LayerNormalization stays lossy even for channels that were zero: it subtracts the mean, so
keeping the original denominator (as the RMSNorm written out with ReduceMean is given, see
`reduce`) would fix the mean but not the variance, which then includes the removed channels'
(-mean)² terms; only decomposing the op could make it exact, and removing channels that are
not zero is an approximation in both cases."""

from __future__ import annotations

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
    normalize_axis,
    refuse,
    where,
)


class PerChannelNormHandler(Handler):
    """BatchNormalization (scale, bias, mean, var) and InstanceNormalization (scale, bias):
    one parameter per channel on axis 1."""

    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        del g
        if node.op_type == "BatchNormalization":
            if int_attr(node, "training_mode", 0) != 0 or any(v.uses() for v in node.outputs[1:]):
                return refuse(f"{where(node)} runs in training mode")
            if int_attr(node, "spatial", 1) != 1:
                return refuse(f"{where(node)} has spatial=0 (one parameter per element)")
        params = [("in", i) for i in range(1, len(node.inputs)) if node.inputs[i] is not None]
        activation_ports: list[Port] = [("in", 0), ("out", 0)]
        if port in activation_ports:
            links = [Link(p, axis) for p in activation_ports if p != port]
            if axis == 1:
                links += [Link(p, 0, role=_role(node, p)) for p in params]  # type: ignore[arg-type]
            return Visit(links=links)
        if axis != 0:
            return refuse(f"axis {axis} of a parameter of {where(node)}")
        links = [Link(p, 1) for p in activation_ports]
        links += [Link(p, 0, role=_role(node, p)) for p in params if p != port]  # type: ignore[arg-type]
        return Visit(links=links, role=_role(node, port))


def _role(node: ir.Node, port: Port) -> str:
    return "bn-scale" if node.op_type == "BatchNormalization" and port == ("in", 1) else ""


class LayerNormHandler(Handler):
    """LayerNormalization(axis=k): axes before k carry through; axes from k on are normalized
    together with the scale and bias (aligned from the right)."""

    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        if any(v.uses() or v.is_graph_output() for v in node.outputs[1:]):
            return refuse(f"the mean or inverse deviation output of {where(node)} is used")
        rank = g.rank(node.inputs[0])
        k = int_attr(node, "axis", -1)
        if rank is None or k is None or (k := normalize_axis(k, rank)) is None:
            return refuse(f"the rank or axis of {where(node)} is unknown")
        activation_ports: list[Port] = [("in", 0), ("out", 0)]
        params: list[tuple[Port, int]] = []
        if port in activation_ports:
            x_axis = axis
        else:
            p_rank = g.rank(node.inputs[port[1]])
            if p_rank is None:
                return refuse(f"the parameter shapes of {where(node)} are unknown")
            x_axis = axis + rank - p_rank
        if x_axis >= k:
            size = (g.shape(node.inputs[0]) or ())[x_axis]
            for i in (1, 2):
                if i < len(node.inputs) and node.inputs[i] is not None:
                    shape = g.shape(node.inputs[i])
                    if shape is None:
                        return refuse(f"the parameter shapes of {where(node)} are unknown")
                    p_axis = x_axis - (rank - len(shape))
                    if p_axis >= 0 and shape[p_axis] == size:
                        params.append((("in", i), p_axis))
                    elif p_axis >= 0 and shape[p_axis] != 1:
                        return refuse(f"a parameter of {where(node)} does not broadcast")
        links = [Link(p, x_axis) for p in activation_ports if p != port]
        links += [Link(p, a) for p, a in params if (p, a) != (port, axis)]
        lossy = None
        if x_axis >= k:
            lossy = (
                f"{where(node)} normalizes over these channels: removing any changes the "
                "mean and variance the others are scaled by"
            )
        return Visit(links=links, lossy=lossy)


class GroupNormHandler(Handler):
    """GroupNormalization(num_groups=G): each group of C/G channels is normalized together,
    so channels go a whole group at a time (removing all-zero groups leaves the others
    exact); `num_groups` is rewritten. Scale and bias are per group ([G], opset 18) or per
    channel ([C], opset 21)."""

    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        shape = g.shape(node.inputs[0])
        groups = int_attr(node, "num_groups", 0)
        if shape is None or len(shape) < 2 or not isinstance(shape[1], int) or not groups:
            return refuse(f"the channel count or num_groups of {where(node)} is unknown")
        channels = shape[1]
        if channels % groups:
            return refuse(f"the channels of {where(node)} do not divide into {groups} groups")
        per = channels // groups
        params = [("in", i) for i in (1, 2) if i < len(node.inputs) and node.inputs[i] is not None]
        sizes = [(g.shape(node.inputs[p[1]]) or (None,))[0] for p in params]
        if any(s not in (groups, channels) for s in sizes):
            return refuse(f"the scale or bias of {where(node)} has an unexpected shape")
        activation_ports: list[Port] = [("in", 0), ("out", 0)]
        c = np.arange(channels)
        if port in activation_ports:
            links = [Link(p, axis) for p in activation_ports if p != port]
            if axis != 1:
                return Visit(links=links)
            # the channels of one group are one unit: tie each to its group's first channel
            links.append(Link(port, 1, pairs=(c, c // per * per)))
            for p, size in zip(params, sizes, strict=True):
                links.append(Link(p, 0, pairs=(c, c // per) if size == groups else None))  # type: ignore[arg-type]
            return Visit(links=links)
        if axis != 0:
            return refuse(f"axis {axis} of a parameter of {where(node)}")
        mine = sizes[params.index(port)]  # type: ignore[arg-type]
        pairs = (c // per, c) if mine == groups else None
        links = [Link(p, 1, pairs=pairs) for p in activation_ports]
        for p, size in zip(params, sizes, strict=True):
            if p != port:
                links.append(Link(p, 0, pairs=None if size == mine else (c // per, c)))  # type: ignore[arg-type]
        return Visit(links=links)

    def rewrite(self, node: ir.Node, rw: Rewriter) -> None:
        shape = rw.view.shape(node.inputs[0])
        groups = int_attr(node, "num_groups", 0)
        assert shape is not None and groups
        new = rw.new_size(node.inputs[0], 1)
        if new is not None and new != shape[1]:
            per = int(shape[1]) // groups  # type: ignore[arg-type]
            node.attributes["num_groups"] = ir.AttrInt64("num_groups", new // per)

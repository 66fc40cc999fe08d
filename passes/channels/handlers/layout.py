"""Ops that move, cut or join axes without computing across channels: Concat, Split, Slice
(channels at an offset), Transpose, Squeeze, Unsqueeze (the axis moves), Pad and Resize (the
channel axis must be left as it is). Split sizes, Slice starts/ends and Resize sizes encode
channel counts and are rewritten."""

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
    ints_attr,
    normalize_axis,
    refuse,
    where,
)


def _all_ports(node: ir.Node) -> list[Port]:
    ports: list[Port] = [("in", i) for i, v in enumerate(node.inputs) if v is not None]
    return ports + [("out", j) for j in range(len(node.outputs))]


def _offsets(sizes: list[int]) -> list[int]:
    return [int(v) for v in np.cumsum([0, *sizes])[:-1]]


def _piece_links(
    port: Port, whole: Port, pieces: list[Port], sizes: list[int], starts: list[int], axis: int
) -> list[Link]:
    """Links between one whole tensor and pieces that cover [start, start+size) of it."""
    if port == whole:
        return [
            Link(p, axis, pairs=(s + np.arange(n), np.arange(n)))
            for p, n, s in zip(pieces, sizes, starts, strict=True)
            if n
        ]
    i = pieces.index(port)
    n, s = sizes[i], starts[i]
    return [Link(whole, axis, pairs=(np.arange(n), s + np.arange(n)))] if n else []


class ConcatHandler(Handler):
    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        rank = g.rank(node.outputs[0])
        cat = int_attr(node, "axis", 0)
        if rank is None or cat is None or (cat := normalize_axis(cat, rank)) is None:
            return refuse(f"the rank or axis of {where(node)} is unknown")
        inputs: list[Port] = [("in", i) for i in range(len(node.inputs))]
        if axis != cat:
            return Visit(links=[Link(p, axis) for p in _all_ports(node) if p != port])
        sizes = [(g.shape(v) or (None,) * rank)[cat] for v in node.inputs]
        if not all(isinstance(s, int) for s in sizes):
            return refuse(f"an input of {where(node)} has an unknown size on the channel axis")
        return Visit(
            links=_piece_links(port, ("out", 0), inputs, sizes, _offsets(sizes), axis)  # type: ignore[arg-type]
        )


def split_sizes(node: ir.Node, g: GraphView, dim: int) -> list[int] | str:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = g.ints(node.inputs[1])
        if sizes is None:
            return f"the split sizes of {where(node)} are computed at run time"
    elif (attr := ints_attr(node, "split")) is not None:
        sizes = attr
    else:
        n = len(node.outputs)
        chunk = -(-dim // n)
        sizes = [min(chunk, max(dim - chunk * i, 0)) for i in range(n)]
    if sum(sizes) != dim or len(sizes) != len(node.outputs):
        return f"the split sizes of {where(node)} do not add up to its input"
    return sizes


class SplitHandler(Handler):
    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        shape = g.shape(node.inputs[0])
        axis_attr = int_attr(node, "axis", 0)
        if shape is None or axis_attr is None:
            return refuse(f"the input shape or axis of {where(node)} is unknown")
        cut = normalize_axis(axis_attr, len(shape))
        if port[0] == "in" and port[1] != 0:
            return refuse(f"the split sizes of {where(node)} are not channels")
        if axis != cut:
            ports: list[Port] = [("in", 0), *(("out", j) for j in range(len(node.outputs)))]
            return Visit(links=[Link(p, axis) for p in ports if p != port])
        dim = shape[cut]
        if not isinstance(dim, int):
            return refuse(f"the size of the split axis of {where(node)} is unknown")
        sizes = split_sizes(node, g, dim)
        if isinstance(sizes, str):
            return refuse(sizes)
        outputs: list[Port] = [("out", j) for j in range(len(node.outputs))]
        return Visit(links=_piece_links(port, ("in", 0), outputs, sizes, _offsets(sizes), axis))

    def rewrite(self, node: ir.Node, rw: Rewriter) -> None:
        shape = rw.view.shape(node.inputs[0])
        assert shape is not None
        cut = normalize_axis(int_attr(node, "axis", 0) or 0, len(shape))
        if not len(rw.removed(node.inputs[0], cut)):  # type: ignore[arg-type]
            return
        sizes = [rw.new_size(v, cut) for v in node.outputs]  # type: ignore[arg-type]
        if any(s is None for s in sizes):
            raise RuntimeError(f"{where(node)}: an output lost its shape")
        array = np.asarray(sizes, np.int64)
        if rw.view.opset >= 13:
            if len(node.inputs) < 2:
                node.resize_inputs(2)
            rw.set_input(node, 1, array, node.outputs[0].name or "split")
            node.attributes.pop("num_outputs", None)
        else:
            node.attributes["split"] = ir.AttrInt64s("split", array.tolist())


def _slice_params(node: ir.Node, g: GraphView) -> tuple[list[int], ...] | str:
    if g.opset >= 10:
        values = [g.ints(v) if v is not None else None for v in node.inputs[1:5]]
        values += [None] * (4 - len(values))
        given = [v for v in node.inputs[1:5] if v is not None]
        if any(g.ints(v) is None for v in given):
            return f"the starts/ends/axes/steps of {where(node)} are computed at run time"
        starts, ends, axes, steps = values
    else:
        starts, ends, axes = (
            ints_attr(node, "starts"),
            ints_attr(node, "ends"),
            ints_attr(node, "axes"),
        )
        steps = None
    if starts is None or ends is None:
        return f"{where(node)} has no starts or ends"
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    return starts, ends, axes, steps


def _slice_range(node: ir.Node, g: GraphView, axis: int) -> tuple[int, int] | None | str:
    """(start, end) of the slice on `axis` with step 1 and bounds clamped; None when the
    slice leaves the axis alone."""
    params = _slice_params(node, g)
    if isinstance(params, str):
        return params
    starts, ends, axes, steps = params
    shape = g.shape(node.inputs[0])
    if shape is None:
        return f"the input shape of {where(node)} is unknown"
    rank = len(shape)
    hits = [i for i, a in enumerate(axes) if normalize_axis(a, rank) == axis]
    if not hits:
        return None
    i = hits[0]
    dim = shape[axis]
    if not isinstance(dim, int):
        return f"the size of the sliced axis of {where(node)} is unknown"
    if steps[i] != 1:
        return f"{where(node)} slices the channel axis with step {steps[i]}"
    start, end = starts[i], ends[i]
    start = min(max(start + dim if start < 0 else start, 0), dim)
    end = min(max(end + dim if end < 0 else end, 0), dim)
    return start, max(start, end)


class SliceHandler(Handler):
    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        if port not in (("in", 0), ("out", 0)):
            return refuse(f"the parameters of {where(node)} are not channels")
        span = _slice_range(node, g, axis)
        if isinstance(span, str):
            return refuse(span)
        other: Port = ("out", 0) if port == ("in", 0) else ("in", 0)
        if span is None:
            return Visit(links=[Link(other, axis)])
        start, end = span
        links = _piece_links(port, ("in", 0), [("out", 0)], [end - start], [start], axis)
        return Visit(links=links)

    def rewrite(self, node: ir.Node, rw: Rewriter) -> None:
        shape = rw.view.shape(node.inputs[0])
        assert shape is not None
        params = _slice_params(node, rw.view)
        assert not isinstance(params, str)
        starts, ends, axes, _ = (list(p) for p in params)
        changed = False
        for i, a in enumerate(axes):
            axis = normalize_axis(a, len(shape))
            removed = rw.removed(node.inputs[0], axis)  # type: ignore[arg-type]
            if not len(removed):
                continue
            span = _slice_range(node, rw.view, axis)  # type: ignore[arg-type]
            assert isinstance(span, tuple)
            kept = rw.kept(node.inputs[0], axis, shape[axis])  # type: ignore[arg-type]
            new_start = int(np.count_nonzero(kept < span[0]))
            starts[i] = new_start
            ends[i] = new_start + int(np.count_nonzero((kept >= span[0]) & (kept < span[1])))
            changed = True
        if not changed:
            return
        if rw.view.opset >= 10:
            base = node.outputs[0].name or "slice"
            dtype = rw.view.array(node.inputs[1]).dtype  # type: ignore[union-attr]
            rw.set_input(node, 1, np.asarray(starts, dtype), f"{base}_starts")
            rw.set_input(node, 2, np.asarray(ends, dtype), f"{base}_ends")
        else:
            node.attributes["starts"] = ir.AttrInt64s("starts", starts)
            node.attributes["ends"] = ir.AttrInt64s("ends", ends)


class TransposeHandler(Handler):
    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        rank = g.rank(node.inputs[0])
        perm = ints_attr(node, "perm")
        if rank is None:
            return refuse(f"the rank of the input of {where(node)} is unknown")
        perm = perm if perm is not None else list(reversed(range(rank)))
        if port == ("in", 0):
            return Visit(links=[Link(("out", 0), perm.index(axis))])
        return Visit(links=[Link(("in", 0), perm[axis])])


def _axes(node: ir.Node, g: GraphView) -> list[int] | None | str:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = g.ints(node.inputs[1])
        return axes if axes is not None else f"the axes of {where(node)} are computed at run time"
    return ints_attr(node, "axes")


class SqueezeHandler(Handler):
    """Squeeze and Unsqueeze: the channel axis moves by the number of axes removed or
    inserted before it."""

    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        if port not in (("in", 0), ("out", 0)):
            return refuse(f"the axes of {where(node)} are not channels")
        axes = _axes(node, g)
        if isinstance(axes, str):
            return refuse(axes)
        in_shape, out_shape = g.shape(node.inputs[0]), g.shape(node.outputs[0])
        if in_shape is None or out_shape is None:
            return refuse(f"the shapes around {where(node)} are unknown")
        squeeze = node.op_type == "Squeeze"
        full, short = (in_shape, out_shape) if squeeze else (out_shape, in_shape)
        if axes is None:
            if not squeeze:
                return refuse(f"{where(node)} has no axes")
            dropped = [i for i, d in enumerate(full) if d == 1]
        else:
            dropped = sorted(a % len(full) for a in axes)
        kept = [i for i in range(len(full)) if i not in dropped]
        if len(kept) != len(short):
            return refuse(f"the axes of {where(node)} do not match its shapes")
        on_full = (port == ("in", 0)) == squeeze
        other: Port = ("out", 0) if port == ("in", 0) else ("in", 0)
        if on_full:
            if axis in dropped:
                return refuse(f"{where(node)} removes or adds the channel axis")
            return Visit(links=[Link(other, kept.index(axis))])
        return Visit(links=[Link(other, kept[axis])])


class PadHandler(Handler):
    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        if port not in (("in", 0), ("out", 0)):
            return refuse(f"the parameters of {where(node)} are not channels")
        rank = g.rank(node.inputs[0])
        if rank is None:
            return refuse(f"the rank of the input of {where(node)} is unknown")
        if g.opset >= 11:
            pads = g.ints(node.inputs[1]) if len(node.inputs) > 1 else None
            axes = g.ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else None
            if len(node.inputs) > 3 and node.inputs[3] is not None and axes is None:
                return refuse(f"the axes of {where(node)} are computed at run time")
        else:
            pads = ints_attr(node, "pads") or ints_attr(node, "paddings")
            axes = None
        if pads is None:
            return refuse(f"the pads of {where(node)} are computed at run time")
        axes = [a % rank for a in axes] if axes is not None else list(range(rank))
        if axis in axes:
            i = axes.index(axis)
            if pads[i] != 0 or pads[i + len(axes)] != 0:
                return refuse(f"{where(node)} pads the channel axis")
        other: Port = ("out", 0) if port == ("in", 0) else ("in", 0)
        return Visit(links=[Link(other, axis)])


class ResizeHandler(Handler):
    """Resize and Upsample: the channel axis must keep its size (scale 1)."""

    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        if port not in (("in", 0), ("out", 0)):
            return refuse(f"the parameters of {where(node)} are not channels")
        in_shape, out_shape = g.shape(node.inputs[0]), g.shape(node.outputs[0])
        if in_shape is None or out_shape is None:
            return refuse(f"the shapes around {where(node)} are unknown")
        mode = node.attributes.get("coordinate_transformation_mode")
        if mode is not None and not mode.is_ref() and mode.as_string() == "tf_crop_and_resize":
            return refuse(f"{where(node)} crops (tf_crop_and_resize)")
        if not isinstance(in_shape[axis], int) or in_shape[axis] != out_shape[axis]:
            return refuse(f"{where(node)} resizes the channel axis")
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            if g.ints(node.inputs[3]) is None:
                return refuse(f"the sizes of {where(node)} are computed at run time")
        other: Port = ("out", 0) if port == ("in", 0) else ("in", 0)
        return Visit(links=[Link(other, axis)])

    def rewrite(self, node: ir.Node, rw: Rewriter) -> None:
        if len(node.inputs) < 4 or node.inputs[3] is None:
            return
        sizes = rw.view.ints(node.inputs[3])
        assert sizes is not None
        rank = rw.view.rank(node.inputs[0]) or 0
        axes = ints_attr(node, "axes")
        axes = [a % rank for a in axes] if axes is not None else list(range(rank))
        new = list(sizes)
        for i, a in enumerate(axes):
            size = rw.new_size(node.outputs[0], a)
            if size is not None and len(rw.removed(node.outputs[0], a)):
                new[i] = size
        if new != sizes:
            rw.set_input(node, 3, np.asarray(new, np.int64), f"{node.outputs[0].name}_sizes")

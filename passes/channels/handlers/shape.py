"""Shape arithmetic and the ops that read it: Shape, Gather, Expand, Tile.

Exporters compute shapes at run time: PyTorch writes `x.shape[0]` as Shape -> Gather and
builds Reshape and Expand targets with Unsqueeze -> Concat. Two things follow.

- `shape_vector` evaluates such a small integer vector from the shapes the analysis knows
  (ints, dim names, None), so Reshape and Expand know their targets.
- A Shape of a tensor whose channels are removed hands the *new* channel count to whatever
  reads it. `channel_readers` follows that element through the shape arithmetic (Gather,
  Slice, Concat, Unsqueeze, Cast, element-wise integer ops, ...) and accepts it only where it
  ends in the target of a Reshape or an Expand, which removal then replaces by a constant
  holding the new counts (`freeze_reshape`, `freeze_expand`). An element read by anything else
  (a Range, a ConstantOfShape, a float scale) refuses the group, naming the op; elements
  that are not the channel count (the batch size, the sequence length) are free to go
  anywhere.

Gather of data on another axis than the channels (`x[:, 0]`, embedding tables) carries the
channels; Expand and Tile carry them when they do not broadcast the channel axis.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.channels.handlers.base import (
    Dim,
    GraphView,
    Handler,
    Link,
    Port,
    Rewriter,
    Visit,
    dim_product,
    dim_quotient,
    int_attr,
    monomial,
    normalize_axis,
    refuse,
    where,
)
from graphopt.passes.cleanup.common import ONNX_DOMAINS

Entry = int | str | None  # a known int, a dim name, unknown
_MAX_LEN = 16  # shape vectors are short; longer integer tensors are data, not shapes
_PASS_OPS = ("Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten")
_ARITH_OPS = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Mod")


def _onnx(node: ir.Node | None) -> bool:
    return node is not None and node.domain in ONNX_DOMAINS


def shape_vector(value: ir.Value | None, g: GraphView, _depth: int = 0) -> list[Entry] | None:
    """The entries of a small integer vector (or scalar) computed from shapes and constants,
    or None when it cannot be followed. Memoized on the view."""
    if value is None or _depth > 64:
        return None
    # keyed by id, holding the value too: a value made by a rewrite may reuse a freed id
    memo = g.__dict__.setdefault("_shape_vectors", {})
    hit = memo.get(id(value))
    if hit is None or hit[0] is not value:
        hit = memo[id(value)] = (value, _evaluate(value, g, _depth))
    return hit[1]


def _evaluate(value: ir.Value, g: GraphView, depth: int) -> list[Entry] | None:
    array = g.array(value)
    if array is not None:
        if not np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
            return None
        flat = array.reshape(-1)
        return [int(v) for v in flat] if flat.size <= _MAX_LEN else None
    node = value.producer()
    if not _onnx(node):
        return None
    assert node is not None
    op = node.op_type

    def arg(i: int) -> list[Entry] | None:
        return shape_vector(node.inputs[i], g, depth + 1) if i < len(node.inputs) else None

    if op == "Shape":
        shape = g.shape(node.inputs[0])
        if shape is None:
            return None
        start = int_attr(node, "start", 0) or 0
        end = int_attr(node, "end", len(shape))
        return list(shape[slice(start, end)])
    if op == "Size":
        shape = g.shape(node.inputs[0])
        if shape is None or not all(isinstance(d, int) for d in shape):
            return [None]
        return [int(np.prod(shape))]  # type: ignore[arg-type]
    if op in _PASS_OPS:
        return arg(0)
    if op == "Gather":
        data, idx = arg(0), g.ints(node.inputs[1])
        if data is None or idx is None or (int_attr(node, "axis", 0) or 0) != 0:
            return None
        n = len(data)
        if any(not -n <= i < n for i in idx):
            return None
        return [data[i] for i in idx]
    if op == "Slice":
        data = arg(0)
        params = [g.ints(v) if v is not None else None for v in node.inputs[1:5]]
        if data is None or params[0] is None or params[1] is None:
            return None
        steps = params[3] if len(params) > 3 and params[3] is not None else [1]
        return data[slice(params[0][0], params[1][0], steps[0])]
    if op == "Concat":
        parts = [shape_vector(v, g, depth + 1) for v in node.inputs]
        if any(p is None for p in parts):
            return None
        return [e for p in parts for e in p]  # type: ignore[union-attr]
    if op == "ConstantOfShape":
        size = arg(0)
        attr = node.attributes.get("value")
        fill = 0
        if attr is not None:
            tensor = attr.as_tensor().numpy().reshape(-1)
            if not np.issubdtype(tensor.dtype, np.integer):
                return None
            fill = int(tensor[0])
        if size is None or not all(isinstance(s, int) for s in size) or len(size) != 1:
            return None
        return [fill] * size[0] if size[0] <= _MAX_LEN else None  # type: ignore[operator]
    if op in (*_ARITH_OPS, "Equal", "Where"):
        args = [arg(i) for i in range(len(node.inputs))]
        if any(a is None for a in args):
            return None
        n = max(len(a) for a in args)  # type: ignore[arg-type]
        if any(len(a) not in (1, n) for a in args):  # type: ignore[arg-type]
            return None
        rows = [[a[i if len(a) > 1 else 0] for a in args] for i in range(n)]  # type: ignore[index]
        return [_apply(op, row) for row in rows]
    return None


def _apply(op: str, row: list[Entry]) -> Entry:
    if op == "Where":
        cond, a, b = row
        return None if not isinstance(cond, int) else (a if cond else b)
    a, b = row
    if op == "Equal":
        if isinstance(a, int) and isinstance(b, int):
            return int(a == b)
        if isinstance(a, str) and a == b:
            return 1
        # a dim is never negative: comparing one with -1 (as exporters do) is false
        if (isinstance(a, str) and isinstance(b, int) and b < 0) or (
            isinstance(b, str) and isinstance(a, int) and a < 0
        ):
            return 0
        return None
    if isinstance(a, int) and isinstance(b, int):
        if op == "Div":
            return None if b == 0 else int(a / b)  # ONNX integer division truncates
        if op == "Mod":
            return None if b == 0 else a % b
        return {"Add": a + b, "Sub": a - b, "Mul": a * b, "Max": max(a, b), "Min": min(a, b)}[op]
    if op == "Mul" and (a == 1 or b == 1):
        return b if a == 1 else a
    if op in ("Mul", "Div") and _positive(a) and _positive(b):
        # dims times dims (x.shape[2] * x.shape[3]); a quotient only when it is whole
        return dim_product([a, b]) if op == "Mul" else dim_quotient(a, b)
    if op in ("Add", "Sub") and b == 0:
        return a
    if op == "Div" and b == 1:
        return a
    return None


def _positive(entry: Entry) -> bool:
    term = monomial(entry)
    return term is not None and term[0] >= 1


# --------------------------------------------------------------------------- readers


def channel_readers(
    node: ir.Node, positions: set[int], g: GraphView
) -> tuple[list[ir.Node], str | None]:
    """Follow positions of the integer vector `node.outputs[0]` to where they are read.

    Returns the Reshape and Expand nodes whose targets they reach (those are frozen when the
    channels go), or the reason they reach something else."""
    terminals: list[ir.Node] = []
    seen: set[tuple[int, tuple[int, ...]]] = set()
    stack = [(node.outputs[0], frozenset(positions))]
    while stack:
        value, taint = stack.pop()
        if not taint or (id(value), tuple(sorted(taint))) in seen:
            continue
        seen.add((id(value), tuple(sorted(taint))))
        if value.is_graph_output():
            return [], f"'{value.name}', which holds a channel count, is a graph output"
        for use in value.uses():
            user, idx = use.node, use.idx
            if user.graph is not node.graph or not _onnx(user):
                return [], f"a channel count is read by {where(user)}"
            out = _follow(user, idx, value, taint, g)
            if isinstance(out, str):
                return [], out
            if out is None:
                terminals.append(user)
                continue
            stack.extend((user.outputs[0], frozenset(t)) for t in out)
    return terminals, None


def _follow(
    user: ir.Node, idx: int, value: ir.Value, taint: frozenset[int], g: GraphView
) -> list[set[int]] | str | None:
    """Tainted positions of `user`'s output; None for a Reshape/Expand target (a terminal);
    a reason when the channel count is read in a way removal cannot rewrite."""
    op = user.op_type
    reads = f"the channel count of a tensor is read by {where(user)}"
    if op in ("Reshape", "Expand") and idx == 1:
        problem = (freeze_reshape if op == "Reshape" else freeze_expand)(user, g, None)
        if isinstance(problem, str):
            return f"{reads}, whose target cannot be made constant: {problem}"
        return None
    if op == "Shape":
        return []  # only the length is read
    if op == "Cast" and _to_float(user):
        # e.g. the attention scale 1/sqrt(C // heads) computed from the stream's width:
        # the count it was exported with is a hyper-parameter; removal keeps it constant
        vector = shape_vector(value, g)
        if vector is None or not all(isinstance(v, int) for v in vector):
            return f"{reads} and is not a constant"
        return None
    if op in _PASS_OPS and idx == 0:
        return [set(taint)]
    if op == "Gather" and idx == 0 and (int_attr(user, "axis", 0) or 0) == 0:
        indices = g.ints(user.inputs[1])
        n = len(shape_vector(value, g) or [])
        if indices is None or not n:
            return reads
        return [{j for j, i in enumerate(indices) if i % n in taint}]
    if op == "Slice" and idx == 0:
        vector = shape_vector(value, g)
        starts = g.ints(user.inputs[1]) if len(user.inputs) > 1 else None
        ends = g.ints(user.inputs[2]) if len(user.inputs) > 2 else None
        steps = g.ints(user.inputs[4]) if len(user.inputs) > 4 and user.inputs[4] else [1]
        if vector is None or starts is None or ends is None or steps is None:
            return reads
        picked = list(range(len(vector)))[slice(starts[0], ends[0], steps[0])]
        return [{j for j, i in enumerate(picked) if i in taint}]
    if op == "Concat":
        offset = 0
        for k, v in enumerate(user.inputs):
            vector = shape_vector(v, g)
            if vector is None:
                return reads
            if k == idx:
                return [{offset + t for t in taint}]
            offset += len(vector)
        return reads
    if op in (*_ARITH_OPS, "Equal", "Where"):
        out = shape_vector(user.outputs[0], g)
        if out is None:
            return reads
        return [set(range(len(out))) if len(shape_vector(value, g) or []) == 1 else set(taint)]
    return reads


# --------------------------------------------------------------------------- freezing


def _to_float(node: ir.Node) -> bool:
    to = int_attr(node, "to", 0)
    return to is not None and ir.DataType(to).is_floating_point()


def _same_dim(a: Dim, b: Dim) -> bool:
    return a is not None and a == b


def frozen_reshape_spec(node: ir.Node, g: GraphView, sizes: dict[int, int]) -> list[int] | str:
    """A constant target for `node` (a Reshape) that makes what it makes now, with the sizes
    in `sizes` (output axis -> new size) on the axes that lose channels."""
    from graphopt.passes.channels.handlers.reshape import reshape_shapes

    shapes = reshape_shapes(node, g)
    if isinstance(shapes, str):
        return shapes
    in_shape, target = shapes
    spec: list[int] = []
    free = 0
    allowzero = int_attr(node, "allowzero", 0)
    for k, dim in enumerate(target):
        if k in sizes:
            spec.append(sizes[k])
        elif isinstance(dim, int):
            spec.append(dim)
        elif not allowzero and k < len(in_shape) and _same_dim(in_shape[k], dim):
            spec.append(0)
        else:
            spec.append(-1)
            free += 1
    if free > 1:
        return f"more than one dim of the target of {where(node)} is only known at run time"
    return spec


def _new_sizes(node: ir.Node, g: GraphView, rw: Rewriter | None) -> dict[int, int]:
    """Axis -> new size, for the axes of the node's output that lose channels (empty when
    only checking)."""
    sizes: dict[int, int] = {}
    if rw is not None:
        out = node.outputs[0]
        for k in range(len(g.shape(out) or ())):
            if len(rw.removed(out, k)):
                sizes[k] = rw.new_size(out, k)  # type: ignore[assignment]
    return sizes


def freeze_reshape(node: ir.Node, g: GraphView, rw: Rewriter | None) -> str | None:
    """Check (rw None) or make (rw given) the Reshape's computed target a constant."""
    if g.ints(node.inputs[1]) is not None:
        return None
    sizes = _new_sizes(node, g, rw)
    spec = frozen_reshape_spec(node, g, sizes)
    if isinstance(spec, str):
        return spec
    if rw is not None:
        rw.set_input(node, 1, np.asarray(spec, np.int64), f"{node.outputs[0].name}_shape")
    return None


def expand_output(node: ir.Node, g: GraphView) -> list[Dim] | str:
    """The output dims of an Expand, from its input's dims and its (evaluated) target."""
    in_shape = g.shape(node.inputs[0])
    target = shape_vector(node.inputs[1], g)
    if in_shape is None or target is None:
        return f"the shapes around {where(node)} are unknown"
    rank = max(len(in_shape), len(target))
    mine = [1] * (rank - len(in_shape)) + list(in_shape)
    theirs: list[Dim] = [1] * (rank - len(target)) + list(target)
    out: list[Dim] = []
    for a, b in zip(mine, theirs, strict=True):
        if b == 1 or _same_dim(a, b):
            out.append(a)
        elif a == 1:
            out.append(b)
        else:
            return f"{where(node)} expands dims that do not broadcast"
    return out


def _expand_spec(node: ir.Node, g: GraphView, sizes: dict[int, int]) -> list[int] | str:
    in_shape = g.shape(node.inputs[0])
    out_shape = expand_output(node, g)
    if isinstance(out_shape, str):
        return out_shape
    assert in_shape is not None
    spec: list[int] = []
    lead = len(out_shape) - len(in_shape)
    for k, dim in enumerate(out_shape):
        mine = in_shape[k - lead] if k >= lead else 1
        if _same_dim(mine, dim):
            spec.append(1)  # 1 keeps the input's dim, whatever it becomes
        elif k in sizes:
            spec.append(sizes[k])
        elif isinstance(dim, int):
            spec.append(dim)
        else:
            return f"{where(node)} broadcasts to a dim only known at run time"
    return spec


def freeze_expand(node: ir.Node, g: GraphView, rw: Rewriter | None) -> str | None:
    """Check (rw None) or make (rw given) the Expand's target a constant."""
    sizes = _new_sizes(node, g, rw)
    spec = _expand_spec(node, g, sizes)
    if isinstance(spec, str):
        return spec
    if rw is not None:
        if g.ints(node.inputs[1]) == spec and not sizes:
            return None
        rw.set_input(node, 1, np.asarray(spec, np.int64), f"{node.outputs[0].name}_shape")
    return None


# --------------------------------------------------------------------------- handlers


class ShapeHandler(Handler):
    """Shape(x) reads every dim of x: the channel count may only reach Reshape and Expand
    targets (made constant on removal), see `channel_readers`."""

    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        if port != ("in", 0):
            return refuse(f"{where(node)} makes a shape, not channels")
        rank = g.rank(node.inputs[0])
        if rank is None:
            return refuse(f"the rank of the input of {where(node)} is unknown")
        start = normalize_axis(int_attr(node, "start", 0) or 0, rank)
        end = int_attr(node, "end", rank)
        end = rank if end is None or end >= rank else end % rank if end < 0 else end
        if start is None or not start <= axis < end:
            return Visit()
        _, problem = channel_readers(node, {axis - start}, g)
        return refuse(problem) if problem else Visit()

    def rewrite(self, node: ir.Node, rw: Rewriter) -> None:
        rank = rw.view.rank(node.inputs[0]) or 0
        start = normalize_axis(int_attr(node, "start", 0) or 0, rank) or 0
        lost = [a - start for a in range(rank) if len(rw.removed(node.inputs[0], a))]
        terminals, problem = channel_readers(node, set(lost), rw.view)
        if problem:
            raise RuntimeError(f"{where(node)}: {problem}")
        for user in terminals:
            if user.op_type == "Cast":  # keeps the count it was exported with
                const = np.asarray(shape_vector(user.inputs[0], rw.view), np.int64)
                if rw.view.rank(user.inputs[0]) == 0:
                    const = const.reshape(())
                rw.set_input(user, 0, const, f"{user.outputs[0].name}_count")
                continue
            if rw.view.ints(user.inputs[1]) is None or user.op_type == "Expand":
                freeze = freeze_reshape if user.op_type == "Reshape" else freeze_expand
                problem = freeze(user, rw.view, rw)
                if problem:
                    raise RuntimeError(f"{where(user)}: {problem}")


class GatherHandler(Handler):
    """Gather(data, indices, axis): data axes other than `axis` carry to the output (shifted
    by the indices' rank); channels on `axis` itself are indexed, so they stop here."""

    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        if port == ("in", 1):
            return refuse(f"the indices of {where(node)} are not channels")
        data_rank = g.rank(node.inputs[0])
        idx_rank = g.rank(node.inputs[1])
        gaxis = int_attr(node, "axis", 0)
        if data_rank is None or idx_rank is None or gaxis is None:
            return refuse(f"the shapes or axis of {where(node)} are unknown")
        gaxis = normalize_axis(gaxis, data_rank)
        if gaxis is None:
            return refuse(f"the axis of {where(node)} is out of range")
        if port == ("in", 0):
            if axis == gaxis:
                return refuse(f"{where(node)} picks entries along the channel axis")
            out_axis = axis if axis < gaxis else axis + idx_rank - 1
            return Visit(links=[Link(("out", 0), out_axis)])
        if gaxis <= axis < gaxis + idx_rank:
            return refuse(f"the channel axis of {where(node)} comes from its indices")
        in_axis = axis if axis < gaxis else axis - idx_rank + 1
        return Visit(links=[Link(("in", 0), in_axis)])


class ExpandHandler(Handler):
    """Expand(x, shape): an axis x holds at its output's size carries through (the target is
    made constant, with 1 there, on removal); a broadcast channel axis is refused."""

    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        if port == ("in", 1):
            return refuse(f"the target shape of {where(node)} is not channels")
        in_shape, out_shape = g.shape(node.inputs[0]), expand_output(node, g)
        if in_shape is None or isinstance(out_shape, str):
            return refuse(f"the shapes around {where(node)} are unknown")
        lead = len(out_shape) - len(in_shape)
        out_axis = axis + lead if port == ("in", 0) else axis
        in_axis = out_axis - lead
        if in_axis < 0 or in_shape[in_axis] != out_shape[out_axis]:
            return refuse(f"{where(node)} broadcasts along the channel axis")
        target = shape_vector(node.inputs[1], g) or []
        entry = out_axis - (len(out_shape) - len(target))
        if not (0 <= entry < len(target) and target[entry] == 1):
            problem = freeze_expand(node, g, None)  # the target holds the channel count
            if problem:
                return refuse(problem)
        other: Port = ("out", 0) if port == ("in", 0) else ("in", 0)
        return Visit(links=[Link(other, out_axis if other == ("out", 0) else in_axis)])

    def rewrite(self, node: ir.Node, rw: Rewriter) -> None:
        if freeze_expand(node, rw.view, None):
            return  # its target keeps the channel axis (1 there), checked by `visit`
        freeze_expand(node, rw.view, rw)


class TileHandler(Handler):
    """Tile(x, repeats): output channel j is input channel j mod C; constant repeats stay
    right when C shrinks."""

    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        if port == ("in", 1):
            return refuse(f"the repeats of {where(node)} are not channels")
        repeats = g.ints(node.inputs[1])
        shape = g.shape(node.inputs[0])
        if repeats is None or shape is None or len(repeats) != len(shape):
            return refuse(f"the repeats of {where(node)} are computed at run time")
        size = shape[axis]
        if not isinstance(size, int):
            return refuse(f"the channel count at {where(node)} is not fixed")
        outs = np.arange(size * repeats[axis])
        ins = outs % size
        pairs = (ins, outs) if port == ("in", 0) else (outs, ins)
        other: Port = ("out", 0) if port == ("in", 0) else ("in", 0)
        return Visit(links=[Link(other, axis, pairs=pairs)])

"""Reshape and Flatten: the input and output dims are matched into blocks of equal product
(e.g. [N, C, H, W] -> [N, C*H*W] is the blocks N|N and C,H,W|CHW). A channel axis alone in its
block on one side maps to

- the one axis of the other side's block, index for index when the block is one axis each;
- when the other side is one axis of several of its dims merged: channel c to every position
  whose digit for the channel axis is c (a block of H*W for Flatten);
- when the other side splits it into several axes ([N, T, C] -> [N, T, h, d]): to the
  outermost of them, so channel c goes with c // d (whole heads stay together); a leading
  axis of 2 or 3 that stacks q/k/v ([N, T, 3, h, d]) is skipped, so head h of all three is
  one channel.

A channel axis in a block with several axes on both sides is refused. The Reshape shape
constant is rewritten with the new channel counts (0 and -1 entries are kept).

Dims only known at run time are names, and products of names ("H*W"), from shape inference.
Exporters build targets from the input's own shape (paddle2onnx:
Concat(Slice(Shape(x), 0, 2), [-1]) for [N, C, H, W] -> [N, C, H*W]); such an entry is the
name of the dim it reads, so it equals the input's dim exactly when inference proved them
equal, acts as a copy of it (like 0), and the -1 is what remains: H*W. A target computed so
is made constant on removal (`freeze_reshape`: 0 for the copies, the new channel counts).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx_ir as ir

from graphopt.passes.channels.handlers.base import (
    Dim,
    GraphView,
    Handler,
    Link,
    Monomial,
    Port,
    Rewriter,
    Visit,
    dim_of,
    dim_product,
    dim_quotient,
    int_attr,
    monomial,
    refuse,
    where,
)
from graphopt.passes.channels.handlers.shape import freeze_reshape, shape_vector

Block = tuple[list[int], list[int]]


def _divides(a: Monomial, b: Monomial) -> bool:
    if a[0] == 0 or b[0] % a[0]:
        return False
    rest = Counter(b[1])
    rest.subtract(a[1])
    return all(n >= 0 for n in rest.values())


def match_blocks(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> list[Block] | None:
    """Pair dims of `a` and `b` into consecutive blocks of equal product. Symbolic dims are
    products of names ("H*W" is H times W), so [N, C, H, W] and [N, C, H*W] pair N|N, C|C
    and H,W|H*W. None when they cannot be matched (an unknown dim, unequal products)."""
    ma, mb = [monomial(d) for d in a], [monomial(d) for d in b]
    if any(t is None for t in ma) or any(t is None for t in mb):
        return None
    blocks: list[Block] = []
    i = j = 0
    while i < len(a) and j < len(b):
        ai, bj = [i], [j]
        pa, pb = ma[i], mb[j]
        assert pa is not None and pb is not None
        i, j = i + 1, j + 1
        while pa != pb:
            if pa[1] or pb[1]:  # symbolic: grow the side that divides the other
                grow_a = _divides(pa, pb) or not _divides(pb, pa)
            else:
                grow_a = pa[0] < pb[0]
            if grow_a and i < len(a):
                pa = _times(pa, ma[i])
                ai.append(i)
                i += 1
            elif j < len(b):
                pb = _times(pb, mb[j])
                bj.append(j)
                j += 1
            else:
                return None
        blocks.append((ai, bj))
    # trailing size-1 dims join the last block
    rest_a, rest_b = list(range(i, len(a))), list(range(j, len(b)))
    if any(a[k] != 1 for k in rest_a) or any(b[k] != 1 for k in rest_b):
        return None
    if rest_a or rest_b:
        if not blocks:
            return None
        blocks[-1] = (blocks[-1][0] + rest_a, blocks[-1][1] + rest_b)
    return blocks


def _times(a: Monomial, b: Monomial | None) -> Monomial:
    assert b is not None
    return (a[0] * b[0], tuple(sorted(a[1] + b[1])))


def axis_map(
    here: tuple[Dim, ...], there: tuple[Dim, ...], axis: int
) -> tuple[int, tuple[np.ndarray, np.ndarray] | None] | str:
    """Where channel `axis` of `here` goes in `there`: (axis there, pairs or None)."""
    blocks = match_blocks(here, there)
    if blocks is None:
        return f"dims {list(here)} and {list(there)} cannot be matched"
    block = next(blk for blk in blocks if axis in blk[0])
    mine = [k for k in block[0] if here[k] != 1]
    theirs = [k for k in block[1] if there[k] != 1]
    if here[axis] == 1:
        return "the channel axis has size 1"
    if len(mine) == 1 and len(theirs) == 1:
        return theirs[0], None
    fixed = all(isinstance(here[k], int) for k in mine) and all(
        isinstance(there[k], int) for k in theirs
    )
    if not fixed:
        return (
            f"the channel axis is merged with or split into dims only known at run time "
            f"({list(here)} vs {list(there)})"
        )
    if len(mine) > 1 and len(theirs) == 1:
        dims = [int(here[k]) for k in mine]  # type: ignore[arg-type]
        positions = np.arange(math.prod(dims))
        digits = np.unravel_index(positions, dims)[mine.index(axis)]
        return theirs[0], (np.asarray(digits), positions)
    if len(mine) == 1 and len(theirs) > 1:
        # [C] -> [h, d] or [C, H, W]: channel c goes with its digit on the outermost axis;
        # a leading axis of 2 or 3 ahead of others stacks q/k/v ([3, h, d]): skip it, so
        # head h of q, k and v is one channel
        outer = next((k for k in theirs[:-1] if int(there[k]) > 3), theirs[0])  # type: ignore[arg-type]
        inner_axes = theirs[theirs.index(outer) + 1 :]
        inner = math.prod(int(there[k]) for k in inner_axes)  # type: ignore[arg-type]
        channels = np.arange(int(here[axis]))  # type: ignore[arg-type]
        return outer, (channels, (channels // inner) % int(there[outer]))  # type: ignore[arg-type]
    return f"the channel axis is in a block of several axes on both sides ({list(here)} vs {list(there)})"


def reshape_shapes(node: ir.Node, g: GraphView) -> tuple[tuple[Dim, ...], tuple[Dim, ...]] | str:
    """The input shape of a Reshape and the output shape it makes: 0 copies the input dim;
    an entry computed from a Shape is the dim it reads (a name, which equals the input's dim
    when shape inference proved them equal: `Shape(x)[0]` is x's batch dim); -1 is what
    remains of the input's product.

    A Reshape that runs has as many elements out as in. When that equation leaves exactly
    one name unmatched ([N, H*W, C] -> [N, 1, W, C] says H = 1), the name takes its value
    in both shapes, so the blocks can be matched."""
    in_shape = g.shape(node.inputs[0])
    spec = shape_vector(node.inputs[1], g)
    if in_shape is None:
        return f"the input shape of {where(node)} is unknown"
    if spec is None or any(v is None for v in spec):
        return f"the target shape of {where(node)} is computed at run time from values it cannot follow"  # noqa: E501
    allowzero = int_attr(node, "allowzero", 0)
    out: list[Dim] = []
    for k, v in enumerate(spec):
        if v == 0 and not allowzero:
            if k >= len(in_shape):
                return f"the target shape of {where(node)} copies a dim the input lacks"
            out.append(in_shape[k])
        else:
            out.append(v)
    if out.count(-1) > 1:
        return f"the target shape of {where(node)} has more than one -1"
    if -1 in out:
        rest = dim_quotient(dim_product(in_shape), dim_product(d for d in out if d != -1))
        if rest is None:
            return f"the -1 in the target shape of {where(node)} cannot be resolved"
        out[out.index(-1)] = rest
        return tuple(in_shape), tuple(out)
    return _solve(tuple(in_shape), tuple(out))


def _solve(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> tuple[tuple[Dim, ...], tuple[Dim, ...]]:
    """Equal element counts of `a` and `b`: a lone name left over on one side, to the first
    power, against a whole number on the other, is that number in both."""
    ta, tb = monomial(dim_product(a)), monomial(dim_product(b))
    if ta is None or tb is None or ta == tb or 0 in (ta[0], tb[0]):
        return a, b
    left, right = Counter(ta[1]), Counter(tb[1])
    left, right = left - right, right - left
    for mine, theirs, cm, ct in ((left, right, ta[0], tb[0]), (right, left, tb[0], ta[0])):
        if not theirs and len(mine) == 1 and sum(mine.values()) == 1 and ct % cm == 0:
            name, value = next(iter(mine)), ct // cm
            return _substitute(a, name, value), _substitute(b, name, value)
    return a, b


def _substitute(dims: tuple[Dim, ...], name: str, value: int) -> tuple[Dim, ...]:
    out: list[Dim] = []
    for dim in dims:
        term = monomial(dim)
        if term is None or name not in term[1]:
            out.append(dim)
            continue
        power = term[1].count(name)
        out.append(dim_of((term[0] * value**power, tuple(n for n in term[1] if n != name))))
    return tuple(out)


def reshape_target(node: ir.Node, g: GraphView) -> tuple[Dim, ...] | str:
    """The output shape a Reshape makes of its input (see `reshape_shapes`)."""
    shapes = reshape_shapes(node, g)
    return shapes if isinstance(shapes, str) else shapes[1]


def _flatten_target(node: ir.Node, g: GraphView) -> tuple[Dim, ...] | str:
    shape = g.shape(node.inputs[0])
    axis = int_attr(node, "axis", 1)
    if shape is None or axis is None:
        return f"the input shape of {where(node)} is unknown"
    axis = axis % len(shape) if axis < 0 else axis

    return (dim_product(shape[:axis]), dim_product(shape[axis:]))


class ReshapeHandler(Handler):
    """Reshape (constant target shape) and Flatten."""

    def _shapes(self, node: ir.Node, g: GraphView) -> tuple[tuple[Dim, ...], tuple[Dim, ...]] | str:
        if node.op_type == "Reshape":
            return reshape_shapes(node, g)
        in_shape = g.shape(node.inputs[0])
        target = _flatten_target(node, g)
        if isinstance(target, str):
            return target
        assert in_shape is not None
        return in_shape, target

    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        if port not in (("in", 0), ("out", 0)):
            return refuse(f"the target shape of {where(node)} is not channels")
        shapes = self._shapes(node, g)
        if isinstance(shapes, str):
            return refuse(shapes)
        here, there = shapes if port == ("in", 0) else shapes[::-1]
        mapped = axis_map(here, there, axis)
        if isinstance(mapped, str):
            return refuse(f"{where(node)}: {mapped}")
        other: Port = ("out", 0) if port == ("in", 0) else ("in", 0)
        in_axis, out_axis = (axis, mapped[0]) if port == ("in", 0) else (mapped[0], axis)
        if node.op_type == "Reshape" and not int_attr(node, "allowzero", 0):
            spec = shape_vector(node.inputs[1], g) or []
            if spec[out_axis] == 0 and (in_axis != out_axis or mapped[1] is not None):
                return refuse(f"{where(node)} copies (0) a dim that is not the channel axis")
        if node.op_type == "Reshape" and (problem := freeze_reshape(node, g, None)):
            return refuse(f"the target shape of {where(node)} is computed at run time: {problem}")
        return Visit(links=[Link(other, mapped[0], pairs=mapped[1])])

    def rewrite(self, node: ir.Node, rw: Rewriter) -> None:
        if node.op_type != "Reshape":
            return
        spec = rw.view.ints(node.inputs[1])
        if spec is None:
            problem = freeze_reshape(node, rw.view, rw)
            if problem:
                raise RuntimeError(f"{where(node)}: {problem}")
            return
        out = node.outputs[0]
        new = list(spec)
        changed = False
        for k, v in enumerate(spec):
            if len(rw.removed(out, k)):
                if v in (0, -1):
                    continue  # follows the input (0) or the remaining product (-1)
                size = rw.new_size(out, k)
                assert size is not None
                new[k] = size
                changed = True
        if changed:
            dtype = rw.view.array(node.inputs[1]).dtype  # type: ignore[union-attr]
            rw.set_input(node, 1, np.asarray(new, dtype), f"{out.name}_shape")

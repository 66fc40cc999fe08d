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
    Port,
    Rewriter,
    Visit,
    int_attr,
    refuse,
    where,
)
from graphopt.passes.channels.handlers.shape import freeze_reshape, shape_vector

Block = tuple[list[int], list[int]]


def match_blocks(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> list[Block] | None:
    """Pair dims of `a` and `b` into consecutive blocks of equal product; a symbolic dim
    pairs only with the same symbol. None when they cannot be matched."""
    blocks: list[Block] = []
    i = j = 0
    while i < len(a) and j < len(b):
        if not isinstance(a[i], int) or not isinstance(b[j], int):
            if a[i] is None or a[i] != b[j]:
                return None
            blocks.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        ai, bj = [i], [j]
        pa, pb = a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:  # type: ignore[operator]
                if i >= len(a) or not isinstance(a[i], int):
                    return None
                pa *= a[i]  # type: ignore[operator]
                ai.append(i)
                i += 1
            else:
                if j >= len(b) or not isinstance(b[j], int):
                    return None
                pb *= b[j]  # type: ignore[operator]
                bj.append(j)
                j += 1
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


def reshape_target(node: ir.Node, g: GraphView) -> tuple[Dim, ...] | str:
    """The output shape a Reshape makes of its input: 0 copies the input dim, -1 is solved
    from the products (or paired with the input's one symbolic dim)."""
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
    if -1 in out:
        known = [d for d in out if d != -1]
        symbols = [d for d in in_shape if not isinstance(d, int)]
        in_static = math.prod(d for d in in_shape if isinstance(d, int))
        out_static = math.prod(d for d in known if isinstance(d, int))
        unknown_out = [d for d in known if not isinstance(d, int)]
        if not symbols and not unknown_out and out_static and in_static % out_static == 0:
            out[out.index(-1)] = in_static // out_static
        elif len(symbols) == 1 and not unknown_out and in_static == out_static:
            out[out.index(-1)] = symbols[0]
        elif (
            Counter(map(str, symbols)) == Counter(map(str, unknown_out))
            and out_static
            and in_static % out_static == 0
        ):
            out[out.index(-1)] = in_static // out_static
        else:
            return f"the -1 in the target shape of {where(node)} cannot be resolved"
    return tuple(out)


def _flatten_target(node: ir.Node, g: GraphView) -> tuple[Dim, ...] | str:
    shape = g.shape(node.inputs[0])
    axis = int_attr(node, "axis", 1)
    if shape is None or axis is None:
        return f"the input shape of {where(node)} is unknown"
    axis = axis % len(shape) if axis < 0 else axis

    def prod(dims: tuple[Dim, ...]) -> Dim:
        if all(isinstance(d, int) for d in dims):
            return math.prod(dims)  # type: ignore[arg-type]
        return dims[0] if len(dims) == 1 else None

    return (prod(shape[:axis]), prod(shape[axis:]))


class ReshapeHandler(Handler):
    """Reshape (constant target shape) and Flatten."""

    def _shapes(self, node: ir.Node, g: GraphView) -> tuple[tuple[Dim, ...], tuple[Dim, ...]] | str:
        in_shape = g.shape(node.inputs[0])
        target = reshape_target(node, g) if node.op_type == "Reshape" else _flatten_target(node, g)
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

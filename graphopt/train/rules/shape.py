"""Ops that move data without arithmetic: reshapes, transposes, concat/split, slices."""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.train.graph import Emitter, attributes, is_static
from graphopt.train.rules import rule

Grads = list[str | None]


@rule("Flatten", "Reshape", "Squeeze", "Unsqueeze", inputs=(0,))
def _reshape(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    return [em.reshape_like(dys[0], node.input[0])] + [None] * (len(node.input) - 1)


@rule("Transpose")
def _transpose(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    rank = em.rank(node.input[0])
    perm = attributes(node).get("perm") or list(reversed(range(rank)))
    return [em.op("Transpose", [dys[0]], perm=[int(i) for i in np.argsort(perm)])]


def _axis_sizes(em: Emitter, values: list[str], axis: int) -> str:
    """The sizes of `values` along `axis`, as an int64 tensor (constant when static)."""
    dims = []
    for v in values:
        shape = em.shape(v)
        dims.append(shape[axis] if shape is not None else None)
    if all(isinstance(d, int) for d in dims):
        return em.ints(dims)  # type: ignore[arg-type]
    parts = [em.op("Shape", [v], start=axis, end=axis + 1) for v in values]
    return em.op("Concat", parts, axis=0)


@rule("Concat")
def _concat(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    inputs = list(node.input)
    if len(inputs) == 1:
        return [dys[0]]
    axis = int(attributes(node)["axis"]) % em.rank(inputs[0])
    sizes = _axis_sizes(em, inputs, axis)
    parts = em.op("Split", [dys[0], sizes], len(inputs), axis=axis)  # opset >= 13
    return [p if need else None for p, need in zip(parts, needed, strict=True)]


@rule("Split", inputs=(0,))
def _split(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    axis = int(attributes(node).get("axis", 0))
    parts = [
        dy if dy is not None else em.zeros_like(out)
        for dy, out in zip(dys, node.output, strict=True)
    ]
    dx = em.op("Concat", parts, axis=axis, shape=em.shape(node.input[0]))
    return [dx] + [None] * (len(node.input) - 1)


@rule("Slice", inputs=(0,))
def _slice(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    x = node.input[0]
    shape = em.shape(x)
    if shape is None:
        raise em.error(f"the rank of '{x}' is unknown")
    rank = len(shape)
    values = []
    for i in range(1, 5):
        name = node.input[i] if len(node.input) > i else ""
        if not name:
            values.append(None)
            continue
        value = em.const_value(name)
        if value is None:
            raise em.error("its starts/ends/axes/steps are computed at run time; constants needed")
        values.append([int(v) for v in np.asarray(value).reshape(-1)])
    starts, ends, axes, steps = values
    assert starts is not None and ends is not None  # Slice requires both
    axes = [a % rank for a in (axes or range(len(starts)))]
    steps = steps or [1] * len(starts)
    dy = dys[0]
    tail = [None] * (len(node.input) - 1)
    if all(s == 1 for s in steps) and all(isinstance(shape[a], int) for a in axes):
        # Step 1 on every sliced axis: the gradient is dy padded back with zeros.
        pads = [0] * (2 * rank)
        for a, start, end in zip(axes, starts, ends, strict=True):
            dim = int(shape[a])  # type: ignore[arg-type]
            start = min(max(start + dim if start < 0 else start, 0), dim)
            end = min(max(end + dim if end < 0 else end, 0), dim)
            end = max(end, start)
            pads[a], pads[rank + a] = start, dim - end
        return [em.op("Pad", [dy, em.ints(pads)], shape=shape), *tail]
    if not is_static(shape):
        raise em.error(
            f"a slice with steps {steps} needs the static shape of '{x}' (got {list(shape)})"
        )
    # Other steps: scatter dy back into the positions the slice read (a constant index).
    static = tuple(int(d) for d in shape)  # type: ignore[arg-type]
    index = [slice(None)] * rank
    for a, start, end, step in zip(axes, starts, ends, steps, strict=True):
        index[a] = slice(start, end, step)  # ONNX clamps as numpy does
    positions = np.arange(int(np.prod(static)), dtype=np.int64).reshape(static)[tuple(index)]
    flat_dy = em.op("Reshape", [dy, em.ints([-1])])
    zeros = em.const(np.zeros(int(np.prod(static)), dtype=em.np_dtype))
    scattered = em.op("ScatterElements", [zeros, em.ints(positions.reshape(-1)), flat_dy], axis=0)
    return [em.op("Reshape", [scattered, em.ints(static)], shape=shape), *tail]

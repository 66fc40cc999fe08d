"""Pad, Resize, Gather/GatherElements and ConvTranspose.

Pad and Resize are linear maps along each axis they change, computed in numpy from the
static sizes: Pad's adjoint adds the slices of dY back where they were read from (a Slice,
a flip or a sum per run of the index map); Resize's is the transpose of its interpolation
matrix (a MatMul per axis, or Reshape + ReduceSum for nearest upsampling by an integer).
Gather scatters dY back with ScatterND(add). ConvTranspose is the adjoint of a Conv with the
same weight tensor: dX is that Conv, dW is Conv's dW with the roles of dY and X swapped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper

from graphopt.train.graph import Emitter, attributes, is_static
from graphopt.train.rules import rule
from graphopt.train.rules.conv import _conv_dw, _Geometry, _spatial

Grads = list[str | None]
INT64_MAX = int(np.iinfo(np.int64).max)
INT64_MIN = int(np.iinfo(np.int64).min)


def _const_ints(em: Emitter, node: onnx.NodeProto, index: int, what: str) -> list[int] | None:
    """A constant int input as a list; None when absent; refused when computed at run time."""
    name = node.input[index] if len(node.input) > index else ""
    if not name:
        return None
    value = em.const_value(name)
    if value is None:
        raise em.error(f"its {what} are computed at run time; constant {what} are needed")
    return [int(v) for v in np.asarray(value).reshape(-1)]


# ---------------------------------------------------------------------------- Pad


@rule("Pad", inputs=(0, 2))
def _pad(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    (dy,) = dys
    x = node.input[0]
    shape = em.shape(x)
    if shape is None:
        raise em.error(f"the rank of '{x}' is unknown")
    rank = len(shape)
    mode = attributes(node).get("mode", "constant")
    pads = _const_ints(em, node, 1, "pads")
    assert pads is not None  # Pad requires them
    axes = _const_ints(em, node, 3, "axes")
    axes = [a % rank for a in axes] if axes is not None else list(range(rank))
    begin, end = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[len(axes) + i]
    out: Grads = [None] * len(node.input)
    if mode == "constant":
        # dX is the part of dY that X filled: a Slice, then zeros where X was cropped.
        changed = [a for a in range(rank) if begin[a] > 0 or end[a] > 0]
        inner = dy
        if changed:
            inner = em.op(
                "Slice",
                [dy, em.ints([max(begin[a], 0) for a in changed]),
                 em.ints([-end[a] if end[a] > 0 else INT64_MAX for a in changed]),
                 em.ints(changed)],
            )  # fmt: skip
        if needed[0]:
            crops = [max(-b, 0) for b in begin] + [max(-e, 0) for e in end]
            out[0] = em.op("Pad", [inner, em.ints(crops)], shape=shape) if any(crops) else inner
        if len(node.input) > 2 and node.input[2] and needed[2]:
            # The constant fills what X did not: the sum of dY minus the sum of X's part.
            total = em.reduce("ReduceSum", dy, None, keepdims=False)
            mine = em.reduce("ReduceSum", inner, None, keepdims=False)
            out[2] = em.reshape_like(em.op("Sub", [total, mine]), node.input[2])
        return out
    if mode not in ("reflect", "edge", "wrap"):
        raise em.error(f"mode='{mode}' is not supported")
    if not needed[0]:
        return out
    grad = dy
    dims = list(em.shape(node.output[0]) or [None] * rank)
    for a in range(rank):
        if begin[a] == 0 and end[a] == 0:
            continue
        n = shape[a]
        if not isinstance(n, int):
            raise em.error(
                f"mode='{mode}' needs the static size of axis {a} of '{x}' ({list(shape)})",
                hint="Fix the input shapes (input_shapes=) so shape inference knows them.",
            )
        index = np.pad(np.arange(n), (max(begin[a], 0), max(end[a], 0)), mode=mode)
        index = index[max(-begin[a], 0) : len(index) - max(-end[a], 0)]
        grad = _gather_adjoint(em, grad, dims, a, index, n)
        dims[a] = n
    out[0] = grad
    return out


def _gather_adjoint(em: Emitter, dy: str, dims: list, axis: int, index: np.ndarray, n: int) -> str:
    """The adjoint of y = x.take(index, axis) (x of size n there): for each run of index
    that steps by +1, -1 or 0, the matching slice of dy, flipped or summed, padded to n."""
    parts = []
    o = 0
    while o < len(index):
        step = int(index[o + 1] - index[o]) if o + 1 < len(index) else 1
        if step not in (-1, 0, 1):
            step = 1
        stop = o + 1
        while stop < len(index) and index[stop] - index[stop - 1] == step:
            stop += 1
        if step == -1:  # reversed: read dy[stop-1 .. o] into x[index[stop-1] .. index[o]]
            piece = em.op(
                "Slice",
                [dy, em.ints([stop - 1]), em.ints([o - 1 if o > 0 else INT64_MIN]),
                 em.ints([axis]), em.ints([-1])],
            )  # fmt: skip
            low = int(index[stop - 1])
        else:
            piece = em.op("Slice", [dy, em.ints([o]), em.ints([stop]), em.ints([axis])])
            if step == 0 and stop - o > 1:
                piece = em.reduce("ReduceSum", piece, [axis], keepdims=True)
            low = int(index[o])
        width = 1 if step == 0 else stop - o
        rank = len(dims)
        pads = [0] * (2 * rank)
        pads[axis], pads[rank + axis] = low, n - low - width
        parts.append(em.op("Pad", [piece, em.ints(pads)]) if low or n - low - width else piece)
        o = stop
    return em.add_all(parts)


# ---------------------------------------------------------------------------- Resize


_COORDINATE_MODES = (
    "half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
)  # fmt: skip


def _cubic(d: np.ndarray, a: float) -> np.ndarray:
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def _resize_matrix(n: int, out: int, scale: float, attrs: dict[str, Any]) -> np.ndarray:
    """A with y = A x along one axis (out x n), per the Resize spec's formulas."""
    o = np.arange(out, dtype=np.float64)
    mode = attrs.get("coordinate_transformation_mode", "half_pixel")
    if mode == "half_pixel":
        x = (o + 0.5) / scale - 0.5
    elif mode == "half_pixel_symmetric":
        offset = n / 2 * (1 - out / (scale * n))
        x = offset + (o + 0.5) / scale - 0.5
    elif mode == "pytorch_half_pixel":
        x = (o + 0.5) / scale - 0.5 if out > 1 else np.zeros(out)
    elif mode == "align_corners":
        x = o * (n - 1) / (out - 1) if out > 1 else np.zeros(out)
    else:  # asymmetric
        x = o / scale
    kind = attrs.get("mode", "nearest")
    if kind == "nearest":
        rounding = attrs.get("nearest_mode", "round_prefer_floor")
        pick = {
            "round_prefer_floor": lambda v: np.ceil(v - 0.5),
            "round_prefer_ceil": lambda v: np.floor(v + 0.5),
            "floor": np.floor,
            "ceil": np.ceil,
        }[rounding](x)
        idx, weights = pick[:, None].astype(np.int64), np.ones((out, 1))
    else:
        base = np.floor(x)
        r = x - base
        if kind == "linear":
            offsets, weights = np.array([0, 1]), np.stack([1 - r, r], axis=1)
        else:  # cubic
            offsets = np.array([-1, 0, 1, 2])
            a = float(attrs.get("cubic_coeff_a", -0.75))
            weights = _cubic(r[:, None] - offsets[None, :], a)
        idx = base.astype(np.int64)[:, None] + offsets[None, :]
        if int(attrs.get("exclude_outside", 0)):
            weights = np.where((idx < 0) | (idx >= n), 0.0, weights)
            weights = weights / weights.sum(axis=1, keepdims=True)
    matrix = np.zeros((out, n))
    np.add.at(matrix, (np.repeat(np.arange(out), idx.shape[1]), np.clip(idx, 0, n - 1).ravel()),
              weights.ravel())  # fmt: skip
    return matrix


def _resize_scales(
    em: Emitter, node: onnx.NodeProto, attrs: dict[str, Any], x_shape: tuple, y_shape: tuple
) -> dict[int, float]:
    """The scale of every resized axis (the one the coordinate transform divides by)."""
    rank = len(x_shape)
    axes = [int(a) % rank for a in attrs.get("axes", range(rank))]
    scales_name = node.input[2] if len(node.input) > 2 else ""
    value = em.const_value(scales_name) if scales_name else None
    if scales_name and value is None:
        raise em.error("its scales are computed at run time; constant scales are needed")
    if value is not None and np.asarray(value).size:
        # Spec: float32 scales; use the float32 value as the runtimes do.
        values = np.asarray(value, dtype=np.float32).reshape(-1)
        return {a: float(s) for a, s in zip(axes, values, strict=True)}
    sizes_name = node.input[3] if len(node.input) > 3 else ""
    if not sizes_name:
        raise em.error("it has neither scales nor sizes")
    # Runtimes divide the sizes in float32.
    ratios = {a: float(np.float32(y_shape[a] / x_shape[a])) for a in axes}
    policy = attrs.get("keep_aspect_ratio_policy", "stretch")
    if policy == "stretch":
        return ratios
    sizes = _const_ints(em, node, 3, "sizes")
    assert sizes is not None
    wanted = [s / x_shape[a] for a, s in zip(axes, sizes, strict=True)]
    common = min(wanted) if policy == "not_larger" else max(wanted)
    return dict.fromkeys(axes, float(np.float32(common)))


@rule("Resize", inputs=(0,))
def _resize(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    attrs = attributes(node)
    x, y = node.input[0], node.output[0]
    kind = attrs.get("mode", "nearest")
    coords = attrs.get("coordinate_transformation_mode", "half_pixel")
    if kind not in ("nearest", "linear", "cubic"):
        raise em.error(f"mode='{kind}' is not supported")
    if coords not in _COORDINATE_MODES:
        raise em.error(
            f"coordinate_transformation_mode='{coords}' is not supported"
            + (" (roi, extrapolation)" if coords == "tf_crop_and_resize" else "")
        )
    x_shape, y_shape = em.shape(x), em.shape(y)
    if x_shape is None or y_shape is None:
        raise em.error(f"the rank of '{x}' is unknown")
    scales = _resize_scales(em, node, attrs, x_shape, y_shape)
    grad = dys[0]
    dims = list(y_shape)
    rank = len(x_shape)
    for a in sorted(scales, reverse=True):
        n, out = x_shape[a], y_shape[a]
        if not (isinstance(n, int) and isinstance(out, int)):
            raise em.error(
                f"resized axis {a} of '{x}' has no static size ({list(x_shape)} -> "
                f"{list(y_shape)})",
                hint="Fix the input shapes (input_shapes=) so shape inference knows them.",
            )
        if int(attrs.get("antialias", 0)) and kind != "nearest" and scales[a] < 1:
            raise em.error("antialias=1 when downsampling is not supported")
        matrix = _resize_matrix(n, out, scales[a], attrs)
        if out == n and np.array_equal(matrix, np.eye(n)):
            continue
        grad = _axis_adjoint(em, grad, a, rank, matrix, dims)
        dims[a] = n
    em.shapes[grad] = tuple(x_shape)
    return [grad] + [None] * (len(node.input) - 1)


def _axis_adjoint(
    em: Emitter, dy: str, axis: int, rank: int, matrix: np.ndarray, dims: list
) -> str:
    """dX = Aᵀ dY along `axis` (A: out x n)."""
    out, n = matrix.shape
    k = out // n
    if out == n * k and np.array_equal(matrix, np.eye(n).repeat(k, axis=0)):
        # Nearest upsampling by an integer: dX sums each block of k.
        suffix = dims[axis + 1 :]
        unknown = [i for i, d in enumerate(suffix) if not isinstance(d, int)]
        if len(unknown) <= 1:
            suffix = [d if isinstance(d, int) else -1 for d in suffix]
            split = em.op("Reshape", [dy, em.ints([0] * axis + [n, k] + suffix)])
            return em.reduce("ReduceSum", split, [axis + 1], keepdims=False)
    if axis == rank - 1:
        return em.op("MatMul", [dy, em.const(matrix.astype(em.np_dtype))])
    if axis == rank - 2:
        return em.op("MatMul", [em.const(matrix.T.astype(em.np_dtype)), dy])
    perm = [i for i in range(rank) if i != axis] + [axis]
    moved = em.op("Transpose", [dy], perm=perm)
    product = em.op("MatMul", [moved, em.const(matrix.astype(em.np_dtype))])
    return em.op("Transpose", [product], perm=[int(i) for i in np.argsort(perm)])


# ---------------------------------------------------------------------------- Gather


def _normalized_indices(em: Emitter, indices: str, size: str | int) -> str:
    """int64 indices with the negative ones wrapped (by `size`, an int or an int64 scalar)."""
    value = em.const_value(indices)
    if value is not None and isinstance(size, int):
        array = np.asarray(value, dtype=np.int64)
        return em.const(np.where(array < 0, array + size, array), np.int64)
    if em.types.get(indices) != onnx.TensorProto.INT64:
        indices = em.op("Cast", [indices], to=onnx.TensorProto.INT64)
    n = em.const(np.int64(size), np.int64) if isinstance(size, int) else size
    negative = em.op("Cast", [em.op("Less", [indices, em.const(np.int64(0), np.int64)])],
                     to=onnx.TensorProto.INT64)  # fmt: skip
    return em.op("Add", [indices, em.op("Mul", [negative, n])])


def _axis_size(em: Emitter, x: str, axis: int) -> str | int:
    shape = em.shape(x)
    if shape is not None and isinstance(shape[axis], int):
        return int(shape[axis])  # type: ignore[arg-type]
    return em.op("Squeeze", [em.op("Shape", [x], start=axis, end=axis + 1)])


def _zeros(em: Emitter, shape: str) -> str:
    return em.op(
        "ConstantOfShape", [shape], value=helper.make_tensor("value", em.elem_type, [1], [0.0])
    )


@rule("Gather", inputs=(0,))
def _gather(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    # y = data.take(indices, axis): y's axes are data[:a] + indices + data[a+1:]. Move the
    # index axes to the front, scatter-add into data with its axis a in front, move back.
    (dy,) = dys
    data, indices = node.input
    r, q = em.rank(data), em.rank(indices)
    a = int(attributes(node).get("axis", 0)) % r
    idx = _normalized_indices(em, indices, _axis_size(em, data, a))
    perm_y = [*range(a, a + q), *range(a), *range(a + q, r + q - 1)]
    if perm_y != sorted(perm_y):
        dy = em.op("Transpose", [dy], perm=perm_y)  # indices + data[:a] + data[a+1:]
    perm_d = [a, *range(a), *range(a + 1, r)]
    d_shape = em.shape(data)
    if is_static(d_shape):
        moved_shape = em.ints([d_shape[i] for i in perm_d])  # type: ignore[index,misc]
    else:
        moved_shape = em.op("Gather", [em.op("Shape", [data]), em.ints(perm_d)], axis=0)
    if em.opset >= 16:
        moved = em.op(
            "ScatterND", [_zeros(em, moved_shape), em.unsqueeze(idx, [q]), dy], reduction="add"
        )
    else:  # one-hot rows, summed by a MatMul: (n, K) @ (K, rest)
        n = _axis_size(em, data, a)
        depth = em.const(np.int64(n), np.int64) if isinstance(n, int) else n
        hot = em.op(
            "OneHot", [em.op("Reshape", [idx, em.ints([-1])]), depth, em.const([0.0, 1.0])],
            axis=0,
        )  # fmt: skip
        flat = em.op("Flatten", [dy], axis=q)  # (K, rest)
        moved = em.op("Reshape", [em.op("MatMul", [hot, flat]), moved_shape])
    if a == 0:
        return [moved, None]
    return [em.op("Transpose", [moved], perm=[int(i) for i in np.argsort(perm_d)]), None]


@rule("GatherElements", inputs=(0,))
def _gather_elements(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    if em.opset < 16:
        raise em.error(
            "its gradient needs ScatterElements with reduction (opset 16)",
            hint="Convert the model to opset 16 or newer (onnx.version_converter).",
        )
    data, indices = node.input
    a = int(attributes(node).get("axis", 0)) % em.rank(data)
    idx = _normalized_indices(em, indices, _axis_size(em, data, a))
    zeros = _zeros(em, em.shape_tensor(data))
    return [em.op("ScatterElements", [zeros, idx, dys[0]], axis=a, reduction="add"), None]


# ---------------------------------------------------------------------------- ConvTranspose


@rule("ConvTranspose")
def _conv_transpose(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    (dy,) = dys
    attrs = attributes(node)
    x, w = node.input[0], node.input[1]
    w_shape = em.static_shape(w, "weight")
    kernel = tuple(w_shape[2:])
    r = len(kernel)
    group = int(attrs.get("group", 1))
    s_in, s_out = _spatial(em, x), _spatial(em, node.output[0])
    strides = tuple(int(v) for v in attrs.get("strides", [1] * r))
    dils = tuple(int(v) for v in attrs.get("dilations", [1] * r))
    out_pad = [int(v) for v in attrs.get("output_padding", [0] * r)]
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", "") and "output_shape" not in attrs:
        pads = [int(v) for v in attrs.get("pads", [0] * (2 * r))]
    else:
        totals = [
            s * (i - 1) + p + (k - 1) * d + 1 - o
            for s, i, p, k, d, o in zip(strides, s_in, out_pad, kernel, dils, s_out, strict=True)
        ]
        if any(totals):
            raise em.error(
                f"auto_pad='{auto_pad}' or output_shape with implicit pads is not supported",
                hint="Export with explicit pads.",
            )
        pads = [0] * (2 * r)
    out: Grads = [None] * len(node.input)
    if needed[0]:
        # ConvTranspose(X, W) is the adjoint of Conv(., W): its dX is that Conv.
        dx = em.op(
            "Conv", [dy, w], group=group, strides=list(strides), dilations=list(dils),
            pads=pads, kernel_shape=list(kernel),
        )  # fmt: skip
        reach = [
            (o + pb + pe - ((k - 1) * d + 1)) // s + 1
            for o, pb, pe, k, d, s in zip(s_out, pads[:r], pads[r:], kernel, dils, strides,
                                          strict=True)
        ]  # fmt: skip
        if reach != list(s_in):  # output_padding >= stride: Conv reads past X's size
            dx = em.op("Slice", [dx, em.ints([0] * r), em.ints(s_in), em.ints(range(2, 2 + r))])
        out[0] = dx
    if needed[1]:
        # dW[c, m, t] = sum over (n, i) of X[n, c, i] * dY[n, m, i*s + t*d - pad]: Conv's dW
        # with dY in the input's role and X in the output gradient's.
        geo = _Geometry(s_out, s_in, kernel, strides, dils, tuple(pads[:r]), tuple(pads[r:]))
        out[1] = _conv_dw(em, dy, x, w_shape, group, geo)
    if len(node.input) > 2 and needed[2]:
        out[2] = em.reduce("ReduceSum", dy, [0, *range(2, 2 + r)], keepdims=False)
    return out

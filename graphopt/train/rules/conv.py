"""Conv and the pools.

Conv: dX as a Conv with flipped, group-transposed weights at stride 1 (ORT's fast forward
kernels) and as a ConvTranspose with explicit output_padding otherwise. dW as im2col: the
window of the input each kernel tap multiplies (a Slice per tap, or all taps at once from
one Conv with one-hot constant kernels), multiplied by dY in a Gemm over the batch or a
batched MatMul per image; the issue's spike measured im2col ~4.6x faster in ORT than a
swapped-role Conv. Depthwise dW is the exception: there the swapped-role grouped Conv wins.
dB as a ReduceSum. A per-channel factor on dY (a frozen BatchNormalization after the conv)
is applied to the weight and to the small results instead of to dY.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from graphopt.train.graph import Emitter, attributes, is_static
from graphopt.train.rules import rule

Grads = list[str | None]
# From this many output positions per image, an ungrouped stride-1 conv's dW is a batched
# MatMul per image (_per_image_dw) rather than one Gemm over the whole batch.
PER_IMAGE_DW_MIN_POSITIONS = 1024
# From this many output positions per image, a strided conv's dW (after _im2col) is a
# batched MatMul per image rather than one Gemm over the whole batch (measured on ResNet's
# stride-2 convs: 32x32 -> 16x16 wins per image, 16x16 -> 8x8 with one Gemm).
PER_IMAGE_MATMUL_MIN_POSITIONS = 256
INT64_MIN = int(np.iinfo(np.int64).min)


@dataclass(frozen=True)
class _Geometry:
    spatial_in: tuple[int, ...]
    spatial_out: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]

    @property
    def output_padding(self) -> list[int]:
        """What ConvTranspose must add so that its output has the input's spatial size."""
        return [
            size - (s * (o - 1) + (k - 1) * d + 1 - pb - pe)
            for size, o, k, s, d, pb, pe in zip(
                self.spatial_in, self.spatial_out, self.kernel, self.strides, self.dilations,
                self.pads_begin, self.pads_end, strict=True,
            )
        ]  # fmt: skip

    @property
    def pads(self) -> list[int]:
        return [*self.pads_begin, *self.pads_end]


def _spatial(em: Emitter, name: str) -> tuple[int, ...]:
    shape = em.shape(name)
    if shape is None or not is_static(shape[2:]):
        raise em.error(
            f"the spatial size of '{name}' is not static "
            f"({'unknown' if shape is None else list(shape)})",
            hint="Fix the input shapes (input_shapes=) so shape inference knows them.",
        )
    return tuple(int(d) for d in shape[2:])  # type: ignore[arg-type]


def _geometry(em: Emitter, node: onnx.NodeProto, kernel: tuple[int, ...]) -> _Geometry:
    attrs = attributes(node)
    s_in, s_out = _spatial(em, node.input[0]), _spatial(em, node.output[0])
    r = len(kernel)
    strides = tuple(int(v) for v in attrs.get("strides", [1] * r))
    dils = tuple(int(v) for v in attrs.get("dilations", [1] * r))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        pads = [int(v) for v in attrs.get("pads", [0] * (2 * r))]
        begin, end = tuple(pads[:r]), tuple(pads[r:])
    elif auto_pad == "VALID":
        begin = end = (0,) * r
    else:
        totals = [
            max((o - 1) * s + (k - 1) * d + 1 - i, 0)
            for i, o, k, s, d in zip(s_in, s_out, kernel, strides, dils, strict=True)
        ]
        small = tuple(t // 2 for t in totals)
        large = tuple(t - t // 2 for t in totals)
        begin, end = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    return _Geometry(s_in, s_out, kernel, strides, dils, begin, end)


@rule("Conv")
def _conv(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    (dy,) = dys
    x, w = node.input[0], node.input[1]
    w_shape = em.static_shape(w, "weight")
    group = int(attributes(node).get("group", 1))
    geo = _geometry(em, node, tuple(w_shape[2:]))
    r = len(geo.kernel)
    # dY = raw * factor per output channel (a frozen BatchNormalization after the conv):
    # every gradient below is linear in dY per output channel, so the factor scales the
    # weight and the small results instead of the whole of dY.
    factor = None
    deferred = em.deferred_scale_grads.get(dy)
    if dy in em.channel_scaled:
        dy, factor = em.channel_scaled[dy]
    per_out = em.op("Reshape", [factor, em.ints([-1] + [1] * (r + 1))]) if factor else None
    out: Grads = [None] * len(node.input)
    if needed[0]:
        scaled_w = em.op("Mul", [w, per_out]) if per_out else w
        out[0] = _conv_dx(em, dy, scaled_w, w_shape, group, geo)
    if needed[1] or deferred is not None:
        dw = _conv_dw(em, x, dy, w_shape, group, geo)
        if needed[1]:
            out[1] = em.op("Mul", [dw, per_out], shape=w_shape) if per_out else dw
        if deferred is not None:
            _batch_norm_scale_grad(em, node, dw, len(w_shape), deferred)
    if len(node.input) > 2 and needed[2]:
        db = em.reduce("ReduceSum", dy, [0, *range(2, 2 + r)], keepdims=False)
        out[2] = em.op("Mul", [db, factor]) if factor else db
    return out


def _batch_norm_scale_grad(
    em: Emitter, node: onnx.NodeProto, dw: str, w_rank: int, deferred: tuple[str, str, str, str]
) -> None:
    """The scale gradient of the frozen BatchNormalization after this Conv (rules/norm.py):
    inv_std * (sum(W * dW) + bias * sum(dY) - mean * sum(dY)), dW for the BN's dY, written
    to the name the BN rule already returned."""
    name, mean, inv_std, dy_sum = deferred
    dot = em.reduce(
        "ReduceSum", em.op("Mul", [node.input[1], dw]), list(range(1, w_rank)), keepdims=False
    )
    offset = mean
    if len(node.input) > 2 and node.input[2]:
        offset = em.op("Sub", [mean, node.input[2]])
    centered = em.op("Sub", [dot, em.op("Mul", [offset, dy_sum])])
    em.nodes.append(
        helper.make_node("Mul", [centered, inv_std], [name], name=f"{name}({node.name or 'Conv'})")
    )


def _conv_dx(
    em: Emitter, dy: str, w: str, w_shape: tuple[int, ...], group: int, geo: _Geometry
) -> str:
    r = len(geo.kernel)
    reach = [(k - 1) * d for k, d in zip(geo.kernel, geo.dilations, strict=True)]
    flipped_pads = [e - p for e, p in zip(reach + reach, geo.pads, strict=True)]
    if all(s == 1 for s in geo.strides) and min(flipped_pads) >= 0:
        # dX = Conv(dY, W') with W' the kernel flipped in space and in/out channels swapped
        # per group: ORT's forward Conv kernels are faster than its ConvTranspose.
        m, cg = w_shape[0], w_shape[1]
        wt = em.op("Reshape", [w, em.ints([group, m // group, cg, *geo.kernel])])
        wt = em.op("Transpose", [wt], perm=[0, 2, 1, *range(3, 3 + r)])
        wt = em.op("Reshape", [wt, em.ints([group * cg, m // group, *geo.kernel])])
        axes = list(range(2, 2 + r))
        wt = em.op(
            "Slice", [wt, em.ints([-1] * r), em.ints([INT64_MIN] * r), em.ints(axes),
                      em.ints([-1] * r)],
        )  # fmt: skip
        return em.op(
            "Conv", [dy, wt], group=group, dilations=list(geo.dilations), pads=flipped_pads,
            kernel_shape=list(geo.kernel),
        )  # fmt: skip
    return em.op(
        "ConvTranspose", [dy, w], group=group, strides=list(geo.strides),
        dilations=list(geo.dilations), pads=geo.pads, output_padding=geo.output_padding,
        kernel_shape=list(geo.kernel),
    )  # fmt: skip


def _conv_dw(
    em: Emitter, x: str, dy: str, w_shape: tuple[int, ...], group: int, geo: _Geometry
) -> str:
    """dW[m, c, t] = sum over (n, o) of dY[n, m, o] * X[n, c, o*s + t*d], t a kernel tap.

    The windows of X that the taps multiply: at stride 1, a Slice of the padded input per
    tap (the centre tap of a "same" conv is X itself); at a larger stride, all at once
    from one Conv with one-hot kernels (_im2col), where a Slice with a step copies element
    by element. On ResNet's 16x16 and 8x8 stride-1 convs the one-hot Conv plus ORT's
    reorder of its output cost more than the slices. The products sum over the batch in
    one Gemm in channels-first layout (a Gemm per tap for slices), or per image with a
    batched MatMul in the tensors' own layout, which skips transposing X and dY and pays
    on large feature maps."""
    r = len(geo.kernel)
    m, cg = w_shape[0], w_shape[1]
    if cg == 1 and m == group:
        return _depthwise_dw(em, x, dy, w_shape, geo)
    c = cg * group
    taps = int(np.prod(geo.kernel))
    positions = int(np.prod(geo.spatial_out))
    channels_first = [1, 0, *range(2, 2 + r)]
    if all(s == 1 for s in geo.strides):
        if group == 1 and positions >= PER_IMAGE_DW_MIN_POSITIONS:
            return _per_image_dw(em, x, dy, w_shape, geo)
        # Batch innermost, (C, *S, N): a tap's window is then runs of W*N contiguous
        # values rather than rows of W, which ORT's single-threaded Slice copies faster
        # (32x16x16x64 3x3 conv: 6.1 ms against 6.8 ms for dW; at 8x8x128, 4.4 against 5.9).
        # A 1x1 kernel slices nothing, and there the channels-first transpose (moving whole
        # feature maps) is the cheaper one.
        if taps > 1:
            layout, first = [1, *range(2, 2 + r), 0], 1  # (C, *S, N)
        else:
            layout, first = channels_first, 2  # (C, N, *S)
        cols = _sliced_taps(em, em.op("Transpose", [x], perm=layout), geo, first=first)
        dyt = em.op("Transpose", [dy], perm=layout)  # (M, *O, N) or (M, N, *O)
        if group == 1:
            # One Gemm per tap, concatenated at the end: concatenating the taps' windows
            # first writes a (C, T, *O, N) copy of the input, which costs ORT more than
            # the Gemm itself (a tenth of a ResNet step).
            a = em.op("Reshape", [dyt, em.ints([m, -1])])
            per_tap = [
                em.op("Gemm", [a, em.op("Reshape", [col, em.ints([c, -1])])], transB=1)
                for col in cols
            ]  # (M, C) each
            per_tap = [em.op("Reshape", [t, em.ints([m, c, 1])]) for t in per_tap]
            dw = per_tap[0] if taps == 1 else em.op("Concat", per_tap, axis=2)  # (M, C, T)
            return em.op("Reshape", [dw, em.ints(w_shape)], shape=w_shape)
        cols = [em.unsqueeze(col, [1]) for col in cols]
        xcol = cols[0] if taps == 1 else em.op("Concat", cols, axis=1)  # (C, T, *O, N)
        # (or (C, 1, N, *O) for a 1x1 kernel)
    else:
        im2col = _im2col(em, x, geo)  # (N*C, T, *O)
        if group == 1 and positions >= PER_IMAGE_MATMUL_MIN_POSITIONS:
            b = em.op("Reshape", [im2col, em.ints([-1, c * taps, positions])])  # (N, C*T, O)
            a = em.op("Reshape", [dy, em.ints([0, m, -1])])  # (N, M, O)
            dw = em.op("MatMul", [a, em.op("Transpose", [b], perm=[0, 2, 1])])
            dw = em.reduce("ReduceSum", dw, [0], keepdims=False)  # (M, C*T)
            return em.op("Reshape", [dw, em.ints(w_shape)], shape=w_shape)
        im2col = em.op("Reshape", [im2col, em.ints([-1, c, taps, positions])])
        xcol = em.op("Transpose", [im2col], perm=[1, 2, 0, 3])  # (C, T, N, O)
        dyt = em.op("Transpose", [dy], perm=channels_first)  # (M, N, *O)
    a = em.op("Reshape", [dyt, em.ints([group, m // group, -1])])
    b = em.op("Reshape", [xcol, em.ints([group, cg * taps, -1])])
    dw = em.op("MatMul", [a, em.op("Transpose", [b], perm=[0, 2, 1])])  # (g, M/g, Cg*T)
    return em.op("Reshape", [dw, em.ints(w_shape)], shape=w_shape)


def _per_image_dw(em: Emitter, x: str, dy: str, w_shape: tuple[int, ...], geo: _Geometry) -> str:
    """dW of an ungrouped stride-1 conv with large feature maps: per tap, a Slice of the
    padded input and a batched MatMul of dY (N, M, O) by the window's transpose (N, O, C),
    summed over the batch. From 1,024 output positions per image the one-hot Conv costs
    more than the slices (ResNet's 32x32x32 3x3 conv, batch 32: 12.4 ms against 8.8 ms)."""
    m, c = w_shape[0], w_shape[1]
    a = em.op("Reshape", [dy, em.ints([0, m, -1])])  # (N, M, O)
    per_tap = []
    for col in _sliced_taps(em, x, geo):  # (N, C, *O) each
        b = em.op("Transpose", [em.op("Reshape", [col, em.ints([0, c, -1])])], perm=[0, 2, 1])
        summed = em.reduce("ReduceSum", em.op("MatMul", [a, b]), [0], keepdims=False)
        per_tap.append(em.op("Reshape", [summed, em.ints([m, c, 1])]))
    dw = per_tap[0] if len(per_tap) == 1 else em.op("Concat", per_tap, axis=2)  # (M, C, T)
    return em.op("Reshape", [dw, em.ints(w_shape)], shape=w_shape)


def _im2col(em: Emitter, x: str, geo: _Geometry) -> str:
    """Every kernel tap's window of X at once, as (N*C, T, *O): a Conv of X seen as N*C
    one-channel images with a constant one-hot kernel per tap, under the conv's own pads,
    strides and dilations. It computes 1*x plus zeros, so the windows are exact. As a
    constant-weight Conv it runs on ORT's fast (NCHWc) kernels and writes all T windows in
    one multi-threaded pass, where a Slice per tap copies on one thread and, at a stride,
    element by element (ResNet's stride-2 3x3 conv, 32 -> 64 channels: dW takes 2.5 ms
    this way in a graph of its own; in the profile of the whole training step, unit-step
    slices of the stride phases had taken 6.4 ms). _conv_dw uses it at strides above 1
    only."""
    taps = list(itertools.product(*(range(k) for k in geo.kernel)))
    onehot = np.zeros((len(taps), 1, *geo.kernel), dtype=em.np_dtype)
    for t, tap in enumerate(taps):
        onehot[(t, 0, *tap)] = 1.0
    x1 = em.op("Reshape", [x, em.ints([-1, 1, *geo.spatial_in])])
    return em.op(
        "Conv", [x1, em.const(onehot)], pads=geo.pads, strides=list(geo.strides),
        dilations=list(geo.dilations), kernel_shape=list(geo.kernel),
    )  # fmt: skip


def _depthwise_dw(em: Emitter, x: str, dy: str, w_shape: tuple[int, ...], geo: _Geometry) -> str:
    """dW of a depthwise conv (one input channel per output channel) as one grouped Conv
    with the roles swapped: the input is X as (1, C*N, *S), one group of N channels per
    channel, and the kernel is dY as (C, N, *O), so that output (1, C, *K) sums over the
    batch and the output positions. The conv's strides become the kernel's dilations and
    its dilations the strides. ORT runs this 1.2-5x faster than a Slice, Mul and ReduceSum
    per tap (32x16x16x64: 3.6 ms against 4.9 ms; at stride 2, 3.8 ms against 14 ms)."""
    r = len(geo.kernel)
    channels_first = [1, 0, *range(2, 2 + r)]
    xt = em.op("Transpose", [x], perm=channels_first)  # (C, N, *S)
    xt = em.op("Reshape", [xt, em.ints([1, -1, *geo.spatial_in])])  # (1, C*N, *S)
    dyt = em.op("Transpose", [dy], perm=channels_first)  # (C, N, *O)
    # The end padding that makes the output exactly the kernel's size, where the conv's own
    # padding reaches no further; otherwise the extra outputs are sliced off.
    reach = [
        (k - 1) * d + (o - 1) * s + 1 - size - begin
        for k, d, o, s, size, begin in zip(
            geo.kernel, geo.dilations, geo.spatial_out, geo.strides, geo.spatial_in,
            geo.pads_begin, strict=True,
        )
    ]  # fmt: skip
    ends = [max(e, 0) for e in reach]
    dw = em.op(
        "Conv", [xt, dyt], group=w_shape[0], strides=list(geo.dilations),
        dilations=list(geo.strides), pads=[*geo.pads_begin, *ends],
    )  # fmt: skip
    if any(e < 0 for e in reach):
        dw = em.op("Slice", [dw, em.ints([0] * r), em.ints(geo.kernel), em.ints(range(2, 2 + r))])
    return em.op("Reshape", [dw, em.ints(w_shape)], shape=w_shape)


def _sliced_taps(em: Emitter, x: str, geo: _Geometry, first: int = 2) -> list[str]:
    """The window of the input that each kernel tap multiplies, for a conv at stride 1: a
    Slice of the padded input per tap, on the spatial axes only (`first` onwards), so
    (N, C, *S) gives (N, C, *O) and (C, *S, N) with first=1 gives (C, *O, N). The centre
    tap of a "same" conv is the unpadded input itself, and a tap whose window is the whole
    padded input takes that; neither is copied."""
    r = len(geo.kernel)
    source = x
    if any(geo.pads):
        before, after = [0] * first, [0] * (2 - first)
        pads = [*before, *geo.pads_begin, *after, *before, *geo.pads_end, *after]
        x = em.op("Pad", [x, em.ints(pads)])
    axes = em.ints(range(first, first + r))
    padded = tuple(
        size + begin + end
        for size, begin, end in zip(geo.spatial_in, geo.pads_begin, geo.pads_end, strict=True)
    )
    cols = []
    for tap in itertools.product(*(range(k) for k in geo.kernel)):
        starts = [t * d for t, d in zip(tap, geo.dilations, strict=True)]
        if starts == list(geo.pads_begin) and geo.spatial_out == geo.spatial_in:
            cols.append(source)
        elif not any(starts) and geo.spatial_out == padded:
            cols.append(x)
        else:
            ends = [b + o for b, o in zip(starts, geo.spatial_out, strict=True)]
            cols.append(em.op("Slice", [x, em.ints(starts), em.ints(ends), axes]))
    return cols


@rule("GlobalAveragePool")
def _global_average_pool(
    em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]
) -> Grads:
    x = node.input[0]
    spread = em.op("Expand", [dys[0], em.shape_tensor(x)], shape=em.shape(x))
    shape = em.shape(x)
    if shape is not None and is_static(shape[2:]):
        return [em.op("Mul", [spread, em.const(1.0 / float(np.prod(shape[2:])))])]
    sizes = em.op("Shape", [x], start=2)
    count = em.op("Cast", [em.reduce("ReduceProd", sizes, None, keepdims=False)], to=em.elem_type)
    return [em.op("Div", [spread, count])]


def _window_counts(geo: _Geometry) -> np.ndarray:
    """How many input positions (padding excluded) each output window covers."""
    per_axis = []
    for size, o, k, s, d, pb in zip(
        geo.spatial_in, geo.spatial_out, geo.kernel, geo.strides, geo.dilations, geo.pads_begin,
        strict=True,
    ):  # fmt: skip
        starts = np.arange(o)[:, None] * s - pb + np.arange(k)[None, :] * d
        per_axis.append(((starts >= 0) & (starts < size)).sum(axis=1))
    counts = per_axis[0]
    for axis_counts in per_axis[1:]:
        counts = np.multiply.outer(counts, axis_counts)
    return counts


def _check_ceil_mode(em: Emitter, node: onnx.NodeProto, geo: _Geometry) -> None:
    if not int(attributes(node).get("ceil_mode", 0)):
        return
    floor = [
        (i + pb + pe - ((k - 1) * d + 1)) // s + 1
        for i, k, s, d, pb, pe in zip(
            geo.spatial_in, geo.kernel, geo.strides, geo.dilations, geo.pads_begin,
            geo.pads_end, strict=True,
        )
    ]  # fmt: skip
    if tuple(floor) != geo.spatial_out:
        raise em.error("ceil_mode=1 adds partial windows, which are not supported yet")


@rule("AveragePool")
def _average_pool(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    # The adjoint of a depthwise conv with all-ones weights, after dividing by each window's
    # divisor: the kernel size, or with count_include_pad=0 the count of real positions.
    attrs = attributes(node)
    x = node.input[0]
    kernel = tuple(int(k) for k in attrs["kernel_shape"])
    geo = _geometry(em, node, kernel)
    _check_ceil_mode(em, node, geo)
    x_shape = em.shape(x)
    channels = x_shape[1] if x_shape is not None and len(x_shape) > 1 else None
    if not isinstance(channels, int):
        raise em.error(f"the channel count of '{x}' is not static")
    if int(attrs.get("count_include_pad", 0)) or not any(geo.pads):
        divisor = em.const(float(np.prod(kernel)))
    else:
        divisor = em.const(_window_counts(geo)[None, None].astype(em.np_dtype))
    scaled = em.op("Div", [dys[0], divisor])
    ones = em.const(np.ones((channels, 1, *kernel), dtype=em.np_dtype))
    return [
        em.op(
            "ConvTranspose",
            [scaled, ones],
            group=channels,
            strides=list(geo.strides),
            dilations=list(geo.dilations),
            pads=geo.pads,
            output_padding=geo.output_padding,
            kernel_shape=list(kernel),
        )  # fmt: skip
    ]


@rule("MaxPool")
def _max_pool(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    # Route dY to the argmax of each window: ScatterElements(add) at MaxPool's own Indices.
    if em.opset < 16:
        raise em.error(
            "its gradient needs ScatterElements with reduction (opset 16)",
            hint="Convert the model to opset 16 or newer (onnx.version_converter).",
        )
    if int(attributes(node).get("storage_order", 0)):
        raise em.error("storage_order=1 is not supported")
    if dys[1:] and any(d is not None for d in dys[1:]):
        raise em.error("its Indices output is not differentiable")
    x = node.input[0]
    if len(node.output) < 2 or not node.output[1]:
        indices = em.fresh("maxpool_indices")
        if len(node.output) < 2:
            node.output.append(indices)
        else:
            node.output[1] = indices
    indices = node.output[1]
    zeros = em.op(
        "ConstantOfShape",
        [em.op("Reshape", [em.op("Size", [x]), em.ints([1])])],
        value=helper.make_tensor("value", em.elem_type, [1], [0.0]),
    )
    flat = em.op(
        "ScatterElements",
        [zeros, em.op("Reshape", [indices, em.ints([-1])]), em.op("Reshape", [dys[0], em.ints([-1])])],
        axis=0, reduction="add",
    )  # fmt: skip
    return [em.reshape_like(flat, x)]

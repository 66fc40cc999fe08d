"""Conv and the pools.

Conv: dX as a Conv with flipped, group-transposed weights at stride 1 (ORT's fast forward
kernels) and as a ConvTranspose with explicit output_padding otherwise. dW as im2col per
kernel tap: the window of the input each tap multiplies (a Slice per tap; at a 2-D stride,
a unit-step Slice of one stride phase after a SpaceToDepth), then a Gemm per tap (ordinary
Conv), the small products concatenated, or a batched MatMul over the concatenated taps
(other groups); the issue's spike measured this ~4.6x faster in ORT than a swapped-role
Conv. Depthwise dW is the exception: there the swapped-role grouped Conv wins. dB as a
ReduceSum. A per-channel factor on dY (a frozen BatchNormalization after the conv) is
applied to the weight and to the small results instead of to dY.
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
    if dy in em.channel_scaled:
        dy, factor = em.channel_scaled[dy]
    per_out = em.op("Reshape", [factor, em.ints([-1] + [1] * (r + 1))]) if factor else None
    out: Grads = [None] * len(node.input)
    if needed[0]:
        scaled_w = em.op("Mul", [w, per_out]) if per_out else w
        out[0] = _conv_dx(em, dy, scaled_w, w_shape, group, geo)
    if needed[1]:
        dw = _conv_dw(em, x, dy, w_shape, group, geo)
        out[1] = em.op("Mul", [dw, per_out], shape=w_shape) if per_out else dw
    if len(node.input) > 2 and needed[2]:
        db = em.reduce("ReduceSum", dy, [0, *range(2, 2 + r)], keepdims=False)
        out[2] = em.op("Mul", [db, factor]) if factor else db
    return out


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
    """im2col per kernel tap: dW[m, c, t] = sum over (n, o) of dY[n, m, o] * X[n, c, o*s + t*d]."""
    r = len(geo.kernel)
    m, cg = w_shape[0], w_shape[1]
    if cg == 1 and m == group:
        return _depthwise_dw(em, x, dy, w_shape, geo)
    c = cg * group
    channels_first = [1, 0, *range(2, 2 + r)]
    taps = int(np.prod(geo.kernel))
    stride = geo.strides[0]
    unit = all(s == 1 for s in geo.strides)
    if group == 1 and unit and np.prod(geo.spatial_out) >= PER_IMAGE_DW_MIN_POSITIONS:
        return _per_image_dw(em, x, dy, w_shape, geo)
    if r == 2 and taps > 1 and stride > 1 and geo.strides[1] == stride:
        cols = _phase_taps(em, x, c, geo)  # (C, N, *O) each
    else:
        cols = _sliced_taps(em, em.op("Transpose", [x], perm=channels_first), geo)
    dyt = em.op("Transpose", [dy], perm=channels_first)  # (M, N, *O)
    if group == 1:
        # One Gemm per tap, concatenated at the end: concatenating the taps' columns first
        # writes a (C, T, N, *O) copy of the input, which costs ORT more than the Gemm
        # itself (a tenth of a ResNet step).
        a = em.op("Reshape", [dyt, em.ints([m, -1])])
        per_tap = [
            em.op("Gemm", [a, em.op("Reshape", [col, em.ints([c, -1])])], transB=1) for col in cols
        ]  # (M, C) each
        per_tap = [em.op("Reshape", [t, em.ints([m, cg, 1])]) for t in per_tap]
        dw = per_tap[0] if taps == 1 else em.op("Concat", per_tap, axis=2)  # (M, Cg, T)
    else:
        cols = [em.unsqueeze(col, [1]) for col in cols]
        xcol = cols[0] if taps == 1 else em.op("Concat", cols, axis=1)  # (C, T, N, *O)
        a = em.op("Reshape", [dyt, em.ints([group, m // group, -1])])
        b = em.op("Reshape", [xcol, em.ints([group, cg * taps, -1])])
        dw = em.op("MatMul", [a, em.op("Transpose", [b], perm=[0, 2, 1])])  # (g, M/g, Cg*T)
    return em.op("Reshape", [dw, em.ints(w_shape)], shape=w_shape)


def _per_image_dw(em: Emitter, x: str, dy: str, w_shape: tuple[int, ...], geo: _Geometry) -> str:
    """dW of an ungrouped stride-1 conv with large feature maps, in the tensors' own (N, C,
    *S) layout: per tap, a batched MatMul of dY (N, M, O) by the window's transpose (N, O,
    C), summed over the batch. It skips the transposes of X and dY that the channels-first
    Gemm needs; with 1,024 or more output positions per image the per-image products are
    big enough for that to pay (ResNet's 32x32x32 3x3 conv, batch 32: 8.8 ms against
    10.6 ms; at 16x16 they are even, at 8x8 the single Gemm wins)."""
    m, c = w_shape[0], w_shape[1]
    a = em.op("Reshape", [dy, em.ints([0, m, -1])])  # (N, M, O)
    per_tap = []
    for col in _sliced_taps(em, x, geo):  # (N, C, *O) each
        b = em.op("Transpose", [em.op("Reshape", [col, em.ints([0, c, -1])])], perm=[0, 2, 1])
        summed = em.reduce("ReduceSum", em.op("MatMul", [a, b]), [0], keepdims=False)
        per_tap.append(em.op("Reshape", [summed, em.ints([m, c, 1])]))
    dw = per_tap[0] if len(per_tap) == 1 else em.op("Concat", per_tap, axis=2)  # (M, C, T)
    return em.op("Reshape", [dw, em.ints(w_shape)], shape=w_shape)


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


def _sliced_taps(em: Emitter, xt: str, geo: _Geometry) -> list[str]:
    """The (C, N, *O) window of the (C, N, *S) input that each kernel tap multiplies (or
    (N, C, *O) of (N, C, *S): only the spatial axes are sliced): a Slice of the padded input
    per tap, with the conv's stride as its step."""
    r = len(geo.kernel)
    unit = all(s == 1 for s in geo.strides)
    source = xt
    if any(geo.pads):
        xt = em.op("Pad", [xt, em.ints([0, 0, *geo.pads_begin, 0, 0, *geo.pads_end])])
    axes = em.ints(range(2, 2 + r))
    steps = em.ints(geo.strides)
    padded = [
        size + begin + end
        for size, begin, end in zip(geo.spatial_in, geo.pads_begin, geo.pads_end, strict=True)
    ]
    cols = []
    for tap in itertools.product(*(range(k) for k in geo.kernel)):
        starts = [t * d for t, d in zip(tap, geo.dilations, strict=True)]
        ends = [
            b + (o - 1) * s + 1
            for b, o, s in zip(starts, geo.spatial_out, geo.strides, strict=True)
        ]
        if unit and starts == list(geo.pads_begin) and geo.spatial_out == geo.spatial_in:
            # the unpadded input itself (the centre tap of a "same" conv, or a 1x1 kernel
            # without padding): no copy
            cols.append(source)
            continue
        if unit and not any(starts) and geo.spatial_out == tuple(padded):
            cols.append(xt)  # the whole padded input
            continue
        cols.append(em.op("Slice", [xt, em.ints(starts), em.ints(ends), axes, steps]))
    return cols


def _phase_taps(em: Emitter, x: str, c: int, geo: _Geometry) -> list[str]:
    """The same windows for a 2-D conv with one stride s > 1 on both axes, from the (N, C,
    H, W) input split into its s*s stride phases by SpaceToDepth: padded to a multiple of
    s, turned into (N, s*s*C, H/s, W/s) and transposed to (s*s*C, N, H/s, W/s), after which
    every tap is a unit-step Slice of one phase. ORT's Slice copies element by element when
    its step is not 1; on ResNet's stride-2 3x3 convs the strided slices cost twice the
    SpaceToDepth, transpose and unit-step slices together."""
    s = geo.strides[0]
    padded = [
        size + begin + end
        for size, begin, end in zip(geo.spatial_in, geo.pads_begin, geo.pads_end, strict=True)
    ]
    ends = [end - size % -s for size, end in zip(padded, geo.pads_end, strict=True)]
    if any(geo.pads_begin) or any(ends):
        x = em.op("Pad", [x, em.ints([0, 0, *geo.pads_begin, 0, 0, *ends])])
    x = em.op("SpaceToDepth", [x], blocksize=s)  # channel (ph * s + pw) * C + c
    x = em.op("Transpose", [x], perm=[1, 0, 2, 3])  # (s*s*C, N, H/s, W/s)
    axes = em.ints([0, 2, 3])
    cols = []
    for tap in itertools.product(*(range(k) for k in geo.kernel)):
        offsets = [t * d for t, d in zip(tap, geo.dilations, strict=True)]
        phase = (offsets[0] % s) * s + offsets[1] % s
        first = [o // s for o in offsets]
        last = [f + o for f, o in zip(first, geo.spatial_out, strict=True)]
        cols.append(
            em.op(
                "Slice", [x, em.ints([phase * c, *first]), em.ints([(phase + 1) * c, *last]), axes]
            )
        )
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

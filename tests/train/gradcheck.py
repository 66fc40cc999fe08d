"""Gradient checks for the training graphs: evaluate them in float64 with ONNX's reference
evaluator (ONNX Runtime has no float64 Conv/ConvTranspose/AveragePool kernels), compare
with directional finite differences, PyTorch autograd, and the float32 run on ONNX Runtime."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from graphopt.model import Model
from graphopt.runtime import create_session
from graphopt.train import Loss, TrainingGraph, build_training_graph


def model_from_proto(proto: onnx.ModelProto) -> Model:
    return Model(ir=ir.from_proto(proto))


def op_model(
    op_type: str,
    inputs: Mapping[str, np.ndarray | None],
    attrs: Mapping[str, object] | None = None,
    *,
    outputs: int = 1,
    opset: int = 18,
    dtype: type = np.float64,
) -> Model:
    """One node whose inputs are all initializers (None: an omitted optional input)."""
    names = [name if value is not None else "" for name, value in inputs.items()]
    inits = []
    for name, value in inputs.items():
        if value is None:
            continue
        array = np.asarray(value)
        if array.dtype.kind == "f":
            array = array.astype(dtype)
        inits.append(numpy_helper.from_array(array, name))
    outs = [f"y{i}" if outputs > 1 else "y" for i in range(outputs)]
    node = helper.make_node(op_type, names, outs, name="op", **dict(attrs or {}))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [node], "op", [], [helper.make_tensor_value_info(o, elem, None) for o in outs], inits
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 9
    _declare_uninferred_shapes(proto)
    return model_from_proto(proto)


def _declare_uninferred_shapes(proto: onnx.ModelProto) -> None:
    """Declare the output shapes ONNX shape inference does not find (GroupNormalization's,
    LayerNormalization's Mean/InvStdDev), from one reference run, so the loss can read them."""
    inferred = onnx.shape_inference.infer_shapes(proto).graph.output
    missing = [v.name for v in inferred if not v.type.tensor_type.HasField("shape")]
    if not missing:
        return
    evaluator = ReferenceEvaluator(proto, new_ops=REFERENCE_OPS)
    values = dict(zip(missing, evaluator.run(missing, {}), strict=True))
    for v in proto.graph.output:
        if v.name in values:
            shape = v.type.tensor_type.shape
            for d in values[v.name].shape:
                shape.dim.add().dim_value = int(d)


def cast_model(model: Model, dtype: type) -> Model:
    """The model with every float initializer, input and output in `dtype`."""
    proto = model.to_proto()
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    for i, t in enumerate(proto.graph.initializer):
        array = numpy_helper.to_array(t)
        if array.dtype.kind == "f":
            proto.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(array.astype(dtype), t.name)
            )
    for v in list(proto.graph.input) + list(proto.graph.output):
        if v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            v.type.tensor_type.elem_type = elem
    del proto.graph.value_info[:]
    return model_from_proto(proto)


class ConvTranspose(OpRun):
    """onnx 1.23's reference ConvTranspose slices grouped weights by output channel (wrong:
    they are (C, M/group, k...)); this one scatters each kernel tap, explicit pads only."""

    def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=None,
             kernel_shape=None, output_padding=None, output_shape=None, pads=None,
             strides=None):  # fmt: skip
        assert auto_pad in (None, "NOTSET") and output_shape is None
        r = x.ndim - 2
        group = group or 1
        strides = strides or [1] * r
        dilations = dilations or [1] * r
        pads = pads or [0] * (2 * r)
        output_padding = output_padding or [0] * r
        kernel = w.shape[2:]
        cg, mg = x.shape[1] // group, w.shape[1]
        full = [
            s * (i - 1) + (k - 1) * d + 1 + p
            for s, i, k, d, p in zip(
                strides, x.shape[2:], kernel, dilations, output_padding, strict=True
            )
        ]
        out = np.zeros((x.shape[0], mg * group, *full), dtype=x.dtype)
        for g in range(group):
            xg = x[:, g * cg : (g + 1) * cg]
            wg = w[g * cg : (g + 1) * cg]
            for tap in itertools.product(*(range(k) for k in kernel)):
                contrib = np.einsum("nc...,cm->nm...", xg, wg[(slice(None), slice(None), *tap)])
                where = tuple(
                    slice(t * d, t * d + s * (i - 1) + 1, s)
                    for t, d, s, i in zip(tap, dilations, strides, x.shape[2:], strict=True)
                )
                out[(slice(None), slice(g * mg, (g + 1) * mg), *where)] += contrib
        crop = tuple(slice(pads[i], full[i] - pads[r + i]) for i in range(r))
        out = out[(slice(None), slice(None), *crop)]
        if b is not None:
            out = out + b.reshape(1, -1, *([1] * r))
        return (out,)


class Erf(OpRun):
    """onnx 1.23's reference Erf rounds through float32; this one keeps the input's dtype."""

    def _run(self, x):
        return (np.vectorize(math.erf, otypes=[x.dtype])(x),)


class Gelu(OpRun):
    """Gelu in the input's dtype (onnx 1.23 expands its function body, whose Erf rounds
    through float32); the tanh form keeps ONNX's float32 constants."""

    def _run(self, x, approximate="none"):
        if approximate == "tanh":
            k, c = np.float32(0.044715), np.float32(math.sqrt(2 / math.pi))
            inner = x.dtype.type(c) * (x + x.dtype.type(k) * x**3)
            return ((0.5 * x * (1 + np.tanh(inner))).astype(x.dtype),)
        cdf = 0.5 * (1 + np.vectorize(math.erf, otypes=[x.dtype])(x / math.sqrt(2)))
        return ((x * cdf).astype(x.dtype),)


class GroupNormalization(OpRun):
    """GroupNormalization in the input's dtype (onnx 1.23's function body computes in float32,
    stash_type); scale and bias per channel (opset 21) or per group (opset 18) by their size."""

    def _run(self, x, scale, bias, epsilon=1e-5, num_groups=None, stash_type=None):
        n, c = x.shape[:2]
        grouped = x.reshape(n, num_groups, -1)
        mean = grouped.mean(-1, keepdims=True)
        var = ((grouped - mean) ** 2).mean(-1, keepdims=True)
        xhat = (grouped - mean) / np.sqrt(var + x.dtype.type(epsilon))
        if scale.size == c:
            xhat = xhat.reshape(x.shape)
            per = (1, c) + (1,) * (x.ndim - 2)
            return ((xhat * scale.reshape(per) + bias.reshape(per)).astype(x.dtype),)
        y = xhat * scale.reshape(1, -1, 1) + bias.reshape(1, -1, 1)
        return (y.reshape(x.shape).astype(x.dtype),)


class Pad(OpRun):
    """Pad with negative pads too (onnx 1.23's reference hands them to np.pad, which refuses
    them): pad by the positive parts, then crop by the negative ones."""

    def _run(self, data, pads, constant_value=None, axes=None, mode=None):
        r = data.ndim
        axes = [int(a) % r for a in (range(r) if axes is None else axes)]
        widths, crop = [(0, 0)] * r, [slice(None)] * r
        for i, a in enumerate(axes):
            b, e = int(pads[i]), int(pads[len(axes) + i])
            widths[a] = (max(b, 0), max(e, 0))
            crop[a] = slice(max(-b, 0), data.shape[a] + max(b, 0) + max(e, 0) - max(-e, 0))
        mode = mode or "constant"
        if mode == "constant":
            value = 0 if constant_value is None else constant_value.reshape(()).item()
            out = np.pad(data, widths, mode="constant", constant_values=value)
        else:
            out = np.pad(data, widths, mode=mode)
        return (out[tuple(crop)].astype(data.dtype),)


REFERENCE_OPS = [ConvTranspose, Erf, Gelu, GroupNormalization, Pad]


class Reference:
    """Runs a training graph in float64 with onnx.reference."""

    def __init__(self, graph: TrainingGraph) -> None:
        self.graph = graph
        self.evaluator = ReferenceEvaluator(graph.proto, new_ops=REFERENCE_OPS)

    def run(self, feeds: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray]):
        names = [self.graph.loss, *self.graph.gradients.values()]
        values = self.evaluator.run(names, {**feeds, **params})
        loss = float(values[0])
        grads = dict(zip(self.graph.gradients, values[1:], strict=True))
        return loss, grads


def directional_fd(
    reference: Reference,
    feeds: Mapping[str, np.ndarray],
    params: Mapping[str, np.ndarray],
    *,
    directions: int = 3,
    eps: float = 1e-6,
    seed: int = 0,
) -> list[tuple[float, float]]:
    """(finite difference, gradient·v) for random unit-scale directions v over all trainables."""
    rng = np.random.default_rng(seed)
    _, grads = reference.run(feeds, params)
    pairs = []
    for _ in range(directions):
        v = {k: rng.standard_normal(p.shape) for k, p in params.items()}
        plus = {k: p + eps * v[k] for k, p in params.items()}
        minus = {k: p - eps * v[k] for k, p in params.items()}
        fd = (reference.run(feeds, plus)[0] - reference.run(feeds, minus)[0]) / (2 * eps)
        analytic = float(sum(np.sum(grads[k] * v[k]) for k in params))
        pairs.append((fd, analytic))
    return pairs


def assert_fd_agrees(pairs: Sequence[tuple[float, float]], rtol: float = 1e-5) -> None:
    for fd, analytic in pairs:
        scale = max(abs(fd), abs(analytic), 1e-8)
        assert abs(fd - analytic) <= rtol * scale, (fd, analytic, abs(fd - analytic) / scale)


def ort_gradients(
    graph: TrainingGraph, feeds: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray]
):
    """Loss and gradients from ONNX Runtime (CPU)."""
    session = create_session(graph.proto.SerializeToString(), device="cpu", threads=1)
    names = [graph.loss, *graph.gradients.values()]
    values = session.run({**feeds, **params}, names)
    return float(values[graph.loss]), {k: values[v] for k, v in graph.gradients.items()}


def assert_close_scaled(actual: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    """Equal within rtol of the largest magnitude (float32 sums lose digits near zero)."""
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


__all__ = [
    "Loss",
    "Reference",
    "assert_close_scaled",
    "assert_fd_agrees",
    "build_training_graph",
    "cast_model",
    "directional_fd",
    "model_from_proto",
    "op_model",
    "ort_gradients",
]

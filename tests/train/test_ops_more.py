"""Per-op gradients of the math, normalization and spatial rules, checked as tests/train/
test_ops.py checks the others (its Case machinery and its three checks: directional finite
differences in float64, PyTorch autograd in float64, ONNX Runtime in float32), plus small
multi-node models for what one node cannot show (Cast, ties, refusals)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphopt.model import Model
from graphopt.train import builder
from graphopt.train.graph import GradientError
from tests.train import test_ops as base
from tests.train.gradcheck import (
    Loss,
    Reference,
    assert_close_scaled,
    assert_fd_agrees,
    build_training_graph,
    directional_fd,
    model_from_proto,
    op_model,
    ort_gradients,
)
from tests.train.nets import Net
from tests.train.test_ops import Case, ints, rand

R = np.random.default_rng(4321)
COND = R.random((2, 3, 1)) > 0.5
IDX = np.array([[0, -1, 2], [2, 0, 0]], dtype=np.int64)  # duplicates and a negative index


def positive(*shape: int) -> np.ndarray:
    return R.uniform(0.5, 2.0, shape)


def layer_norm_stats(T, F, x, s, b, eps):
    """LayerNormalization over the last axis with its Mean and InvStdDev outputs."""
    mean = x.mean(-1, keepdim=True)
    inv_std = 1 / T.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)
    return (x - mean) * inv_std * s + b, mean, inv_std


def pad_with(F, x, pads, value):
    """F.pad with a differentiable constant."""
    ones = F.pad(x.new_zeros(x.shape), pads, value=1.0)
    return F.pad(x, pads) + value * ones


def group_norm_per_group(T, F, x, s, b, eps):
    """Opset 18's GroupNormalization: scale and bias per group."""
    n, groups = x.shape[0], s.shape[0]
    y = F.group_norm(x, groups, eps=eps).reshape(n, groups, -1)
    return (y * s[:, None] + b[:, None]).reshape(x.shape)


CASES = [
    # ---------------------------------------------------------------- powers, roots
    Case("sqrt", "Sqrt", {"x": positive(3, 4)}, {}, lambda T, F, v: T.sqrt(v["x"])),
    Case("reciprocal", "Reciprocal", {"x": rand(3, 4, low=0.5)}, {},
         lambda T, F, v: 1.0 / v["x"]),
    Case("pow-const-3", "Pow", {"x": rand(3, 4), "e": np.array(3.0)}, {},
         lambda T, F, v: v["x"] ** 3, trainables=["x"]),
    Case("pow-const-2", "Pow", {"x": rand(3, 4), "e": np.array(2.0)}, {},
         lambda T, F, v: v["x"] ** 2, trainables=["x"]),
    Case("pow-const-half", "Pow", {"x": positive(3, 4), "e": np.array(0.5)}, {},
         lambda T, F, v: v["x"] ** 0.5, trainables=["x"]),
    Case("pow-int-exponent", "Pow", {"x": rand(3, 4), "e": np.array(3, dtype=np.int64)}, {},
         lambda T, F, v: v["x"] ** 3),
    Case("pow-tensor-broadcast", "Pow", {"x": positive(2, 3, 4), "e": rand(3, 1)}, {},
         lambda T, F, v: v["x"] ** v["e"]),
    Case("pow-exponent-only", "Pow", {"x": positive(3, 4), "e": rand(4)}, {},
         lambda T, F, v: v["x"] ** v["e"], trainables=["e"]),
    # ---------------------------------------------------------------- Erf, Gelu, Abs
    Case("erf", "Erf", {"x": rand(3, 4)}, {}, lambda T, F, v: T.erf(v["x"])),
    Case("gelu", "Gelu", {"x": 2 * rand(3, 4, 5)}, {}, lambda T, F, v: F.gelu(v["x"]),
         opset=20),
    # ONNX's tanh Gelu holds its constants in float32; PyTorch's in float64.
    Case("gelu-tanh", "Gelu", {"x": 2 * rand(3, 4, 5)}, {"approximate": "tanh"},
         lambda T, F, v: F.gelu(v["x"], approximate="tanh"), opset=20, torch_rtol=1e-6),
    Case("abs", "Abs", {"x": rand(3, 4)}, {}, lambda T, F, v: T.abs(v["x"])),
    # ---------------------------------------------------------------- Max, Min, Where
    Case("max-broadcast", "Max", {"a": rand(2, 3, 4), "b": rand(3, 1), "c": rand(4)}, {},
         lambda T, F, v: T.maximum(T.maximum(v["a"], v["b"]), v["c"])),
    Case("min-two", "Min", {"a": rand(3, 4), "b": rand(3, 4)}, {},
         lambda T, F, v: T.minimum(v["a"], v["b"])),
    Case("max-one", "Max", {"a": rand(3, 4)}, {}, lambda T, F, v: v["a"]),
    Case("where-broadcast", "Where", {"c": COND, "a": rand(2, 3, 4), "b": rand(3, 1)}, {},
         lambda T, F, v: T.where(T.tensor(COND), v["a"], v["b"])),
    Case("where-b-only", "Where", {"c": COND, "a": rand(2, 3, 4), "b": rand(4)}, {},
         lambda T, F, v: T.where(T.tensor(COND), v["a"], v["b"]), trainables=["b"]),
    # ---------------------------------------------------------------- normalization
    # Float attributes are float32 in ONNX: the epsilons are powers of two.
    Case("layernorm", "LayerNormalization", {"x": rand(2, 3, 5), "s": rand(5), "b": rand(5)},
         {"epsilon": 2.0**-10},
         lambda T, F, v: F.layer_norm(v["x"], (5,), v["s"], v["b"], 2.0**-10), opset=17),
    Case("layernorm-two-axes", "LayerNormalization",
         {"x": rand(2, 3, 4), "s": rand(3, 4), "b": rand(3, 4)}, {"axis": 1},
         lambda T, F, v: F.layer_norm(v["x"], (3, 4), v["s"], v["b"], 1e-5)),
    Case("layernorm-all-axes-no-bias", "LayerNormalization", {"x": rand(2, 3, 4), "s": rand(3, 4)},
         {"axis": 0}, lambda T, F, v: F.layer_norm(v["x"], (2, 3, 4), v["s"].expand(2, 3, 4),
                                                   None, 1e-5)),
    Case("layernorm-broadcast-scale", "LayerNormalization",
         {"x": rand(2, 3, 4), "s": rand(1, 4), "b": rand(4)}, {"axis": -2},
         lambda T, F, v: F.layer_norm(v["x"], (3, 4), eps=1e-5) * v["s"] + v["b"]),
    Case("layernorm-stats-outputs", "LayerNormalization",
         {"x": rand(2, 3, 4), "s": rand(4), "b": rand(4)}, {"epsilon": 2.0**-8},
         lambda T, F, v: layer_norm_stats(T, F, v["x"], v["s"], v["b"], 2.0**-8), outputs=3),
    Case("layernorm-mean-only", "LayerNormalization",
         {"x": rand(2, 3, 4), "s": rand(4), "b": rand(4)}, {"epsilon": 2.0**-8},
         lambda T, F, v: layer_norm_stats(T, F, v["x"], v["s"], v["b"], 2.0**-8)[1],
         outputs=3, losses_on=[1], trainables=["x"]),
    Case("instancenorm", "InstanceNormalization",
         {"x": rand(2, 3, 4, 5), "s": rand(3), "b": rand(3)}, {"epsilon": 2.0**-12},
         lambda T, F, v: F.instance_norm(v["x"], weight=v["s"], bias=v["b"], eps=2.0**-12)),
    Case("instancenorm-1d", "InstanceNormalization",
         {"x": rand(2, 3, 6), "s": rand(3), "b": rand(3)}, {},
         lambda T, F, v: F.instance_norm(v["x"], weight=v["s"], bias=v["b"], eps=1e-5)),
    # Opset 18's GroupNormalization scales per group, opset 21's per channel.
    Case("groupnorm-opset18", "GroupNormalization",
         {"x": rand(2, 6, 3, 4), "s": rand(3), "b": rand(3)}, {"num_groups": 3},
         lambda T, F, v: group_norm_per_group(T, F, v["x"], v["s"], v["b"], 1e-5)),
    Case("groupnorm-opset21", "GroupNormalization",
         {"x": rand(2, 6, 3, 4), "s": rand(6), "b": rand(6)},
         {"num_groups": 2, "epsilon": 2.0**-10},
         lambda T, F, v: F.group_norm(v["x"], 2, v["s"], v["b"], 2.0**-10), opset=21),
    Case("groupnorm-opset21-2d", "GroupNormalization",
         {"x": rand(3, 8), "s": rand(8), "b": rand(8)}, {"num_groups": 2},
         lambda T, F, v: F.group_norm(v["x"], 2, v["s"], v["b"], 1e-5), opset=21),
    # ---------------------------------------------------------------- Pad
    Case("pad-constant", "Pad",
         {"x": rand(2, 3, 4, 5), "p": ints(0, 0, 1, 2, 0, 0, 2, 1), "cv": np.array(0.5)}, {},
         lambda T, F, v: pad_with(F, v["x"], (2, 1, 1, 2), v["cv"])),
    Case("pad-constant-negative", "Pad",
         {"x": rand(2, 3, 5, 6), "p": ints(0, 1, -1, 2, 0, 0, 2, -3)}, {},
         lambda T, F, v: F.pad(v["x"], (2, -3, -1, 2, 1, 0))),
    Case("pad-axes", "Pad",
         {"x": rand(2, 3, 4), "p": ints(1, -1, 2, 3), "cv": None, "ax": ints(-1, 1)}, {},
         lambda T, F, v: F.pad(v["x"], (1, 2, -1, 3))),
    Case("pad-reflect", "Pad", {"x": rand(2, 3, 5, 6), "p": ints(0, 0, 2, 1, 0, 0, 1, 3)},
         {"mode": "reflect"}, lambda T, F, v: F.pad(v["x"], (1, 3, 2, 1), mode="reflect")),
    Case("pad-edge", "Pad", {"x": rand(2, 3, 4, 5), "p": ints(0, 0, 3, 0, 0, 0, 1, 2)},
         {"mode": "edge"}, lambda T, F, v: F.pad(v["x"], (0, 2, 3, 1), mode="replicate")),
    Case("pad-wrap", "Pad", {"x": rand(2, 3, 4, 5), "p": ints(0, 0, 2, 1, 0, 0, 1, 3)},
         {"mode": "wrap"}, lambda T, F, v: F.pad(v["x"], (1, 3, 2, 1), mode="circular"),
         opset=19),
    # ---------------------------------------------------------------- Resize
    Case("resize-nearest-sizes-3x2", "Resize",
         {"x": rand(2, 3, 3, 4), "roi": None, "s": None, "z": ints(2, 3, 9, 8)},
         {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
         lambda T, F, v: F.interpolate(v["x"], size=(9, 8), mode="nearest")),
    Case("resize-nearest-fractional", "Resize",
         {"x": rand(2, 3, 5, 4), "roi": None, "s": None, "z": ints(2, 3, 7, 3)},
         {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
         lambda T, F, v: F.interpolate(v["x"], size=(7, 3), mode="nearest")),
    Case("resize-bilinear-align-corners", "Resize",
         {"x": rand(2, 3, 3, 4), "roi": None, "s": None, "z": ints(2, 3, 5, 7)},
         {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
         lambda T, F, v: F.interpolate(v["x"], size=(5, 7), mode="bilinear",
                                       align_corners=True)),
    Case("resize-bilinear-down", "Resize",
         {"x": rand(2, 3, 6, 8), "roi": None, "s": None, "z": ints(2, 3, 4, 3)},
         {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
         # 6 -> 4: the scale 2/3 in float32, as runtimes take it.
         lambda T, F, v: F.interpolate(v["x"], size=(4, 3), mode="bilinear"), torch_rtol=1e-5),
    Case("resize-bicubic", "Resize",
         {"x": rand(1, 2, 4, 5), "roi": None, "s": None, "z": ints(1, 2, 7, 9)},
         {"mode": "cubic"},
         # Runtimes take the scales 7/4, 9/5 in float32 (PyTorch in float64).
         lambda T, F, v: F.interpolate(v["x"], size=(7, 9), mode="bicubic"), torch_rtol=1e-5),
    Case("resize-linear-channel-axis", "Resize",
         {"x": rand(2, 3, 4, 2), "roi": None, "s": None, "z": ints(2, 5, 4, 2)},
         {"mode": "linear"}, None),
    # ---------------------------------------------------------------- Gather
    Case("gather-axis0-dups-negative", "Gather", {"d": rand(5, 3), "i": IDX}, {},
         lambda T, F, v: v["d"][T.tensor(IDX)]),
    Case("gather-axis1-scalar", "Gather", {"d": rand(2, 4, 3), "i": np.array(-2)}, {"axis": 1},
         lambda T, F, v: v["d"][:, -2]),
    Case("gather-axis2", "Gather", {"d": rand(2, 3, 5), "i": IDX}, {"axis": 2},
         lambda T, F, v: v["d"][:, :, T.tensor(IDX)]),
    Case("gather-axis1-opset13", "Gather", {"d": rand(2, 5, 3), "i": IDX}, {"axis": 1},
         lambda T, F, v: v["d"][:, T.tensor(IDX)], opset=13),
    Case("gatherelements", "GatherElements",
         {"d": rand(3, 4), "i": np.array([[0, 3, 3], [1, 0, 0], [2, 2, 1]])}, {"axis": 1},
         lambda T, F, v: T.gather(v["d"], 1, T.tensor([[0, 3, 3], [1, 0, 0], [2, 2, 1]]))),
    Case("gatherelements-negative", "GatherElements",
         {"d": rand(3, 4), "i": np.array([[-1, 0, 2, -3]])}, {"axis": 0},
         lambda T, F, v: T.gather(v["d"], 0, T.tensor([[2, 0, 2, 0]]))),
    # ---------------------------------------------------------------- ConvTranspose
    Case("convtranspose-stride-pads-outpad", "ConvTranspose",
         {"x": rand(2, 3, 4, 4), "w": rand(3, 2, 3, 3), "b": rand(2)},
         {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
         lambda T, F, v: F.conv_transpose2d(v["x"], v["w"], v["b"], stride=2, padding=1,
                                            output_padding=1)),
    Case("convtranspose-groups-dilation", "ConvTranspose",
         {"x": rand(2, 4, 3, 4), "w": rand(4, 3, 2, 3)},
         {"group": 2, "dilations": [2, 1], "strides": [1, 2], "pads": [1, 0, 1, 0]},
         lambda T, F, v: F.conv_transpose2d(v["x"], v["w"], groups=2, dilation=(2, 1),
                                            stride=(1, 2), padding=(1, 0))),
    Case("convtranspose-depthwise", "ConvTranspose",
         {"x": rand(2, 3, 4, 4), "w": rand(3, 1, 3, 3), "b": rand(3)},
         {"group": 3, "strides": [2, 2]},
         lambda T, F, v: F.conv_transpose2d(v["x"], v["w"], v["b"], stride=2, groups=3)),
    Case("convtranspose-1d-asym-pads", "ConvTranspose",
         {"x": rand(2, 3, 5), "w": rand(3, 4, 3)},
         {"strides": [3], "pads": [2, 0], "output_padding": [2]},
         lambda T, F, v: F.conv_transpose1d(v["x"], v["w"], stride=3, output_padding=2)[..., 2:]),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_gradient_matches_finite_differences(case: Case):
    base.test_gradient_matches_finite_differences(case)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_gradient_matches_torch(case: Case):
    if case.torch is None:
        pytest.skip("PyTorch has no equivalent of this case")
    base.test_gradient_matches_torch(case)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_onnxruntime_float32_matches_float64(case: Case):
    base.test_onnxruntime_float32_matches_float64(case)


def test_group_norm_output_is_typed_by_the_builder():
    # ONNX shape inference leaves GroupNormalization's output untyped; the builder declares
    # it from input 0, so the gradient is not silently zero.
    x, scale, bias = rand(2, 4, 3), rand(4), rand(4)
    model = op_model("GroupNormalization", {"x": x, "s": scale, "b": bias}, {"num_groups": 2},
                     opset=21)  # fmt: skip
    graph = build_training_graph(model, [Loss.mse("y")])
    _, grads = Reference(graph).run(_targets(graph), graph.initial)
    assert np.abs(grads["s"]).max() > 0


def test_untyped_output_on_the_gradient_path_is_refused(monkeypatch):
    # Without the fill-in, an untyped output with an active input is an error, not a
    # silently dropped gradient.
    monkeypatch.setattr(builder, "SAME_TYPE_AS_INPUT0", frozenset())
    x, scale, bias = rand(2, 4, 3), rand(4), rand(4)
    model = op_model("GroupNormalization", {"x": x, "s": scale, "b": bias}, {"num_groups": 2},
                     opset=21)  # fmt: skip
    with pytest.raises(GradientError, match=r"GroupNormalization node .* type of its output"):
        build_training_graph(model, [Loss.mse("y")])


# ---------------------------------------------------------------------------- small models


def _model(nodes, inits: dict[str, np.ndarray], outputs: list[str], opset: int = 18):
    graph = helper.make_graph(
        nodes,
        "m",
        [],
        [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 9
    return model_from_proto(proto)


def _targets(graph, seed: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.proto.graph.input
    }
    return {name: rng.standard_normal(shapes[name]) for name in graph.loss_inputs}


def test_cast_between_floats_passes_the_gradient():
    # float64 -> float32 -> Mul -> float64: the gradient crosses both casts.
    x, w = rand(3, 4), rand(3, 4).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["x"], ["x32"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", ["x32", "w"], ["p"]),
        helper.make_node("Cast", ["p"], ["y"], to=onnx.TensorProto.DOUBLE),
    ]
    graph = build_training_graph(_model(nodes, {"x": x, "w": w}, ["y"]), [Loss.mse("y")],
                                 trainables=["x"])  # fmt: skip
    feeds = _targets(graph)
    _, grads = Reference(graph).run(feeds, graph.initial)
    assert grads["x"].dtype == np.float64
    expected = 2 * (x * w.astype(np.float64) - feeds["y.target"]) * w / x.size
    np.testing.assert_allclose(grads["x"], expected, rtol=1e-6)


def test_cast_to_integer_blocks_the_gradient():
    # y = float(int(x)) * x: only the direct path carries a gradient (int(x) is flat).
    x = rand(3, 4) * 3
    nodes = [
        helper.make_node("Cast", ["x"], ["xi"], to=onnx.TensorProto.INT64),
        helper.make_node("Cast", ["xi"], ["xf"], to=onnx.TensorProto.DOUBLE),
        helper.make_node("Mul", ["xf", "x"], ["y"]),
    ]
    graph = build_training_graph(_model(nodes, {"x": x}, ["y"]), [Loss.mse("y")])
    feeds = _targets(graph)
    reference = Reference(graph)
    _, grads = reference.run(feeds, graph.initial)
    y = np.trunc(x) * x
    np.testing.assert_allclose(grads["x"], 2 * (y - feeds["y.target"]) * np.trunc(x) / x.size)
    assert_fd_agrees(directional_fd(reference, feeds, graph.initial), rtol=1e-6)


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_min_ties_go_to_the_first_input(op):
    a = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b = np.array([1.0, 0.0, 3.0])
    c = np.array([[1.0, 9.0, -9.0], [4.0, 5.0, 6.0]])
    graph = build_training_graph(op_model(op, {"a": a, "b": b, "c": c}), [Loss.mse("y")])
    feeds = _targets(graph)
    _, grads = Reference(graph).run(feeds, graph.initial)
    y = (np.maximum if op == "Max" else np.minimum).reduce([a, np.broadcast_to(b, a.shape), c])
    dy = 2 * (y - feeds["y.target"]) / y.size
    first = np.where(a == y, 0, np.where(b == y, 1, 2))
    np.testing.assert_allclose(grads["a"], np.where(first == 0, dy, 0))
    np.testing.assert_allclose(grads["b"], np.where(first == 1, dy, 0).sum(axis=0))
    np.testing.assert_allclose(grads["c"], np.where(first == 2, dy, 0))


# Resize's scales are float32 in every model, so these cases are built here rather than by
# op_model (which gives every float initializer the model's dtype).
SCALED = [
    ("nearest-2x", (2, 3, 3, 4), [1, 1, 2, 2], {},
     lambda F, x: F.interpolate(x, scale_factor=2, mode="nearest")),
    ("nearest-half-pixel-down", (1, 2, 6, 6), [1, 1, 0.5, 0.5], {}, None),
    ("bilinear", (2, 3, 3, 4), [1, 1, 2, 2], {"mode": "linear"},
     lambda F, x: F.interpolate(x, scale_factor=2, mode="bilinear")),
    ("linear-1d-axes", (2, 3, 5), [3], {"mode": "linear", "axes": [2]},
     lambda F, x: F.interpolate(x, scale_factor=3, mode="linear")),
    ("cubic-exclude-outside", (1, 2, 4, 5), [1, 1, 2, 1.5],
     {"mode": "cubic", "exclude_outside": 1, "cubic_coeff_a": -0.5}, None),
    ("nearest-ceil-half-pixel-symmetric", (1, 2, 4, 5), [1, 1, 1.5, 2.5],
     {"nearest_mode": "ceil", "coordinate_transformation_mode": "half_pixel_symmetric"}, None),
]  # fmt: skip


def _resize_model(x: np.ndarray, scales: list[float], attrs: dict, dtype: type):
    inits = {"x": x.astype(dtype), "s": np.asarray(scales, dtype=np.float32)}
    node = helper.make_node("Resize", ["x", "", "s"], ["y"], **attrs)
    return _model([node], inits, ["y"])


@pytest.mark.parametrize(("name", "shape", "scales", "attrs", "oracle"), SCALED,
                         ids=[c[0] for c in SCALED])  # fmt: skip
def test_resize_with_scales(name, shape, scales, attrs, oracle):
    x = R.standard_normal(shape)
    graph = build_training_graph(_resize_model(x, scales, attrs, np.float64), [Loss.mse("y")],
                                 trainables=["x"])  # fmt: skip
    feeds = _targets(graph)
    reference = Reference(graph)
    assert_fd_agrees(directional_fd(reference, feeds, graph.initial), rtol=1e-6)
    loss, grads = reference.run(feeds, graph.initial)
    assert np.abs(grads["x"]).max() > 0

    graph32 = build_training_graph(_resize_model(x, scales, attrs, np.float32),
                                   [Loss.mse("y")], trainables=["x"])  # fmt: skip
    feeds32 = {k: v.astype(np.float32) for k, v in feeds.items()}
    loss32, grads32 = ort_gradients(graph32, feeds32, graph32.initial)
    assert loss32 == pytest.approx(loss, rel=1e-5)
    assert_close_scaled(grads32["x"], grads["x"], rtol=2e-5)

    if oracle is not None:
        torch = pytest.importorskip("torch")
        import torch.nn.functional as F

        tx = torch.tensor(x, requires_grad=True)
        total = ((oracle(F, tx) - torch.tensor(feeds["y.target"])) ** 2).mean()
        total.backward()
        assert loss == pytest.approx(float(total.detach()), rel=1e-9)
        np.testing.assert_allclose(grads["x"], tx.grad.numpy(), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------- refusals


def _refused(op: str, inputs: dict, attrs: dict, match: str, opset: int = 18) -> None:
    with pytest.raises(GradientError, match=match):
        build_training_graph(op_model(op, inputs, attrs, opset=opset), [Loss.mse("y")],
                             trainables=["x"])  # fmt: skip


def test_refusals_say_what_is_not_supported():
    x = rand(1, 2, 4, 4)
    _refused("Resize", {"x": x, "roi": np.array([0, 0, 0.1, 0.1, 1, 1, 0.9, 0.9]), "s": None,
                        "z": ints(1, 2, 3, 3)},
             {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize"},
             "tf_crop_and_resize")  # fmt: skip
    _refused("ConvTranspose", {"x": x, "w": rand(2, 2, 3, 3)},
             {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, "auto_pad")  # fmt: skip
    _refused("GatherElements", {"x": rand(3, 4), "i": np.array([[0, 1]])}, {}, "opset 16",
             opset=13)  # fmt: skip


def test_pad_with_runtime_pads_is_refused():
    nodes = [
        helper.make_node("Identity", ["p0"], ["p"]),
        helper.make_node("Pad", ["x", "p"], ["y"]),
    ]
    model = _model(nodes, {"x": rand(2, 3), "p0": ints(0, 1, 0, 1)}, ["y"])
    with pytest.raises(GradientError, match="pads are computed at run time"):
        build_training_graph(model, [Loss.mse("y")], trainables=["x"])


@pytest.mark.parametrize("opset", [13, 18])
def test_gather_with_runtime_indices(opset):
    # Indices computed in the graph (not constants), int32, negative and repeated.
    data = rand(6, 3)
    nodes = [
        helper.make_node("Identity", ["i0"], ["i"]),
        helper.make_node("Gather", ["d", "i"], ["y"], axis=0),
    ]
    index = np.array([[-1, 2], [2, 0], [5, -6]], dtype=np.int32)
    reference_grads, ort_grads = [], []
    for dtype in (np.float64, np.float32):
        model = _model(nodes, {"d": data.astype(dtype), "i0": index}, ["y"], opset=opset)
        graph = build_training_graph(model, [Loss.mse("y")], trainables=["d"])
        feeds = {k: v.astype(dtype) for k, v in _targets(graph).items()}
        if dtype is np.float64:
            reference = Reference(graph)
            assert_fd_agrees(directional_fd(reference, feeds, graph.initial), rtol=1e-6)
            reference_grads.append(reference.run(feeds, graph.initial)[1]["d"])
            dy = 2 * (data[index] - feeds["y.target"]) / feeds["y.target"].size
            expected = np.zeros_like(data)
            np.add.at(expected, index, dy)
            np.testing.assert_allclose(reference_grads[0], expected, rtol=1e-12)
        else:
            ort_grads.append(ort_gradients(graph, feeds, graph.initial)[1]["d"])
    assert_close_scaled(ort_grads[0], reference_grads[0], rtol=2e-5)


# ---------------------------------------------------------------------------- whole model


def _decoder_like(dtype: type) -> Model:
    """Conv, InstanceNormalization, reflect Pad, strided Conv, Max (a leaky relu), bilinear
    Resize, ConvTranspose, LayerNormalization, pooled, then Pow/Sqrt, Where and an added
    Gather row (an embedding) before the Gemm head: 5 logits."""
    n = Net(5, dtype)
    x = n.conv("x", 3, 4)
    x = n.op("InstanceNormalization", [x, n.weight([4]), n.const(n.rng.standard_normal(4) * 0.1)])
    x = n.op("Pad", [x, n.const(ints(0, 0, 1, 1, 0, 0, 1, 1))], mode="reflect")
    x = n.op("Conv", [x, n.weight([6, 4, 3, 3])], strides=[2, 2])  # 10 -> 4
    x = n.op("Max", [x, n.op("Mul", [x, n.const(np.array(0.1))])])
    x = n.op("Resize", [x, "", "", n.const(ints(2, 6, 9, 9))], mode="linear")  # 4 -> 9
    x = n.op("ConvTranspose", [x, n.weight([6, 4, 3, 3])], strides=[2, 2], pads=[1, 1, 1, 1],
             output_padding=[1, 1])  # 9 -> 18  # fmt: skip
    x = n.op("LayerNormalization", [x, n.weight([18]), n.const(np.zeros(18))], axis=-1)
    x = n.op("Flatten", [n.op("GlobalAveragePool", [x])], axis=1)  # (2, 4)
    x = n.op("Sqrt", [n.op("Add", [n.op("Pow", [x, n.const(np.array(2.0))]),
                                   n.const(np.array(1.0))])])  # fmt: skip
    x = n.op("Where", [n.const(np.array([True, False, True, True])), x,
                       n.op("Mul", [x, n.const(np.array(-0.5))])])  # fmt: skip
    x = n.op("Add", [x, n.op("Gather", [n.weight([7, 4]), n.const(np.array([3, -1]))])])
    n.op("Gemm", [x, n.weight([5, 4]), n.const(np.zeros(5), "fc_b")], transB=1)
    n.nodes[-1].output[0] = "logits"
    return n.model({"x": [2, 3, 8, 8]}, ["logits"])


def test_whole_model_gradients():
    losses = [Loss.cross_entropy("logits", weight=0.5), Loss.distillation("logits", weight=2.0)]
    graph = build_training_graph(_decoder_like(np.float64), losses)
    onnx.checker.check_model(graph.proto, full_check=True)
    assert len(graph.trainables) == 10
    rng = np.random.default_rng(11)
    feeds = {
        "x": rng.standard_normal((2, 3, 8, 8)),
        "logits.labels": np.array([1, 4], dtype=np.int64),
        "logits.teacher": rng.standard_normal((2, 5)) * 2,
    }
    reference = Reference(graph)
    assert_fd_agrees(directional_fd(reference, feeds, graph.initial, directions=2), rtol=1e-5)
    loss64, grads64 = reference.run(feeds, graph.initial)

    graph32 = build_training_graph(_decoder_like(np.float32), losses)
    feeds32 = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in feeds.items()}
    loss32, grads32 = ort_gradients(graph32, feeds32, graph32.initial)
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    for name in graph.trainables:
        assert np.abs(grads64[name]).max() > 0, name
        assert_close_scaled(grads32[name], grads64[name], rtol=1e-4)

"""Per-op gradients of the math, normalization and spatial rules, checked as tests/train/
test_ops.py checks the others (its Case machinery and its three checks: directional finite
differences in float64, PyTorch autograd in float64, ONNX Runtime in float32), plus small
multi-node models for what one node cannot show (Cast, ties, refusals)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphopt.train import builder
from tests.train import test_ops as base
from tests.train.gradcheck import (
    Loss,
    Reference,
    assert_fd_agrees,
    build_training_graph,
    directional_fd,
    model_from_proto,
    op_model,
)
from tests.train.test_ops import Case, rand

R = np.random.default_rng(4321)
COND = R.random((2, 3, 1)) > 0.5


def positive(*shape: int) -> np.ndarray:
    return R.uniform(0.5, 2.0, shape)


def layer_norm_stats(T, F, x, s, b, eps):
    """LayerNormalization over the last axis with its Mean and InvStdDev outputs."""
    mean = x.mean(-1, keepdim=True)
    inv_std = 1 / T.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)
    return (x - mean) * inv_std * s + b, mean, inv_std


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
]  # fmt: skip


def _infer_through_group_norm(infer):
    """builder._infer, plus GroupNormalization's output (its input's type and shape), which
    ONNX shape inference leaves unknown: without it the builder sees no float output there
    and silently passes no gradient (see test_group_norm_needs_the_builder_to_know_its_output)."""

    def patched(proto: onnx.ModelProto):
        shapes, types = infer(proto)
        unknown = [
            n for n in proto.graph.node
            if n.op_type == "GroupNormalization" and n.output[0] not in types
            and n.input[0] in types
        ]  # fmt: skip
        if not unknown:
            return shapes, types
        annotated = onnx.ModelProto()
        annotated.CopyFrom(proto)
        for n in unknown:
            shape = shapes.get(n.input[0])
            annotated.graph.value_info.append(
                helper.make_tensor_value_info(n.output[0], types[n.input[0]], shape)
            )
        return infer(annotated)

    return patched


@pytest.fixture
def builder_knows_group_norm(monkeypatch):
    monkeypatch.setattr(builder, "_infer", _infer_through_group_norm(builder._infer))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.usefixtures("builder_knows_group_norm")
def test_gradient_matches_finite_differences(case: Case):
    base.test_gradient_matches_finite_differences(case)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.usefixtures("builder_knows_group_norm")
def test_gradient_matches_torch(case: Case):
    if case.torch is None:
        pytest.skip("PyTorch has no equivalent of this case")
    base.test_gradient_matches_torch(case)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.usefixtures("builder_knows_group_norm")
def test_onnxruntime_float32_matches_float64(case: Case):
    base.test_onnxruntime_float32_matches_float64(case)


@pytest.mark.xfail(
    strict=True,
    reason="builder: ONNX shape inference does not type GroupNormalization's output, so "
    "_active drops it and the gradient is silently zero (needs a builder change)",
)
def test_group_norm_needs_the_builder_to_know_its_output():
    x, scale, bias = rand(2, 4, 3), rand(4), rand(4)
    model = op_model("GroupNormalization", {"x": x, "s": scale, "b": bias}, {"num_groups": 2},
                     opset=21)  # fmt: skip
    graph = build_training_graph(model, [Loss.mse("y")])
    _, grads = Reference(graph).run(_targets(graph), graph.initial)
    assert np.abs(grads["s"]).max() > 0


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

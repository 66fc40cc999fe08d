"""Per-op gradients of the math, normalization and spatial rules, checked as tests/train/
test_ops.py checks the others (its Case machinery and its three checks: directional finite
differences in float64, PyTorch autograd in float64, ONNX Runtime in float32), plus small
multi-node models for what one node cannot show (Cast, ties, refusals)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

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

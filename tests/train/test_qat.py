"""Quantization-aware training: QuantizeLinear/DequantizeLinear straight-through gradients
against PyTorch's fake quantization (the same estimator, inclusive bounds) in float32 on ONNX
Runtime and float64 on onnx.reference; finite differences of the clipped identity the
estimator differentiates; integer weights unfolded into float shadows; end-to-end QAT of a
small conv + gemm net quantized by graphopt's quantize pass.

Scales are powers of two, so x / scale (ONNX) and x * (1 / scale) (PyTorch) agree exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.context import Context
from graphopt.data import open_dataset
from graphopt.errors import GraphoptError
from graphopt.model import Model
from graphopt.passes.prune.masks import PackedMask
from graphopt.passes.quantize import QuantizeOptions, QuantizePass
from graphopt.runtime import create_session
from graphopt.train import AdamW, Loss, Trainer, build_training_graph
from tests import models
from tests.train.gradcheck import Reference, model_from_proto, ort_gradients

torch = pytest.importorskip("torch")

R = np.random.default_rng(2024)
QRANGE = {
    TensorProto.INT8: (-128, 127),
    TensorProto.UINT8: (0, 255),
    TensorProto.INT16: (-32768, 32767),
    TensorProto.INT4: (-8, 7),
    TensorProto.UINT4: (0, 15),
}


def _const(name: str, value: np.ndarray, elem: int | None = None) -> onnx.TensorProto:
    if elem is None:
        return numpy_helper.from_array(np.asarray(value), name)
    value = np.asarray(value)
    return helper.make_tensor(name, elem, list(value.shape), value.reshape(-1).tolist())


def _proto(nodes, inits, outputs=("y",), inputs=(), opset=19, dtype=np.float32) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        nodes,
        "g",
        list(inputs),
        [helper.make_tensor_value_info(o, elem, None) for o in outputs],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 10
    return proto


# ---------------------------------------------------------------------------- per op


@dataclass
class Case:
    id: str
    x: np.ndarray
    scale: np.ndarray  # powers of two
    zero_point: np.ndarray
    qtype: int
    axis: int | None = None
    opset: int = 19
    saturating: bool = True  # at least 20 % of x saturates


def _pow2(*shape: int, low: int = -6, high: int = -3) -> np.ndarray:
    return np.exp2(R.integers(low, high + 1, shape)).astype(np.float64)


CASES = [
    Case("int8-tensor", R.standard_normal((4, 5, 6)) * 6, np.array(2.0**-5), np.array(0),
         TensorProto.INT8),
    Case("uint8-tensor-asym", R.standard_normal((6, 7)) * 8 + 2, np.array(2.0**-5),
         np.array(100), TensorProto.UINT8),
    Case("int8-channel-axis0", R.standard_normal((5, 3, 3, 3)) * 6, _pow2(5),
         R.integers(-10, 11, 5), TensorProto.INT8, axis=0),
    Case("uint8-channel-axis1", R.standard_normal((2, 4, 5)) * 8, _pow2(4),
         R.integers(90, 160, 4), TensorProto.UINT8, axis=1),
    Case("int16-tensor", R.standard_normal((5, 6)) * 5, np.array(2.0**-13), np.array(7),
         TensorProto.INT16, opset=21),
    Case("int4-tensor", R.standard_normal((5, 6)), np.array(2.0**-3), np.array(-1),
         TensorProto.INT4, opset=21),
    Case("uint4-channel", R.standard_normal((3, 8)) * 2, _pow2(8, low=-3, high=-2),
         R.integers(5, 11, 8), TensorProto.UINT4, axis=1, opset=21),
    # Exactly on rounding boundaries near the bounds: 127.5 -> 128 (half to even) saturates,
    # -128.5 -> -128 does not, 126.5 -> 126 and 127.49 -> 127 are inside.
    Case("int8-boundaries",
         np.array([127.5, 127.49, 126.5, 128.5, -128.5, -128.51, -129.5, 0.5, -0.5, 3.0]) / 8,
         np.array(2.0**-3), np.array(0), TensorProto.INT8, saturating=False),
    Case("uint8-boundaries-zp",
         (np.array([155.5, 155.49, 154.5, -100.5, -100.51, -99.5, 0.25, 12.0]) / 4),
         np.array(2.0**-2), np.array(100), TensorProto.UINT8, saturating=False),
]  # fmt: skip


def _qdq_model(case: Case, dtype: type) -> Model:
    attrs = {} if case.axis is None else {"axis": case.axis}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q", **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq", **attrs),
    ]
    inits = [
        _const("x", case.x.astype(dtype)),
        _const("s", case.scale.astype(dtype)),
        _const("z", case.zero_point, case.qtype),
    ]
    return model_from_proto(_proto(nodes, inits, opset=case.opset, dtype=dtype))


def _torch_loss_and_grad(case: Case, target: np.ndarray, dtype):
    x = torch.tensor(case.x.astype(dtype), requires_grad=True)
    low, high = QRANGE[case.qtype]
    if case.axis is None:
        y = torch.fake_quantize_per_tensor_affine(
            x, float(case.scale), int(case.zero_point), low, high
        )
    else:
        y = torch.fake_quantize_per_channel_affine(
            x,
            torch.tensor(case.scale, dtype=torch.float32),  # powers of two: exact
            torch.tensor(case.zero_point, dtype=torch.int32),
            case.axis,
            low,
            high,
        )
    loss = ((y - torch.tensor(target)) ** 2).mean()
    loss.backward()
    return float(loss.detach()), x.grad.numpy()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["ort-f32", "reference-f64"])
def test_fake_quantization_gradient_matches_torch(case: Case, dtype):
    graph = build_training_graph(_qdq_model(case, dtype), [Loss.mse("y")], trainables=["x"])
    target = np.random.default_rng(3).standard_normal(case.x.shape).astype(dtype)
    feeds = {"y.target": target}
    if dtype == np.float32:
        loss, grads = ort_gradients(graph, feeds, graph.initial)
    else:
        loss, grads = Reference(graph).run(feeds, graph.initial)
    expected_loss, expected = _torch_loss_and_grad(case, target, dtype)
    assert loss == pytest.approx(expected_loss, rel=1e-6 if dtype == np.float32 else 1e-12)
    assert grads["x"].dtype == dtype
    np.testing.assert_allclose(grads["x"], expected, rtol=1e-6, atol=0)
    saturated = expected == 0
    assert np.all(grads["x"][saturated] == 0)
    if case.saturating:
        assert saturated.mean() >= 0.2
        assert saturated.mean() <= 0.8


def test_boundary_mask_is_inclusive_after_rounding():
    case = next(c for c in CASES if c.id == "int8-boundaries")
    graph = build_training_graph(_qdq_model(case, np.float32), [Loss.mse("y")], trainables=["x"])
    target = np.full(case.x.shape, -1.0, np.float32)  # dy is nowhere zero
    _, grads = ort_gradients(graph, {"y.target": target}, graph.initial)
    passes = grads["x"] != 0
    # 127.5 and 128.5 round to 128 (saturate); -128.5 rounds to -128 (inside); -129.5 out.
    assert passes.tolist() == [False, True, True, False, True, False, False, True, True, True]


def test_q_dq_pair_gives_dy_times_mask_exactly():
    """A fake-quantization pair passes dy through unchanged where inside (no scale round
    trip): on the grid the gradient is an Identity's, bit for bit, and 0 where saturated."""
    base = CASES[0]
    s = float(base.scale)
    rounded = np.rint(base.x / s)
    inside = (rounded >= -128) & (rounded <= 127)
    grid = np.where(inside, rounded * s, base.x).astype(np.float32)
    case = Case("grid", grid, base.scale, base.zero_point, base.qtype)
    graph = build_training_graph(_qdq_model(case, np.float32), [Loss.mse("y")], trainables=["x"])
    assert [n.op_type for n in graph.proto.graph.node].count("Div") == 1  # the mask's x / s
    identity = _proto([helper.make_node("Identity", ["x"], ["y"])], [_const("x", grid)])
    plain = build_training_graph(model_from_proto(identity), [Loss.mse("y")])
    target = np.random.default_rng(3).standard_normal(grid.shape).astype(np.float32)
    _, grads = ort_gradients(graph, {"y.target": target}, graph.initial)
    _, dy = ort_gradients(plain, {"y.target": target}, plain.initial)
    assert 0.2 <= 1 - inside.mean() <= 0.8
    np.testing.assert_array_equal(grads["x"][inside], dy["x"][inside])
    assert np.all(grads["x"][~inside] == 0)


def test_unpaired_scales_go_out_and_back():
    """Q and DQ with different scales, and a Q read by two DQs: dx = sum dy * s_dq / s_q * mask."""
    x = R.standard_normal((4, 6)) * 6
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s1", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s2", "z"], ["y"]),
        helper.make_node("DequantizeLinear", ["q", "s1", "z"], ["y2"]),
    ]
    inits = [
        _const("x", x),
        _const("s1", np.array(2.0**-4)),
        _const("s2", np.array(2.0**-2)),
        _const("z", np.array(3, np.int8)),
    ]
    model = model_from_proto(_proto(nodes, inits, outputs=("y", "y2"), dtype=np.float64))
    graph = build_training_graph(model, [Loss.mse("y"), Loss.mse("y2")], trainables=["x"])
    rng = np.random.default_rng(5)
    t1, t2 = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
    loss, grads = Reference(graph).run({"y.target": t1, "y2.target": t2}, graph.initial)
    tx = torch.tensor(x, requires_grad=True)
    fq = torch.fake_quantize_per_tensor_affine(tx, 2.0**-4, 3, -128, 127)
    total = ((fq * 4 - torch.tensor(t1)) ** 2).mean() + ((fq - torch.tensor(t2)) ** 2).mean()
    total.backward()
    assert loss == pytest.approx(float(total.detach()), rel=1e-12)
    np.testing.assert_allclose(grads["x"], tx.grad.numpy(), rtol=1e-12)
    assert (tx.grad.numpy() == 0).mean() >= 0.2


@pytest.mark.parametrize("axis", [1, -2])
def test_scale_and_zero_point_computed_in_the_graph(axis):
    """Per-axis scale and zero point that are not constants: broadcast in the graph."""
    x = R.standard_normal((3, 4, 5)) * 6
    scale = _pow2(4)
    zero_point = R.integers(-5, 6, 4).astype(np.int8)
    nodes = [
        helper.make_node("Mul", ["s0", "one"], ["s"]),
        helper.make_node("Identity", ["z0"], ["z"]),
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=axis),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=axis),
    ]
    inits = [
        _const("x", x.astype(np.float32)),
        _const("s0", scale.astype(np.float32)),
        _const("one", np.float32(1.0)),
        _const("z0", zero_point),
    ]
    model = model_from_proto(_proto(nodes, inits))
    graph = build_training_graph(model, [Loss.mse("y")], trainables=["x"])
    target = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    loss, grads = ort_gradients(graph, {"y.target": target}, graph.initial)
    case = Case("computed", x, scale, zero_point, TensorProto.INT8, axis=1)
    expected_loss, expected = _torch_loss_and_grad(case, target, np.float32)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    np.testing.assert_allclose(grads["x"], expected, rtol=1e-6, atol=0)
    assert (expected == 0).mean() >= 0.2


@pytest.mark.parametrize(
    "qtype,limit", [(TensorProto.FLOAT8E4M3FN, 448.0), (TensorProto.FLOAT8E5M2, 57344.0)]
)
def test_float8_mask_is_the_largest_finite_value(qtype, limit):
    scale = np.float32(2.0**-4) if limit == 448.0 else np.float32(2.0**-12)
    x = (R.standard_normal((5, 8)) * 1.3 * limit * scale).astype(np.float32)
    case = Case("fp8", x, np.array(scale), np.array(0.0), qtype)
    model = _qdq_model(case, np.float32)
    graph = build_training_graph(model, [Loss.mse("y")], trainables=["x"])
    target = np.zeros(x.shape, np.float32)
    _, grads = ort_gradients(graph, {"y.target": target}, graph.initial)
    y = ort.InferenceSession(model.to_proto().SerializeToString()).run(["y"], {})[0]
    inside = np.abs(x / scale) <= limit
    assert 0.2 <= 1 - inside.mean() <= 0.8
    expected = np.where(inside, 2 * y / np.float32(y.size), 0).astype(np.float32)
    np.testing.assert_allclose(grads["x"], expected, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------- finite differences


def _grid_net(dtype=np.float64):
    """a (trainable, on its uint8 grid, 30 % saturated) -> Q/DQ -> MatMul with an int8
    per-column weight behind a DequantizeLinear -> Add(b) -> y."""
    rng = np.random.default_rng(11)
    sa, za = 2.0**-4, 60
    k = rng.integers(-59, 195, (6, 5)).astype(np.float64)  # inside [0-60, 255-60], off the ends
    far = rng.random((6, 5)) < 0.3
    k[far] = rng.choice([-1, 1], far.sum()) * rng.uniform(200, 300, far.sum()) + 60
    a = k * sa
    wq = rng.integers(-100, 101, (5, 4)).astype(np.int8)
    sw = np.exp2(rng.integers(-7, -4, 4)).astype(dtype)
    nodes = [
        helper.make_node("QuantizeLinear", ["a", "sa", "za"], ["aq"]),
        helper.make_node("DequantizeLinear", ["aq", "sa", "za"], ["ad"]),
        helper.make_node("DequantizeLinear", ["wq", "sw"], ["w"], axis=1),
        helper.make_node("MatMul", ["ad", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["y"]),
    ]
    inits = [
        _const("a", a.astype(dtype)),
        _const("sa", np.array(sa, dtype)),
        _const("za", np.array(za, np.uint8)),
        _const("wq", wq),
        _const("sw", sw),
        _const("b", rng.standard_normal(4).astype(dtype)),
    ]
    bounds = ((0 - za) * sa, (255 - za) * sa), ((-128 * sw), (127 * sw))
    return model_from_proto(_proto(nodes, inits, dtype=dtype)), bounds


def test_straight_through_is_the_derivative_of_the_clipped_identity():
    """On the quantization grid (half a step from every rounding boundary) the quantized
    forward equals the clipped identity, and the estimator's gradients are that surrogate's
    exact derivatives: directional finite differences in float64 agree to 1e-7."""
    model, ((alo, ahi), (wlo, whi)) = _grid_net()
    graph = build_training_graph(model, [Loss.mse("y")], trainables=["a", "wq", "b"])
    assert set(graph.quantized) == {"wq"}
    target = np.random.default_rng(4).standard_normal((6, 4))
    feeds = {"y.target": target}
    reference = Reference(graph)
    loss, grads = reference.run(feeds, graph.initial)

    def surrogate(p):
        ad = np.clip(p["a"], alo, ahi)
        w = np.clip(p["wq"], wlo, whi)
        return float(np.mean((ad @ w + p["b"] - target) ** 2))

    assert loss == pytest.approx(surrogate(graph.initial), rel=1e-13)
    assert (np.clip(graph.initial["a"], alo, ahi) != graph.initial["a"]).mean() >= 0.2
    rng = np.random.default_rng(0)
    eps = 1e-6
    for _ in range(4):
        v = {k: rng.standard_normal(p.shape) for k, p in graph.initial.items()}
        plus = {k: p + eps * v[k] for k, p in graph.initial.items()}
        minus = {k: p - eps * v[k] for k, p in graph.initial.items()}
        fd = (surrogate(plus) - surrogate(minus)) / (2 * eps)
        analytic = sum(float(np.sum(grads[k] * v[k])) for k in graph.initial)
        assert analytic == pytest.approx(fd, rel=1e-7)


def test_blocked_weight_gradient_matches_torch_per_block():
    """int4 weight, blocked along the reduction axis (block 4, a partial last block): its
    shadow's gradient is torch's per-channel fake quantization of each block."""
    rng = np.random.default_rng(8)
    k_dim, n, block = 10, 3, 4
    blocks = -(-k_dim // block)
    wq = rng.integers(-8, 8, (k_dim, n))
    scale = np.exp2(rng.integers(-4, -1, (blocks, n))).astype(np.float32)
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "s"], ["w"], axis=0, block_size=block),
        helper.make_node("MatMul", ["a", "w"], ["y"]),
    ]
    inits = [_const("wq", wq, TensorProto.INT4), _const("s", scale)]
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [5, k_dim])]
    model = model_from_proto(_proto(nodes, inits, inputs=inputs, opset=21))
    graph = build_training_graph(model, [Loss.mse("y")])
    assert graph.trainables == ["wq"] and graph.quantized["wq"].data_type == TensorProto.INT4
    expanded = np.repeat(scale, block, axis=0)[:k_dim]
    np.testing.assert_array_equal(graph.initial["wq"], (wq * expanded).astype(np.float32))
    # Move the shadow so that a third of it saturates.
    shadow = (graph.initial["wq"] + rng.standard_normal((k_dim, n)) * 6 * expanded).astype(
        np.float32
    )
    a = rng.standard_normal((5, k_dim)).astype(np.float32)
    target = rng.standard_normal((5, n)).astype(np.float32)
    loss, grads = ort_gradients(graph, {"a": a, "y.target": target}, {"wq": shadow})

    # torch: one channel per (block, column) pair, its block's rows the channel's elements.
    padded = np.zeros((blocks * block, n), np.float32)
    padded[:k_dim] = shadow
    tw = torch.tensor(padded, requires_grad=True)
    per_block = tw.reshape(blocks, block, n).permute(0, 2, 1).reshape(blocks * n, block)
    fq = torch.fake_quantize_per_channel_affine(
        per_block, torch.tensor(scale.reshape(-1)), torch.zeros(blocks * n, dtype=torch.int32),
        0, -8, 7,
    )  # fmt: skip
    w = fq.reshape(blocks, n, block).permute(0, 2, 1).reshape(blocks * block, n)[:k_dim]
    total = ((torch.tensor(a) @ w - torch.tensor(target)) ** 2).mean()
    total.backward()
    expected = tw.grad.numpy()[:k_dim]
    assert loss == pytest.approx(float(total.detach()), rel=1e-5)
    np.testing.assert_allclose(grads["wq"], expected, rtol=1e-5, atol=1e-7)
    assert 0.2 <= (expected == 0).mean() <= 0.8
    assert np.all(grads["wq"][expected == 0] == 0)


# ---------------------------------------------------------------------------- unfolding


def test_unfolding_keeps_the_forward_bit_exact():
    model, _ = _grid_net(np.float32)
    graph = build_training_graph(model, [Loss.mse("y")], outputs=["y"])
    assert set(graph.trainables) == {"a", "wq", "b"}
    spec = graph.quantized["wq"]
    stored = model.graph.initializers["wq"].const_value.numpy()
    np.testing.assert_array_equal(spec.quantize(graph.initial["wq"]), stored)
    assert spec.quantize(graph.initial["wq"]).dtype == np.int8
    target = np.zeros((6, 4), np.float32)
    session = create_session(graph.proto.SerializeToString(), device="cpu", threads=1)
    y = session.run({**graph.initial, "y.target": target}, ["y"])["y"]
    expected = ort.InferenceSession(model.to_proto().SerializeToString()).run(["y"], {})[0]
    np.testing.assert_array_equal(y, expected)


def test_qat_modes_and_refusals():
    model, _ = _grid_net(np.float32)
    # qat=False: the integer weight stays an integer; asking for it says how.
    off = build_training_graph(model, [Loss.mse("y")], qat=False)
    assert "wq" not in off.trainables and not off.quantized
    with pytest.raises(GraphoptError, match=r"not float32/float64: wq"):
        build_training_graph(model, [Loss.mse("y")], trainables=["wq"], qat=False)
    # Requested by name: unfolded without qat=True.
    only = build_training_graph(model, [Loss.mse("y")], trainables=["wq"])
    assert only.trainables == ["wq"] and set(only.quantized) == {"wq"}
    # qat=True on a float model.
    float_model = model_from_proto(
        _proto(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            [_const("x", np.ones((2, 3), np.float32)), _const("w", np.ones((3, 2), np.float32))],
        )
    )
    with pytest.raises(GraphoptError, match=r"no integer weights behind a DequantizeLinear"):
        build_training_graph(float_model, [Loss.mse("y")], qat=True)


def test_integer_weights_that_cannot_unfold_stay_frozen_with_a_reason():
    wq = np.arange(12, dtype=np.int8).reshape(3, 4)
    nodes = [
        helper.make_node("Mul", ["s0", "two"], ["s"]),  # a scale computed in the graph
        helper.make_node("DequantizeLinear", ["wq", "s"], ["w"]),
        helper.make_node("DequantizeLinear", ["vq", "sv"], ["v"]),
        helper.make_node("Cast", ["vq"], ["vf"], to=TensorProto.FLOAT),  # a second use
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "v"], ["m2"]),
        helper.make_node("Add", ["m2", "vf"], ["y"]),
    ]
    inits = [
        _const("x", np.ones((2, 3), np.float32)),
        _const("s0", np.float32(0.5)),
        _const("two", np.float32(2.0)),
        _const("wq", wq),
        _const("vq", np.ones(4, np.int8)),
        _const("sv", np.float32(0.25)),
    ]
    model = model_from_proto(_proto(nodes, inits))
    graph = build_training_graph(model, [Loss.mse("y")])
    assert graph.trainables == ["x"]
    assert "computed in the graph" in graph.frozen_quantized["wq"]
    assert "also used" in graph.frozen_quantized["vq"]
    with pytest.raises(GraphoptError, match=r"Cannot train the integer weight\(s\) wq"):
        build_training_graph(model, [Loss.mse("y")], trainables=["wq"])


# ---------------------------------------------------------------------------- end to end


def _float_net(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(16)+Relu -> Conv(16, stride 2)+Relu -> GlobalAveragePool -> Flatten
    -> Gemm(16) -> y."""
    rng = np.random.default_rng(seed)

    def w(name, shape, scale):
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name
        )

    inits = [
        w("w1", (16, 3, 3, 3), 0.3), w("b1", (16,), 0.1), w("w2", (16, 16, 3, 3), 0.1),
        w("b2", (16,), 0.1), w("w3", (16, 16), 0.3), w("b3", (16,), 0.1),
    ]  # fmt: skip
    mk = helper.make_node
    nodes = [
        mk("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4, name="conv1"),
        mk("Relu", ["c1"], ["r1"], name="relu1"),
        mk("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 4, strides=[2, 2], name="conv2"),
        mk("Relu", ["c2"], ["r2"], name="relu2"),
        mk("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        mk("Flatten", ["gap"], ["flat"], name="flat"),
        mk("Gemm", ["flat", "w3", "b3"], ["y"], transB=1, name="gemm"),
    ]
    return models.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        inits,
        opset=opset,
    )


def _quantized(proto: onnx.ModelProto, tmp_path: Path, **options) -> Model:
    path = tmp_path / "calib.npz"
    np.savez(path, **models.feeds(proto, batch=32))
    model = Model(ir=ir.from_proto(proto))
    data = open_dataset(os.fspath(path), model.input_specs())
    ctx = Context(workdir=tmp_path, calib_data=data, device="cpu", batch_size=16)
    opts = QuantizeOptions(min_channels=1, samples=32, calibrator="minmax", **options)
    QuantizePass(opts).run(model, ctx)
    return model


def _unoptimized(model: Model, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.to_proto().SerializeToString(), options)
    return session.run(["y"], {"x": x})[0]


def _last_step(model: Model) -> float:
    """One quantization step of the Gemm's input, through the Gemm: its scale times the
    largest row sum of |W| (the output is not quantized itself)."""
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    scale_of = {}
    for dq in (v.producer() for v in gemm.inputs[:2]):
        if dq is not None and dq.op_type == "DequantizeLinear":
            scale_of[dq.outputs[0].name] = dq.inputs[1].const_value.numpy().astype(np.float64)
    w_dq = gemm.inputs[1].producer()
    wq = w_dq.inputs[0].const_value.numpy().astype(np.float64)
    w = wq * scale_of[gemm.inputs[1].name].reshape(-1, *([1] * (wq.ndim - 1)))
    x_scale = float(np.max(scale_of.get(gemm.inputs[0].name, np.array(0.0))))
    return x_scale * float(np.abs(w).sum(axis=1).max())


def _signature(model: Model):
    nodes = [
        (n.op_type, n.name, [v.name if v else "" for v in n.inputs], [v.name for v in n.outputs])
        for n in model.graph
    ]
    dtypes = {name: v.const_value.dtype for name, v in model.graph.initializers.items()}
    return nodes, dtypes


QAT_TARGETS = [
    pytest.param({"target": "ort-cpu"}, 17, id="ort-cpu-int8"),
    pytest.param({"target": "tensorrt"}, 17, id="tensorrt-int8"),
    pytest.param({"target": "tensorrt", "precision": "fp8"}, 19, id="tensorrt-fp8"),
]


@pytest.mark.parametrize("options,opset", QAT_TARGETS)
def test_qat_trains_a_quantized_net_and_requantizes_it(tmp_path, options, opset):
    model = _quantized(_float_net(opset=opset), tmp_path, **options)
    before = _signature(model)
    stored = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    x = models.feeds(_float_net(), batch=16, seed=1)["x"]
    target = create_session(_float_net(seed=1).SerializeToString(), device="cpu").run({"x": x})
    feeds = {"x": x, "y.target": target["y"]}
    trainer = Trainer(model, [Loss.mse("y")], AdamW(lr=3e-3), outputs=["y"], threads=1)
    quantized = trainer.graph.quantized
    assert {"w1_quantized", "w2_quantized", "w3_quantized"} <= set(quantized)
    assert not trainer.graph.frozen_quantized
    # The unfolded forward is the quantized model's, bit for bit (ORT without its fusions).
    first, _, outs = trainer.gradients(feeds)
    np.testing.assert_array_equal(outs["y"], _unoptimized(model, x))

    losses = [trainer.step(feeds).loss for _ in range(25)]
    assert losses[-1] < 0.5 * first
    trained = trainer.trained_model()
    assert _signature(trained) == before  # nodes and initializer dtypes unchanged
    for name, spec in quantized.items():
        new = trained.graph.initializers[name].const_value.numpy()
        assert new.dtype == stored[name].dtype
        changed = np.mean(new.astype(np.float64) != stored[name].astype(np.float64))
        assert changed > (0.05 if spec.fake_quantized else 0.5), name
    biases = [name for name, spec in quantized.items() if not spec.fake_quantized]
    for name in biases:  # int32 (ort-cpu): trained unquantized, rounded to the nearest step
        spec = quantized[name]
        assert trained.graph.initializers[name].const_value.dtype == ir.DataType.INT32
        back = spec.dequantize(spec.quantize(trainer.params[name]))
        assert np.all(np.abs(back - trainer.params[name]) <= 0.5001 * spec.scale)
    # The re-quantized model on ORT matches the trainer's float-shadow forward.
    _, _, outs = trainer.gradients(feeds)
    y = create_session(trained, device="cpu", threads=1).run({"x": x})["y"]
    step = _last_step(trained)
    assert 0 < step < 0.1 * float(np.abs(outs["y"]).max())
    assert float(np.max(np.abs(y - outs["y"]))) <= step
    if not biases:  # same integers, same float arithmetic (ORT's fusions left out)
        np.testing.assert_allclose(_unoptimized(trained, x), outs["y"], rtol=0, atol=1e-5)
    # The input model is untouched.
    for name, value in model.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), stored[name])


def test_qat_of_blockwise_int4_weights(tmp_path):
    model = _quantized(_float_net(opset=21), tmp_path, target="tensorrt", precision="int4")
    before = _signature(model)
    int4 = [n for n, v in model.graph.initializers.items() if v.const_value.dtype.name == "INT4"]
    assert int4
    x = models.feeds(_float_net(), batch=16, seed=1)["x"]
    target = create_session(_float_net(seed=1).SerializeToString(), device="cpu").run({"x": x})
    feeds = {"x": x, "y.target": target["y"]}
    trainer = Trainer(model, [Loss.mse("y")], AdamW(lr=3e-3), outputs=["y"], threads=1)
    assert set(int4) <= set(trainer.graph.quantized)
    first = trainer.step(feeds).loss
    for _ in range(20):
        last = trainer.step(feeds).loss
    assert last < 0.5 * first
    trained = trainer.trained_model()
    assert _signature(trained) == before
    name = int4[0]
    new = trained.graph.initializers[name].const_value.numpy().astype(np.int8)
    old = model.graph.initializers[name].const_value.numpy().astype(np.int8)
    assert np.mean(new != old) > 0.05 and new.min() >= -8 and new.max() <= 7
    _, _, outs = trainer.gradients(feeds)
    np.testing.assert_allclose(_unoptimized(trained, x), outs["y"], rtol=0, atol=1e-5)


def test_pruned_int8_weights_stay_zero(tmp_path):
    """Masks stored under the float weight's name (prune runs before quantize) apply to the
    shadow of its integers: pruned values stay at the zero point, the rest train."""
    proto = _float_net()
    keep = np.random.default_rng(3).random((16, 16, 3, 3)) > 0.5
    w2 = next(t for t in proto.graph.initializer if t.name == "w2")
    w2.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w2) * keep, "w2"))
    model = _quantized(proto, tmp_path, target="tensorrt")
    model.metadata["masks"] = {"w2": PackedMask.pack(keep)}
    stored = model.graph.initializers["w2_quantized"].const_value.numpy()
    assert np.all(stored[~keep] == 0)
    x = models.feeds(proto, batch=16, seed=1)["x"]
    target = np.random.default_rng(2).standard_normal((16, 16)).astype(np.float32)
    trainer = Trainer(model, [Loss.mse("y")], AdamW(lr=1e-2, weight_decay=0.1), threads=1)
    for _ in range(8):
        trainer.step({"x": x, "y.target": target})
    new = trainer.trained_model().graph.initializers["w2_quantized"].const_value.numpy()
    assert np.all(new[~keep] == 0)
    assert np.mean(new[keep] != stored[keep]) > 0.1
    unmasked = Trainer(model, [Loss.mse("y")], AdamW(lr=1e-2), threads=1, use_masks=False)
    for _ in range(8):
        unmasked.step({"x": x, "y.target": target})
    moved = unmasked.trained_model().graph.initializers["w2_quantized"].const_value.numpy()
    assert np.mean(moved[~keep] != 0) > 0.1

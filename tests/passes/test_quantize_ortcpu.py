"""The `ort-cpu` profile: ONNX Runtime's CPU provider really fuses the Q/DQ it writes into
integer kernels (read from the graph ORT optimizes, at ORT_ENABLE_EXTENDED), and the fused
model stays close to the float one."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.model import Model
from tests import models
from tests.passes.test_quantize import calib_feeds, cosine, mlp, quantize, run_ort


def fused_ops(model: Model, tmp_path: Path) -> tuple[Counter[str], onnx.ModelProto]:
    """Op types of the graph ORT's CPU provider runs after its QDQ fusions."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(
        model.to_proto().SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    return Counter(node.op_type for node in optimized.graph.node), optimized


def pool_concat_cnn(channels: int = 16) -> onnx.ModelProto:
    """x -> Conv+Relu -> MaxPool -> two Conv+Relu branches -> Concat -> Conv+Relu ->
    GlobalAveragePool -> Flatten -> Gemm -> y."""
    rng = np.random.default_rng(4)
    c = channels

    def w(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:]))
        values = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        return numpy_helper.from_array(values.astype(np.float32), name)

    def b(name: str, n: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), name)

    weights = [
        w("w1", (c, 3, 3, 3)), b("b1", c),
        w("w2", (c, c, 3, 3)), b("b2", c),
        w("w3", (c, c, 1, 1)), b("b3", c),
        w("w4", (2 * c, 2 * c, 3, 3)), b("b4", 2 * c),
        w("w5", (10, 2 * c)), b("b5", 10),
    ]  # fmt: skip
    mk = helper.make_node
    nodes = [
        mk("Conv", ["x", "w1", "b1"], ["c1"], name="conv_1", pads=[1, 1, 1, 1]),
        mk("Relu", ["c1"], ["r1"], name="relu_1"),
        mk("MaxPool", ["r1"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        mk("Conv", ["p", "w2", "b2"], ["c2"], name="conv_2", pads=[1, 1, 1, 1]),
        mk("Relu", ["c2"], ["r2"], name="relu_2"),
        mk("Conv", ["p", "w3", "b3"], ["c3"], name="conv_3"),
        mk("Relu", ["c3"], ["r3"], name="relu_3"),
        mk("Concat", ["r2", "r3"], ["cat"], name="concat", axis=1),
        mk("Conv", ["cat", "w4", "b4"], ["c4"], name="conv_4", pads=[1, 1, 1, 1]),
        mk("Relu", ["c4"], ["r4"], name="relu_4"),
        mk("GlobalAveragePool", ["r4"], ["gap"], name="gap"),
        mk("Flatten", ["gap"], ["flat"], name="flatten"),
        mk("Gemm", ["flat", "w5", "b5"], ["y"], name="fc", transB=1, alpha=0.5),
    ]
    vi = helper.make_tensor_value_info
    return models.make_model(
        nodes,
        [vi("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [vi("y", TensorProto.FLOAT, ["N", 10])],
        weights,
    )


def test_ort_fuses_the_cnn_into_integer_kernels(tmp_path):
    proto = pool_concat_cnn()
    model, result = quantize(proto, tmp_path, cleanup=False, target="ort-cpu", min_channels=1)
    assert result.stats["quantized_nodes"] == 5 and result.stats["biases_quantized"] == 5
    ops, optimized = fused_ops(model, tmp_path)
    # Every Conv became QLinearConv (its Relu dropped), the Concat QLinearConcat, the pool
    # and Flatten moved int8 data, the global pool QLinearGlobalAveragePool, the Gemm QGemm.
    assert ops["QLinearConv"] == 4 and ops["Conv"] == 0 and ops["Relu"] == 0
    assert ops["QLinearConcat"] == 1 and ops["QLinearGlobalAveragePool"] == 1
    assert ops["QGemm"] == 1 and ops["Gemm"] == 0
    assert ops["QuantizeLinear"] == 1  # only the graph input is quantized at run time
    assert ops["DequantizeLinear"] == 0  # QGemm writes float logits
    pool = next(node for node in optimized.graph.node if node.op_type == "MaxPool")
    assert pool.input[0] == "r1_quantized"  # MaxPool runs on uint8
    # ... because its input and output share one scale (as do GlobalAveragePool -> Flatten).
    scales = {n.inputs[0].name: n.inputs[1] for n in model.graph if n.op_type == "QuantizeLinear"}
    assert scales["r1"] is scales["p"] and scales["gap"] is scales["flat"]
    feeds = calib_feeds(proto, samples=32, seed=7)
    (reference,) = run_ort(proto, feeds)
    (candidate,) = run_ort(model, feeds)
    assert cosine(reference, candidate) > 0.99


def test_ort_fuses_the_residual_cnn(tmp_path):
    proto = models.small_cnn()
    model, _ = quantize(proto, tmp_path, target="ort-cpu", min_channels=1)
    ops, _ = fused_ops(model, tmp_path)
    assert ops["QLinearConv"] == 3 and ops["Conv"] == 0
    assert ops["QLinearAdd"] == 1  # the residual Add, its Relu dropped
    assert ops["QGemm"] == 1
    assert ops["ConvTranspose"] == 1  # no integer kernel on the CPU: left in float


def test_ort_fuses_matmuls(tmp_path):
    proto = mlp()
    model, _ = quantize(proto, tmp_path, cleanup=False, target="ort-cpu")
    ops, _ = fused_ops(model, tmp_path)
    # MatMul -> Relu -> Q (the Gemm's input) is QLinearMatMul; the Gemm writes float.
    assert ops["QLinearMatMul"] == 1 and ops["QGemm"] == 1
    assert ops["MatMul"] == 0 and ops["Gemm"] == 0
    feeds = calib_feeds(proto, samples=16, seed=3)
    assert cosine(run_ort(proto, feeds)[0], run_ort(model, feeds)[0]) > 0.99


def test_transformer_block_projections_run_as_integer_matmuls(tmp_path):
    proto = models.transformer_block(seq=8, dim=32, heads=4, hidden=64)
    model, result = quantize(proto, tmp_path, target="ort-cpu")
    assert result.stats["quantized_nodes"] == 6
    ops, _ = fused_ops(model, tmp_path)
    integer = ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] + ops["DynamicQuantizeMatMul"]
    assert integer == 6
    # The attention core stays in float (ORT folds the 1/sqrt(d) Mul into one of them).
    assert ops["MatMul"] + ops["FusedMatMul"] == 2
    feeds = calib_feeds(proto, samples=8, seed=2)
    assert cosine(run_ort(proto, feeds)[0], run_ort(model, feeds)[0]) > 0.99


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("kernels", ["u8s8", "u8u8"])
def test_activations_are_uint8_and_weights_symmetric(tmp_path, per_channel, kernels):
    model, result = quantize(
        pool_concat_cnn(),
        tmp_path,
        cleanup=False,
        target="ort-cpu",
        per_channel=per_channel,
        min_channels=1,
        ort_kernels=kernels,
    )
    assert result.stats["ort_kernels"] == kernels
    weights = 0
    for node in model.graph:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        data = node.inputs[0].const_value
        if node.op_type == "QuantizeLinear" or data is None:
            assert node.inputs[2].const_value.numpy().dtype == np.uint8
            continue
        if data.dtype == ir.DataType.INT32:  # a bias: zero point 0, scale x_scale * w_scale
            assert len(node.inputs) == 2
            continue
        weights += 1
        zero_point = node.inputs[2].const_value.numpy()
        if kernels == "u8s8":
            assert data.dtype == ir.DataType.INT8 and not zero_point.any()
        else:  # the same values, stored as uint8 around 128
            assert data.dtype == ir.DataType.UINT8 and np.all(zero_point == 128)
        assert node.inputs[1].const_value.numpy().ndim == (1 if per_channel else 0)
    assert weights == 5
    ops, _ = fused_ops(model, tmp_path)
    assert ops["QLinearConv"] == 4 and ops["QGemm"] == 1 and ops["Conv"] == 0


def test_u8s8_and_u8u8_models_compute_the_same_values(tmp_path):
    proto = pool_concat_cnn()
    feeds = calib_feeds(proto, samples=8, seed=4)
    outputs = []
    for kernels in ("u8s8", "u8u8"):
        model, _ = quantize(
            proto, tmp_path, cleanup=False, target="ort-cpu", min_channels=1, ort_kernels=kernels
        )
        options = ort.SessionOptions()  # no fusions: the Q/DQ semantics themselves
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(
            model.to_proto().SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        outputs.append(session.run(None, feeds)[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])


def depthwise_cnn() -> onnx.ModelProto:
    """Conv 8->32, depthwise 32 (one output per group), grouped 32->64 (two per group: ORT's
    GEMM path), a Gemm head; every weight positive so int8 partial sums are as large as
    they get."""
    rng = np.random.default_rng(7)

    def w(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.uniform(0.5, 1.0, shape).astype(np.float32), name)

    mk = helper.make_node
    nodes = [
        mk("Conv", ["x", "w1"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        mk("Conv", ["c1", "w2"], ["c2"], name="depthwise", pads=[1, 1, 1, 1], group=32),
        mk("Conv", ["c2", "w3"], ["c3"], name="grouped", group=32),
        mk("GlobalAveragePool", ["c3"], ["gap"], name="gap"),
        mk("Flatten", ["gap"], ["flat"], name="flatten"),
        mk("Gemm", ["flat", "w4"], ["y"], name="fc", transB=1),
    ]
    vi = helper.make_tensor_value_info
    return models.make_model(
        nodes,
        [vi("x", TensorProto.FLOAT, ["N", 8, 12, 12])],
        [vi("y", TensorProto.FLOAT, ["N", 16])],
        [w("w1", (32, 8, 3, 3)), w("w2", (32, 1, 3, 3)), w("w3", (64, 1, 1, 1)), w("w4", (16, 64))],
    )


def _weight_ranges(model: Model) -> dict[str, int]:
    """Quantized op name -> the largest |int8 weight| it reads."""
    out = {}
    for node in model.graph:
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is None or producer.op_type != "DequantizeLinear":
                continue
            data = producer.inputs[0].const_value
            if data is not None and data.dtype == ir.DataType.INT8:
                out[node.name] = int(np.abs(data.numpy().astype(np.int16)).max())
    return out


def test_u8s7_weights_are_seven_bit_except_depthwise(tmp_path):
    model, result = quantize(
        depthwise_cnn(), tmp_path, cleanup=False, target="ort-cpu", min_channels=1,
        ort_kernels="u8s7",
    )  # fmt: skip
    assert result.stats["ort_kernels"] == "u8s7"
    assert _weight_ranges(model) == {"conv": 63, "depthwise": 127, "grouped": 63, "fc": 63}


def _fused_and_exact(model: Model, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    outputs = []
    for level in (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,  # ORT's integer kernels
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,  # the Q/DQ semantics, in float
    ):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(
            model.to_proto().SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        outputs.append(session.run(None, feeds)[0])
    return outputs[0], outputs[1]


def test_u8s7_integer_kernels_do_not_saturate(tmp_path):
    """ORT's fused U8S8 kernels give what the Q/DQ graph means with 7-bit weights; with 8-bit
    weights they saturate on x86 without VNNI (the control, checked where it applies)."""
    from graphopt.passes.quantize.ortcpu import kernels_for_this_cpu

    proto = depthwise_cnn()
    feeds = {"x": np.random.default_rng(1).uniform(0.0, 4.0, (4, 8, 12, 12)).astype(np.float32)}
    errors = {}
    for kernels in ("u8s7", "u8s8"):
        model, _ = quantize(
            proto, tmp_path, cleanup=False, target="ort-cpu", min_channels=1, ort_kernels=kernels
        )
        fused, exact = _fused_and_exact(model, feeds)
        errors[kernels] = float(np.abs(fused - exact).max() / np.abs(exact).max())
    assert errors["u8s7"] < 1e-3
    if kernels_for_this_cpu()[0] == "u8s7":  # no VNNI here: 8-bit weights must saturate
        assert errors["u8s8"] > 1e-2


@pytest.mark.parametrize(
    ("machine", "flags", "expected"),
    [
        ("x86_64", "fpu sse avx2 avx512f avx512_vnni", "u8s8"),
        ("x86_64", "fpu sse avx2 avx_vnni", "u8s8"),
        ("x86_64", "fpu sse avx2", "u8s7"),
        ("x86_64", None, "u8s7"),
        ("aarch64", None, "u8s8"),
    ],
)
def test_auto_kernels_follow_the_cpu(monkeypatch, machine, flags, expected):
    from graphopt.passes.quantize import ortcpu

    monkeypatch.setattr(ortcpu.platform, "machine", lambda: machine)
    monkeypatch.setattr(ortcpu, "_cpu_flags", lambda: None if flags is None else set(flags.split()))
    kernels, why = ortcpu.kernels_for_this_cpu()
    assert kernels == expected and why


def hard_swish_cnn(channels: int = 16) -> onnx.ModelProto:
    """x -> Conv -> hard-swish (HardSigmoid + Mul, as cleanup fuses it) -> Conv -> y, and the
    residual Add of two Conv outputs: PP-LCNet's blocks."""
    rng = np.random.default_rng(6)
    c = channels

    def w(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        values = rng.standard_normal(shape) * np.sqrt(2.0 / int(np.prod(shape[1:])))
        return numpy_helper.from_array(values.astype(np.float32), name)

    mk = helper.make_node
    nodes = [
        mk("Conv", ["x", "w1"], ["c1"], name="conv_1", pads=[1, 1, 1, 1]),
        mk("HardSigmoid", ["c1"], ["gate"], name="hsig", alpha=1 / 6, beta=0.5),
        mk("Mul", ["c1", "gate"], ["hs"], name="hswish"),
        mk("Conv", ["hs", "w2"], ["c2"], name="conv_2", pads=[1, 1, 1, 1]),
        mk("Conv", ["hs", "w3"], ["c3"], name="conv_3"),
        mk("Add", ["c2", "c3"], ["y"], name="add"),
    ]
    vi = helper.make_tensor_value_info
    return models.make_model(
        nodes,
        [vi("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [vi("y", TensorProto.FLOAT, ["N", c, 16, 16])],
        [w("w1", (c, 3, 3, 3)), w("w2", (c, c, 3, 3)), w("w3", (c, c, 1, 1))],
    )


def test_hard_swish_stays_float_between_integer_convs(tmp_path):
    # ORT's CPU provider has no integer HardSigmoid: a QLinearMul for x * HardSigmoid(x)
    # would need the gate and the product quantized, two more roundings for no int8 input
    # saved (on PP-OCRv4, u8u8 minmax CER 3.05 % with them, 1.12 % without, FP32 1.12 %).
    proto = hard_swish_cnn()
    model, _ = quantize(proto, tmp_path, cleanup=False, target="ort-cpu", min_channels=1)
    quantized = {n.inputs[0].name for n in model.graph if n.op_type == "QuantizeLinear"}
    assert {"x", "c1", "hs"} <= quantized  # the convs' inputs and the first conv's output
    assert "gate" not in quantized
    ops, _ = fused_ops(model, tmp_path)
    assert ops["QLinearConv"] == 3 and ops["QLinearMul"] == 0 and ops["HardSigmoid"] == 1
    # An Add of two int8 conv outputs still runs as QLinearAdd... only when its output has
    # somewhere to go: here it is the graph output, which is never quantized.
    assert ops["QLinearAdd"] == 0
    feeds = calib_feeds(proto, samples=32, seed=5)
    assert cosine(run_ort(proto, feeds)[0], run_ort(model, feeds)[0]) > 0.99

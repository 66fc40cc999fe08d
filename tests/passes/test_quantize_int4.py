"""Weight-only blockwise int4 (passes/quantize/weightonly.py, blockwise.py, awq.py): the
dequantized weights against an independent numpy RTN, ONNX Runtime's outputs against the
float model, sizes, site selection and exclusions, AWQ's fold (exact in float) and its gain
over RTN on a model with outlier channels, the opset raise, idempotence.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.context import Context
from graphopt.data import open_dataset
from graphopt.errors import GraphoptError, PassFailed
from graphopt.model import Model
from graphopt.passes.quantize import awq
from graphopt.passes.quantize.graphutil import NameSource
from graphopt.passes.quantize.sites import Excluder
from graphopt.passes.quantize.weightonly import WeightOnlyResult, quantize_weights_int4

FLOAT = TensorProto.FLOAT

# ---------------------------------------------------------------------------- helpers


def make(nodes, inputs, outputs, inits, opset=17, check=True) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "int4", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9  # onnx 1.23's default IR version is newer than ORT 1.31 reads
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def vi(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, FLOAT, shape)


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def weight(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 0.2).astype(np.float32)


def matmul_model(k: int, n: int, x_shape: list | None = None) -> onnx.ModelProto:
    x_shape = x_shape or ["N", k]
    return make(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [vi("x", x_shape)],
        [vi("y", [*x_shape[:-1], n])],
        [init("w", weight((k, n)))],
    )


def inputs(proto: onnx.ModelProto, rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for value in proto.graph.input:
        dims = [d.dim_value if d.dim_value else rows for d in value.type.tensor_type.shape.dim]
        out[value.name] = rng.standard_normal(dims).astype(np.float32)
    return out


def int4(
    proto: onnx.ModelProto,
    tmp_path: Path,
    *,
    method: str = "rtn",
    block_size: int = 32,
    exclude: tuple[str, ...] = (),
    min_channels: int = 16,
    symmetric: bool = True,
    model: Model | None = None,
) -> tuple[Model, WeightOnlyResult]:
    """Quantize (types inferred first, as the pass does), with 64 calibration samples."""
    if model is None:
        model = Model(ir=ir.from_proto(onnx.shape_inference.infer_shapes(proto)))
    path = tmp_path / "calib.npz"
    np.savez(path, **inputs(proto, 64, seed=0))
    data = open_dataset(os.fspath(path), model.input_specs())
    ctx = Context(workdir=tmp_path, calib_data=data, device="cpu", batch_size=16)
    result = quantize_weights_int4(
        model,
        ctx,
        method=method,  # type: ignore[arg-type]
        block_size=block_size,
        excluder=Excluder(exclude),
        min_channels=min_channels,
        samples=64,
        symmetric=symmetric,
    )
    if result.modified:
        onnx.checker.check_model(model.to_proto(), full_check=True)
    return model, result


def run(model: Model | onnx.ModelProto, feeds: dict, *, fused: str = "off") -> np.ndarray:
    """ORT's first output. fused: "off" (no graph optimizations: DequantizeLinear then MatMul
    in float), "exact" (MatMulNBits at accuracy level 0), "default" (ORT's defaults)."""
    proto = model.to_proto() if isinstance(model, Model) else model
    options = ort.SessionOptions()
    if fused == "off":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if fused == "exact":
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)[0]


def reference_rtn(w_kn: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent RTN, block by block and column by column: (int4 values, dequantized)."""
    k, n = w_kn.shape
    q = np.zeros((k, n), np.int8)
    deq = np.zeros((k, n), np.float32)
    for start in range(0, k, block):
        for col in range(n):
            vals = w_kn[start : start + block, col]
            scale = np.float32(max(max(vals.max(), 0) / 7, -min(vals.min(), 0) / 8))
            scale = scale if scale > 0 else np.float32(1)
            codes = np.clip(np.round(vals / scale), -8, 7)  # np.round: half to even
            q[start : start + block, col] = codes
            deq[start : start + block, col] = codes.astype(np.float32) * scale
    return q, deq


def dequantized_weight(model: Model, k: int) -> np.ndarray:
    """The weight a single-MatMul model multiplies by: its output for the identity matrix."""
    return run(model, {"x": np.eye(k, dtype=np.float32)})


def nodes(model: Model, op: str) -> list[ir.Node]:
    return [node for node in model.graph if node.op_type == op]


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b) ** 2))


# ---------------------------------------------------------------------------- RTN


def test_dequantized_weight_equals_an_independent_rtn(tmp_path):
    proto = matmul_model(256, 48)
    model, result = int4(proto, tmp_path, block_size=32)
    assert result.modified and result.stats["weights_quantized"] == 1
    (dq,) = nodes(model, "DequantizeLinear")
    assert dq.attributes["axis"].as_int() == 0 and dq.attributes["block_size"].as_int() == 32
    assert len(dq.inputs) == 2  # symmetric: no zero point
    assert dq.inputs[0].const_value.dtype == ir.DataType.INT4
    assert dq.inputs[1].const_value.shape.numpy() == (8, 48)
    assert nodes(model, "QuantizeLinear") == []
    w = numpy_helper.to_array(proto.graph.initializer[0])
    codes, expected = reference_rtn(w, 32)
    stored = numpy_helper.to_array(
        next(t for t in model.to_proto().graph.initializer if t.data_type == TensorProto.INT4)
    )
    np.testing.assert_array_equal(stored.astype(np.int8), codes)
    np.testing.assert_array_equal(dequantized_weight(model, 256), expected)
    assert model.ir.opset_imports[""] == 21 and model.ir.ir_version >= 10
    assert result.stats["opset_raised_from"] == 17


def test_outputs_within_the_rounding_bound_on_onnx_runtime(tmp_path):
    proto = matmul_model(256, 48)
    model, _ = int4(proto, tmp_path, block_size=32)
    feeds = inputs(proto, 16, seed=3)
    expected = run(proto, feeds)
    w = numpy_helper.to_array(proto.graph.initializer[0])
    half_step = np.abs(reference_rtn(w, 32)[1] - w).max()  # at most half a step
    bound = np.abs(feeds["x"]).sum(axis=1, keepdims=True) * half_step
    for fused in ("off", "exact"):
        assert np.all(np.abs(run(model, feeds, fused=fused) - expected) <= bound + 1e-4)
    # ORT's default MatMulNBits also rounds the activations to int8: close, not exact.
    default = run(model, feeds, fused="default")
    assert mse(default, expected) < 0.05 * np.mean(expected**2)


def test_onnx_runtime_fuses_into_matmulnbits(tmp_path):
    model, _ = int4(matmul_model(256, 48), tmp_path, block_size=32)
    options = ort.SessionOptions()
    options.optimized_model_filepath = os.fspath(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(model.to_proto().SerializeToString(), options)
    optimized = onnx.load(options.optimized_model_filepath)
    assert [n.op_type for n in optimized.graph.node] == ["MatMulNBits"]


def test_weights_shrink_about_eightfold(tmp_path):
    proto = matmul_model(512, 256)
    before = Model(ir=ir.from_proto(proto)).initializer_bytes()
    model, result = int4(proto, tmp_path, block_size=128)
    after = model.initializer_bytes()
    assert before == 512 * 256 * 4
    assert after == 512 * 256 // 2 + 4 * 256 * 4  # packed int4 + one float scale per block
    assert result.stats["weight_bytes_before"] == before
    assert result.stats["weight_bytes_after"] == after
    assert 7 < before / after < 8


def test_asymmetric_has_int4_zero_points_and_is_exact(tmp_path):
    proto = matmul_model(128, 32)
    model, _ = int4(proto, tmp_path, block_size=32, symmetric=False)
    (dq,) = nodes(model, "DequantizeLinear")
    q, scale, zero_point = (v.const_value.numpy() for v in dq.inputs)
    assert dq.inputs[2].const_value.dtype == ir.DataType.INT4
    w = numpy_helper.to_array(proto.graph.initializer[0])
    expected = (q.astype(np.float32) - np.repeat(zero_point, 32, 0).astype(np.float32)) * np.repeat(
        scale, 32, 0
    )
    np.testing.assert_array_equal(dequantized_weight(model, 128), expected)
    assert np.abs(expected - w).max() <= np.repeat(scale, 32, 0).max() / 2 + 1e-6


def test_partial_last_block(tmp_path):
    proto = matmul_model(200, 32)
    model, _ = int4(proto, tmp_path, block_size=64)
    (dq,) = nodes(model, "DequantizeLinear")
    assert dq.inputs[1].const_value.shape.numpy() == (4, 32)  # ceil(200 / 64)
    w = numpy_helper.to_array(proto.graph.initializer[0])
    expected = reference_rtn(w, 64)[1]
    np.testing.assert_array_equal(dequantized_weight(model, 200), expected)
    feeds = inputs(proto, 8, seed=1)
    np.testing.assert_allclose(run(model, feeds, fused="exact"), feeds["x"] @ expected, atol=1e-4)


def test_transposed_gemm_is_stored_as_k_by_n(tmp_path):
    k, n = 96, 40
    b = weight((n, k), seed=4)
    c = weight((n,), seed=5)
    proto = make(
        [helper.make_node("Gemm", ["x", "b", "c"], ["y"], name="gemm", transB=1, alpha=0.5)],
        [vi("x", ["N", k])],
        [vi("y", ["N", n])],
        [init("b", b), init("c", c)],
    )
    model, result = int4(proto, tmp_path, block_size=32)
    (gemm,) = nodes(model, "Gemm")
    assert gemm.attributes["transB"].as_int() == 0 and result.stats["transposed_gemms"] == 1
    assert gemm.inputs[1].shape.numpy() == (k, n)
    feeds = inputs(proto, 8, seed=2)
    expected = 0.5 * feeds["x"] @ reference_rtn(b.T, 32)[1] + c
    for fused in ("off", "exact"):
        np.testing.assert_allclose(run(model, feeds, fused=fused), expected, atol=1e-4)


def test_shared_weight_is_quantized_once(tmp_path):
    proto = make(
        [
            helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("MatMul", ["r", "w"], ["y"], name="mm2"),
        ],
        [vi("x", ["N", 64])],
        [vi("y", ["N", 64])],
        [init("w", weight((64, 64)))],
    )
    model, result = int4(proto, tmp_path)
    (dq,) = nodes(model, "DequantizeLinear")
    assert {node.name for node, _ in dq.outputs[0].uses()} == {"mm1", "mm2"}
    assert "w" not in model.graph.initializers
    assert result.stats["quantized_nodes"] == 2 and result.stats["weights_quantized"] == 1


def test_three_d_activations(tmp_path):
    proto = matmul_model(128, 32, x_shape=["B", 6, 128])
    model, _ = int4(proto, tmp_path, block_size=64)
    feeds = inputs(proto, 3, seed=4)
    expected = feeds["x"] @ reference_rtn(numpy_helper.to_array(proto.graph.initializer[0]), 64)[1]
    for fused in ("off", "exact"):
        np.testing.assert_allclose(run(model, feeds, fused=fused), expected, atol=1e-4)


def test_exclusions_carry_reasons(tmp_path):
    proto = make(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a"], name="kept"),
            helper.make_node("MatMul", ["a", "w2"], ["b"], name="mine"),
            helper.make_node("MatMul", ["b", "w4"], ["c"], name="batched"),  # [2, 32, 32]
            helper.make_node("MatMul", ["c", "w3"], ["d"], name="tiny"),  # N = 8
            helper.make_node("Transpose", ["d"], ["dt"], perm=[0, 2, 1]),
            helper.make_node("MatMul", ["d", "dt"], ["y"], name="attention"),
        ],
        [vi("x", [2, 4, 32])],
        [vi("y", [2, 4, 4])],
        [
            init("w1", weight((32, 32), 1)),
            init("w2", weight((32, 32), 2)),
            init("w3", weight((32, 8), 3)),
            init("w4", weight((2, 32, 32), 4)),
        ],
    )
    model, result = int4(proto, tmp_path, exclude=("mine", "nothing-matches"), min_channels=16)
    reasons = {item.node: item.reason for item in result.excluded}
    assert reasons == {
        "mine": "user",
        "tiny": "small-channels",
        "batched": "weight-rank",
        "attention": "attention",
    }
    assert result.stats["excluded_by_reason"]["user"] == 1
    assert result.warnings == ["exclude entry 'nothing-matches' matched no node"]
    assert [n.name for n in nodes(model, "MatMul") if n.inputs[1].producer()] == [
        "kept",
        "attention",
    ]
    feeds = inputs(proto, 2, seed=6)
    assert mse(run(model, feeds), run(proto, feeds)) < 1e-2 * np.mean(run(proto, feeds) ** 2)


def test_no_eligible_site_leaves_the_model_alone(tmp_path):
    proto = matmul_model(8, 8)
    model = Model(ir=ir.from_proto(proto))
    before = model.to_proto().SerializeToString()
    _, result = int4(proto, tmp_path, model=model)
    assert not result.modified and result.stats["excluded_by_reason"] == {"small-channels": 1}
    assert model.to_proto().SerializeToString() == before


def test_bad_block_size_is_refused(tmp_path):
    for size in (8, 48):
        with pytest.raises(ValueError, match="power of two"):
            int4(matmul_model(64, 32), tmp_path, block_size=size)


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_second_run_changes_nothing(tmp_path, method):
    proto = outlier_model()
    model, first = int4(proto, tmp_path, method=method)
    before = model.to_proto().SerializeToString()
    _, second = int4(proto, tmp_path, method=method, model=model)
    assert first.modified and not second.modified
    assert second.stats["already_quantized"] == 1
    assert model.to_proto().SerializeToString() == before


# ---------------------------------------------------------------------------- opset


def test_opset_raise_rewrites_ops_that_changed(tmp_path):
    proto = make(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1], keepdims=1),
            helper.make_node("Sub", ["x", "m"], ["c"]),
            helper.make_node("Split", ["c"], ["s1", "s2"], axis=0),
            helper.make_node("Concat", ["s1", "s2"], ["cc"], axis=0),
            helper.make_node("MatMul", ["cc", "w"], ["y"], name="mm"),
        ],
        [vi("x", [4, 64])],
        [vi("y", [4, 32])],
        [init("w", weight((64, 32)))],
    )
    model, result = int4(proto, tmp_path)
    assert result.stats["opset_rewritten_nodes"] == 2
    feeds = inputs(proto, 4, seed=1)
    expected = run(proto, feeds)
    assert mse(run(model, feeds), expected) < 1e-2 * np.mean(expected**2)


def test_opset_raise_refuses_an_op_that_would_change_meaning(tmp_path):
    proto = make(
        [
            helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
            helper.make_node("Reshape", ["a", "shape"], ["r"]),
            helper.make_node("GroupNormalization", ["r", "g", "b"], ["y"], num_groups=2),
        ],
        [vi("x", [2, 64])],
        [vi("y", [2, 4, 8])],
        [
            init("w", weight((64, 32))),
            init("shape", np.array([2, 4, 8], np.int64)),
            init("g", np.ones(2, np.float32)),
            init("b", np.zeros(2, np.float32)),
        ],
        opset=18,
        check=False,  # onnx 1.23's checker calls GroupNormalization-18 deprecated
    )
    model = Model(ir=ir.from_proto(proto))
    before = model.to_proto().SerializeToString()
    with pytest.raises(PassFailed, match="GroupNormalization"):
        int4(proto, tmp_path, model=model)
    assert model.to_proto().SerializeToString() == before


# ---------------------------------------------------------------------------- AWQ

K, N = 128, 64


def outlier_model(*, producer: str = "layernorm") -> onnx.ModelProto:
    """x -> (LayerNormalization whose scale has 4 outlier channels) -> MatMul -> y: the
    activation pattern AWQ is for. The weights of the outlier channels are ordinary."""
    rng = np.random.default_rng(7)
    gamma = rng.uniform(0.5, 1.5, K).astype(np.float32)
    gamma[[3, 40, 77, 100]] = [25.0, -30.0, 20.0, 40.0]
    beta = (rng.standard_normal(K) * 0.1).astype(np.float32)
    return make(
        [
            helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], axis=-1),
            helper.make_node("MatMul", ["h", "w"], ["y"], name="proj"),
        ],
        [vi("x", ["N", 4, K])],
        [vi("y", ["N", 4, N])],
        [init("g", gamma), init("b", beta), init("w", weight((K, N), 8))],
    )


def test_awq_beats_rtn_on_outlier_channels(tmp_path):
    proto = outlier_model()
    rtn, _ = int4(proto, tmp_path, method="rtn")
    scaled, result = int4(proto, tmp_path, method="awq")
    (layer,) = result.stats["awq_layers"]
    assert layer["alpha"] > 0 and layer["awq_error"] < layer["rtn_error"]
    assert [step.split(" ")[0] for step in layer["fold"]] == ["LayerNormalization"] * 2
    assert [step[-7:] for step in layer["fold"]] == ["input 1", "input 2"]
    held_out = inputs(proto, 32, seed=99)
    expected = run(proto, held_out)
    for fused in ("off", "default"):
        rtn_error = mse(run(rtn, held_out, fused=fused), expected)
        awq_error = mse(run(scaled, held_out, fused=fused), expected)
        assert awq_error < 0.7 * rtn_error, (fused, awq_error, rtn_error)


def chain_model() -> onnx.ModelProto:
    """Every kind of fold: LayerNorm -> MatMul+Add (Linear) -> Gemm(transB) -> Mul by a
    scalar -> MatMul, each MatMul/Gemm quantizable."""
    d = 64
    return make(
        [
            helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], axis=-1),
            helper.make_node("MatMul", ["h", "w1"], ["m1"], name="mm1"),
            helper.make_node("Add", ["m1", "b1"], ["l1"]),
            helper.make_node("Gemm", ["l1", "w2", "c2"], ["l2"], name="gemm", transB=1),
            helper.make_node("Mul", ["l2", "half"], ["l3"]),
            helper.make_node("MatMul", ["l3", "w3"], ["y"], name="mm3"),
        ],
        [vi("x", ["N", d])],
        [vi("y", ["N", d])],
        [
            init("g", np.linspace(0.5, 8, d).astype(np.float32)),
            init("b", weight((d,), 1)),
            init("w1", weight((d, d), 2)),
            init("b1", weight((d,), 3)),
            init("w2", weight((d, d), 4)),
            init("c2", weight((d,), 5)),
            init("half", np.array(0.5, np.float32)),
            init("w3", weight((d, d), 6)),
        ],
    )


def test_awq_folds_keep_the_float_math(tmp_path):
    """The folds alone (scales at alpha 1, the largest), without rounding: same outputs."""
    proto = chain_model()
    model = Model(ir=ir.from_proto(proto))
    readers = [(n, 1 if n.op_type == "Gemm" else 0) for n in model.graph if n.name]
    planned = awq.plan(readers)
    assert planned.fallbacks == [] and len(planned.groups) == 3
    path = tmp_path / "calib.npz"
    np.savez(path, **inputs(proto, 32, seed=0))
    ctx = Context(workdir=tmp_path, calib_data=open_dataset(os.fspath(path), model.input_specs()))
    awq.collect(model, ctx, planned.groups, samples=32)
    names = NameSource(model.graph)
    for group in planned.groups:
        scales = awq.awq_scales(group.mean_abs, 1.0)
        assert scales.max() / scales.min() > 2  # the check below is not vacuous
        awq.apply(group, scales, names)
    feeds = inputs(proto, 16, seed=5)
    expected = run(proto, feeds)
    np.testing.assert_allclose(run(model, feeds), expected, rtol=1e-5, atol=1e-5)


def test_awq_on_every_fold_kind_quantizes_and_runs(tmp_path):
    proto = chain_model()
    model, result = int4(proto, tmp_path, method="awq")
    assert result.stats["awq_scaled_nodes"] + result.stats["awq_fallback_count"] == 3
    assert result.stats["awq_fallback"] == []
    held_out = inputs(proto, 16, seed=3)
    rtn, _ = int4(proto, tmp_path, method="rtn")
    expected = run(proto, held_out)
    assert mse(run(model, held_out), expected) <= 1.05 * mse(run(rtn, held_out), expected)


def test_awq_falls_back_to_rtn_with_reasons(tmp_path):
    d = 64
    proto = make(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a"], name="from_input"),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["b"], name="after_relu"),
            helper.make_node("Mul", ["b", "two"], ["c"]),
            helper.make_node("MatMul", ["c", "w3"], ["e"], name="shared_x"),
            helper.make_node("Add", ["c", "e"], ["y"]),
        ],
        [vi("x", ["N", d])],
        [vi("y", ["N", d])],
        [
            init("w1", weight((d, d), 1)),
            init("w2", weight((d, d), 2)),
            init("two", np.array(2.0, np.float32)),
            init("w3", weight((d, d), 3)),
        ],
    )
    model, result = int4(proto, tmp_path, method="awq")
    reasons = {item["nodes"][0]: item["reason"] for item in result.stats["awq_fallback"]}
    assert reasons == {
        "from_input": "input",
        "after_relu": "no-fold",
        "shared_x": "shared-activation",
    }
    assert result.stats["quantized_nodes"] == 3 and result.stats["awq_layers"] == []


def test_awq_needs_calibration_data(tmp_path):
    model = Model(ir=ir.from_proto(outlier_model()))
    with pytest.raises(GraphoptError, match="calibration data"):
        quantize_weights_int4(
            model,
            Context(workdir=tmp_path),
            method="awq",
            block_size=32,
            excluder=Excluder(()),
            min_channels=16,
            samples=8,
        )

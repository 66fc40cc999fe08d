"""SmoothQuantPass: exact in float on several graphs (checked on ONNX Runtime), the groups it
forms and refuses with reasons, the α search, idempotence, and the point of it: lower int8
error after `quantize` on a model with outlier activation channels."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from graphopt.cli import main
from graphopt.context import Context
from graphopt.data import open_dataset
from graphopt.errors import GraphoptError, RecipeError
from graphopt.model import Model
from graphopt.passes.base import PassResult, build_options, get_pass
from graphopt.passes.quantize import QuantizeOptions, QuantizePass
from graphopt.passes.smoothquant import SmoothQuantOptions, SmoothQuantPass
from tests import models

# ---------------------------------------------------------------------------- models


def _model(nodes, inputs, outputs, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    initializers = [
        numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()
    ]
    return models.make_model(nodes, inputs, outputs, initializers, name="sq")


_vi = models.value_info


def _rng_weights(seed: int, **shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape) * 0.3 for name, shape in shapes.items()}


def mlp_gemm(trans_b: int = 1, c_shape: tuple[int, ...] = (32,)) -> onnx.ModelProto:
    """x[N,24] -> Gemm(C) -> Relu -> Gemm -> Relu -> Gemm -> y: absorbed through Relu."""
    w = _rng_weights(1, w1=(32, 24) if trans_b else (24, 32), c1=c_shape, w2=(32, 32), w3=(32, 8))
    w["c2"] = np.full(32, 0.1)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "c1"], ["g1"], name="fc1", transB=trans_b, beta=0.5),
        helper.make_node("Relu", ["g1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2", "c2"], ["g2"], name="fc2", alpha=1.5),
        helper.make_node("LeakyRelu", ["g2"], ["r2"], name="leaky", alpha=0.1),
        helper.make_node("Gemm", ["r2", "w3"], ["y"], name="fc3"),
    ]
    return _model(nodes, [_vi("x", [6, 24])], [_vi("y", [6, 8])], w)


def matmul_chain() -> onnx.ModelProto:
    """x -> Mul(c) -> MatMul -> Add(b) -> MatMul -> Div(c) -> MatMul -> y (batched, rank 3)."""
    w = _rng_weights(2, m=(1, 1, 16), w1=(16, 32), b1=(32,), w2=(32, 24), w3=(24, 8))
    w["d"] = np.full((1, 24), 2.0)
    nodes = [
        helper.make_node("Mul", ["m", "x"], ["xm"], name="scale_in"),
        helper.make_node("MatMul", ["xm", "w1"], ["h1"], name="mm1"),
        helper.make_node("Add", ["h1", "b1"], ["a1"], name="bias1"),
        helper.make_node("MatMul", ["a1", "w2"], ["h2"], name="mm2"),
        helper.make_node("Div", ["h2", "d"], ["h3"], name="div"),
        helper.make_node("MatMul", ["h3", "w3"], ["y"], name="mm3"),
    ]
    return _model(nodes, [_vi("x", ["N", 5, 16])], [_vi("y", ["N", 5, 8])], w)


def conv_chain() -> onnx.ModelProto:
    """x -> Conv3x3(+b) -> Relu -> Conv1x1(+b) -> Conv1x1 -> y: weights absorb 1/s."""
    w = _rng_weights(3, w1=(16, 3, 3, 3), b1=(16,), w2=(24, 16, 1, 1), b2=(24,), w3=(8, 24, 1, 1))
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Conv", ["c2", "w3"], ["y"], name="conv3"),
    ]
    return _model(nodes, [_vi("x", ["N", 3, 8, 8])], [_vi("y", ["N", 8, 8, 8])], w)


def outlier_block(dim: int = 64, seq: int = 16, seed: int = 0) -> onnx.ModelProto:
    """x -> LayerNorm (gamma x50 on 4 channels) -> q/k/v MatMul+Add -> (q+k+v) -> MatMul -> y.

    The outlier channels make one per-tensor int8 scale of the LayerNorm output coarse for
    every other channel: the case SmoothQuant is for.
    """
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 1.5, dim)
    outliers = [3, 17, dim - 20, dim - 6]
    gamma[outliers] *= 50.0
    w = {"gamma": gamma, "beta": rng.standard_normal(dim) * 0.1}
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1)
    ]
    for name in "qkv":
        w[f"w{name}"] = rng.standard_normal((dim, dim)) / np.sqrt(dim)
        # As in trained models, the rows that read the outlier channels are small, so the
        # outliers do not dominate the outputs, only the activation's int8 range.
        w[f"w{name}"][outliers] /= 50.0
        w[f"b{name}"] = rng.standard_normal(dim) * 0.1
        nodes += [
            helper.make_node("MatMul", ["ln", f"w{name}"], [f"{name}_mm"], name=f"{name}_proj"),
            helper.make_node("Add", [f"{name}_mm", f"b{name}"], [name], name=f"{name}_bias"),
        ]
    w["wo"] = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    nodes += [
        helper.make_node("Add", ["q", "k"], ["qk"], name="sum1"),
        helper.make_node("Add", ["qk", "v"], ["qkv"], name="sum2"),
        helper.make_node("MatMul", ["qkv", "wo"], ["y"], name="out_proj"),
    ]
    return _model(nodes, [_vi("x", ["N", seq, dim])], [_vi("y", ["N", seq, dim])], w)


# ---------------------------------------------------------------------------- helpers


def context(proto: onnx.ModelProto, tmp_path: Path, samples: int = 64) -> Context:
    path = tmp_path / "calib.npz"
    np.savez(path, **models.feeds(proto, seed=0, batch=samples))
    data = open_dataset(os.fspath(path), Model(ir=ir.from_proto(proto)).input_specs())
    return Context(workdir=tmp_path, calib_data=data, device="cpu", batch_size=16)


def smooth(proto: onnx.ModelProto, tmp_path: Path, **options: object) -> tuple[Model, PassResult]:
    model = Model(ir=ir.from_proto(proto))
    result = SmoothQuantPass(SmoothQuantOptions(**options)).run(model, context(proto, tmp_path))  # type: ignore[arg-type]
    onnx.checker.check_model(model.to_proto(), full_check=True)
    return model, result


def run_ort(model: Model | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Without graph optimizations: on x86 CPUs without VNNI, ORT's fused int8 MatMul can
    saturate its int16 partial sums, an error of ORT's CPU kernels, not of the Q/DQ model
    (which TensorRT computes as written)."""
    proto = model.to_proto() if isinstance(model, Model) else model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)[0]


def assert_same_outputs(proto: onnx.ModelProto, model: Model) -> None:
    """ORT outputs on held-out inputs agree within 1e-4 of the output's magnitude."""
    feeds = models.feeds(proto, seed=7, batch=4)
    ref, got = run_ort(proto, feeds), run_ort(model, feeds)
    assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref)), np.max(np.abs(got - ref))


def smoothed(result: PassResult) -> dict[str, dict]:
    return {g["activation"]: g for g in result.stats["smoothed"]}


def skipped(result: PassResult) -> dict[str, dict]:
    return {g["activation"]: g for g in result.stats["skipped"]}


def initializer(model: Model, node_name: str, index: int) -> np.ndarray:
    node = next(n for n in model.graph if n.name == node_name)
    return node.inputs[index].const_value.numpy()  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- lossless


@pytest.mark.parametrize("alpha", [0.5, 0.8, "auto"])
def test_transformer_block_is_unchanged_in_float(tmp_path, alpha):
    proto = models.transformer_block()
    proto.ir_version = 9
    model, result = smooth(proto, tmp_path, alpha=alpha)
    assert result.modified
    groups = smoothed(result)
    # q, k and v share the LayerNorm output: one group, one s.
    assert groups["ln1"]["consumers"] == ["matmul_1", "matmul_5", "matmul_9"]
    assert groups["ln1"]["absorber"] == "layernormalization_0"
    assert groups["ln2"]["absorber"] == "layernormalization_24"
    assert groups["gelu"]["absorber"] == "mul_31"  # the GELU's final Mul by 0.5
    assert skipped(result)["ctx"]["reason"] == "no-absorbing-producer"  # after a Reshape
    assert skipped(result)["q_t"]["reason"] == "dynamic-weight"  # the attention core
    assert result.stats["groups_smoothed"] == 3
    assert_same_outputs(proto, model)


@pytest.mark.parametrize(("trans_b", "c_shape"), [(1, (32,)), (0, (6, 1)), (0, ()), (1, (6, 32))])
def test_gemm_relu_mlp_is_unchanged_in_float(tmp_path, trans_b, c_shape):
    proto = mlp_gemm(trans_b, c_shape)
    model, result = smooth(proto, tmp_path, alpha=0.5)
    groups = smoothed(result)
    # s > 0 commutes with Relu and LeakyRelu: the Gemm before each takes 1/s.
    assert groups["r1"]["absorber"] == "fc1"
    assert groups["r2"]["absorber"] == "fc2"
    assert skipped(result)["x"]["reason"] == "no-absorbing-producer"  # a graph input
    assert_same_outputs(proto, model)
    w2 = initializer(model, "fc2", 1)
    assert not np.allclose(w2, numpy_helper.to_array(proto.graph.initializer[2]))


def test_matmul_chain_with_mul_add_and_div_is_unchanged_in_float(tmp_path):
    proto = matmul_chain()
    model, result = smooth(proto, tmp_path, alpha=0.5)
    groups = smoothed(result)
    assert groups["xm"]["absorber"] == "scale_in"  # the Mul's [1,1,16] constant
    assert groups["a1"]["absorber"] == "mm1"  # through the bias Add into mm1's columns
    assert groups["h3"]["absorber"] == "div"
    assert initializer(model, "scale_in", 0).shape == (1, 1, 16)
    assert_same_outputs(proto, model)


def test_conv_1x1_chain_is_unchanged_in_float(tmp_path):
    proto = conv_chain()
    model, result = smooth(proto, tmp_path, alpha=0.5)
    groups = smoothed(result)
    assert groups["r1"]["absorber"] == "conv1"
    assert groups["c2"]["absorber"] == "conv2"
    assert skipped(result)["x"]["reason"] == "unsupported-consumer"  # a 3x3 Conv
    assert_same_outputs(proto, model)


def test_shared_weight_initializers_are_copied_not_edited(tmp_path):
    """Two MatMuls read one weight; only the smoothed one may change."""
    w = _rng_weights(4, w=(16, 16))
    w["g"] = np.linspace(0.5, 20, 16)
    nodes = [
        helper.make_node("Mul", ["x", "g"], ["xg"], name="gain"),
        helper.make_node("MatMul", ["xg", "w"], ["y"], name="smoothed"),
        helper.make_node("MatMul", ["x2", "w"], ["z"], name="other"),
    ]
    proto = _model(
        nodes,
        [_vi("x", ["N", 16]), _vi("x2", ["N", 16])],
        [_vi("y", ["N", 16]), _vi("z", ["N", 16])],
        w,
    )
    model, result = smooth(proto, tmp_path)
    assert result.stats["groups_smoothed"] == 1
    np.testing.assert_array_equal(initializer(model, "other", 1), w["w"].astype(np.float32))
    feeds = models.feeds(proto, seed=3, batch=4)
    session = ort.InferenceSession(model.to_proto().SerializeToString())
    for ref, got in zip(run_all(proto, feeds), session.run(None, feeds), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def run_all(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(proto.SerializeToString()).run(None, feeds)


# ---------------------------------------------------------------------------- refusals


def test_producer_with_other_readers_is_refused(tmp_path):
    """The LayerNorm output also feeds a residual Add: dividing gamma would change it."""
    w = _rng_weights(5, w=(16, 16))
    w.update(g=np.ones(16), b=np.zeros(16))
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], name="ln"),
        helper.make_node("MatMul", ["ln", "w"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "ln"], ["y"], name="residual"),
    ]
    proto = _model(nodes, [_vi("x", ["N", 16])], [_vi("y", ["N", 16])], w)
    model, result = smooth(proto, tmp_path)
    assert not result.modified
    assert skipped(result)["ln"]["reason"] == "other-readers"
    assert "residual" in skipped(result)["ln"]["detail"]
    untouched = Model(ir=ir.from_proto(proto)).to_proto().SerializeToString()
    assert model.to_proto().SerializeToString() == untouched


def test_chain_value_read_elsewhere_is_refused(tmp_path):
    """mm1's output is smoothed through Relu, but the pre-Relu value is also a graph output."""
    w = _rng_weights(6, w1=(16, 16), w2=(16, 16))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    proto = _model(nodes, [_vi("x", ["N", 16])], [_vi("y", ["N", 16]), _vi("h", ["N", 16])], w)
    _, result = smooth(proto, tmp_path)
    assert skipped(result)["r"]["reason"] == "other-readers"


def test_exclude_leaves_the_group_alone(tmp_path):
    proto = models.transformer_block()
    proto.ir_version = 9
    _, result = smooth(proto, tmp_path, exclude=("matmul_5", "re:^nothing$"))
    assert skipped(result)["ln1"]["reason"] == "user"
    assert "ln2" in smoothed(result)
    assert result.warnings == ["exclude entry 're:^nothing$' matched no node"]


def test_dynamic_weight_is_refused(tmp_path):
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Abs", ["w"], ["wdyn"], name="abs"),
        helper.make_node("MatMul", ["r", "wdyn"], ["y"], name="mm"),
    ]
    proto = _model(nodes, [_vi("x", ["N", 16])], [_vi("y", ["N", 16])], _rng_weights(7, w=(16, 16)))
    _, result = smooth(proto, tmp_path)
    assert not result.modified
    assert skipped(result)["r"]["reason"] == "dynamic-weight"


# ---------------------------------------------------------------------------- behaviour


def test_second_run_changes_nothing(tmp_path):
    for alpha in (0.5, "auto"):
        proto = outlier_block()
        model, first = smooth(proto, tmp_path, alpha=alpha)
        assert first.modified
        before = model.to_proto().SerializeToString()
        second = SmoothQuantPass(SmoothQuantOptions(alpha=alpha)).run(
            model, context(proto, tmp_path)
        )
        assert not second.modified, second.stats
        assert set(second.stats["skipped_by_reason"]) >= {"balanced"} or set(
            second.stats["skipped_by_reason"]
        ) >= {"no-gain"}
        assert model.to_proto().SerializeToString() == before


def test_alpha_auto_chooses_per_group_and_never_raises_the_estimated_error(tmp_path):
    proto = models.transformer_block()
    proto.ir_version = 9
    _, result = smooth(proto, tmp_path, alpha="auto")
    for group in result.stats["smoothed"]:
        assert group["alpha"] in [round(0.1 * i, 1) for i in range(11)]
        assert group["error_after"] < group["error_before"]
    assert result.stats["alphas"] == [g["alpha"] for g in result.stats["smoothed"]]


def test_scales_follow_the_formula(tmp_path):
    """s_j = max|X_j|^α / max|W_j|^(1-α) with X the LayerNorm output: gamma / s afterwards."""
    proto = outlier_block(dim=32, seq=4)
    model, _ = smooth(proto, tmp_path, alpha=0.5)
    feeds = models.feeds(proto, seed=0, batch=64)
    inferred = onnx.shape_inference.infer_shapes(proto)
    probe = onnx.ModelProto()
    probe.CopyFrom(inferred)
    probe.graph.output.append(_vi("ln", ["N", 4, 32]))
    ln = ort.InferenceSession(probe.SerializeToString()).run(["ln"], feeds)[0]
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    xmax = np.abs(ln).reshape(-1, 32).max(axis=0)
    wmax = np.max([np.abs(weights[f"w{n}"]).max(axis=1) for n in "qkv"], axis=0)
    s = np.sqrt(xmax) / np.sqrt(wmax)
    np.testing.assert_allclose(initializer(model, "ln", 1), weights["gamma"] / s, rtol=1e-5)
    np.testing.assert_allclose(
        initializer(model, "q_proj", 1), weights["wq"] * s[:, None], rtol=1e-5
    )


def test_without_data_the_pass_says_what_it_needs(tmp_path):
    model = Model(ir=ir.from_proto(outlier_block()))
    with pytest.raises(GraphoptError, match="calibration data") as info:
        SmoothQuantPass().run(model, Context(workdir=tmp_path))
    assert "--data" in (info.value.hint or "")


def test_options_are_validated():
    cls = get_pass("smoothquant")
    assert build_options(cls, {"alpha": "auto"}, from_text=True).alpha == "auto"
    assert build_options(cls, {"alpha": "0.7"}, from_text=True).alpha == 0.7
    for bad in ("1.5", "best"):
        with pytest.raises(RecipeError):
            build_options(cls, {"alpha": bad}, from_text=True)
    with pytest.raises(ValueError):
        SmoothQuantOptions(alpha=-0.1)
    with pytest.raises(ValueError):
        SmoothQuantOptions(exclude=("re:(",))


# ---------------------------------------------------------------------------- the point


def _int8_error(
    proto: onnx.ModelProto, tmp_path: Path, smooth_first: bool, alpha, calibrator: str = "mse"
) -> float:
    """Relative RMS error of quantize(target=tensorrt) against the float model, held out."""
    model = Model(ir=ir.from_proto(proto))
    ctx = context(proto, tmp_path, samples=128)
    if smooth_first:
        SmoothQuantPass(SmoothQuantOptions(alpha=alpha)).run(model, ctx)
    QuantizePass(QuantizeOptions(target="tensorrt", calibrator=calibrator)).run(model, ctx)
    feeds = models.feeds(proto, seed=11, batch=64)
    ref, got = run_ort(proto, feeds), run_ort(model, feeds)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize(("alpha", "calibrator"), [(0.5, "mse"), ("auto", "minmax")])
def test_smoothquant_cuts_int8_error_on_outlier_channels(tmp_path, alpha, calibrator):
    """Measured: relative RMS error 0.34 -> 0.017 (mse, alpha 0.5), 0.43 -> 0.018 (minmax,
    auto)."""
    proto = outlier_block()
    plain = _int8_error(proto, tmp_path, False, alpha, calibrator)
    smoothed_error = _int8_error(proto, tmp_path, True, alpha, calibrator)
    assert smoothed_error < plain / 8, (plain, smoothed_error)


def test_cli_smoothquant_then_quantize(tmp_path):
    proto = outlier_block(dim=32, seq=8)
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", **models.feeds(proto, seed=0, batch=32))
    result = CliRunner().invoke(
        main,
        [
            "optimize",
            str(tmp_path / "m.onnx"),
            "--data",
            str(tmp_path / "d.npz"),
            "--pass",
            "smoothquant:alpha=auto",
            "--pass",
            "quantize",
            "-o",
            str(tmp_path / "out"),
            "--latency-runs",
            "0",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["smoothquant"]["modified"] is True
    stats = steps["smoothquant"]["pass_stats"]
    assert stats["groups_smoothed"] == 1  # q, k, v after the LayerNorm
    assert stats["skipped_by_reason"] == {"no-absorbing-producer": 1}  # q + k + v
    assert steps["quantize"]["pass_stats"]["quantized_nodes"] == 4
    out = onnx.load(tmp_path / "out" / "m.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in out.graph.node)

"""BiasCorrectionPass against independent oracles: the mean output of the model with int8
weights (built here with numpy and run on ONNX Runtime) matches the float model's after the
correction; a direct numpy convolution gives the corrected bias of a tiny Conv; grouped and
depthwise Convs, Gemm (transA/transB, alpha, beta, no C), MatMul+Add; the sites are the ones
`quantize` picks; idempotence (also across save and load); errors; the command line."""

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
from graphopt.errors import GraphoptError
from graphopt.model import Model
from graphopt.passes.base import PassResult
from graphopt.passes.bias_correction import MARK, BiasCorrectionOptions, BiasCorrectionPass
from graphopt.passes.quantize import QuantizeOptions, QuantizePass, qparams
from tests import models

# ---------------------------------------------------------------------------- models


def _model(nodes, inputs, outputs, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    initializers = [
        numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()
    ]
    return models.make_model(nodes, inputs, outputs, initializers, name="bc")


_vi = models.value_info


def conv(
    *,
    cin: int = 16,
    cout: int = 32,
    group: int = 1,
    pads: int = 0,
    bias: bool = True,
    k: int = 3,
    **attrs: object,
) -> onnx.ModelProto:
    """x[N,cin,10,10] -> Conv(k x k, group, pads, attrs) -> y (spatial output size left open)."""
    rng = np.random.default_rng(cin * 100 + cout + group)
    weights = {"w": rng.standard_normal((cout, cin // group, k, k)) * 0.2}
    inputs = ["x", "w"]
    if bias:
        weights["b"] = rng.standard_normal(cout) * 0.1
        inputs.append("b")
    if "auto_pad" not in attrs:
        attrs["pads"] = [pads] * 4
    node = helper.make_node("Conv", inputs, ["y"], name="conv", group=group, **attrs)
    return _model(
        [node], [_vi("x", ["N", cin, 10, 10])], [_vi("y", ["N", cout, "H", "W"])], weights
    )


def gemm(
    *, trans_a: int = 0, trans_b: int = 1, alpha: float = 1.0, beta: float = 1.0, c: bool = True
) -> onnx.ModelProto:
    """x -> Gemm(K=32, N=24) -> y, x given as [N, 32] (or [32, N] with transA)."""
    rng = np.random.default_rng(7)
    weights = {"w": rng.standard_normal((24, 32) if trans_b else (32, 24)) * 0.2}
    inputs = ["x", "w"]
    if c:
        weights["c"] = rng.standard_normal(24) * 0.1
        inputs.append("c")
    node = helper.make_node(
        "Gemm", inputs, ["y"], name="fc", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta
    )
    x_shape = [32, 48] if trans_a else [48, 32]
    return _model([node], [_vi("x", x_shape)], [_vi("y", [48, 24])], weights)


def matmul(*, add: bool = True) -> onnx.ModelProto:
    """x[N,6,32] -> MatMul(32 -> 24) -> (Add bias) -> y."""
    rng = np.random.default_rng(9)
    weights = {"w": rng.standard_normal((32, 24)) * 0.2}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm" if add else "y"], name="mm")]
    if add:
        weights["b"] = rng.standard_normal((1, 24)) * 0.1
        nodes.append(helper.make_node("Add", ["b", "mm"], ["y"], name="bias"))
    return _model(nodes, [_vi("x", ["N", 6, 32])], [_vi("y", ["N", 6, 24])], weights)


# ---------------------------------------------------------------------------- helpers


def calibration(
    proto: onnx.ModelProto, axis: int = 1, samples: int = 48, seed: int = 0
) -> dict[str, np.ndarray]:
    """Normal inputs plus a different mean per channel along `axis` (as after a ReLU or a
    LayerNorm's bias); dynamic dims get `samples`."""
    rng = np.random.default_rng(seed)
    out = {}
    for value in proto.graph.input:
        dims = [d.dim_value or samples for d in value.type.tensor_type.shape.dim]
        shape = [1] * len(dims)
        shape[axis] = -1
        offsets = np.linspace(-1.5, 2.5, dims[axis]).reshape(shape)
        out[value.name] = (rng.standard_normal(dims) + offsets).astype(np.float32)
    return out


def context(tmp_path: Path, feeds: dict[str, np.ndarray], proto: onnx.ModelProto) -> Context:
    path = tmp_path / "calib.npz"
    np.savez(path, **feeds)
    data = open_dataset(os.fspath(path), Model(ir=ir.from_proto(proto)).input_specs())
    return Context(workdir=tmp_path, calib_data=data, device="cpu", batch_size=16)


def correct(
    proto: onnx.ModelProto, tmp_path: Path, feeds: dict[str, np.ndarray], **options: object
) -> tuple[Model, PassResult]:
    model = Model(ir=ir.from_proto(proto))
    result = BiasCorrectionPass(BiasCorrectionOptions(**options)).run(  # type: ignore[arg-type]
        model, context(tmp_path, feeds, proto)
    )
    onnx.checker.check_model(model.to_proto(), full_check=True)
    return model, result


def with_int8_weights(proto: onnx.ModelProto, node_name: str, axis: int) -> onnx.ModelProto:
    """The model with `node_name`'s weight replaced by its int8 round trip (per channel)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    node = next(n for n in out.graph.node if n.name == node_name)
    for i, tensor in enumerate(out.graph.initializer):
        if tensor.name == node.input[1]:
            w = numpy_helper.to_array(tensor)
            scales = qparams.weight_scales(w, axis)
            shape = [1] * w.ndim
            shape[axis] = -1
            q = qparams.quantize_weight(w, scales, axis).astype(np.float32) * scales.reshape(shape)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(q, tensor.name))
    return out


def run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Without graph optimizations: ORT's fused int8 kernels on x86 without VNNI can saturate,
    which is not what a Q/DQ model means."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options)
    return session.run(None, feeds)[0]


def channel_means(y: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(y, axis, 0).reshape(y.shape[axis], -1).mean(axis=1)


def mean_errors(
    proto: onnx.ModelProto, corrected: Model, feeds, node: str, w_axis: int, y_axis: int
) -> tuple[float, float]:
    """max |per-channel mean of the int8-weight model - the float model's|, before and after."""
    reference = channel_means(run(proto, feeds), y_axis)
    before = channel_means(run(with_int8_weights(proto, node, w_axis), feeds), y_axis)
    after_proto = with_int8_weights(corrected.to_proto(), node, w_axis)
    after = channel_means(run(after_proto, feeds), y_axis)
    return float(np.max(np.abs(before - reference))), float(np.max(np.abs(after - reference)))


def bias_of(model: Model, node_name: str, index: int = 2) -> np.ndarray:
    node = next(n for n in model.graph if n.name == node_name)
    return node.inputs[index].const_value.numpy()  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- oracles


@pytest.mark.parametrize(
    ("group", "cin", "cout", "bias"),
    [(1, 16, 32, True), (2, 16, 32, True), (16, 16, 16, False), (4, 16, 32, False)],
    ids=["plain", "grouped", "depthwise", "grouped-no-bias"],
)
def test_conv_mean_output_matches_float_after_correction(tmp_path, group, cin, cout, bias):
    proto = conv(cin=cin, cout=cout, group=group, bias=bias)
    feeds = calibration(proto)
    model, result = correct(proto, tmp_path, feeds, min_channels=1)
    assert result.stats["corrected"] == 1
    assert result.stats["biases_added"] == (0 if bias else 1)
    before, after = mean_errors(proto, model, feeds, "conv", 0, 1)
    # No padding: the correction is exact up to float rounding.
    assert after < before / 100, (before, after)
    assert model.graph.node(0).metadata_props[MARK] == "corrected"


@pytest.mark.parametrize(
    "attrs",
    [
        {"pads": 1},
        {"pads": 2, "strides": [2, 2]},
        {"auto_pad": "SAME_UPPER", "strides": [2, 3]},
        {"auto_pad": "SAME_LOWER", "strides": [3, 2]},
        {"pads": 1, "strides": [1, 2], "dilations": [2, 1]},
        {"auto_pad": "VALID", "dilations": [2, 2]},
    ],
    ids=["pads", "pads-stride", "same-upper", "same-lower", "pads-dilated", "valid-dilated"],
)
def test_padding_strides_and_dilations_are_followed_exactly(tmp_path, attrs):
    """The taps read shifted, zero-padded windows: their means come from the mean sample."""
    attrs = dict(attrs)
    pads = attrs.pop("pads", 0)
    proto = conv(pads=pads, **attrs)
    feeds = calibration(proto)
    model, result = correct(proto, tmp_path, feeds)
    assert result.stats["approximate"] == []
    before, after = mean_errors(proto, model, feeds, "conv", 0, 1)
    assert after < before / 100, (before, after)


def _direct_conv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Valid 2-D convolution (group 1, stride 1) with explicit loops: the oracle."""
    n, _, h, width = x.shape
    cout, _, kh, kw = w.shape
    out = np.zeros((n, cout, h - kh + 1, width - kw + 1))
    for i in range(h - kh + 1):
        for j in range(width - kw + 1):
            patch = x[:, :, i : i + kh, j : j + kw].astype(np.float64)
            out[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w.astype(np.float64))
    return out


def test_tiny_conv_bias_matches_a_direct_convolution(tmp_path):
    proto = conv(cin=2, cout=4)
    feeds = calibration(proto, samples=8)
    model, _ = correct(proto, tmp_path, feeds, min_channels=1)
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    w = weights["w"]
    scales = qparams.weight_scales(w, 0)
    qw = qparams.quantize_weight(w, scales, 0).astype(np.float32) * scales[:, None, None, None]
    x = feeds["x"]
    shift = (_direct_conv(x, qw) - _direct_conv(x, w)).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(bias_of(model, "conv"), weights["b"] - shift, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("trans_a", "trans_b", "alpha", "beta", "c"),
    [
        (0, 1, 1.0, 1.0, True),
        (0, 0, 0.5, 2.0, True),
        (1, 1, 1.5, 0.5, True),
        (0, 0, 2.0, 3.0, False),
    ],
)
def test_gemm_mean_output_matches_float_after_correction(
    tmp_path, trans_a, trans_b, alpha, beta, c
):
    proto = gemm(trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, c=c)
    feeds = calibration(proto, axis=0 if trans_a else 1)
    model, result = correct(proto, tmp_path, feeds)
    assert result.stats["corrected"] == 1 and result.stats["biases_added"] == (0 if c else 1)
    before, after = mean_errors(proto, model, feeds, "fc", 0 if trans_b else 1, 1)
    assert after < before / 100, (before, after)


def test_matmul_is_corrected_through_its_bias_add(tmp_path):
    proto = matmul()
    feeds = calibration(proto, axis=-1)
    model, result = correct(proto, tmp_path, feeds)
    assert result.stats["corrected"] == 1
    assert bias_of(model, "bias", 0).shape == (1, 24)
    before, after = mean_errors(proto, model, feeds, "mm", 1, 2)
    assert after < before / 100, (before, after)


def test_matmul_without_a_bias_add_is_skipped(tmp_path):
    proto = matmul(add=False)
    model, result = correct(proto, tmp_path, calibration(proto, axis=-1))
    assert not result.modified
    assert result.stats["skipped"][0]["reason"] == "no-bias-add"


# ---------------------------------------------------------------------------- which layers


def test_only_the_layers_quantize_will_quantize_are_corrected(tmp_path):
    """A Conv with 8 outputs stays float in quantize (small-channels): left alone here too,
    and so is an excluded one."""
    rng = np.random.default_rng(3)
    weights = {
        "w1": rng.standard_normal((32, 16, 1, 1)) * 0.2,
        "w2": rng.standard_normal((8, 32, 1, 1)) * 0.2,
        "w3": rng.standard_normal((32, 32, 1, 1)) * 0.2,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="wide"),
        helper.make_node("Conv", ["a", "w2"], ["y"], name="narrow"),
        helper.make_node("Conv", ["a", "w3"], ["z"], name="excluded"),
    ]
    proto = _model(
        nodes,
        [_vi("x", ["N", 16, 4, 4])],
        [_vi("y", ["N", 8, 4, 4]), _vi("z", ["N", 32, 4, 4])],
        weights,
    )
    feeds = calibration(proto)
    model, result = correct(proto, tmp_path, feeds, exclude=("excluded",))
    assert [layer["node"] for layer in result.stats["layers"]] == ["wide"]
    assert result.stats["left_float_by_quantize"] == {"small-channels": 1, "user": 1}
    quantized = Model(ir=ir.from_proto(proto))
    q = QuantizePass(QuantizeOptions(exclude=("excluded",))).run(
        quantized, context(tmp_path, feeds, proto)
    )
    assert {e["node"] for e in q.stats["excluded"]} == {"narrow", "excluded"}


def test_a_second_run_changes_nothing_even_after_saving(tmp_path):
    proto = conv()
    feeds = calibration(proto)
    model, first = correct(proto, tmp_path, feeds)
    assert first.modified
    saved = model.to_proto()
    for again in (model, Model(ir=ir.from_proto(saved))):
        result = BiasCorrectionPass().run(again, context(tmp_path, feeds, proto))
        assert not result.modified
        assert result.stats["skipped_by_reason"] == {"already-corrected": 1}
        assert again.to_proto().SerializeToString() == saved.SerializeToString()


def test_zero_mean_inputs_with_exact_weights_change_nothing(tmp_path):
    """Weights already on the int8 grid: Q(W) = W, no shift, no new bias."""
    proto = conv(bias=False)
    weights = numpy_helper.to_array(proto.graph.initializer[0])
    scales = qparams.weight_scales(weights, 0)
    exact = (
        qparams.quantize_weight(weights, scales, 0).astype(np.float32) * scales[:, None, None, None]
    )
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(exact, "w"))
    model, result = correct(proto, tmp_path, calibration(proto))
    assert not result.modified
    assert result.stats["skipped_by_reason"] == {"negligible": 1}
    assert len(list(model.graph.node(0).inputs)) == 2


def test_without_data_the_pass_says_what_it_needs(tmp_path):
    with pytest.raises(GraphoptError, match="calibration data") as info:
        BiasCorrectionPass().run(Model(ir=ir.from_proto(conv())), Context(workdir=tmp_path))
    assert "--data" in (info.value.hint or "")


# ---------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("calibrator", ["mse", "minmax"])
def test_after_quantize_the_mean_output_drifts_much_less(tmp_path, calibrator):
    """The whole point, on held-out data after `quantize`: measured max per-channel mean
    error 0.043 -> 0.001 (mse) and 0.041 -> 0.001 (minmax) on this padded 3x3 Conv."""
    proto = conv(pads=1)
    feeds, held_out = calibration(proto, samples=128), calibration(proto, samples=64, seed=3)
    reference = channel_means(run(proto, held_out), 1)
    errors = []
    for corrected in (False, True):
        model = Model(ir=ir.from_proto(proto))
        ctx = context(tmp_path, feeds, proto)
        if corrected:
            BiasCorrectionPass().run(model, ctx)
        QuantizePass(QuantizeOptions(calibrator=calibrator)).run(model, ctx)
        means = channel_means(run(model.to_proto(), held_out), 1)
        errors.append(float(np.max(np.abs(means - reference))))
    assert errors[1] < errors[0] / 10, errors


def test_cli_bias_correction_then_quantize(tmp_path):
    proto = conv(pads=1)
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", **calibration(proto, samples=32))
    result = CliRunner().invoke(
        main,
        [
            "optimize",
            str(tmp_path / "m.onnx"),
            "--data",
            str(tmp_path / "d.npz"),
            "--pass",
            "bias-correction",
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
    assert steps["bias-correction"]["pass_stats"]["corrected"] == 1
    assert steps["quantize"]["pass_stats"]["quantized_nodes"] == 1

"""QuantizePass: placement (which tensors carry Q/DQ, with reasons for what stays float),
numerics against ONNX Runtime on the float model, exclusions, idempotence, errors, and the
command line on the sample model.

The TensorRT constraint check is tested in test_quantize_trtcheck.py, ONNX Runtime's integer
kernels in test_quantize_ortcpu.py; both use the helpers here.
"""

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
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import main
from graphopt.context import Context
from graphopt.data import Dataset, open_dataset
from graphopt.errors import GraphoptError, RecipeError
from graphopt.model import Model
from graphopt.passes.base import PassResult, build_options, get_pass
from graphopt.passes.cleanup import CleanupPass
from graphopt.passes.quantize import QuantizeOptions, QuantizePass, insert, qparams
from graphopt.passes.quantize.sites import Excluder, select
from graphopt.passes.quantize.tensorrt import plan_tensorrt
from graphopt.recipe import load_recipe
from tests import models

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "digits"

# ---------------------------------------------------------------------------- helpers


def calib_feeds(proto: onnx.ModelProto, samples: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    return models.feeds(proto, seed=seed, batch=samples)


def dataset_for(proto: onnx.ModelProto, tmp_path: Path, samples: int = 64) -> Dataset:
    """The model's own calibration data: random normal inputs, written as an .npz."""
    path = tmp_path / f"calib_{samples}.npz"
    np.savez(path, **calib_feeds(proto, samples))
    return open_dataset(os.fspath(path), Model(ir=ir.from_proto(proto)).input_specs())


def context(tmp_path: Path, data: Dataset | None) -> Context:
    return Context(workdir=tmp_path, calib_data=data, device="cpu", batch_size=16)


def cleaned(proto: onnx.ModelProto, tmp_path: Path) -> Model:
    model = Model(ir=ir.from_proto(proto))
    CleanupPass().run(model, Context(workdir=tmp_path))
    return model


def quantize(
    proto: onnx.ModelProto, tmp_path: Path, *, cleanup: bool = True, **options: object
) -> tuple[Model, PassResult]:
    """Cleanup (optional) then quantize with its own calibration data; checks the result."""
    model = cleaned(proto, tmp_path) if cleanup else Model(ir=ir.from_proto(proto))
    data = dataset_for(proto, tmp_path)
    result = QuantizePass(QuantizeOptions(**options)).run(model, context(tmp_path, data))  # type: ignore[arg-type]
    onnx.checker.check_model(model.to_proto(), full_check=True)
    return model, result


def run_ort(model: Model | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = model.to_proto() if isinstance(model, Model) else model
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def activation_readers(model: Model) -> dict[str, set[tuple[str, int]]]:
    """Quantized activation -> the (node, input index) reading its dequantized value."""
    out: dict[str, set[tuple[str, int]]] = {}
    for node in model.graph:
        if node.op_type != "QuantizeLinear" or node.inputs[0].const_value is not None:
            continue
        (dq, _), *_ = node.outputs[0].uses()
        readers = {(user.name or user.op_type, index) for user, index in dq.outputs[0].uses()}
        out[node.inputs[0].name] = readers
    return out


def weight_dqs(model: Model) -> dict[str, tuple[str, int | None]]:
    """Reader node -> (quantized weight name, axis) for every weight DequantizeLinear."""
    out = {}
    for node in model.graph:
        if node.op_type == "DequantizeLinear" and node.inputs[0].const_value is not None:
            axis = node.attributes.get("axis")
            for user, index in node.outputs[0].uses():
                if index == 1:
                    out[user.name] = (node.inputs[0].name, None if axis is None else axis.as_int())
    return out


def fetch(proto: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]) -> dict:
    """Intermediate tensors of the float model, fetched with ONNX Runtime."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    infos = {vi.name: vi for vi in [*inferred.graph.value_info, *inferred.graph.output]}
    extended = onnx.ModelProto()
    extended.CopyFrom(inferred)
    outputs = {o.name for o in extended.graph.output}
    wanted = [n for n in names if n not in feeds]
    extended.graph.output.extend(infos[n] for n in wanted if n not in outputs)
    session = ort.InferenceSession(extended.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip(wanted, session.run(wanted, feeds), strict=True))
    values.update({n: feeds[n] for n in names if n in feeds})
    return values


class Range:
    """A range computed in the test (numpy min/max), shaped like calibration's TensorRange."""

    def __init__(self, array: np.ndarray) -> None:
        self.low = np.asarray(np.min(array), np.float64)
        self.high = np.asarray(np.max(array), np.float64)

    def amax(self) -> np.ndarray:
        return np.maximum(np.abs(self.low), np.abs(self.high))


def residual_pair(channels: int = 16) -> onnx.ModelProto:
    """x -> conv_a -> ya; x -> conv_b -> yb; Add(ya, yb) -> Relu -> conv_c -> y: both Add
    inputs come straight from quantized Convs."""
    rng = np.random.default_rng(1)
    c = channels
    weights = [
        numpy_helper.from_array((rng.standard_normal((c, c, 3, 3)) * 0.2).astype(np.float32), n)
        for n in ("wa", "wb", "wc")
    ]
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["ya"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "wb"], ["yb"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["ya", "yb"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "wc"], ["y"], name="conv_c", pads=[1, 1, 1, 1]),
    ]
    vi = helper.make_tensor_value_info
    return models.make_model(
        nodes,
        [vi("x", TensorProto.FLOAT, ["N", c, 6, 6])],
        [vi("y", TensorProto.FLOAT, ["N", c, 6, 6])],
        weights,
    )


def concat_net(channels: int = 16) -> onnx.ModelProto:
    """Two Conv+Relu branches concatenated into a third Conv; branch 1 also feeds conv_d."""
    rng = np.random.default_rng(2)
    c = channels

    def w(name: str, cout: int, cin: int, scale: float) -> onnx.TensorProto:
        values = rng.standard_normal((cout, cin, 1, 1)) * scale
        return numpy_helper.from_array(values.astype(np.float32), name)

    weights = [w("w1", c, c, 0.3), w("w2", c, c, 2.0), w("w3", c, 2 * c, 0.3), w("w4", c, c, 0.3)]
    mk = helper.make_node
    nodes = [
        mk("Conv", ["x", "w1"], ["c1"], name="conv_1"),
        mk("Relu", ["c1"], ["r1"], name="relu_1"),
        mk("Conv", ["x", "w2"], ["c2"], name="conv_2"),
        mk("Relu", ["c2"], ["r2"], name="relu_2"),
        mk("Concat", ["r1", "r2"], ["cat"], name="concat", axis=1),
        mk("Conv", ["cat", "w3"], ["y"], name="conv_3"),
        mk("Conv", ["r1", "w4"], ["z"], name="conv_d"),
    ]
    vi = helper.make_tensor_value_info
    return models.make_model(
        nodes,
        [vi("x", TensorProto.FLOAT, ["N", c, 4, 4])],
        [vi("y", TensorProto.FLOAT, ["N", c, 4, 4]), vi("z", TensorProto.FLOAT, ["N", c, 4, 4])],
        weights,
    )


def mlp(rows: int | str = "N", dim: int = 32) -> onnx.ModelProto:
    """x[rows, dim] -> MatMul -> Relu -> Gemm(transB) -> y."""
    rng = np.random.default_rng(3)
    weights = [
        numpy_helper.from_array((rng.standard_normal((dim, dim)) * 0.2).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((dim, dim)) * 0.2).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal(dim).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="matmul"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="gemm", transB=1),
    ]
    vi = helper.make_tensor_value_info
    return models.make_model(
        nodes,
        [vi("x", TensorProto.FLOAT, [rows, dim])],
        [vi("y", TensorProto.FLOAT, [rows, dim])],
        weights,
    )


# ---------------------------------------------------------------------------- placement


def test_tensorrt_placement_on_the_residual_cnn(tmp_path):
    """small_cnn after cleanup: Conv(+BN folded)+Relu, depthwise Conv+Relu, grouped Conv,
    residual Add with the first Relu's output, ConvTranspose+Relu, GAP, Flatten, Gemm."""
    model, result = quantize(models.small_cnn(), tmp_path, target="tensorrt", min_channels=1)
    assert result.modified
    # Exactly these activations carry Q/DQ, read by exactly these inputs: the inputs of
    # the five compute ops, plus the residual Add's skip input (index 1, 'a'), whose other
    # input comes straight from the grouped Conv. No Conv output is quantized.
    assert activation_readers(model) == {
        "x": {("conv_0", 0)},
        "a": {("conv_3", 0), ("add_8", 1)},
        "r2": {("conv_6", 0)},
        "r3": {("convtranspose_10", 0)},
        "flat": {("gemm_15", 0)},
    }
    # Weights: int8 behind a DequantizeLinear on the output-channel axis of each op.
    assert {node: axis for node, (_, axis) in weight_dqs(model).items()} == {
        "conv_0": 0,
        "conv_3": 0,
        "conv_6": 0,
        "convtranspose_10": 1,
        "gemm_15": 0,  # transB=1
    }
    for node in model.graph:
        if node.op_type == "DequantizeLinear" and node.inputs[0].const_value is not None:
            assert node.inputs[0].const_value.dtype == ir.DataType.INT8
    stats = result.stats
    assert stats["target"] == "tensorrt" and stats["quantized_nodes"] == 5
    assert stats["quantize_linear"] == 5 and stats["dequantize_linear"] == 10
    assert stats["weights_quantized"] == 5 and stats["excluded"] == []
    assert json.loads(json.dumps(stats)) == stats  # the report writes it as JSON


def test_residual_skip_is_quantized_even_when_nothing_else_reads_it(tmp_path):
    # With the depthwise conv excluded, 'a' is quantized only for the residual Add.
    model, result = quantize(
        models.small_cnn(), tmp_path, target="tensorrt", min_channels=1, exclude=("conv_3",)
    )
    readers = activation_readers(model)
    assert readers["a"] == {("add_8", 1)}
    assert {"node": "conv_3", "op": "Conv", "reason": "user"}.items() <= result.stats["excluded"][
        0
    ].items()
    # conv_3 still reads the float value.
    conv_3 = next(n for n in model.graph if n.name == "conv_3")
    assert conv_3.inputs[0].name == "a"


def test_residual_add_of_two_quantized_convs_quantizes_the_second_input(tmp_path):
    model, _ = quantize(residual_pair(), tmp_path, cleanup=False, target="tensorrt")
    assert activation_readers(model) == {
        "x": {("conv_a", 0), ("conv_b", 0)},
        "yb": {("add", 1)},
        "r": {("conv_c", 0)},
    }


def test_concat_inputs_share_the_scale_of_the_concat_output(tmp_path):
    proto = concat_net()
    model, _ = quantize(proto, tmp_path, cleanup=False, target="tensorrt", calibrator="minmax")
    readers = activation_readers(model)
    assert set(readers) == {"x", "r1", "cat"}
    scales = {}
    for node in model.graph:
        if node.op_type == "QuantizeLinear":
            scales[node.inputs[0].name] = node.inputs[1]
    # One shared scale initializer for r1 and cat, set by the Concat output's range.
    assert scales["r1"] is scales["cat"]
    feeds = calib_feeds(proto)
    expected = np.float32(np.abs(fetch(proto, ["cat"], feeds)["cat"]).max() / 127)
    assert scales["cat"].const_value.numpy() == pytest.approx(expected, rel=1e-6)


def test_insert_uses_the_ranges_it_is_given(tmp_path):
    """Placement + insertion with ranges computed here (numpy min/max of ORT activations)."""
    proto = models.small_cnn()
    model = cleaned(proto, tmp_path)
    float_proto = model.to_proto()
    selection = select(
        model.graph,
        target="tensorrt",
        excluder=Excluder(()),
        min_channels=1,
        quantize_attention=False,
    )
    plan = plan_tensorrt(model.graph, selection, Excluder(()))
    feeds = calib_feeds(proto)
    values = fetch(float_proto, plan.range_tensors(), feeds)
    ranges = {name: Range(array) for name, array in values.items()}
    inserted = insert.apply(model.graph, plan, ranges, per_channel=True)
    assert inserted.quantize_linear == 5
    for node in model.graph:
        if node.op_type == "QuantizeLinear":
            name = node.inputs[0].name
            expected = np.float32(np.abs(values[name]).max() / 127)
            assert node.inputs[1].const_value.numpy() == expected
            assert node.inputs[2].const_value.numpy() == 0
            assert node.inputs[2].const_value.dtype == ir.DataType.INT8


def test_transformer_block_leaves_attention_and_norms_in_float(tmp_path):
    model, result = quantize(models.transformer_block(), tmp_path, target="tensorrt")
    reasons = {(e["op"], e["reason"]) for e in result.stats["excluded"]}
    assert reasons == {
        ("LayerNormalization", "LayerNorm"),
        ("MatMul", "attention"),
        ("Softmax", "attention"),
        ("Erf", "GELU"),
    }
    assert result.stats["excluded_by_reason"] == {"GELU": 1, "LayerNorm": 2, "attention": 3}
    quantized = {name for name, _ in weight_dqs(model).items()}
    assert len(quantized) == 6  # q, k, v, output projection, and the two MLP MatMuls
    readers = activation_readers(model)
    # The q/k/v projections share one Q/DQ pair on the LayerNorm output.
    assert len(readers["ln1"]) == 3
    assert not any(
        n.op_type == "QuantizeLinear" and n.inputs[0].name in ("q_t", "k_t", "probs")
        for n in model.graph
    )


def test_quantize_attention_when_asked(tmp_path):
    model, result = quantize(
        models.transformer_block(), tmp_path, target="tensorrt", quantize_attention=True
    )
    assert result.stats["excluded_by_reason"].get("attention") == 1  # only the Softmax
    readers = activation_readers(model)
    assert {"q_t", "k_t", "probs", "v_t"} <= set(readers)


def test_small_channels_and_gemv_are_left_in_float(tmp_path):
    # small_cnn has 8 channels or fewer everywhere: with the default minimum of 16 nothing
    # is quantized and the model is left as it was.
    model = cleaned(models.small_cnn(), tmp_path)
    before = model.to_proto().SerializeToString()
    result = QuantizePass().run(model, context(tmp_path, dataset_for(models.small_cnn(), tmp_path)))
    assert result.modified is False
    assert model.to_proto().SerializeToString() == before
    assert result.stats["excluded_by_reason"] == {"small-channels": 5}
    # A single-row MatMul/Gemm is a GEMV for TensorRT, not for ONNX Runtime's CPU kernels.
    _, trt = quantize(mlp(rows=1), tmp_path, cleanup=False, target="tensorrt")
    assert trt.modified is False and trt.stats["excluded_by_reason"] == {"GEMV": 2}
    _, cpu = quantize(mlp(rows=1), tmp_path, cleanup=False, target="ort-cpu")
    assert cpu.modified is True and cpu.stats["quantized_nodes"] == 2


def test_gemm_and_matmul_weights_use_their_output_channel_axis(tmp_path):
    model, _ = quantize(mlp(), tmp_path, cleanup=False, target="tensorrt")
    assert {node: axis for node, (_, axis) in weight_dqs(model).items()} == {
        "matmul": 1,  # B is [K, N]
        "gemm": 0,  # transB=1: B is [N, K]
    }
    gemm_no_trans = models.gemm_bn(trans_b=0, c_shape=None)
    model, _ = quantize(gemm_no_trans, tmp_path, target="tensorrt", min_channels=1)
    assert [axis for _, axis in weight_dqs(model).values()] == [1]


# ---------------------------------------------------------------------------- exclusions


@pytest.mark.parametrize(
    ("exclude", "excluded_nodes"),
    [
        (("conv_0",), {"conv_0"}),
        (("re:^conv_[36]$",), {"conv_3", "conv_6"}),
        (("op:Conv",), {"conv_0", "conv_3", "conv_6"}),
        (("op:Gemm", "convtranspose_10"), {"gemm_15", "convtranspose_10"}),
    ],
)
def test_exclusions_by_name_regex_and_op_type(tmp_path, exclude, excluded_nodes):
    model, result = quantize(
        models.small_cnn(), tmp_path, target="tensorrt", min_channels=1, exclude=exclude
    )
    users = {e["node"] for e in result.stats["excluded"] if e["reason"] == "user"}
    assert users == excluded_nodes
    assert result.stats["excluded_by_reason"]["user"] == len(excluded_nodes)
    assert not excluded_nodes & set(weight_dqs(model))
    assert result.stats["quantized_nodes"] == 5 - len(excluded_nodes)
    assert result.warnings == []


def test_an_exclusion_that_matches_nothing_is_a_warning(tmp_path):
    _, result = quantize(
        models.small_cnn(), tmp_path, min_channels=1, exclude=("no_such_node", "op:Conv")
    )
    assert result.warnings == ["exclude entry 'no_such_node' matched no node"]


def test_bad_exclusions_are_refused_when_the_recipe_is_read():
    with pytest.raises(RecipeError, match="regular expression"):
        build_options(get_pass("quantize"), {"exclude": ["re:(unclosed"]})
    with pytest.raises(RecipeError, match="calibrator"):
        build_options(get_pass("quantize"), {"calibrator": "kl"})
    options = build_options(
        get_pass("quantize"),
        {"exclude": "conv_0|re:fc.*|op:Gemm", "target": "ort-cpu"},
        from_text=True,
    )
    assert options.exclude == ("conv_0", "re:fc.*", "op:Gemm")


# ---------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("target", ["tensorrt", "ort-cpu"])
def test_quantized_small_cnn_stays_close_to_float(tmp_path, target):
    proto = models.small_cnn()
    model, result = quantize(proto, tmp_path, target=target, min_channels=1)
    assert result.modified
    feeds = calib_feeds(proto, samples=32, seed=1)  # other samples than the calibration ones
    (reference,) = run_ort(proto, feeds)
    (candidate,) = run_ort(model, feeds)
    assert cosine(reference, candidate) > 0.99


def test_per_channel_weights_round_trip_as_numpy_computes_them(tmp_path):
    proto = models.small_cnn()
    float_model = cleaned(proto, tmp_path)
    originals = {
        name: value.const_value.numpy().copy()
        for name, value in float_model.graph.initializers.items()
    }
    alphas = {
        node.name: node.attributes["alpha"].as_float()
        for node in float_model.graph
        if node.op_type == "Gemm" and "alpha" in node.attributes
    }
    model, _ = quantize(proto, tmp_path, target="tensorrt", min_channels=1)
    checked = 0
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or node.inputs[0].const_value is None:
            continue
        q = node.inputs[0].const_value.numpy()
        scale = node.inputs[1].const_value.numpy()
        axis = node.attributes["axis"].as_int()
        w = originals[node.inputs[0].name.removesuffix("_quantized")]
        (reader, _), *_ = node.outputs[0].uses()
        if reader.name in alphas:  # a Gemm's alpha is folded into its weight (then 1)
            w = w * np.float32(alphas[reader.name])
            assert reader.attributes["alpha"].as_float() == 1.0
        # Reference: abs-max per output channel / 127, round half to even, narrow range.
        amax = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(axis=1)
        expected_scale = (amax / np.float32(127)).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        expected_q = np.clip(np.rint(w / expected_scale.reshape(shape)), -127, 127).astype(np.int8)
        np.testing.assert_array_equal(scale, expected_scale)
        np.testing.assert_array_equal(q, expected_q)
        assert not np.any(node.inputs[2].const_value.numpy())
        # What ONNX Runtime dequantizes is q * scale, within half a step of the weight.
        dequantized = _dequantize_on_ort(q, scale, axis)
        np.testing.assert_array_equal(dequantized, q.astype(np.float32) * scale.reshape(shape))
        assert np.all(np.abs(dequantized - w) <= expected_scale.reshape(shape) / 2 + 1e-7)
        checked += 1
    assert checked == 5


def _dequantize_on_ort(q: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=axis)],
        "dq",
        [helper.make_tensor_value_info("q", TensorProto.INT8, list(q.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(q.shape))],
        [numpy_helper.from_array(scale, "s")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = models.IR_VERSION
    (y,) = run_ort(proto, {"q": q})
    return y


def test_scale_parameters():
    class R:
        def __init__(self, low, high):
            self.low, self.high = np.asarray(low), np.asarray(high)

        def amax(self):
            return np.maximum(np.abs(self.low), np.abs(self.high))

    sym = qparams.activation_params([R(-2.0, 1.0), R(-0.5, 3.0)], symmetric=True)
    assert sym.scale == np.float32(3.0 / 127) and sym.zero_point == 0 and sym.signed
    asym = qparams.activation_params([R(-1.0, 3.0)], symmetric=False)
    assert asym.scale == np.float32(4.0 / 255) and asym.zero_point == np.uint8(64)
    relu = qparams.activation_params([R(0.5, 2.0)], symmetric=False)  # 0 stays exact
    assert relu.zero_point == 0 and relu.scale == np.float32(2.0 / 255)
    dead = qparams.activation_params([R(0.0, 0.0)], symmetric=True)
    assert dead.scale > 0
    zero_channel = qparams.weight_scales(np.zeros((2, 3), np.float32), 0)
    np.testing.assert_array_equal(zero_channel, [1.0, 1.0])


# ---------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("target", ["tensorrt", "ort-cpu"])
def test_second_run_changes_nothing(tmp_path, target):
    proto = models.small_cnn()
    model, first = quantize(proto, tmp_path, target=target, min_channels=1)
    assert first.modified
    before = model.to_proto().SerializeToString()
    second = QuantizePass(QuantizeOptions(target=target, min_channels=1)).run(
        model, context(tmp_path, dataset_for(proto, tmp_path))
    )
    assert second.modified is False
    assert second.stats["quantize_linear"] == 0
    assert second.stats["already_quantized"] >= first.stats["quantized_nodes"]
    assert model.to_proto().SerializeToString() == before


def test_a_model_without_compute_ops_is_left_alone(tmp_path):
    proto = models.dropout_identity()
    model = Model(ir=ir.from_proto(proto))
    result = QuantizePass().run(model, context(tmp_path, dataset_for(proto, tmp_path)))
    assert result.modified is False and result.stats["quantized_nodes"] == 0


def test_float16_ops_are_left_alone_with_a_reason(tmp_path):
    proto = models.conv_bn(channels=16, dtype=np.float16)
    model = Model(ir=ir.from_proto(proto))
    before = model.to_proto().SerializeToString()
    result = QuantizePass().run(model, context(tmp_path, dataset_for(proto, tmp_path)))
    assert result.modified is False
    assert [(e["node"], e["reason"]) for e in result.stats["excluded"]] == [("conv", "dtype")]
    assert model.to_proto().SerializeToString() == before


def test_samples_are_rounded_to_a_batch_size_the_model_fixes(tmp_path):
    # gemm_bn fixes the batch at 3: the default 256 samples become 255.
    from graphopt.passes.quantize.ranges import usable_samples

    proto = models.gemm_bn()
    assert usable_samples(Model(ir=ir.from_proto(proto)), 256) == 255
    assert usable_samples(Model(ir=ir.from_proto(proto)), 2) == 3
    assert usable_samples(Model(ir=ir.from_proto(models.small_cnn())), 7) == 7
    path = tmp_path / "many.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32))
    model = Model(ir=ir.from_proto(proto))
    data = open_dataset(os.fspath(path), model.input_specs())
    result = QuantizePass(QuantizeOptions(min_channels=1)).run(model, context(tmp_path, data))
    assert result.modified


def test_no_calibration_data_is_a_clear_error(tmp_path):
    model = Model(ir=ir.from_proto(models.small_cnn()))
    with pytest.raises(GraphoptError, match="calibration data") as info:
        QuantizePass().run(model, context(tmp_path, None))
    assert "--data" in info.value.paragraph()


def test_tensors_with_inf_stay_in_float_with_their_readers(tmp_path):
    """Log(Relu(x)) is -inf wherever x <= 0: the Conv reading it stays in float, with a
    reason, and the rest of the model is quantized."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array((rng.standard_normal((16, 16, 1, 1)) * 0.3).astype(np.float32), n)
        for n in ("w1", "w2")
    ]
    mk = helper.make_node
    nodes = [
        mk("Relu", ["x"], ["r"], name="relu"),
        mk("Log", ["r"], ["l"], name="log"),
        mk("Conv", ["l", "w1"], ["a"], name="conv_inf"),
        mk("Conv", ["x", "w2"], ["b"], name="conv_ok"),
        mk("Add", ["a", "b"], ["y"], name="add"),
    ]
    vi = helper.make_tensor_value_info
    proto = models.make_model(
        nodes,
        [vi("x", TensorProto.FLOAT, ["N", 16, 4, 4])],
        [vi("y", TensorProto.FLOAT, ["N", 16, 4, 4])],
        weights,
    )
    model, result = quantize(proto, tmp_path, cleanup=False, target="tensorrt")
    assert result.modified and result.stats["quantized_nodes"] == 1
    (excluded,) = result.stats["excluded"]
    assert excluded["node"] == "conv_inf" and excluded["reason"] == "calibration"
    assert "inf or NaN" in excluded["detail"]
    assert any("'l' left in float" in warning for warning in result.warnings)
    assert set(activation_readers(model)) == {"x"}
    assert set(weight_dqs(model)) == {"conv_ok"}


@pytest.mark.parametrize("calibrator", ["minmax", "percentile", "entropy", "mse"])
def test_every_calibrator_quantizes_the_sample(tmp_path, calibrator):
    proto = onnx.load(os.fspath(DIGITS / "model.onnx"))
    model = cleaned(proto, tmp_path)
    data = open_dataset(os.fspath(DIGITS / "calib.npz"), model.input_specs())
    result = QuantizePass(QuantizeOptions(calibrator=calibrator, samples=64)).run(
        model, context(tmp_path, data)
    )
    assert result.modified and result.stats["calibrator"] == calibrator
    with np.load(DIGITS / "val.npz") as val:
        feeds, labels = {"image": val["image"]}, val["labels"]
    (reference,) = run_ort(proto, feeds)
    (candidate,) = run_ort(model, feeds)
    assert cosine(reference, candidate) > 0.99
    accuracy = float(np.mean(candidate.argmax(axis=1) == labels))
    assert accuracy >= float(np.mean(reference.argmax(axis=1) == labels)) - 0.01


def test_options_and_recipes_are_registered():
    assert get_pass("quantize") is QuantizePass
    for name, target in (("trt-int8", "tensorrt"), ("ort-int8", "ort-cpu")):
        recipe = load_recipe(name)
        assert [spec.name for spec in recipe.passes] == ["cleanup", "quantize"]
        assert recipe.passes[1].options.target == target
        assert recipe.gates.min_cosine == 0.99


# ---------------------------------------------------------------------------- command line


@pytest.mark.parametrize("target", ["tensorrt", "ort-cpu"])
def test_cli_on_the_sample_keeps_accuracy(tmp_path, target):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "optimize",
            str(DIGITS / "model.onnx"),
            "--pass",
            "cleanup",
            "--pass",
            f"quantize:target={target}",
            "--data",
            str(DIGITS / "calib.npz"),
            "--val-data",
            str(DIGITS / "val.npz"),
            "--device",
            "cpu",
            "--latency-runs",
            "3",
            "-o",
            str(out),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    step = report["steps"][-1]
    assert step["name"] == "quantize" and step["modified"] is True
    fidelity = step["fidelity"]
    assert fidelity["reference_accuracy"] - fidelity["candidate_accuracy"] <= 0.01
    assert fidelity["worst_cosine"] > 0.99
    stats = step["pass_stats"]
    assert stats["target"] == target and stats["quantized_nodes"] == 3
    assert stats["excluded_by_reason"] == {"small-channels": 2}
    saved = onnx.load(os.fspath(out / "model.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in saved.graph.node)

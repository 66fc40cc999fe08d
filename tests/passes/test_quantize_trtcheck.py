"""The TensorRT constraint check: the `tensorrt` profile's output passes it on a corpus of
CNNs and transformer blocks, and it catches each violation in a hand-corrupted model; the
opset raise to 13 and its refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import PassFailed
from graphopt.model import Model
from graphopt.passes.quantize import QuantizeOptions, QuantizePass, opset
from graphopt.passes.quantize.trtcheck import check_tensorrt
from tests import models
from tests.passes.test_quantize import (
    calib_feeds,
    concat_net,
    context,
    cosine,
    dataset_for,
    mlp,
    quantize,
    residual_pair,
    run_ort,
)

# The CNNs and transformer blocks of tests/models.py (the others hold no compute op with a
# constant weight, or inputs that are not batches of samples), and the models above.
CORPUS = {
    **{
        name: builder
        for name, builder in models.ALL_BUILDERS.items()
        if name.startswith(("conv_", "gemm_")) or name in ("small_cnn", "transformer_block")
    },
    "transformer_block_wide": lambda: models.transformer_block(seq=4, dim=32, heads=4, hidden=64),
    "conv_bn_wide": lambda: models.conv_bn(channels=32),
    "conv_bn_depthwise_wide": lambda: models.conv_bn(channels=32, groups=32),
    "residual_pair": residual_pair,
    "concat_net": concat_net,
    "mlp": mlp,
}


@pytest.mark.parametrize("name", sorted(CORPUS))
@pytest.mark.parametrize("attention", [False, True])
def test_tensorrt_profile_passes_the_check_on_the_corpus(tmp_path, name, attention):
    proto = CORPUS[name]()
    model, result = quantize(
        proto, tmp_path, target="tensorrt", min_channels=1, quantize_attention=attention
    )
    assert check_tensorrt(model.ir) == []
    assert result.modified and result.stats["quantized_nodes"] > 0
    # Every Q/DQ is signed int8 with zero point 0, and the model still computes the same
    # function, up to int8 noise.
    for node in model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point = node.inputs[2].const_value
            assert zero_point.dtype == ir.DataType.INT8 and not zero_point.numpy().any()
    feeds = calib_feeds(proto, samples=8, seed=5)
    for reference, candidate in zip(run_ort(proto, feeds), run_ort(model, feeds), strict=True):
        assert cosine(reference, candidate) > 0.98


# ---------------------------------------------------------------------------- corruptions


@pytest.fixture
def quantized(tmp_path) -> Model:
    model, _ = quantize(models.small_cnn(), tmp_path, target="tensorrt", min_channels=1)
    assert check_tensorrt(model.ir) == []
    return model


def _node(model: Model, name: str) -> ir.Node:
    return next(node for node in model.graph if node.name == name)


def _set_initializer(model: Model, value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(array, name=value.name)
    value.type = ir.TensorType(value.const_value.dtype)


def test_check_catches_a_nonzero_zero_point(quantized):
    q = _node(quantized, "a_QuantizeLinear")
    _set_initializer(quantized, q.inputs[2], np.array(1, np.int8))
    violations = check_tensorrt(quantized.ir)
    assert {v.node for v in violations} == {"a_QuantizeLinear", "a_DequantizeLinear"}
    assert all("zero point 1 != 0" in v.message for v in violations)


def test_check_catches_uint8_activations(quantized):
    q = _node(quantized, "x_QuantizeLinear")
    _set_initializer(quantized, q.inputs[2], np.array(0, np.uint8))
    messages = {v.node: v.message for v in check_tensorrt(quantized.ir)}
    assert "uint8 activation" in messages["x_QuantizeLinear"]
    # A QuantizeLinear without a zero point produces uint8 too.
    r2 = _node(quantized, "r2_QuantizeLinear")
    r2.resize_inputs(2)
    messages = {v.node: v.message for v in check_tensorrt(quantized.ir)}
    assert "uint8 activation" in messages["r2_QuantizeLinear"]


def test_check_catches_a_per_channel_axis_off_the_output_channels(tmp_path):
    model, _ = quantize(mlp(), tmp_path, cleanup=False, target="tensorrt")
    assert check_tensorrt(model.ir) == []
    dq = next(node for node in model.graph if node.name == "w1_DequantizeLinear")
    dq.attributes["axis"] = ir.AttrInt64("axis", 0)  # B is [K, N]: channels are axis 1
    onnx.checker.check_model(model.to_proto(), full_check=True)  # still a valid model
    (violation,) = check_tensorrt(model.ir)
    assert violation.node == dq.name
    assert "axis 0" in violation.message and "output-channel axis is 1" in violation.message


def test_check_catches_per_channel_activations(quantized):
    q = _node(quantized, "flat_QuantizeLinear")
    dq = _node(quantized, "flat_DequantizeLinear")
    scale = np.full(4, 0.1, np.float32)
    for node in (q, dq):
        scales = ir.Value(name=f"{node.name}_scales", shape=ir.Shape([4]))
        _set_initializer(quantized, scales, scale)
        quantized.graph.register_initializer(scales)
        zeros = ir.Value(name=f"{node.name}_zeros", shape=ir.Shape([4]))
        _set_initializer(quantized, zeros, np.zeros(4, np.int8))
        quantized.graph.register_initializer(zeros)
        node.replace_input_with(1, scales)
        node.replace_input_with(2, zeros)
    messages = {v.node: v.message for v in check_tensorrt(quantized.ir)}
    assert "per-tensor" in messages["flat_QuantizeLinear"]
    assert "not a weight" in messages["flat_DequantizeLinear"]


def test_check_catches_an_opset_below_13(quantized):
    quantized.ir.opset_imports[""] = 12
    violations = check_tensorrt(quantized.ir)
    assert violations and all("opset is 12" in v.message for v in violations)


def test_a_violation_in_the_input_model_fails_the_pass_naming_the_node(tmp_path):
    """A model that arrives with an asymmetric Q/DQ pair in front of a Conv."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array((rng.standard_normal((16, 16, 1, 1))).astype(np.float32), "w"),
        numpy_helper.from_array((rng.standard_normal((16, 16, 1, 1))).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(3, np.int8), "zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="old_q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="old_dq"),
        helper.make_node("Relu", ["xd"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["c_relu"], name="relu_2"),
        helper.make_node("Conv", ["c_relu", "w2"], ["y"], name="conv_2"),
    ]
    vi = helper.make_tensor_value_info
    proto = models.make_model(
        nodes,
        [vi("x", TensorProto.FLOAT, ["N", 16, 4, 4])],
        [vi("y", TensorProto.FLOAT, ["N", 16, 4, 4])],
        weights,
    )
    model = Model(ir=ir.from_proto(proto))
    with pytest.raises(PassFailed) as info:
        QuantizePass(QuantizeOptions(target="tensorrt")).run(
            model, context(tmp_path, dataset_for(proto, tmp_path))
        )
    assert info.value.node == "old_q" and info.value.pass_name == "quantize"
    assert "zero point 3 != 0" in info.value.paragraph()
    assert "old_q" in info.value.paragraph()


# ---------------------------------------------------------------------------- opset


def _conv_net(
    opset: int, extra: list[onnx.NodeProto] | None = None, y_shape: list[int] | None = None
) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array((rng.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32), n)
        for n in ("w1", "w2")
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv_1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv_2", pads=[1, 1, 1, 1]),
        *(extra or [helper.make_node("Relu", ["c2"], ["y"], name="relu_out")]),
    ]
    vi = helper.make_tensor_value_info
    shape = [1, 16, 4, 4]
    return models.make_model(
        nodes,
        [vi("x", TensorProto.FLOAT, shape)],
        [vi("y", TensorProto.FLOAT, y_shape or shape)],
        weights,
        opset=opset,
    )


def test_an_old_opset_is_raised_to_13_when_every_op_keeps_its_meaning(tmp_path):
    proto = _conv_net(11)
    model, result = quantize(proto, tmp_path, cleanup=False, target="tensorrt")
    assert result.stats["opset_raised_from"] == 11
    assert model.ir.opset_imports[""] == 13
    assert check_tensorrt(model.ir) == []
    feeds = calib_feeds(proto, samples=2)
    assert cosine(run_ort(proto, feeds)[0], run_ort(model, feeds)[0]) > 0.99


def _rewritten_ops() -> list[onnx.NodeProto]:
    """Opset-11 ops whose attribute became an input at 13, and a Softmax over more than the
    last axis: c2 [1,16,4,4] -> Squeeze/Unsqueeze/ReduceSum/Split -> Softmax(axis=1)."""
    mk = helper.make_node
    return [
        mk("Unsqueeze", ["c2"], ["u"], name="unsqueeze", axes=[0]),  # [1,1,16,4,4]
        mk("Squeeze", ["u"], ["s"], name="squeeze", axes=[0]),  # [1,16,4,4]
        mk("Split", ["s"], ["s1", "s2"], name="split", axis=1, split=[4, 12]),
        mk("ReduceSum", ["s2"], ["rs"], name="reduce", axes=[1], keepdims=1),  # [1,1,4,4]
        mk("Add", ["s1", "rs"], ["a"], name="add"),  # [1,4,4,4]
        mk("Softmax", ["a"], ["y"], name="softmax", axis=1),  # over 4x4x4 before opset 13
    ]


def test_ops_whose_attribute_became_an_input_are_rewritten_exactly():
    proto = _conv_net(11, _rewritten_ops(), [1, 4, 4, 4])
    model = Model(ir=ir.from_proto(proto))
    assert opset.blockers(model.ir, 13) == []
    assert opset.raise_opset(model.ir, 13) == 5
    raised = model.to_proto()
    onnx.checker.check_model(raised, full_check=True)
    assert raised.opset_import[0].version == 13
    feeds = calib_feeds(proto, samples=1, seed=9)
    (expected,) = run_ort(proto, feeds)
    (actual,) = run_ort(raised, feeds)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)
    # The Softmax still normalizes over the 64 trailing values, not over axis 1 alone.
    assert np.allclose(actual.reshape(1, -1).sum(axis=1), 1.0, atol=1e-5)


def test_an_old_opset_with_rewritten_ops_is_quantized(tmp_path):
    proto = _conv_net(11, _rewritten_ops(), [1, 4, 4, 4])
    model, result = quantize(proto, tmp_path, cleanup=False, target="tensorrt")
    assert result.stats["opset_raised_from"] == 11 and result.stats["opset_rewritten_nodes"] == 5
    assert check_tensorrt(model.ir) == []
    feeds = calib_feeds(proto, samples=2)
    assert cosine(run_ort(proto, feeds)[0], run_ort(model, feeds)[0]) > 0.99


def test_an_old_opset_that_cannot_be_raised_fails_the_pass(tmp_path):
    extra = [helper.make_node("Dropout", ["c2"], ["y"], name="dropout", ratio=0.25)]
    proto = _conv_net(11, extra)
    model = Model(ir=ir.from_proto(proto))
    before = model.to_proto().SerializeToString()
    with pytest.raises(PassFailed) as info:
        QuantizePass(QuantizeOptions(target="tensorrt")).run(
            model, context(tmp_path, dataset_for(proto, tmp_path))
        )
    paragraph = info.value.paragraph()
    assert "opset 11" in paragraph and "opset 13" in paragraph and "Re-export" in paragraph
    assert "dropout (Dropout-11): uses attribute(s) ratio" in paragraph
    assert info.value.node == "dropout"
    assert model.ir.opset_imports[""] == 11
    assert model.to_proto().SerializeToString() == before

"""Cleanup's affine folding: a per-channel Mul/Add by constants after or before a Conv goes into
the Conv's weights and bias, with ONNX Runtime outputs unchanged; everything that does not
fold exactly is left alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.context import Context
from graphopt.model import Model
from graphopt.passes.cleanup import CleanupOptions, CleanupPass

C_IN, C_OUT = 8, 12


def conv_node(name: str, x: str, y: str, *, pads: int = 0, group: int = 1, bias: bool = True):
    inputs = [x, f"{name}_w"] + ([f"{name}_b"] if bias else [])
    return helper.make_node(
        "Conv", inputs, [y], name=name, kernel_shape=[3, 3], pads=[pads] * 4, group=group
    )


def conv_inits(name: str, c_in: int, c_out: int, *, group: int = 1, bias: bool = True, seed=0):
    rng = np.random.default_rng(seed)
    out = [
        numpy_helper.from_array(
            rng.normal(0, 0.3, (c_out, c_in // group, 3, 3)).astype(np.float32), f"{name}_w"
        )
    ]
    if bias:
        out.append(
            numpy_helper.from_array(rng.normal(0, 0.3, c_out).astype(np.float32), f"{name}_b")
        )
    return out


def const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def model(nodes, inits, *, out_channels: int = C_OUT, extra_outputs=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C_IN, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in extra_outputs],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def cleaned(proto: onnx.ModelProto, tmp_path: Path, **options) -> tuple[Model, dict]:
    m = Model(ir=ir.from_proto(proto))
    result = CleanupPass(CleanupOptions(**options)).run(m, Context(workdir=tmp_path))
    return m, result.stats


def assert_same_outputs(proto: onnx.ModelProto, m: Model) -> None:
    x = np.random.default_rng(3).normal(0, 1, (2, C_IN, 9, 9)).astype(np.float32)
    outs = []
    for p in (proto, m.to_proto()):
        s = ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"])
        outs.append(s.run(None, {"x": x}))
    for before, after in zip(*outs, strict=True):
        assert before.shape == after.shape
        scale = max(float(np.abs(before).max()), 1e-6)
        assert float(np.abs(after - before).max()) <= 1e-5 * scale


def ops(m: Model) -> list[str]:
    return [n.op_type for n in m.graph]


PER_CHANNEL_OUT = np.linspace(0.5, 2.0, C_OUT).reshape(C_OUT, 1, 1)
PER_CHANNEL_IN = np.array([-1.5, -0.7, 0.4, 1.0, 1.3, 2.0, -0.2, 0.9]).reshape(1, C_IN, 1, 1)


@pytest.mark.parametrize(
    ("scale", "shift", "bias"),
    [
        (1.7, -0.3, True),  # a learnable affine block: scalars
        (PER_CHANNEL_OUT, PER_CHANNEL_OUT * 0.1, True),  # [C, 1, 1]
        (PER_CHANNEL_OUT.reshape(1, C_OUT, 1, 1), None, False),  # Mul only, no bias
        (None, [0.25], False),  # Add only, shape [1]
    ],
)
def test_affine_after_a_conv_folds(scale, shift, bias, tmp_path: Path) -> None:
    nodes = [conv_node("conv", "x", "c", pads=1, bias=bias)]
    inits = conv_inits("conv", C_IN, C_OUT, bias=bias)
    last = "c"
    if scale is not None:
        nodes.append(helper.make_node("Mul", [last, "scale"], ["m"]))
        inits.append(const("scale", scale))
        last = "m"
    if shift is not None:
        nodes.append(helper.make_node("Add", ["shift", last], ["a"]))
        inits.append(const("shift", shift))
        last = "a"
    nodes.append(helper.make_node("Relu", [last], ["y"]))
    proto = model(nodes, inits)
    m, stats = cleaned(proto, tmp_path)
    assert stats["affines_folded"] == 1
    assert ops(m) == ["Conv", "Relu"]
    assert_same_outputs(proto, m)


@pytest.mark.parametrize("pads", [0, 1])
@pytest.mark.parametrize("group", [1, 2, C_IN])
def test_affine_before_a_conv_folds(pads: int, group: int, tmp_path: Path) -> None:
    """Per input channel; with padding only the scale moves and Add(x, d / c) stays."""
    out = C_OUT if group != C_IN else C_IN * 2  # depthwise with channel multiplier 2
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Mul", ["r", "scale"], ["m"]),
        helper.make_node("Add", ["m", "shift"], ["a"]),
        conv_node("conv", "a", "y", pads=pads, group=group),
    ]
    inits = [const("scale", PER_CHANNEL_IN), const("shift", PER_CHANNEL_IN * -0.2 + 0.1)]
    inits += conv_inits("conv", C_IN, out, group=group)
    proto = model(nodes, inits)
    m, stats = cleaned(proto, tmp_path)
    assert stats["affines_folded"] == 1
    assert ops(m) == (["Relu", "Conv"] if pads == 0 else ["Relu", "Add", "Conv"])
    assert_same_outputs(proto, m)


def test_scalar_affine_before_a_padded_conv_keeps_a_scalar_add(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Mul", ["r", "scale"], ["m"]),
        helper.make_node("Add", ["m", "shift"], ["a"]),
        conv_node("conv", "a", "y", pads=1),
    ]
    inits = [const("scale", [2.5]), const("shift", [-1.0])] + conv_inits("conv", C_IN, C_OUT)
    proto = model(nodes, inits)
    m, _ = cleaned(proto, tmp_path)
    add = next(n for n in m.graph if n.op_type == "Add")
    shift = next(v for v in add.inputs if v.const_value is not None)
    assert shift.const_value.numpy().shape == (1,)
    assert_same_outputs(proto, m)


def test_conv_output_read_twice_is_left_alone(tmp_path: Path) -> None:
    nodes = [
        conv_node("conv", "x", "c", pads=1),
        helper.make_node("Mul", ["c", "scale"], ["m"]),
        helper.make_node("Add", ["m", "c"], ["y"]),
    ]
    proto = model(nodes, [const("scale", [2.0]), *conv_inits("conv", C_IN, C_OUT)])
    m, stats = cleaned(proto, tmp_path)
    assert stats.get("affines_folded", 0) == 0
    assert ops(m) == ["Conv", "Mul", "Add"]


def test_zero_scale_before_a_padded_conv_is_left_alone(tmp_path: Path) -> None:
    scale = np.ones((1, C_IN, 1, 1))
    scale[0, 3] = 0.0
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Mul", ["r", "scale"], ["m"]),
        helper.make_node("Add", ["m", "shift"], ["a"]),
        conv_node("conv", "a", "y", pads=1),
    ]
    inits = [const("scale", scale), const("shift", [0.5])] + conv_inits("conv", C_IN, C_OUT)
    proto = model(nodes, inits)
    m, stats = cleaned(proto, tmp_path)
    assert stats.get("affines_folded", 0) == 0
    assert_same_outputs(proto, m)


def test_constant_not_per_channel_is_left_alone(tmp_path: Path) -> None:
    """A [1, 1, 9, 1] constant scales rows, not channels."""
    nodes = [
        conv_node("conv", "x", "c", pads=1),
        helper.make_node("Mul", ["c", "scale"], ["y"]),
    ]
    scale = np.linspace(1, 2, 9).reshape(1, 1, 9, 1)
    proto = model(nodes, [const("scale", scale), *conv_inits("conv", C_IN, C_OUT)])
    m, stats = cleaned(proto, tmp_path)
    assert stats.get("affines_folded", 0) == 0
    assert_same_outputs(proto, m)


def test_graph_output_keeps_its_name(tmp_path: Path) -> None:
    nodes = [
        conv_node("conv", "x", "c", pads=1),
        helper.make_node("Mul", ["c", "scale"], ["m"]),
        helper.make_node("Add", ["m", "shift"], ["y"]),
    ]
    inits = [const("scale", [3.0]), const("shift", [1.0]), *conv_inits("conv", C_IN, C_OUT)]
    proto = model(nodes, inits)
    m, _ = cleaned(proto, tmp_path)
    assert ops(m) == ["Conv"]
    assert [v.name for v in m.graph.outputs] == ["y"]
    assert_same_outputs(proto, m)


def test_an_affine_stops_at_an_intermediate_graph_output(tmp_path: Path) -> None:
    nodes = [
        conv_node("conv", "x", "c", pads=1),
        helper.make_node("Mul", ["c", "scale"], ["m"]),
        helper.make_node("Add", ["m", "shift"], ["y"]),
    ]
    inits = [const("scale", [3.0]), const("shift", [1.0]), *conv_inits("conv", C_IN, C_OUT)]
    proto = model(nodes, inits, extra_outputs=("m",))
    m, _ = cleaned(proto, tmp_path)
    assert ops(m) == ["Conv", "Add"]  # the Mul folds; the Add after an output stays
    assert "m" in [v.name for v in m.graph.outputs]
    assert_same_outputs(proto, m)


def test_the_rule_can_be_turned_off(tmp_path: Path) -> None:
    nodes = [conv_node("conv", "x", "c", pads=1), helper.make_node("Mul", ["c", "s"], ["y"])]
    proto = model(nodes, [const("s", [2.0]), *conv_inits("conv", C_IN, C_OUT)])
    m, _ = cleaned(proto, tmp_path, fold_affine=False)
    assert ops(m) == ["Conv", "Mul"]

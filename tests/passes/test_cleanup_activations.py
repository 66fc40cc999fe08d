"""Cleanup's activation fusion: hard-sigmoid / hard-swish spelled out as Add, Clip, Mul, Div
become HardSigmoid (and a Mul), with outputs equal on ONNX Runtime; everything that does not
match exactly is left alone."""

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


def const(
    name: str, value: float, shape: tuple[int, ...] = (), dtype=np.float32
) -> onnx.TensorProto:
    return numpy_helper.from_array(np.full(shape, value, dtype), name)


def build(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    *,
    x_shape: list[int | str] | None = None,
    opset: int = 17,
    elem: int = TensorProto.FLOAT,
    outputs: tuple[str, ...] = ("y",),
) -> onnx.ModelProto:
    shape = ["N", 8, 5, 5] if x_shape is None else x_shape
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), *nodes],
        "g",
        [helper.make_tensor_value_info("x", elem, shape)],
        [helper.make_tensor_value_info(o, elem, shape) for o in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def hard_swish(variant: str, *, three=(), six=(), opset: int = 17) -> onnx.ModelProto:
    """r * Clip(r + 3, 0, 6) / 6 written several ways (r = Relu(x) - 1, so negative too)."""
    n = helper.make_node
    pre = [n("Sub", ["r", "one"], ["v"], name="shift")]
    inits = [const("one", 1.0), const("three", 3.0, three)]
    if opset >= 11:
        clip = n("Clip", ["a", "zero", "six_c"], ["c"], name="clip")
        inits += [const("zero", 0.0), const("six_c", 6.0)]
    else:
        clip = n("Clip", ["a"], ["c"], name="clip", min=0.0, max=6.0)
    add = n(
        "Add", ["v", "three"] if variant != "add-swapped" else ["three", "v"], ["a"], name="add"
    )
    if variant in ("div-after-mul", "add-swapped"):
        tail = [n("Mul", ["v", "c"], ["m"], name="mul"), n("Div", ["m", "six"], ["y"], name="div")]
        inits.append(const("six", 6.0, six))
    elif variant == "mul-sixth":
        tail = [
            n("Mul", ["c", "v"], ["m"], name="mul"),
            n("Mul", ["sixth", "m"], ["y"], name="scale"),
        ]
        inits.append(const("sixth", 1 / 6, six))
    elif variant == "sigmoid-only":
        tail = [n("Div", ["c", "six"], ["y"], name="div")]
        inits.append(const("six", 6.0, six))
    else:
        raise AssertionError(variant)
    return build([*pre, add, clip, *tail], inits, opset=opset)


def cleaned(proto: onnx.ModelProto, tmp_path: Path, **options: bool) -> tuple[Model, dict]:
    model = Model(ir=ir.from_proto(proto))
    result = CleanupPass(CleanupOptions(**options)).run(model, Context(workdir=tmp_path))
    onnx.checker.check_model(model.to_proto(), full_check=True)
    return model, result.stats


def run(proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def inputs(dtype=np.float32) -> np.ndarray:
    # Dense over the interesting range [-4, 4] and beyond, both clip edges included.
    x = np.linspace(-8, 8, 2 * 8 * 5 * 5).reshape(2, 8, 5, 5)
    x.flat[:4] = [-3.0, 3.0, 0.0, 4.0]  # r - 1 hits -3 / +3 exactly (the clip edges)
    return x.astype(dtype)


def ops(model: Model) -> list[str]:
    return [node.op_type for node in model.graph]


@pytest.mark.parametrize(
    ("variant", "opset", "three", "six"),
    [
        ("div-after-mul", 17, (1,), (1,)),  # Paddle's export (PP-OCR)
        ("div-after-mul", 12, (), ()),
        ("div-after-mul", 10, (), ()),  # Clip bounds as attributes
        ("add-swapped", 13, (1, 1, 1, 1), ()),
        ("mul-sixth", 17, (), (1,)),
        ("sigmoid-only", 17, (), ()),
    ],
)
def test_patterns_fuse_and_keep_the_outputs(
    variant: str, opset: int, three: tuple, six: tuple, tmp_path: Path
) -> None:
    proto = hard_swish(variant, three=three, six=six, opset=opset)
    model, stats = cleaned(proto, tmp_path)
    assert stats["activations_fused"] == 1
    expected = ["Relu", "Sub", "HardSigmoid"] + ([] if variant == "sigmoid-only" else ["Mul"])
    assert ops(model) == expected
    node = next(n for n in model.graph if n.op_type == "HardSigmoid")
    assert node.attributes["alpha"].as_float() == pytest.approx(1 / 6)
    assert node.attributes["beta"].as_float() == pytest.approx(0.5)
    x = inputs()
    (before,), (after,) = run(proto, x), run(model.to_proto(), x)
    assert before.shape == after.shape
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_a_graph_output_keeps_its_name(tmp_path: Path) -> None:
    proto = hard_swish("div-after-mul")
    model, _ = cleaned(proto, tmp_path)
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert model.graph.outputs[0].producer().op_type == "Mul"


def test_float16_and_other_offsets(tmp_path: Path) -> None:
    """Clip(x + 2, 0, 4) / 4 is HardSigmoid(alpha=0.25, beta=0.5), in float16 too."""
    n = helper.make_node
    nodes = [
        n("Add", ["r", "two"], ["a"]),
        n("Clip", ["a", "zero", "four"], ["c"]),
        n("Mul", ["r", "c"], ["m"]),
        n("Div", ["m", "four"], ["y"]),
    ]
    for dtype, elem in ((np.float32, TensorProto.FLOAT), (np.float16, TensorProto.FLOAT16)):
        inits = [const(k, v, (), dtype) for k, v in (("two", 2.0), ("zero", 0.0), ("four", 4.0))]
        proto = build(nodes, inits, elem=elem)
        model, stats = cleaned(proto, tmp_path)
        assert stats["activations_fused"] == 1
        x = inputs(dtype)
        tol = 1e-6 if dtype == np.float32 else 2e-3
        np.testing.assert_allclose(
            run(model.to_proto(), x)[0].astype(np.float32),
            run(proto, x)[0].astype(np.float32),
            rtol=tol,
            atol=tol,
        )


def _not_fused(proto: onnx.ModelProto, tmp_path: Path) -> None:
    model, stats = cleaned(proto, tmp_path)
    assert stats.get("activations_fused", 0) == 0
    assert "HardSigmoid" not in ops(model)


def test_scale_that_does_not_match_the_clip_is_left_alone(tmp_path: Path) -> None:
    proto = hard_swish("div-after-mul")
    for init in proto.graph.initializer:
        if init.name == "six":
            init.CopyFrom(const("six", 5.0))
    _not_fused(proto, tmp_path)


def test_clip_not_from_zero_is_left_alone(tmp_path: Path) -> None:
    proto = hard_swish("div-after-mul")
    for init in proto.graph.initializer:
        if init.name == "zero":
            init.CopyFrom(const("zero", -1.0))
    _not_fused(proto, tmp_path)


def test_an_intermediate_with_another_reader_is_left_alone(tmp_path: Path) -> None:
    proto = hard_swish("div-after-mul")
    proto.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 8, 5, 5]))
    _not_fused(proto, tmp_path)


def test_mul_by_another_tensor_is_left_alone(tmp_path: Path) -> None:
    """x2 * Clip(x + 3, 0, 6) / 6 with x2 != x is not hard-swish."""
    proto = hard_swish("div-after-mul")
    for node in proto.graph.node:
        if node.name == "mul":
            node.input[0] = "r"  # the Add reads v = r - 1
    _not_fused(proto, tmp_path)


def test_rank_zero_input_with_rank_one_constants_is_left_alone(tmp_path: Path) -> None:
    """x of shape [] with a [1]-shaped constant broadcasts to [1]; HardSigmoid would not."""
    n = helper.make_node
    nodes = [
        n("Add", ["r", "three"], ["a"]),
        n("Clip", ["a", "zero", "six"], ["c"]),
        n("Div", ["c", "six1"], ["y"]),
    ]
    inits = [
        const("three", 3.0, (1,)),
        const("zero", 0.0),
        const("six", 6.0),
        const("six1", 6.0, (1,)),
    ]
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), *nodes],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    _not_fused(proto, tmp_path)


def test_the_rule_can_be_turned_off(tmp_path: Path) -> None:
    model, stats = cleaned(hard_swish("div-after-mul"), tmp_path, fuse_activations=False)
    assert "HardSigmoid" not in ops(model)

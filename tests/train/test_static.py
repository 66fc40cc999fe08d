"""freeze_shape_subgraphs: a Shape -> Slice -> Concat -> Reshape chain (as paddle2onnx writes
it) becomes constants for fixed input shapes; outputs stay equal and training works."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graphopt.model import Model
from graphopt.runtime import create_session
from graphopt.train import AdamW, Loss, Trainer
from graphopt.train.static import freeze_shape_subgraphs
from tests.models import make_model


def _flatten_by_shape() -> Model:
    """x[N,2,3,4] -> Conv 1x1 (4 channels) -> Reshape to [N, C*H, W] with the shape taken
    from Shape(y)[0:2] and Constant nodes -> MatMul w[4,5]."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "wc"], ["y"]),
        helper.make_node("Shape", ["y"], ["s"]),
        helper.make_node(
            "Constant", [], ["zero"], value=numpy_helper.from_array(np.array([0], np.int64))
        ),
        helper.make_node(
            "Constant", [], ["one"], value=numpy_helper.from_array(np.array([1], np.int64))
        ),
        helper.make_node("Slice", ["s", "zero", "one"], ["n"]),
        helper.make_node(
            "Constant", [], ["rest"], value=numpy_helper.from_array(np.array([-1, 4], np.int64))
        ),
        helper.make_node("Concat", ["n", "rest"], ["target"], axis=0),
        helper.make_node("Reshape", ["y", "target"], ["r"]),
        helper.make_node("MatMul", ["r", "w"], ["out"]),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 2, 1, 1)).astype(np.float32), "wc"),
        numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "w"),
    ]
    proto = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 12, 5])],
        inits,
    )
    return Model(ir=ir.from_proto(proto))


def test_frozen_copy_computes_the_same_and_trains() -> None:
    model = _flatten_by_shape()
    frozen, count = freeze_shape_subgraphs(model, {"x": [3, 2, 3, 4]})
    assert count == 1
    assert "Shape" not in [n.op_type for n in frozen.graph]
    assert "Shape" in [n.op_type for n in model.graph]  # the original is untouched
    assert sorted(model.graph.initializers) == ["w", "wc"]
    x = np.random.default_rng(1).standard_normal((3, 2, 3, 4)).astype(np.float32)
    want = create_session(model, device="cpu").run({"x": x})["out"]
    got = create_session(frozen, device="cpu").run({"x": x})["out"]
    np.testing.assert_array_equal(got, want)
    trainer = Trainer(frozen, [Loss.mse("out", target="t")], AdamW(lr=1e-2))
    target = np.zeros_like(want)
    losses = [trainer.step({"x": x, "t": target}).loss for _ in range(5)]
    assert losses[-1] < losses[0]
    assert set(trainer.params) == {"w", "wc"}


def test_a_second_freeze_finds_nothing_left() -> None:
    model = _flatten_by_shape()
    proto = model.to_proto()
    frozen, count = freeze_shape_subgraphs(Model(ir=ir.from_proto(proto)), {"x": [2, 2, 3, 4]})
    assert count == 1
    again, count = freeze_shape_subgraphs(frozen, {"x": [2, 2, 3, 4]})
    assert count == 0
    assert [d for d in again.graph.inputs[0].shape] == [2, 2, 3, 4]

"""Models that trip up other quantizers: integer inputs, an embedding table behind Gather,
biases that are graph inputs (not initializers: an Add after a MatMul and a Gemm's C), and a
compute op inside an If whose condition is computed from the data. The pass quantizes what it can, leaves the rest in float with a
reason, and the result runs on ONNX Runtime close to the float model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.context import Context
from graphopt.data import open_dataset
from graphopt.model import Model
from graphopt.passes.quantize import QuantizeOptions, QuantizePass
from tests.passes.test_quantize import cosine, run_ort

VOCAB, D, H = 50, 32, 48


def awkward_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name
        )

    mk = helper.make_node
    then_branch = helper.make_graph(
        [mk("MatMul", ["r", "w2"], ["branch_out"], name="matmul_in_if")],
        "then",
        [],
        [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, ["N", "S", H])],
    )
    else_branch = helper.make_graph(
        [mk("Identity", ["r"], ["branch_out_else"], name="identity_in_else")],
        "else",
        [],
        [helper.make_tensor_value_info("branch_out_else", TensorProto.FLOAT, ["N", "S", H])],
    )
    nodes = [
        mk("Gather", ["embedding", "ids"], ["e"], name="embed", axis=0),
        mk("MatMul", ["e", "w1"], ["m1"], name="proj"),
        mk("Unsqueeze", ["bias_in", "axis_1"], ["bias_3d"], name="bias_per_sample"),
        mk("Add", ["m1", "bias_3d"], ["a1"], name="bias_from_input"),
        mk("Cast", ["ids"], ["ids_f"], name="ids_float", to=TensorProto.FLOAT),
        mk("ReduceSum", ["ids_f"], ["id_sum"], name="id_sum", keepdims=0),
        mk("Greater", ["id_sum", "zero"], ["flag"], name="flag"),
        mk("Relu", ["a1"], ["r"], name="relu"),
        mk("If", ["flag"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch),
        mk("ReduceMean", ["r"], ["pooled"], name="pool", axes=[1], keepdims=0),
        mk("Gemm", ["pooled", "w3", "bias_in"], ["z"], name="head"),  # C is a graph input
    ]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "awkward",
        [vi("ids", TensorProto.INT64, ["N", "S"]), vi("bias_in", TensorProto.FLOAT, ["N", H])],
        [vi("y", TensorProto.FLOAT, ["N", "S", H]), vi("z", TensorProto.FLOAT, ["N", H])],
        [
            w("embedding", VOCAB, D),
            w("w1", D, H),
            w("w2", H, H),
            w("w3", H, H),
            numpy_helper.from_array(np.array([1], np.int64), "axis_1"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def feeds(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "ids": rng.integers(1, VOCAB, (n, 7), dtype=np.int64),
        "bias_in": rng.standard_normal((n, H)).astype(np.float32),
    }


@pytest.mark.parametrize("target", ["tensorrt", "ort-cpu"])
def test_awkward_model_is_quantized_where_it_can_be(tmp_path: Path, target: str) -> None:
    proto = awkward_model()
    onnx.checker.check_model(proto, full_check=True)
    model = Model(ir=ir.from_proto(proto))
    calib = feeds(np.random.default_rng(1), 32)
    path = tmp_path / "calib.npz"
    np.savez(path, **calib)
    dataset = open_dataset(os.fspath(path), model.input_specs())
    ctx = Context(workdir=tmp_path, calib_data=dataset, device="cpu", batch_size=32)
    result = QuantizePass(QuantizeOptions(target=target, min_channels=1)).run(model, ctx)
    onnx.checker.check_model(model.to_proto(), full_check=True)
    excluded = {item["node"]: item["reason"] for item in result.stats["excluded"]}
    assert excluded.get("matmul_in_if") == "subgraph"
    assert result.stats["quantized_nodes"] >= 1  # proj (and head where the target allows)
    ops = {node.name: node for node in model.graph}
    assert ops["proj"].inputs[1].producer().op_type == "DequantizeLinear"
    assert ops["embed"].inputs[0].name == "embedding"  # the table stays float
    assert ops["head"].inputs[1].producer().op_type == "DequantizeLinear"
    assert ops["head"].inputs[2].name == "bias_in"  # a run-time C stays as it is
    check = feeds(np.random.default_rng(2), 5)
    for want, got in zip(run_ort(proto, check), run_ort(model, check), strict=True):
        assert got.shape == want.shape
        assert cosine(want, got) > 0.99

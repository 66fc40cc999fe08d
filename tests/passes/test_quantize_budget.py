"""The quantize pass's accuracy budget: the ops that hurt most go back to float, by bisection,
until the model meets the bound; checked on ONNX Runtime against the float model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.context import Context
from graphopt.data import Dataset, open_dataset
from graphopt.errors import GraphoptError
from graphopt.model import Model
from graphopt.passes.quantize import QuantizeOptions, QuantizePass
from graphopt.validate import Gates, compare

WIDTH = 64


def outlier_mlp(seed: int = 0) -> onnx.ModelProto:
    """Four MatMul layers; the activation between layers 1 and 2 has four channels 60x the
    others (layer 1's columns scaled up, layer 2's rows scaled down by the same factor), so a
    per-tensor int8 scale there wipes out the other 60 channels: layer 2 is the op to revert."""
    rng = np.random.default_rng(seed)
    weights = [
        rng.normal(0, 1 / np.sqrt(WIDTH), (WIDTH, WIDTH)).astype(np.float32) for _ in range(4)
    ]
    weights[0][:, :4] *= 60.0
    weights[1][:4, :] /= 60.0
    nodes, inits = [], []
    previous = "x"
    for i, w in enumerate(weights, start=1):
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == 4 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [f"m{i}"], name=f"layer{i}"))
        if i < 4:
            nodes.append(helper.make_node("Relu", [f"m{i}"], [out], name=f"relu{i}"))
        else:
            nodes.append(helper.make_node("Identity", [f"m{i}"], [out], name="out"))
        previous = out
    graph = helper.make_graph(
        nodes,
        "outlier_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def data(
    tmp_path: Path, proto: onnx.ModelProto, name: str, *, seed: int, labels: bool = False
) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (96, WIDTH)).astype(np.float32)
    arrays = {"x": x}
    if labels:
        arrays["labels"] = np.argmax(_float_outputs(proto, x), axis=1).astype(np.int64)
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return open_dataset(os.fspath(path), Model(ir=ir.from_proto(proto)).input_specs())


def _float_outputs(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def run(tmp_path: Path, proto: onnx.ModelProto, calib: Dataset, **options: object):
    model = Model(ir=ir.from_proto(proto))
    ctx = Context(workdir=tmp_path, calib_data=calib, device="cpu", batch_size=16)
    opts = QuantizeOptions(min_channels=1, **options)  # type: ignore[arg-type]
    result = QuantizePass(opts).run(model, ctx)
    onnx.checker.check_model(model.to_proto(), full_check=True)
    return model, result


def held_out_cosine(tmp_path: Path, proto: onnx.ModelProto, model: Model) -> float:
    test = data(tmp_path, proto, "test", seed=7)
    report = compare(Model(ir=ir.from_proto(proto)), model, test, device="cpu")
    assert report.worst_cosine is not None
    return report.worst_cosine


def test_without_a_budget_the_outlier_layer_costs_accuracy(tmp_path: Path) -> None:
    """The premise of the other tests: plain int8 misses a 0.9999 cosine on this model."""
    proto = outlier_mlp()
    model, result = run(tmp_path, proto, data(tmp_path, proto, "calib", seed=1))
    assert result.stats["quantized_nodes"] == 4
    assert held_out_cosine(tmp_path, proto, model) < 0.9999


def test_budget_reverts_the_worst_layer_and_meets_the_bound(tmp_path: Path) -> None:
    proto = outlier_mlp()
    model, result = run(tmp_path, proto, data(tmp_path, proto, "calib", seed=1), min_cosine=0.9999)
    budget = result.stats["budget"]
    reverted = [item["node"] for item in budget["reverted"]]
    assert budget["met"] is True
    assert "layer2" in reverted  # the ranking found the op that the outliers break
    assert len(reverted) < 4  # and kept the others quantized
    assert result.stats["quantized_nodes"] == 4 - len(reverted)
    assert result.stats["excluded_by_reason"]["budget"] == len(reverted)
    for item in result.stats["excluded"]:
        if item["reason"] == "budget":
            assert item["node"] in reverted
    # The reverted op reads a float input and float weights; the others are int8.
    ops = {node.name: node for node in model.graph}
    assert ops["layer2"].inputs[0].name == "h1"
    assert ops["layer2"].inputs[1].name == "w2"
    assert ops["layer3"].inputs[1].producer().op_type == "DequantizeLinear"
    # Independent check, on data the search never saw.
    assert held_out_cosine(tmp_path, proto, model) >= 0.9995
    assert all(e["reverted"] <= 4 for e in budget["evaluations"])
    assert budget["evaluations"][-1]["passed"] or any(e["passed"] for e in budget["evaluations"])


def test_budget_that_already_holds_reverts_nothing(tmp_path: Path) -> None:
    proto = outlier_mlp()
    calib = data(tmp_path, proto, "calib", seed=1)
    model, result = run(tmp_path, proto, calib, min_cosine=0.5)
    budget = result.stats["budget"]
    assert budget["met"] is True and budget["reverted"] == []
    assert len(budget["evaluations"]) == 1
    assert result.stats["quantized_nodes"] == 4
    plain, _ = run(tmp_path, proto, calib)
    assert [n.op_type for n in model.graph] == [n.op_type for n in plain.graph]


def test_accuracy_budget_uses_labels_and_the_metric(tmp_path: Path) -> None:
    proto = outlier_mlp()
    calib = data(tmp_path, proto, "calib", seed=1, labels=True)
    model, result = run(tmp_path, proto, calib, max_accuracy_drop=0.03, budget_samples=96)
    budget = result.stats["budget"]
    assert budget["met"] is True
    assert "accuracy drop" in budget["evaluations"][0]["summary"]
    # Measured again, independently of the search, on the samples it was judged on.
    report = compare(
        Model(ir=ir.from_proto(proto)), model, calib, gates=Gates(max_accuracy_drop=0.03)
    )
    assert report.passed, report.failures


def test_accuracy_budget_without_labels_is_a_clear_error(tmp_path: Path) -> None:
    proto = outlier_mlp()
    with pytest.raises(GraphoptError, match="needs labelled data"):
        run(tmp_path, proto, data(tmp_path, proto, "calib", seed=1), max_accuracy_drop=0.01)


def test_unreachable_budget_leaves_the_model_in_float_and_says_so(tmp_path: Path) -> None:
    proto = outlier_mlp()
    model, result = run(
        tmp_path, proto, data(tmp_path, proto, "calib", seed=1), min_sqnr=200.0, budget_evals=3
    )
    assert result.modified is False
    assert result.stats["budget"]["met"] is False
    assert len(result.stats["budget"]["evaluations"]) <= 4  # the first, then 3 at most
    assert any("accuracy budget" in w for w in result.warnings)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph)
    # Exactly as it came: no inferred types or shapes left on intermediate values.
    assert (
        model.to_proto().SerializeToString()
        == Model(ir=ir.from_proto(proto)).to_proto().SerializeToString()
    )


def test_budget_evaluations_are_bounded(tmp_path: Path) -> None:
    proto = outlier_mlp()
    _, result = run(
        tmp_path, proto, data(tmp_path, proto, "calib", seed=1), min_cosine=0.9999, budget_evals=1
    )
    assert len(result.stats["budget"]["evaluations"]) <= 2

"""Per-layer comparison finds the first tensor where a candidate departs from the reference."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import main
from graphopt.data import open_dataset
from graphopt.layerwise import compare_layers
from graphopt.model import load_model


def chain(path, *, perturb_layer: int | None = None, insert_identity: bool = False):
    """x -> (MatMul w_i -> Relu) x 4 -> y; optionally perturb one weight or add an Identity."""
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    for i in range(4):
        w = (rng.standard_normal((8, 8)) / np.sqrt(8)).astype(np.float32)
        if i == perturb_layer:
            w = (w + 0.5 * rng.standard_normal((8, 8))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"], name=f"mm{i}"))
        out = "y" if i == 3 else f"relu{i}"
        nodes.append(helper.make_node("Relu", [f"mm{i}"], [out], name=f"relu{i}"))
        current = out
    if insert_identity:
        # Renames nothing that exists in the reference: the extra tensor is simply unmatched.
        nodes.insert(1, helper.make_node("Identity", ["mm0"], ["extra"], name="extra"))
        nodes.append(helper.make_node("Identity", ["extra"], ["unused_out"], name="extra2"))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])]
        + (
            [helper.make_tensor_value_info("unused_out", TensorProto.FLOAT, ["N", 8])]
            if insert_identity
            else []
        ),
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32))
    return path


def test_identical_models_agree_on_every_layer(tmp_path, data):
    ref = load_model(chain(tmp_path / "a.onnx"))
    report = compare_layers(ref, ref, open_dataset(data, ref.input_specs()), batch_size=16)
    assert [layer.tensor for layer in report.layers] == [
        "mm0",
        "relu0",
        "mm1",
        "relu1",
        "mm2",
        "relu2",
        "mm3",
    ]
    assert all(layer.fidelity.cosine == 1.0 for layer in report.layers)
    assert report.first_departure(0.9999) is None
    assert report.samples == 40


def test_first_departure_is_the_perturbed_layer(tmp_path, data):
    ref = load_model(chain(tmp_path / "a.onnx"))
    cand = load_model(chain(tmp_path / "b.onnx", perturb_layer=2))
    report = compare_layers(ref, cand, open_dataset(data, ref.input_specs()), group_size=3)
    by_name = {layer.tensor: layer.fidelity for layer in report.layers}
    assert by_name["relu1"].cosine == 1.0
    assert by_name["mm2"].cosine < 0.99
    assert report.first_departure(0.999).tensor == "mm2"
    # Cross-check one tensor against numpy on the raw activations.
    x = np.load(data)["x"]
    w_ref = onnx.numpy_helper.to_array(onnx.load(tmp_path / "a.onnx").graph.initializer[2])
    w_cand = onnx.numpy_helper.to_array(onnx.load(tmp_path / "b.onnx").graph.initializer[2])
    h = x
    for i in range(2):
        w = onnx.numpy_helper.to_array(onnx.load(tmp_path / "a.onnx").graph.initializer[i])
        h = np.maximum(h @ w, 0)
    a, b = (h @ w_ref).ravel().astype(np.float64), (h @ w_cand).ravel().astype(np.float64)
    expected = a @ b / np.sqrt((a @ a) * (b @ b))
    assert by_name["mm2"].cosine == pytest.approx(expected, rel=1e-6)


def test_tensors_only_in_one_model_are_reported_unmatched(tmp_path, data):
    ref = load_model(chain(tmp_path / "a.onnx", insert_identity=True))
    cand = load_model(chain(tmp_path / "b.onnx"))
    report = compare_layers(ref, cand, open_dataset(data, ref.input_specs()))
    assert report.unmatched == ["extra"]


def test_validate_per_layer_on_the_command_line(tmp_path, data):
    a, b = chain(tmp_path / "a.onnx"), chain(tmp_path / "b.onnx", perturb_layer=1)
    result = CliRunner().invoke(
        main, ["validate", str(a), str(b), "--data", str(data), "--per-layer"]
    )
    assert result.exit_code == 0, result.output
    assert "Per-layer fidelity" in result.stdout and "first tensor below cosine" in result.stdout
    assert "'mm1'" in result.stdout
    result = CliRunner().invoke(
        main, ["validate", str(a), str(b), "--data", str(data), "--per-layer", "--json"]
    )
    layers = json.loads(result.stdout)["per_layer"]["layers"]
    assert [row["tensor"] for row in layers][:3] == ["mm0", "relu0", "mm1"]
    assert layers[0]["cosine"] == 1.0 and layers[2]["cosine"] < 0.999

"""The command line: the happy paths, and every bad input giving one paragraph and exit 1."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, numpy_helper

from graphopt.cli import main
from tests.tiny import data_file, tiny_model


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def workspace(tmp_path):
    model = tiny_model(tmp_path / "model.onnx")
    data = data_file(tmp_path / "data.npz")
    return tmp_path, model, data


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_clean_failure(result, *words: str):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip().endswith(errors[0]), "the error must be the last thing said"
    paragraph = errors[0]
    for word in words:
        assert word in paragraph, paragraph


def test_optimize_writes_model_and_report_and_the_model_runs(workspace):
    tmp, model, data = workspace
    out = tmp / "out"
    before = digest(model)
    result = invoke(
        "optimize", model, "--data", data, "--val-data", data, "-o", out, "--latency-runs", "3"
    )
    assert result.exit_code == 0, result.output
    assert "per-pass report" in result.stdout and "cleanup" in result.stdout
    assert digest(model) == before
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    assert [s["name"] for s in report["steps"]] == ["original", "cleanup", "quantize"]
    assert report["steps"][1]["modified"] is True
    # The tiny Gemm (3 outputs) is below quantize's min_channels: left in float, with reason.
    quantize = report["steps"][2]
    assert quantize["modified"] is False
    assert {e["reason"] for e in quantize["pass_stats"]["excluded"]} == {"small-channels"}
    assert report["latency"]["original"]["runs"] == 3
    optimized = onnx.load(out / "model.onnx")
    assert {n.op_type for n in optimized.graph.node} == {"Gemm", "Relu"}
    x = np.load(data)["x"]
    ref = ort.InferenceSession(str(model)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out / "model.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_optimize_json_output_and_single_file_destination(workspace):
    tmp, model, data = workspace
    result = invoke(
        "optimize",
        model,
        "--val-data",
        data,
        "-o",
        tmp / "o" / "small.onnx",
        "--latency-runs",
        "0",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["output"].endswith("small.onnx")
    assert (tmp / "o" / "small.report.json").exists()
    assert report["fidelity"]["outputs"][0]["name"] == "y"


def test_print_recipe_shows_the_resolved_recipe(workspace):
    _, model, _ = workspace
    result = invoke(
        "optimize",
        model,
        "--pass",
        "cleanup:fold_batchnorm=false",
        "--gate",
        "min_cosine=0.5",
        "--print-recipe",
    )
    assert result.exit_code == 0
    assert "fold_batchnorm: false" in result.stdout and "min_cosine: 0.5" in result.stdout


def test_failed_gate_exits_1_and_writes_no_model(workspace, tmp_path):
    tmp, model, data = workspace
    edit = tmp_path / "edits.py"
    edit.write_text(
        "import numpy as np\n"
        "def scale(graph):\n"
        "    w = graph.tensors()['w']\n"
        "    w.values = (w.values * -1).astype(np.float32)\n"
        "    return graph\n"
    )
    out = tmp / "gated"
    result = invoke(
        "optimize",
        model,
        "--pass",
        f"graphsurgeon:function={edit}:scale",
        "--val-data",
        data,
        "--gate",
        "min_cosine=0.99",
        "-o",
        out,
        "--latency-runs",
        "0",
    )
    assert_clean_failure(result, "min_cosine", "not written")
    assert not (out / "model.onnx").exists()
    assert json.loads((out / "report.json").read_text())["passed"] is False


def test_graphsurgeon_pass_runs_a_user_function(workspace, tmp_path):
    tmp, model, data = workspace
    edit = tmp_path / "fold_relu.py"
    edit.write_text(
        "def drop_relu(graph):\n"
        "    relu = [n for n in graph.nodes if n.op == 'Relu'][0]\n"
        "    relu.op = 'Identity'\n"
        "    return graph\n"
    )
    out = tmp / "gs"
    result = invoke(
        "optimize",
        model,
        "--pass",
        f"graphsurgeon:function={edit}:drop_relu",
        "-o",
        out,
        "--latency-runs",
        "0",
    )
    assert result.exit_code == 0, result.output
    assert "Relu" not in {n.op_type for n in onnx.load(out / "model.onnx").graph.node}


def test_passes_lists_every_pass_from_the_code():
    result = invoke("passes", "--json")
    assert result.exit_code == 0
    listing = json.loads(result.stdout)
    assert "cleanup" in listing and listing["cleanup"]["lossless"] is True
    assert {o["name"] for o in listing["cleanup"]["options"]} >= {
        "fold_constants",
        "fold_batchnorm",
    }
    assert listing["graphsurgeon"]["command_line_only"] is True
    assert "cleanup" in invoke("passes").stdout


def test_inspect(workspace):
    _, model, _ = workspace
    result = invoke("inspect", model, "--json")
    assert result.exit_code == 0
    stats = json.loads(result.stdout)
    assert stats["params"] == 3 * 4 + 3 + 5
    assert stats["op_histogram"] == {"Gemm": 1, "Relu": 1, "Identity": 1}
    assert "Gemm" in invoke("inspect", model).stdout


def test_validate_identical_and_gated(workspace, tmp_path):
    tmp, model, data = workspace
    assert (
        invoke("validate", model, model, "--data", data, "--gate", "min_cosine=0.9999").exit_code
        == 0
    )
    other = tmp_path / "other.onnx"
    proto = onnx.load(model)
    proto.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.full(3, 5.0, np.float32), "b"))
    onnx.save(proto, other)
    result = invoke("validate", model, other, "--data", data, "--gate", "max_abs_error=1e-3")
    assert_clean_failure(result, "max_abs_error")


# ----------------------------------------------------------------------------- bad input


def test_default_recipe_without_data_runs_the_lossless_recipe(workspace):
    tmp, model, data = workspace
    result = invoke("optimize", model, "--val-data", data, "-o", tmp / "o", "--latency-runs", "0")
    assert result.exit_code == 0, result.output
    assert "'lossless' recipe runs instead" in result.stderr
    report = json.loads((tmp / "o" / "report.json").read_text())
    assert [s["name"] for s in report["steps"]] == ["original", "cleanup"]


def test_missing_model(tmp_path):
    assert_clean_failure(
        invoke("optimize", tmp_path / "nope.onnx", "-o", tmp_path / "o"), "nope.onnx"
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.1])
def test_truncated_model(workspace, cut):
    tmp, model, data = workspace
    raw = model.read_bytes()
    broken = tmp / "broken.onnx"
    broken.write_bytes(raw[: int(len(raw) * cut)])
    before = digest(broken)
    result = invoke("optimize", broken, "--val-data", data, "-o", tmp / "o")
    assert_clean_failure(result, "broken.onnx")
    assert digest(broken) == before
    assert not (tmp / "o").exists()


def test_corrupt_model(tmp_path):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x00\xff not a model at all" * 10)
    assert_clean_failure(invoke("inspect", bad), "garbage.onnx")


def test_wrong_input_name_in_data(workspace):
    tmp, model, _ = workspace
    data = data_file(tmp / "wrong.npz", name="images")
    result = invoke("optimize", model, "--val-data", data, "-o", tmp / "o")
    assert_clean_failure(result, "images", "x")
    assert not (tmp / "o").exists()


def test_wrong_shape_in_data(workspace):
    tmp, model, _ = workspace
    data = data_file(tmp / "wrong.npz", shape=(20, 5))
    result = invoke("optimize", model, "--val-data", data, "-o", tmp / "o")
    assert_clean_failure(result, "x", "5")
    assert not (tmp / "o").exists()


def test_unreadable_data(workspace):
    tmp, model, _ = workspace
    bad = tmp / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    result = invoke("optimize", model, "--val-data", bad, "-o", tmp / "o")
    assert_clean_failure(result, "bad.npz")
    assert not (tmp / "o").exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--pass", "sharpen"], ["Unknown pass 'sharpen'"]),
        (["--pass", "cleanup:fold=1"], ["cleanup", "fold"]),
        (["--recipe", "no-such-recipe"], ["no-such-recipe"]),
        (["--gate", "min_cosine=high"], ["min_cosine=high"]),
    ],
)
def test_bad_recipe_arguments(workspace, args, words):
    tmp, model, data = workspace
    result = invoke("optimize", model, *args, "--val-data", data, "-o", tmp / "o")
    assert_clean_failure(result, *words)
    assert not (tmp / "o").exists()


def test_bad_recipe_file(workspace):
    tmp, model, _ = workspace
    recipe = tmp / "r.yaml"
    recipe.write_text("passes:\n  - cleanup: {ratio: 2}\n")
    assert_clean_failure(invoke("optimize", model, "--recipe", recipe, "-o", tmp / "o"), "ratio")


def test_external_data_escaping_the_folder_is_refused(tmp_path):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(np.ones(12, np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    model = onnx.load(tiny_model(folder / "m.onnx"))
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in {"location": "../secret.bin", "offset": "0", "length": "48"}.items():
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, folder / "m.onnx")
    result = invoke("optimize", folder / "m.onnx", "-o", tmp_path / "o")
    assert_clean_failure(result, "outside")
    assert not (tmp_path / "o").exists()


def test_output_onto_the_input_is_refused(workspace):
    tmp, model, _ = workspace
    before = digest(model)
    result = invoke("optimize", model, "-o", model, "--latency-runs", "0")
    assert_clean_failure(result, "input")
    assert digest(model) == before

"""graphopt.triton and `graphopt export-triton`: configs parsed with Triton's own ModelConfig
schema, the documented repository layout, external data, atomic writes, and error paths."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import main
from graphopt.errors import GraphoptError
from graphopt.model import load_model
from graphopt.triton import TritonOptions, export_triton, has_batch_dim
from tests.tiny import tiny_model

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "models" / "digits" / "model.onnx"


def _model_config_module():
    """Triton's ModelConfig protobuf module from the tritonclient package.

    `tritonclient.grpc`'s package init needs grpcio, which the schema itself does not; without
    it, the generated module is loaded from its file.
    """
    try:
        from tritonclient.grpc import model_config_pb2

        return model_config_pb2
    except (ImportError, RuntimeError):
        pass
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or spec.origin is None:
        pytest.skip(
            "tritonclient (Triton's ModelConfig schema) is not installed: pip install -e '.[test]'"
        )
    path = Path(spec.origin).parent / "grpc" / "model_config_pb2.py"
    loader_spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mc():
    return _model_config_module()


def parse(mc, path: Path):
    """Parse config.pbtxt strictly: an unknown field or a wrong type raises."""
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def triton_layout_problems(model_dir: Path, filename: str) -> list[str]:
    """Check a model folder against Triton's documented repository layout
    (model_repository.md): config.pbtxt plus numeric version folders holding the model file."""
    problems = []
    if not (model_dir / "config.pbtxt").is_file():
        problems.append("no config.pbtxt")
    versions = [p for p in model_dir.iterdir() if p.is_dir()]
    if not versions:
        problems.append("no version folder")
    for entry in model_dir.iterdir():
        if entry.is_dir() and not entry.name.isdigit():
            problems.append(f"non-numeric folder {entry.name}")
        if entry.name.startswith("."):
            problems.append(f"hidden entry {entry.name}")
    for version in versions:
        if version.name.isdigit() and not (version / filename).is_file():
            problems.append(f"{version.name}/{filename} missing")
    for entry in model_dir.parent.iterdir():
        if entry.name.startswith("."):
            problems.append(f"staging left in the repository: {entry.name}")
    return problems


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_clean_failure(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def dynamic_model(path: Path) -> Path:
    """A dynamic-batch, dynamic-size image model with fp32, int64 and bool outputs."""
    text = """
    <ir_version: 9, opset_import: ["" : 17]>
    dyn (float[N,3,H,W] x) => (float[N,3] mean, int64[N] best, bool[N,3] positive)
    <float zero = {0}>
    {
        mean = ReduceMean<axes = [2, 3], keepdims = 0>(x)
        best = ArgMax<axis = 1, keepdims = 0>(mean)
        positive = Greater(mean, zero)
    }
    """
    return save(onnx.parser.parse_model(text), path)


def external_data_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = folder / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="ext.weights", size_threshold=0)
    return path


# ---------------------------------------------------------------------------- configs


def test_image_cnn_config_parses_with_tritons_schema(mc, tmp_path):
    repo = tmp_path / "repo"
    result = export_triton(
        load_model(SAMPLE), repo, "digits", TritonOptions(preferred_batch=(8, 4))
    )
    config = parse(mc, result.config_path)
    assert config.name == "digits"
    assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.max_batch_size == 8
    (image,) = config.input
    assert image.name == "image" and image.data_type == mc.TYPE_FP32
    assert list(image.dims) == [1, 8, 8]  # N x 1 x 8 x 8 without the batch dim
    (logits,) = config.output
    assert logits.name == "logits" and list(logits.dims) == [10]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    (group,) = config.instance_group
    assert group.kind == mc.ModelInstanceGroup.KIND_GPU and group.count == 1
    assert not config.HasField("optimization")
    assert triton_layout_problems(repo / "digits", "model.onnx") == []
    written = onnx.load(repo / "digits" / "1" / "model.onnx")
    onnx.checker.check_model(written, full_check=True)
    assert [i.name for i in written.graph.input] == ["image"]


def test_dynamic_batch_model_has_dynamic_dims_and_types(mc, tmp_path):
    model = load_model(dynamic_model(tmp_path / "dyn.onnx"))
    assert has_batch_dim(model)
    result = export_triton(model, tmp_path / "repo", "dyn", TritonOptions(max_batch_size=32))
    config = parse(mc, result.config_path)
    assert config.max_batch_size == 32
    (x,) = config.input
    assert list(x.dims) == [3, -1, -1]
    outputs = {o.name: o for o in config.output}
    assert outputs["mean"].data_type == mc.TYPE_FP32 and list(outputs["mean"].dims) == [3]
    # int64[N] is a scalar per sample: Triton's form is dims [1] reshaped to [].
    assert outputs["best"].data_type == mc.TYPE_INT64 and list(outputs["best"].dims) == [1]
    assert outputs["best"].HasField("reshape") and list(outputs["best"].reshape.shape) == []
    assert outputs["positive"].data_type == mc.TYPE_BOOL
    assert not config.dynamic_batching.preferred_batch_size


def test_a_model_with_external_data_keeps_it_beside_the_model(mc, tmp_path):
    source = external_data_model(tmp_path / "src")
    model = load_model(source)
    result = export_triton(model, tmp_path / "repo", "ext", TritonOptions(instance_group="cpu"))
    version = tmp_path / "repo" / "ext" / "1"
    assert result.data_file == version / "model.onnx.data" and result.data_file.is_file()
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.onnx.data"]
    config = parse(mc, result.config_path)
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert list(config.input[0].dims) == [64] and list(config.output[0].dims) == [32]
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    ref = ort.InferenceSession(str(source)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(version / "model.onnx")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(ref, got)
    assert (tmp_path / "src" / "ext.weights").is_file()  # the input is untouched
    assert triton_layout_problems(tmp_path / "repo" / "ext", "model.onnx") == []


def test_a_fixed_batch_model_gets_max_batch_size_zero(mc, tmp_path):
    model = load_model(tiny_model(tmp_path / "m.onnx", batch=1))
    assert not has_batch_dim(model)
    result = export_triton(model, tmp_path / "repo", "fixed", TritonOptions())
    config = parse(mc, result.config_path)
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [1, 4] and list(config.output[0].dims) == [1, 3]
    assert not config.HasField("dynamic_batching")
    with pytest.raises(GraphoptError, match="batch dimension"):
        export_triton(model, tmp_path / "repo2", "f", TritonOptions(max_batch_size=4))
    with pytest.raises(GraphoptError, match="dynamic batching"):
        export_triton(model, tmp_path / "repo3", "f", TritonOptions(preferred_batch=(2,)))


def test_tensorrt_accelerator_for_the_onnxruntime_backend(mc, tmp_path):
    qdq = """
    <ir_version: 9, opset_import: ["" : 17]>
    qdq (float[N,4] x) => (float[N,4] y)
    <float s = {0.05}, int8 z = {0}>
    {
        q = QuantizeLinear(x, s, z)
        y = DequantizeLinear(q, s, z)
    }
    """
    model = load_model(save(onnx.parser.parse_model(qdq), tmp_path / "qdq.onnx"))
    result = export_triton(model, tmp_path / "repo", "q", TritonOptions(accelerator="tensorrt"))
    config = parse(mc, result.config_path)
    (accel,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accel.name == "tensorrt"
    assert dict(accel.parameters) == {"precision_mode": "INT8"}  # Q/DQ model: int8
    plain = load_model(tiny_model(tmp_path / "t.onnx"))
    options = TritonOptions(accelerator="tensorrt", trt_precision="FP16", trt_workspace_mb=512)
    config = parse(mc, export_triton(plain, tmp_path / "repo", "t", options).config_path)
    (accel,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert dict(accel.parameters) == {
        "precision_mode": "FP16",
        "max_workspace_size_bytes": str(512 * 2**20),
    }
    # Without the accelerator, a Q/DQ model on GPU instances gets the CUDA EP warning.
    notes = export_triton(model, tmp_path / "repo", "q2", TritonOptions()).notes
    assert any("slower than FP32" in note for note in notes)


def test_tensorrt_backend_copies_the_plan(mc, tmp_path):
    model = load_model(SAMPLE)
    plan = tmp_path / "digits.plan"
    plan.write_bytes(b"serialized engine bytes")
    options = TritonOptions(backend="tensorrt", preferred_batch=(4,))
    result = export_triton(model, tmp_path / "repo", "digits_trt", options, plan=plan)
    config = parse(mc, result.config_path)
    assert config.platform == "tensorrt_plan" and config.backend == "tensorrt"
    assert config.default_model_filename == "model.plan"
    assert (tmp_path / "repo" / "digits_trt" / "1" / "model.plan").read_bytes() == plan.read_bytes()
    assert triton_layout_problems(tmp_path / "repo" / "digits_trt", "model.plan") == []
    with pytest.raises(GraphoptError, match="none was given"):
        export_triton(model, tmp_path / "r", "x", TritonOptions(backend="tensorrt"))
    with pytest.raises(GraphoptError, match="does not exist"):
        export_triton(
            model, tmp_path / "r", "x", TritonOptions(backend="tensorrt"), plan=tmp_path / "no"
        )
    with pytest.raises(GraphoptError, match="--plan is for the tensorrt backend"):
        export_triton(model, tmp_path / "r", "x", TritonOptions(), plan=plan)
    with pytest.raises(GraphoptError, match="GPU only"):
        TritonOptions(backend="tensorrt", instance_group="cpu")


def test_names_and_quotes_survive_the_schema(mc, tmp_path):
    text = """
    <ir_version: 9, opset_import: ["" : 17]>
    q (float[N,2] "in\\"put") => (float[N,2] "out/é")
    {
        "out/é" = Relu("in\\"put")
    }
    """
    model = load_model(save(onnx.parser.parse_model(text), tmp_path / "q.onnx"))
    config = parse(mc, export_triton(model, tmp_path / "repo", "q", TritonOptions()).config_path)
    assert config.input[0].name == 'in"put'
    assert config.output[0].name == "out/é"


# ---------------------------------------------------------------------------- errors


def test_unsupported_dtypes_are_clear_errors(tmp_path):
    complex_in = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "c",
            [helper.make_tensor_value_info("x", TensorProto.COMPLEX64, ["N", 2])],
            [helper.make_tensor_value_info("y", TensorProto.COMPLEX64, ["N", 2])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    complex_in.ir_version = 9
    model = load_model(save(complex_in, tmp_path / "c.onnx"))
    with pytest.raises(GraphoptError, match="COMPLEX64.*no data type"):
        export_triton(model, tmp_path / "repo", "c", TritonOptions())

    strings = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "s",
            [helper.make_tensor_value_info("x", TensorProto.STRING, ["N"])],
            [helper.make_tensor_value_info("y", TensorProto.STRING, ["N"])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    strings.ir_version = 9
    model = load_model(save(strings, tmp_path / "s.onnx"))
    plan = tmp_path / "s.plan"
    plan.write_bytes(b"x")
    with pytest.raises(GraphoptError, match="strings"):
        export_triton(model, tmp_path / "repo", "s", TritonOptions(backend="tensorrt"), plan=plan)
    result = export_triton(model, tmp_path / "repo", "s", TritonOptions(instance_group="cpu"))
    assert "TYPE_STRING" in result.config_text
    assert not (tmp_path / "repo" / "c").exists()


def test_an_existing_version_is_replaced_only_with_force(tmp_path):
    model = load_model(SAMPLE)
    repo = tmp_path / "repo"
    export_triton(model, repo, "digits", TritonOptions())
    marker = repo / "digits" / "1" / "marker"
    marker.write_text("old")
    with pytest.raises(GraphoptError, match="already exists") as refused:
        export_triton(model, repo, "digits", TritonOptions())
    assert "--force" in refused.value.paragraph()
    assert marker.exists()
    export_triton(model, repo, "digits", TritonOptions(version=2))
    export_triton(model, repo, "digits", TritonOptions(force=True, preferred_batch=(2,)))
    assert not marker.exists()
    assert (repo / "digits" / "2" / "model.onnx").is_file()  # other versions are kept
    assert triton_layout_problems(repo / "digits", "model.onnx") == []


def test_the_input_model_inside_the_version_folder_is_never_replaced(tmp_path):
    repo = tmp_path / "repo"
    export_triton(load_model(SAMPLE), repo, "digits", TritonOptions())
    inside = repo / "digits" / "1" / "model.onnx"
    before = inside.read_bytes()
    with pytest.raises(GraphoptError, match="never modifies its input"):
        export_triton(load_model(inside), repo, "digits", TritonOptions(force=True))
    assert inside.read_bytes() == before


def test_a_failed_publish_leaves_the_repository_as_it_was(tmp_path, monkeypatch):
    model = load_model(SAMPLE)
    repo = tmp_path / "repo"
    export_triton(model, repo, "digits", TritonOptions())
    config_before = (repo / "digits" / "config.pbtxt").read_text()
    model_before = (repo / "digits" / "1" / "model.onnx").read_bytes()
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name == "config.pbtxt" and ".digits.staging-" in str(src):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr("graphopt.triton.os.replace", failing_replace)
    with pytest.raises(GraphoptError, match="disk full"):
        export_triton(model, repo, "digits", TritonOptions(force=True, preferred_batch=(4,)))
    monkeypatch.undo()
    assert (repo / "digits" / "config.pbtxt").read_text() == config_before
    assert (repo / "digits" / "1" / "model.onnx").read_bytes() == model_before
    assert triton_layout_problems(repo / "digits", "model.onnx") == []


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "-x"])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(GraphoptError, match="model name"):
        export_triton(load_model(SAMPLE), tmp_path / "repo", name, TritonOptions())
    assert not (tmp_path / "evil").exists()


def test_options_are_checked():
    with pytest.raises(GraphoptError, match="positive"):
        TritonOptions(preferred_batch=(0,))
    with pytest.raises(GraphoptError, match="version"):
        TritonOptions(version=0)
    with pytest.raises(GraphoptError, match="accelerator"):
        TritonOptions(trt_precision="FP16")
    with pytest.raises(GraphoptError, match="GPU instances"):
        TritonOptions(accelerator="tensorrt", instance_group="cpu")


# ---------------------------------------------------------------------------- command line


def test_cli_export_with_preferred_batch_from_a_bench_result(mc, tmp_path):
    bench_json = tmp_path / "bench.json"
    result = invoke(
        "bench", SAMPLE, "--batch", "2,16", "--runs", "3", "--report", bench_json, "--json"
    )
    assert result.exit_code == 0, result.output
    best = json.loads(bench_json.read_text())["best_batch"]
    repo = tmp_path / "repo"
    result = invoke(
        "export-triton", SAMPLE, "--repo", repo, "--name", "digits",
        "--preferred-from", bench_json, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert written["preferred_batch_size"] == [best]
    config = parse(mc, repo / "digits" / "config.pbtxt")
    assert list(config.dynamic_batching.preferred_batch_size) == [best]
    assert config.max_batch_size == max(8, best)
    assert "CPU provider" in result.stderr  # the sweep ran on the CPU: said so


def test_cli_warns_when_the_bench_result_is_for_another_model(tmp_path):
    bench_json = tmp_path / "bench.json"
    bench_json.write_text(json.dumps({"best_batch": 4, "model_sha256": "0" * 64}))
    result = invoke(
        "export-triton", SAMPLE, "--repo", tmp_path / "r", "--name", "d",
        "--preferred-from", bench_json,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "different model file" in result.stderr
    assert "preferred_batch_size: [ 4 ]" in result.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--name", "../x"], ["model name"]),
        (["--name", "d", "--backend", "tensorrt"], ["graphopt build"]),
        (["--name", "d", "--preferred-batch", "16", "--max-batch-size", "8"], ["exceed"]),
        (["--name", "d", "--preferred-batch", "4", "--preferred-from", "b.json"], ["one"]),
        (["--name", "d", "--preferred-from", "missing.json"], ["missing.json"]),
        (["--name", "d", "--trt-precision", "FP16"], ["--accelerator tensorrt"]),
    ],
)
def test_cli_bad_input_is_one_paragraph(tmp_path, args, words):
    result = invoke("export-triton", SAMPLE, "--repo", tmp_path / "repo", *args)
    assert_clean_failure(result, *words)
    assert not (tmp_path / "repo" / "d").exists()


def test_cli_refuses_to_overwrite_without_force(tmp_path):
    args = ["export-triton", SAMPLE, "--repo", tmp_path / "repo", "--name", "d"]
    assert invoke(*args).exit_code == 0
    assert_clean_failure(invoke(*args), "--force")
    assert invoke(*args, "--force").exit_code == 0


def test_a_failed_first_export_leaves_no_entry(tmp_path, monkeypatch):
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name == "config.pbtxt":
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr("graphopt.triton.os.replace", failing_replace)
    with pytest.raises(GraphoptError, match="disk full"):
        export_triton(load_model(SAMPLE), tmp_path / "repo", "digits", TritonOptions())
    assert list((tmp_path / "repo").iterdir()) == []

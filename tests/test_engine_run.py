"""graphopt.engine.run / .compare and the plan paths of `graphopt bench` and `graphopt
validate`, on a machine without TensorRT.

What needs no TensorRT is tested for real: the plan signature logic (batch sizes from a
profile, padding a batch into it and trimming the outputs back), the type table, the
statistics and the result (which export-triton reads), the output-marking graph edit (run on
ONNX Runtime), the streaming comparison given two runners, the sidecar reader, and every
check the commands make before they look for TensorRT. Running a plan needs TensorRT,
cuda-python and a GPU; those tests are skipped with that reason. No fake `tensorrt` module.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx.parser
import pytest
from click.testing import CliRunner

from graphopt.cli import main
from graphopt.data import open_dataset
from graphopt.engine.compare import (
    compare_runs,
    mark_outputs,
    read_sidecar,
    sidecar_build_request,
)
from graphopt.engine.options import BuildOptions
from graphopt.engine.run import (
    IOTensor,
    PlanBenchResult,
    PlanSignature,
    cuda_runtime,
    is_plan_path,
    latency_stats,
    numpy_dtype,
    read_plan_bytes,
    sweep_points,
    trim_outputs,
)
from graphopt.errors import DataError, EngineUnavailable, GraphoptError
from graphopt.model import load_model
from graphopt.runtime import create_session
from graphopt.triton import preferred_from_bench
from graphopt.validate import Gates, compare
from tests.tiny import data_file, tiny_model

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "models" / "digits" / "model.onnx"
SAMPLE_VAL = ROOT / "models" / "digits" / "val.npz"

F32 = np.dtype(np.float32)

# An engine as read_signature would describe one: x[N,3,H,W] with two profiles, mask[N,4].
DYNAMIC = PlanSignature(
    (
        IOTensor(
            "x",
            True,
            F32,
            (-1, 3, -1, -1),
            (((2, 3, 8, 8), (8, 3, 16, 16), (32, 3, 32, 32)), ((1, 3, 8, 8), (1, 3, 8, 8), (4, 3, 8, 8))),
        ),
        IOTensor("mask", True, np.dtype(np.int64), (-1, 4), (((1, 4), (8, 4), (64, 4)), ((1, 4), (1, 4), (4, 4)))),
        IOTensor("y", False, F32, (-1, 10)),
    ),
    num_profiles=2,
)  # fmt: skip
FIXED = PlanSignature(
    (IOTensor("x", True, F32, (4, 3)), IOTensor("y", False, F32, (4, 2))), num_profiles=1
)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def error_line(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make `import tensorrt` fail, as on a machine without it (also where it is installed)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def plan(tmp_path):
    """A file that looks like a plan by name (its bytes are never given to TensorRT here)."""
    path = tmp_path / "digits.plan"
    path.write_bytes(b"not really an engine")
    return path


# ---------------------------------------------------------------------------- signature


def test_types_map_to_numpy():
    assert numpy_dtype("FLOAT") == F32
    assert numpy_dtype("HALF") == np.float16
    assert numpy_dtype("BF16") == np.dtype(ml_dtypes.bfloat16)
    assert numpy_dtype("FP8") == np.dtype(ml_dtypes.float8_e4m3fn)
    assert numpy_dtype("INT64") == np.int64 and numpy_dtype("BOOL") == np.bool_
    with pytest.raises(GraphoptError, match="INT4"):
        numpy_dtype("INT4")


def test_batch_sizes_come_from_the_profile():
    # Profile 0: x allows batch 2-32, mask 1-64: the common range is 2-32, optimum 8.
    assert DYNAMIC.batch_range(0) == (2, 8, 32)
    assert DYNAMIC.batch_sizes(0) == [2, 4, 8, 16, 32]
    assert DYNAMIC.batch_sizes(0, max_batch=10) == [2, 4, 8, 10]
    assert DYNAMIC.batch_sizes(1) == [1, 2, 4]
    assert DYNAMIC.batch_sizes(0, requested=[2, 32]) == [2, 32]
    with pytest.raises(GraphoptError, match=r"1, 64 are outside profile 0 .*batch 2 to 32"):
        DYNAMIC.batch_sizes(0, requested=[1, 8, 64])
    with pytest.raises(GraphoptError, match="no profile 2"):
        DYNAMIC.batch_sizes(2)
    assert FIXED.batch_range() == (4, 4, 4) and FIXED.batch_sizes() == [4]


def test_shapes_and_specs_take_the_profile_optimum():
    assert DYNAMIC.shapes_for_batch(5, 0) == {"x": (5, 3, 16, 16), "mask": (5, 4)}
    specs = {s.name: s for s in DYNAMIC.input_specs(0)}
    assert specs["x"].shape == ("batch", 3, 16, 16)
    assert specs["mask"].dtype == np.int64
    assert FIXED.shapes_for_batch(9) == {"x": (4, 3)}  # a fixed batch keeps its size


def test_a_small_batch_is_padded_into_the_profile_and_trimmed_back():
    x = np.arange(1 * 3 * 8 * 8, dtype=np.float64).reshape(1, 3, 8, 8)
    mask = np.ones((1, 4), dtype=np.int32)
    fitted, real = DYNAMIC.fit({"x": x, "mask": mask}, 0)
    assert real == 1
    assert fitted["x"].shape == (2, 3, 8, 8) and fitted["x"].dtype == F32  # padded to min 2
    assert fitted["mask"].dtype == np.int64 and fitted["x"].flags.c_contiguous
    np.testing.assert_array_equal(fitted["x"][1], fitted["x"][0])
    outputs = trim_outputs({"y": np.zeros((2, 10)), "scalar": np.float32(1.0)}, 2, real)
    assert outputs["y"].shape == (1, 10) and outputs["scalar"] == 1.0
    fitted, real = FIXED.fit({"x": np.ones((3, 3), np.float32)})
    assert fitted["x"].shape == (4, 3) and real == 3


@pytest.mark.parametrize(
    ("feeds", "words"),
    [
        ({"x": np.ones((64, 3, 8, 8), np.float32), "mask": np.ones((64, 4))}, "larger than"),
        ({"x": np.ones((2, 3, 64, 8), np.float32), "mask": np.ones((2, 4))}, "outside profile 0"),
        ({"x": np.ones((2, 3, 8), np.float32), "mask": np.ones((2, 4))}, "outside profile 0"),
        ({"x": np.ones((2, 3, 8, 8), np.float32)}, "no input(s) 'mask'"),
        ({"x": np.ones((2, 3, 8, 8), np.int32), "mask": np.ones((2, 4))}, "takes float32"),
    ],
)
def test_data_that_does_not_fit_the_profile_is_a_data_error(feeds, words):
    with pytest.raises(DataError) as refused:
        DYNAMIC.fit(feeds, 0)
    assert words in refused.value.paragraph()


# ---------------------------------------------------------------------------- results


def test_statistics_sweep_and_result_that_export_triton_reads(tmp_path):
    stats = latency_stats([1.0, 2.0, 3.0, 4.0, 100.0], batch=8, warmup=2)
    assert stats.median_ms == 3.0 and stats.max_ms == 100.0 and stats.provider == "TensorRT"
    assert stats.throughput == pytest.approx(8 * 1000 / 3.0)
    with pytest.raises(GraphoptError):
        latency_stats([], batch=1, warmup=0)

    def measure(size: int):  # 1 ms per sample beyond batch 4: throughput stops growing
        return latency_stats([max(1.0, size / 4)], batch=size, warmup=0)

    points, stopped = sweep_points([1, 2, 4, 8, 16], measure, auto=True, min_gain=0.05)
    assert [p.batch_size for p in points] == [1, 2, 4, 8]
    assert "batch 8" in stopped
    points, stopped = sweep_points([1, 2, 4, 8], measure, auto=False, min_gain=0.05)
    assert len(points) == 4 and stopped is None

    result = PlanBenchResult(
        plan=str(tmp_path / "m.plan"),
        plan_sha256=None,
        tensorrt_version="10.13.0",
        gpu={"name": "NVIDIA H100", "compute_capability": "9.0", "driver": "580"},
        profile=0,
        data="random",
        random_data=True,
        points=points,
        sweep="list",
    )
    data = result.to_dict()
    assert data["runtime"] == "tensorrt" and data["tensorrt_speed"] is True
    assert data["best_batch"] == 4 and "copies" in data["timing"]
    assert "CUDA events" in "\n".join(result.notes())
    assert result.table().row_count == 4
    report = tmp_path / "bench.json"
    report.write_text(json.dumps(data))
    assert preferred_from_bench(report, None) == ((4,), [])


def test_plan_files_are_checked_before_tensorrt(tmp_path):
    assert is_plan_path("a/m.plan") and is_plan_path("m.ENGINE") and not is_plan_path("m.onnx")
    with pytest.raises(GraphoptError, match="does not exist"):
        read_plan_bytes(tmp_path / "none.plan")
    (tmp_path / "empty.plan").write_bytes(b"")
    with pytest.raises(GraphoptError, match="empty"):
        read_plan_bytes(tmp_path / "empty.plan")
    with pytest.raises(GraphoptError, match="folder"):
        read_plan_bytes(tmp_path)


def test_without_cuda_python_running_a_plan_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(EngineUnavailable, match="cuda-python"):
        cuda_runtime()


# ---------------------------------------------------------------------------- bench CLI


def test_bench_of_a_plan_without_tensorrt_says_how_to_install_it(no_tensorrt, plan, tmp_path):
    report = tmp_path / "bench.json"
    paragraph = error_line(invoke("bench", plan, "--batch", "1,8", "--report", report))
    assert "TensorRT is not installed" in paragraph
    assert 'pip install "graphopt[tensorrt]"' in paragraph and "NVIDIA GPU" in paragraph
    assert not report.exists()


def test_bench_of_a_plan_reports_bad_requests_before_tensorrt(no_tensorrt, plan, tmp_path):
    missing = error_line(invoke("bench", tmp_path / "none.plan"))
    assert "does not exist" in missing and "TensorRT is not" not in missing
    both = error_line(invoke("bench", plan, "--runs", "5", "--time", "1"))
    assert "--runs and --time" in both
    assert "--batch" in error_line(invoke("bench", plan, "--batch", "0,x"))


# ---------------------------------------------------------------------------- validate CLI


def test_validate_a_plan_without_tensorrt(no_tensorrt, plan):
    result = invoke("validate", plan, "--reference", SAMPLE, "--data", SAMPLE_VAL)
    paragraph = error_line(result)
    assert "TensorRT is not installed" in paragraph and 'graphopt[tensorrt]"' in paragraph
    # REFERENCE CANDIDATE order works too.
    result = invoke("validate", SAMPLE, plan, "--data", SAMPLE_VAL)
    assert "TensorRT is not installed" in error_line(result)


def test_validate_a_plan_checks_arguments_data_and_sidecar_first(no_tensorrt, plan, tmp_path):
    usage = invoke("validate", plan, SAMPLE, "--reference", SAMPLE, "--data", SAMPLE_VAL)
    assert usage.exit_code == 2 and "not both" in usage.output
    usage = invoke("validate", SAMPLE, "--data", SAMPLE_VAL)
    assert usage.exit_code == 2 and "Missing the candidate" in usage.output
    cases = [
        (["validate", SAMPLE, "--reference", plan], "must be an ONNX model"),
        (["validate", plan, "--reference", tmp_path / "none.onnx"], "none.onnx"),
        (["validate", tmp_path / "none.plan", "--reference", SAMPLE], "does not exist"),
        (["validate", plan, "--reference", SAMPLE, "--per-layer"], "digits.plan.json"),
    ]
    wrong = data_file(tmp_path / "wrong.npz", name="pixels", shape=(4, 1, 8, 8))
    cases.append((["validate", plan, "--reference", SAMPLE, "--data", wrong], "image"))
    for args, words in cases:
        if "--data" not in args:
            args = [*args, "--data", SAMPLE_VAL]
        paragraph = error_line(invoke(*args))
        assert words in paragraph, paragraph
        assert "TensorRT is not installed" not in paragraph
    # With a sidecar whose source is gone, --per-layer asks for --plan-source.
    sidecar = {"source_model": str(tmp_path / "gone.onnx"), "options": {}, "profiles": []}
    Path(str(plan) + ".json").write_text(json.dumps(sidecar))
    paragraph = error_line(
        invoke("validate", plan, "--reference", SAMPLE, "--data", SAMPLE_VAL, "--per-layer")
    )
    assert "--plan-source" in paragraph


# ---------------------------------------------------------------------------- comparison


def test_mark_outputs_exposes_typed_tensors_and_leaves_the_model_alone(tmp_path):
    model = load_model(tiny_model(tmp_path / "m.onnx"))
    before = model.to_proto().SerializeToString()
    marked = mark_outputs(model, ["h", "r", "h"])
    outputs = [(v.name, v.dtype is not None) for v in marked.graph.outputs]
    assert outputs == [("y", True), ("h", True), ("r", True)]
    assert model.to_proto().SerializeToString() == before
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    values = create_session(marked, device="cpu").run({"x": x})
    np.testing.assert_array_equal(values["r"], np.maximum(values["h"], 0))
    np.testing.assert_array_equal(values["y"], values["r"])
    with pytest.raises(GraphoptError, match="'w', 'nope' are not produced by a node"):
        mark_outputs(model, ["w", "nope"])


def test_compare_runs_matches_validate_and_survives_padding(tmp_path):
    """The plan side as a runner: an ORT session behind the signature's pad-and-trim, with a
    profile whose minimum batch (4) is larger than the data's last batch."""
    reference = load_model(SAMPLE)
    dataset = open_dataset(str(SAMPLE_VAL), reference.input_specs())
    session = create_session(reference, device="cpu")
    signature = PlanSignature(
        (
            IOTensor("image", True, F32, (-1, 1, 8, 8), (((4, 1, 8, 8), (8, 1, 8, 8), (16, 1, 8, 8)),)),
            IOTensor("logits", False, F32, (-1, 10)),
        )
    )  # fmt: skip
    padded_sizes = []

    def plan_like(feeds):
        fitted, real = signature.fit(feeds)
        padded_sizes.append(fitted["image"].shape[0])
        return trim_outputs(session.run(fitted), fitted["image"].shape[0], real)

    report = compare_runs(
        lambda feeds: session.run(feeds),
        plan_like,
        session.output_names,
        dataset,
        batch_size=7,  # 360 samples: the last batch holds 3, padded to 4
        gates=Gates(min_cosine=0.9999),
    )
    assert report and report.samples == len(dataset)
    assert report.outputs[0].max_abs == 0.0 and report.outputs[0].cosine == pytest.approx(1.0)
    assert padded_sizes[-1] == 4
    assert report.reference_accuracy == report.candidate_accuracy

    # Against a different candidate, the same numbers as validate.compare's.
    cand_path = tmp_path / "noisy.onnx"
    shutil.copy(SAMPLE, cand_path)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    noisy (float[N,1,8,8] image) => (float[N,10] logits)
    {
        flat = Flatten(image)
        w = RandomNormal<shape = [64, 10], seed = 1.0>()
        logits = MatMul(flat, w)
    }
    """
    onnx.save(onnx.parser.parse_model(text), cand_path)
    candidate = create_session(cand_path, device="cpu")
    ours = compare_runs(
        lambda feeds: session.run(feeds),
        lambda feeds: candidate.run(feeds),
        session.output_names,
        dataset,
        batch_size=32,
    )
    theirs = compare(reference, cand_path, dataset, batch_size=32, device="cpu")
    assert ours.to_dict()["outputs"] == theirs.to_dict()["outputs"]


def test_the_sidecar_gives_the_build_request_back(tmp_path, plan):
    options = BuildOptions(workspace_mb=64, opt_level=1, timing_cache=str(tmp_path / "t.cache"))
    sidecar = {
        "source_model": str(SAMPLE),
        "options": options.to_dict(),
        "profiles": [{"image": {"min": [1, 1, 8, 8], "opt": [8, 1, 8, 8], "max": [32, 1, 8, 8]}}],
    }
    Path(str(plan) + ".json").write_text(json.dumps(sidecar))
    again, specs = sidecar_build_request(read_sidecar(plan))
    assert again == options
    assert specs == ["image:1x1x8x8/8x1x8x8/32x1x8x8"]
    Path(str(plan) + ".json").write_text(json.dumps({"options": {"turbo": True}}))
    with pytest.raises(GraphoptError, match="not ones this graphopt knows"):
        sidecar_build_request(read_sidecar(plan))


# ---------------------------------------------------------------------------- with TensorRT


def _gpu_stack():
    pytest.importorskip(
        "tensorrt",
        reason='TensorRT is not installed (pip install "graphopt[tensorrt]" on a machine with '
        "an NVIDIA GPU and driver; PyPI alone does not suffice)",
    )
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")
    if shutil.which("nvidia-smi") is None:
        pytest.skip("TensorRT is installed but no NVIDIA GPU is visible (nvidia-smi missing)")


def test_bench_and_validate_a_built_plan(tmp_path):
    _gpu_stack()
    from graphopt.engine import build_plan

    plan = tmp_path / "digits.plan"
    build_plan(SAMPLE, plan, ["image:1x1x8x8/8x1x8x8/32x1x8x8"])
    result = invoke("bench", plan, "--batch", "1,8,32", "--runs", "20", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [b["batch_size"] for b in data["batches"]] == [1, 8, 32]
    result = invoke(
        "validate", plan, "--reference", SAMPLE, "--data", SAMPLE_VAL, "--gate", "min_cosine=0.999",
        "--per-layer",
    )  # fmt: skip
    assert result.exit_code == 0, result.output

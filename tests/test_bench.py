"""graphopt.benchmark and `graphopt bench`: batch sweeps on ORT's CPU provider, the notes a
reader needs (provider, Q/DQ on CUDA is not TensorRT speed), JSON, and bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from click.testing import CliRunner

from graphopt.benchmark import (
    BenchOptions,
    BenchResult,
    _doubling,
    bench,
    count_qdq,
    fill_batch,
    model_fixed_batch,
    parse_batches,
)
from graphopt.cli import main
from graphopt.data import open_dataset
from graphopt.errors import GraphoptError
from graphopt.model import load_model
from graphopt.runtime import CPU, CUDA, LatencyStats, measure_latency
from tests.tiny import data_file, tiny_model

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "models" / "digits" / "model.onnx"
SAMPLE_VAL = ROOT / "models" / "digits" / "val.npz"

QDQ = """
<ir_version: 9, opset_import: ["" : 17]>
qdq (float[N,4] x) => (float[N,4] y)
<float s = {0.05}, int8 z = {0}>
{
    q = QuantizeLinear(x, s, z)
    y = DequantizeLinear(q, s, z)
}
"""

IMAGE_HW = """
<ir_version: 9, opset_import: ["" : 17]>
image (float[N,3,H,W] x) => (float[N,3] y)
{
    y = ReduceMean<axes = [2, 3], keepdims = 0>(x)
}
"""


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_clean_failure(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]


def random_for(model, n: int):
    return open_dataset("random", model.input_specs(), num_samples=n, seed=0)


def stats(batch: int, median_ms: float, provider: str = CPU) -> LatencyStats:
    return LatencyStats(
        median_ms=median_ms,
        p90_ms=median_ms,
        mean_ms=median_ms,
        runs=10,
        warmup=1,
        threads=1,
        provider=provider,
        batch_size=batch,
        p99_ms=median_ms,
        total_s=median_ms / 100,
    )


def result_with(provider: str, qdq_nodes: int) -> BenchResult:
    return BenchResult(
        model="m.onnx",
        model_sha256=None,
        provider=provider,
        requested_device="cuda",
        threads=1,
        data="random",
        random_data=True,
        qdq_nodes=qdq_nodes,
        points=[stats(1, 2.0, provider), stats(8, 8.0, provider)],
        fixed_batch=None,
        sweep="list",
    )


# ---------------------------------------------------------------------------- library


def test_a_batch_list_times_each_size_on_the_cpu(tmp_path):
    model = load_model(tiny_model(tmp_path / "m.onnx"))
    options = BenchOptions(batches=(1, 4, 16), runs=7, warmup=1, threads=1, device="cpu")
    result = bench(model, random_for(model, 16), options)
    assert [p.batch_size for p in result.points] == [1, 4, 16]
    assert all(p.runs == 7 and p.provider == CPU and p.threads == 1 for p in result.points)
    for p in result.points:
        assert p.min_ms <= p.median_ms <= p.p90_ms <= p.p99_ms <= p.max_ms
        assert p.throughput == pytest.approx(p.batch_size * 1000.0 / p.median_ms)
    assert result.best.throughput == max(p.throughput for p in result.points)
    assert result.provider == CPU and result.sweep == "list" and result.stopped is None
    digest = hashlib.sha256((tmp_path / "m.onnx").read_bytes()).hexdigest()
    assert result.model_sha256 == digest


def test_the_auto_sweep_stops_when_throughput_stops_improving(tmp_path):
    model = load_model(tiny_model(tmp_path / "m.onnx"))
    # Doubling the batch can at most double throughput plus noise, never add 1000 %.
    options = BenchOptions(min_gain=10.0, runs=5, warmup=1, device="cpu")
    result = bench(model, random_for(model, 256), options)
    assert [p.batch_size for p in result.points] == [1, 2]
    assert result.sweep == "auto"
    assert "batch 2 gave" in result.stopped and "1000%" in result.stopped


def test_the_auto_sweep_stops_at_the_largest_batch():
    assert _doubling(1) == [1]
    assert _doubling(64) == [1, 2, 4, 8, 16, 32, 64]
    assert _doubling(48) == [1, 2, 4, 8, 16, 32, 48]


def test_the_auto_sweep_reports_reaching_max_batch(tmp_path):
    model = load_model(tiny_model(tmp_path / "m.onnx"))
    result = bench(model, random_for(model, 1), BenchOptions(max_batch=1, runs=3, device="cpu"))
    assert [p.batch_size for p in result.points] == [1]
    assert "largest batch" in result.stopped


def test_a_fixed_batch_model_is_timed_at_its_batch_only(tmp_path):
    model = load_model(tiny_model(tmp_path / "m.onnx", batch=2))
    assert model_fixed_batch(model) == 2
    result = bench(model, random_for(model, 2), BenchOptions(batches=(1, 8), runs=3, device="cpu"))
    assert [p.batch_size for p in result.points] == [2]
    assert result.fixed_batch == 2
    assert any("fixes its batch size at 2" in note for note in result.notes())


def test_samples_are_repeated_in_order_when_the_data_has_fewer(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    feeds, repeated = fill_batch({"x": x}, 7)
    assert repeated and feeds["x"].shape == (7, 4)
    np.testing.assert_array_equal(feeds["x"][:, 0], [0, 4, 8, 0, 4, 8, 0])
    feeds, repeated = fill_batch({"x": x}, 2)
    assert not repeated
    np.testing.assert_array_equal(feeds["x"], x[:2])

    model = load_model(tiny_model(tmp_path / "m.onnx"))
    data = open_dataset(data_file(tmp_path / "d.npz", shape=(3, 4)), model.input_specs())
    result = bench(model, data, BenchOptions(batches=(2, 8), runs=3, device="cpu"))
    assert result.repeated == [8]
    assert any("repeated to fill batch 8" in note for note in result.notes())


def test_a_time_budget_runs_until_it_is_spent(tmp_path):
    model = tiny_model(tmp_path / "m.onnx")
    feeds = {"x": np.ones((1, 4), np.float32)}
    timed = measure_latency(model, feeds, runs=2, warmup=0, budget_s=0.05, device="cpu")
    assert timed.total_s >= 0.05
    assert timed.runs > 2
    fixed = measure_latency(model, feeds, runs=4, warmup=0, device="cpu")
    assert fixed.runs == 4


def test_qdq_on_cuda_is_never_shown_as_tensorrt_speed():
    notes = "\n".join(result_with(CUDA, qdq_nodes=6).notes())
    assert "6 Q/DQ nodes" in notes and "NOT TensorRT speed" in notes
    assert "graphopt build" in notes
    assert "NOT TensorRT" not in "\n".join(result_with(CUDA, qdq_nodes=0).notes())
    cpu_notes = "\n".join(result_with(CPU, qdq_nodes=6).notes())
    assert "not TensorRT speed" in cpu_notes
    data = result_with(CUDA, qdq_nodes=6).to_dict()
    assert data["tensorrt_speed"] is False and data["provider"] == CUDA
    assert data["best_batch"] == 8  # 8 samples in 8 ms beats 1 in 2 ms


def test_qdq_nodes_are_counted(tmp_path):
    path = tmp_path / "qdq.onnx"
    onnx.save(onnx.parser.parse_model(QDQ), path)
    model = load_model(path)
    assert count_qdq(model) == 2
    result = bench(model, random_for(model, 1), BenchOptions(batches=(1,), runs=2, device="cpu"))
    assert result.qdq_nodes == 2
    assert any("2 Q/DQ nodes" in note for note in result.notes())


def test_options_are_checked_before_any_work():
    with pytest.raises(GraphoptError, match="positive"):
        BenchOptions(batches=(0, 2))
    with pytest.raises(GraphoptError, match="repeat"):
        BenchOptions(batches=(2, 2))
    with pytest.raises(GraphoptError, match="budget"):
        BenchOptions(budget_s=0)
    assert parse_batches("auto") is None
    assert parse_batches("1, 4,16") == (1, 4, 16)
    for bad in ("", "0", "4,x", "-1"):
        with pytest.raises(GraphoptError, match="--batch"):
            parse_batches(bad)


# ---------------------------------------------------------------------------- command line


def test_bench_on_the_sample_prints_the_table():
    result = invoke("bench", SAMPLE, "--data", SAMPLE_VAL, "--batch", "1,8", "--runs", "5")
    assert result.exit_code == 0, result.output
    for word in ("p50 ms", "p90 ms", "p99 ms", "samples/s", "on CPU", "throughput-optimal"):
        assert word in result.stdout, result.stdout


def test_bench_json_and_report_file(tmp_path):
    report = tmp_path / "sweep" / "bench.json"
    result = invoke(
        "bench", SAMPLE, "--data", SAMPLE_VAL, "--batch", "1,4", "--runs", "3",
        "--threads", "1", "--json", "--report", report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    written = json.loads(report.read_text())
    assert printed["best_batch"] == written["best_batch"] in (1, 4)
    assert [b["batch_size"] for b in printed["batches"]] == [1, 4]
    assert printed["provider"] == CPU and printed["threads"] == 1
    assert printed["data"].startswith("val.npz")
    assert printed["machine"]["cpu_count"] >= 1 and printed["machine"]["onnxruntime"]
    assert printed["model_sha256"] == hashlib.sha256(SAMPLE.read_bytes()).hexdigest()


def test_bench_with_a_time_budget(tmp_path):
    model = tiny_model(tmp_path / "m.onnx")
    result = invoke("bench", model, "--batch", "2", "--time", "0.05", "--json")
    assert result.exit_code == 0, result.output
    point = json.loads(result.stdout)["batches"][0]
    assert point["total_s"] >= 0.05 and point["batch_size"] == 2


def test_dynamic_dims_of_random_data_come_from_shape(tmp_path):
    path = tmp_path / "image.onnx"
    onnx.save(onnx.parser.parse_model(IMAGE_HW), path)
    result = invoke("bench", path, "--batch", "1")
    assert_clean_failure(result, "--shape")
    result = invoke(
        "bench", path, "--shape", "x:1x3x8x12", "--batch", "1,2", "--runs", "2", "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["random_data"] is True


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--batch", "0,2"], ["--batch"]),
        (["--runs", "5", "--time", "1"], ["--runs", "--time"]),
        (["--shape", "x:1xA"], ["--shape"]),
        (["--data", "missing.npz"], ["missing.npz"]),
    ],
)
def test_bad_input_is_one_paragraph(tmp_path, args, words):
    model = tiny_model(tmp_path / "m.onnx")
    assert_clean_failure(invoke("bench", model, *args), *words)


def test_a_missing_model_is_one_paragraph(tmp_path):
    assert_clean_failure(invoke("bench", tmp_path / "nope.onnx"), "nope.onnx")

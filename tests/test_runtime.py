"""Tests for graphopt.runtime: sessions against onnx's reference evaluator, captures, latency."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator

import graphopt.runtime as runtime
from graphopt.data import open_dataset
from graphopt.errors import ModelLoadError, RuntimeFailed
from graphopt.model import Model, load_model
from graphopt.runtime import (
    LatencyStats,
    capture,
    create_session,
    measure_latency,
    resolve_providers,
    run_dataset,
)

SMALL = """
<ir_version: 9, opset_import: ["" : 17]>
small (float[N,4] x) => (float[N,3] y)
<float[4,3] W = {0.5, -1, 2, 1.5, 0.25, -0.75, -2, 1, 0.5, 1, -0.5, 0.25}, float[3] b = {0.1, -0.2, 0.3}>
{
    h = MatMul(x, W)
    a = Add(h, b)
    y = Relu(a)
}
"""


@pytest.fixture
def proto() -> onnx.ModelProto:
    return onnx.parser.parse_model(SMALL)


@pytest.fixture
def model(proto: onnx.ModelProto) -> Model:
    return Model(ir=ir.from_proto(proto))


def inputs(n: int = 5) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)


def weights() -> tuple[np.ndarray, np.ndarray]:
    w = np.array([0.5, -1, 2, 1.5, 0.25, -0.75, -2, 1, 0.5, 1, -0.5, 0.25], np.float32)
    return w.reshape(4, 3), np.array([0.1, -0.2, 0.3], np.float32)


def test_outputs_match_reference_evaluator(proto: onnx.ModelProto, model: Model, tmp_path) -> None:
    x = inputs()
    (expected,) = ReferenceEvaluator(proto).run(None, {"x": x})
    path = tmp_path / "small.onnx"
    onnx.save(proto, path)
    for source in (model, proto.SerializeToString(), path, str(path), load_model(path)):
        session = create_session(source, device="cpu", threads=1)
        assert session.provider == "CPUExecutionProvider"
        assert session.input_names == ["x"] and session.output_names == ["y"]
        got = session.run({"x": x})
        assert list(got) == ["y"]
        np.testing.assert_allclose(got["y"], expected, rtol=1e-5, atol=1e-6)


def test_extra_outputs_expose_intermediate_tensors(proto: onnx.ModelProto, model: Model) -> None:
    x = inputs()
    w, b = weights()
    session = create_session(model, device="cpu", extra_outputs=["h", "a"])
    assert session.output_names == ["y", "h", "a"]
    got = session.run({"x": x}, outputs=["h", "a"])
    assert list(got) == ["h", "a"]
    np.testing.assert_allclose(got["h"], x @ w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["a"], x @ w + b, rtol=1e-5, atol=1e-6)
    # The caller's model is not changed.
    assert [v.name for v in model.graph.outputs] == ["y"]
    # Also from bytes, and an existing output is not added twice.
    session = create_session(proto.SerializeToString(), device="cpu", extra_outputs=["h", "y"])
    assert session.output_names == ["y", "h"]


def test_unknown_extra_output_is_named(model: Model) -> None:
    with pytest.raises(RuntimeFailed, match="'nope'"):
        create_session(model, device="cpu", extra_outputs=["h", "nope"])


def test_unknown_requested_output_is_named(model: Model) -> None:
    session = create_session(model, device="cpu")
    with pytest.raises(RuntimeFailed, match="no output.*'h'"):
        session.run({"x": inputs()}, outputs=["h"])


def test_bad_models_raise_runtime_failed(proto: onnx.ModelProto) -> None:
    with pytest.raises(RuntimeFailed, match="could not load the serialized model"):
        create_session(b"definitely not onnx", device="cpu")
    bad = onnx.parser.parse_model(
        """<ir_version: 9, opset_import: ["" : 17]>
        bad (float[N] x) => (float[N] y) { y = NoSuchOperator(x) }"""
    )
    with pytest.raises(RuntimeFailed) as info:
        create_session(bad.SerializeToString(), device="cpu")
    assert "NoSuchOperator" in info.value.paragraph()
    assert len(info.value.message.splitlines()) == 1


def test_bad_feeds_raise_runtime_failed(model: Model) -> None:
    session = create_session(model, device="cpu")
    with pytest.raises(RuntimeFailed) as info:
        session.run({"x": np.zeros((2, 5), np.float32)})
    assert "'x'" in info.value.paragraph() and "?x4" in info.value.paragraph()
    with pytest.raises(RuntimeFailed):
        session.run({"x": np.zeros((2, 4), np.float64)})


def test_big_model_goes_through_workdir(model: Model, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runtime, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    with pytest.raises(RuntimeFailed, match="working folder"):
        create_session(model, device="cpu")
    session = create_session(model, device="cpu", extra_outputs=["h"], workdir=tmp_path)
    w, _ = weights()
    x = inputs()
    np.testing.assert_allclose(session.run({"x": x})["h"], x @ w, rtol=1e-5, atol=1e-6)
    assert list(tmp_path.iterdir())  # saved there while the session lives
    del session
    gc.collect()
    assert not list(tmp_path.iterdir())  # and removed with it


def test_run_dataset_covers_all_samples(proto: onnx.ModelProto, model: Model, tmp_path) -> None:
    x = inputs(7)
    np.savez(tmp_path / "d.npz", x=x, labels=np.arange(7))
    dataset = open_dataset(tmp_path / "d.npz", model.input_specs())
    session = create_session(model, device="cpu")
    results = list(run_dataset(session, dataset, batch_size=3))
    assert [batch.size for batch, _ in results] == [3, 3, 1]
    got = np.concatenate([values["y"] for _, values in results])
    np.testing.assert_array_equal(np.concatenate([b.labels for b, _ in results]), np.arange(7))
    (expected,) = ReferenceEvaluator(proto).run(None, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_capture_streams_each_batch(model: Model, tmp_path) -> None:
    x = inputs(5)
    w, b = weights()
    np.savez(tmp_path / "d.npz", x=x)
    dataset = open_dataset(tmp_path / "d.npz", model.input_specs())
    seen = []

    def callback(batch, tensors):
        assert set(tensors) == {"h", "a"}
        np.testing.assert_allclose(tensors["h"], batch.feeds["x"] @ w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tensors["a"], batch.feeds["x"] @ w + b, rtol=1e-5, atol=1e-6)
        seen.append(batch.size)

    capture(model, dataset, ["h", "a"], callback, batch_size=2, device="cpu")
    assert seen == [2, 2, 1]
    assert [v.name for v in model.graph.outputs] == ["y"]


def test_auto_is_cpu_here_and_quiet(capfd) -> None:
    runtime.cuda_works.cache_clear()
    providers = resolve_providers("auto")
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    if runtime.cuda_works():
        pytest.skip("this machine has a working CUDA")
    assert providers == ["CPUExecutionProvider"]
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]


def test_cuda_without_cuda_fails_clearly() -> None:
    if runtime.cuda_works():
        pytest.skip("this machine has a working CUDA")
    with pytest.raises(RuntimeFailed, match="CUDA"):
        resolve_providers("cuda")
    with pytest.raises(RuntimeFailed, match="Unknown device"):
        resolve_providers("tpu")  # type: ignore[arg-type]


def test_measure_latency_reports_sane_stats(model: Model) -> None:
    feeds = {"x": inputs(3)}
    stats = measure_latency(model, feeds, runs=7, warmup=2, threads=1, device="cpu")
    assert isinstance(stats, LatencyStats)
    assert stats.runs == 7 and stats.warmup == 2 and stats.threads == 1
    assert stats.batch_size == 3 and stats.provider == "CPUExecutionProvider"
    assert 0 < stats.median_ms <= stats.p90_ms
    assert stats.mean_ms > 0
    assert set(stats.to_dict()) == {
        "median_ms",
        "p90_ms",
        "mean_ms",
        "runs",
        "warmup",
        "threads",
        "provider",
        "batch_size",
        "p99_ms",
        "min_ms",
        "max_ms",
        "total_s",
        "throughput",
    }
    assert stats.min_ms <= stats.median_ms <= stats.p99_ms <= stats.max_ms
    assert stats.total_s > 0
    session = create_session(model, device="cpu")
    assert measure_latency(session, feeds, runs=3, warmup=0).runs == 3
    with pytest.raises(RuntimeFailed):
        measure_latency(session, feeds, runs=0)


def test_model_file_with_escaping_external_data_is_refused(
    proto: onnx.ModelProto, tmp_path
) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 48)
    folder = tmp_path / "model"
    folder.mkdir()
    weight = proto.graph.initializer[0]
    weight.ClearField("raw_data")
    del weight.float_data[:]
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "48")):
        weight.external_data.add(key=key, value=value)
    onnx.save(proto, folder / "evil.onnx")
    with pytest.raises(ModelLoadError, match="outside"):
        create_session(folder / "evil.onnx", device="cpu")

"""tests calibration/cache.py: a re-run with the same model, data and options is served
from the cache without ONNX Runtime; a change in data, method, options or the computation
of a tensor misses."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from graphopt import runtime
from graphopt.calibration import CalibrationCache, calibrate
from graphopt.calibration.cache import ValueFingerprints, data_digest
from tests.calibration.nets import ArrayDataset, conv_data, conv_net, matmul_data, matmul_net


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every ONNX Runtime session created, in order."""
    made: list[object] = []
    original = runtime.create_session

    def counting(*args, **kwargs):
        made.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(runtime, "create_session", counting)
    return made


def _equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].name == b[name].name == name
        np.testing.assert_array_equal(a[name].low, b[name].low)
        np.testing.assert_array_equal(a[name].high, b[name].high)
        assert (a[name].axis, a[name].method, a[name].samples) == (
            b[name].axis,
            b[name].method,
            b[name].samples,
        )


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_a_rerun_is_served_from_the_cache(tmp_path, sessions, method: str) -> None:
    model, data = conv_net(), conv_data(32)
    names = ["c1", "r1", "r2"]
    per_channel = {"c1": 1} if method == "minmax" else None
    first = calibrate(model, data, names, method=method, per_channel=per_channel,
                      cache=CalibrationCache(tmp_path), device="cpu")  # fmt: skip
    assert len(sessions) == (1 if method == "minmax" else 2)
    assert len(list(tmp_path.glob("*.json"))) == 3
    sessions.clear()
    cache = CalibrationCache(tmp_path)
    again = calibrate(model.copy(), conv_data(32), names, method=method, per_channel=per_channel,
                      cache=cache, device="cpu", batch_size=5)  # fmt: skip
    assert sessions == []
    assert (cache.hits, cache.misses) == (3, 0)
    _equal(first, again)


def test_a_subset_hits_and_new_tensors_are_calibrated_alone(tmp_path, sessions) -> None:
    model, data = conv_net(), conv_data(32)
    cache = CalibrationCache(tmp_path)
    calibrate(model, data, ["c1", "r1"], cache=cache, device="cpu")
    sessions.clear()
    found = calibrate(model, data, ["r1", "c2"], cache=cache, device="cpu")
    assert len(sessions) == 1 and cache.hits == 1
    assert list(found) == ["r1", "c2"]
    fresh = calibrate(model, data, ["r1", "c2"], device="cpu")
    _equal(found, fresh)


@pytest.mark.parametrize(
    "change",
    [
        {"method": "percentile"},
        {"symmetric": False},
        {"per_channel": {"c1": 1}},
        {"samples": 31},
    ],
)
def test_other_options_miss(tmp_path, sessions, change: dict) -> None:
    model, data = conv_net(), conv_data(32)
    calibrate(model, data, ["c1"], cache=CalibrationCache(tmp_path), device="cpu")
    cache = CalibrationCache(tmp_path)
    calibrate(model, data, ["c1"], cache=cache, device="cpu", **change)
    assert (cache.hits, cache.misses) == (0, 1)


def test_histogram_options_count_only_for_their_methods(tmp_path) -> None:
    model, data = conv_net(), conv_data(32)
    calibrate(model, data, ["c1"], method="percentile", cache=CalibrationCache(tmp_path),
              device="cpu")  # fmt: skip
    for options, hit in [
        ({"method": "percentile", "percentile": 99.9}, False),
        ({"method": "percentile", "bins": 1024}, False),
        ({"method": "percentile", "max_batch_bytes": 4096}, True),
        ({"method": "minmax", "percentile": 99.9}, False),
    ]:
        cache = CalibrationCache(tmp_path)
        calibrate(model, data, ["c1"], cache=cache, device="cpu", **options)
        assert cache.hits == int(hit), options
    # percentile and bins do not change minmax ranges
    cache = CalibrationCache(tmp_path)
    calibrate(model, data, ["c1"], cache=cache, device="cpu", percentile=50.0, bins=4096)
    assert cache.hits == 1


def test_other_data_misses(tmp_path) -> None:
    model, data = conv_net(), conv_data(32)
    calibrate(model, data, ["c1"], cache=CalibrationCache(tmp_path), device="cpu")
    changed = conv_data(32)
    changed.arrays["x"] = changed.arrays["x"].copy()
    changed.arrays["x"][17, 0, 0, 0] += 1e-3
    cache = CalibrationCache(tmp_path)
    calibrate(model, changed, ["c1"], cache=cache, device="cpu")
    assert cache.hits == 0


def test_data_digest_does_not_depend_on_batching() -> None:
    data = conv_data(20)
    digests = {data_digest(data, size) for size in (1, 3, 7, 20, 64)}
    assert len(digests) == 1
    assert data_digest(conv_data(20, seed=5), 4) not in digests
    assert data_digest(conv_data(19), 4) not in digests


def test_model_fingerprints_cover_what_a_tensor_depends_on() -> None:
    model = conv_net()
    base = ValueFingerprints(model)
    # Another copy, renamed nodes: same fingerprints.
    copy = model.copy()
    for node in copy.graph:
        node.name = f"renamed_{node.name}"
    same = ValueFingerprints(copy)
    for name in ("x", "c1", "r2", "logits"):
        assert same.of(name) == base.of(name)
    # A downstream weight changes only what depends on it.
    changed = conv_net()
    wf = changed.graph.initializers["wf"]
    wf.const_value = ir.tensor(np.asarray(wf.const_value.numpy()) * 2, name="wf")
    after = ValueFingerprints(changed)
    assert after.of("r2") == base.of("r2")
    assert after.of("logits") != base.of("logits")
    # An attribute upstream changes everything below it.
    other = conv_net()
    other.graph.node("conv2").attributes["pads"] = ir.AttrInt64s("pads", [1, 1, 1, 1])
    assert ValueFingerprints(other).of("c2") == base.of("c2")  # same value: same fingerprint
    other.graph.node("relu1").op_type = "Sigmoid"
    changed_fp = ValueFingerprints(other)
    assert changed_fp.of("c1") == base.of("c1")
    assert changed_fp.of("r1") != base.of("r1")
    assert changed_fp.of("r2") != base.of("r2")


def test_other_model_misses(tmp_path) -> None:
    cache = CalibrationCache(tmp_path)
    calibrate(matmul_net(seed=0), matmul_data(), ["h", "o"], cache=cache, device="cpu")
    cache = CalibrationCache(tmp_path)
    calibrate(matmul_net(seed=1), matmul_data(), ["h", "o"], cache=cache, device="cpu")
    assert cache.hits == 0


def test_unreadable_entries_are_recomputed(tmp_path, capsys) -> None:
    model, data = conv_net(), ArrayDataset({"x": conv_data(8).arrays["x"]})
    first = calibrate(model, data, ["c1"], cache=CalibrationCache(tmp_path), device="cpu")
    (entry,) = tmp_path.glob("*.json")
    entry.write_text("{not json")
    cache = CalibrationCache(tmp_path)
    again = calibrate(model, data, ["c1"], cache=cache, device="cpu")
    assert (cache.hits, cache.misses) == (0, 1)
    assert "unreadable calibration cache entry" in capsys.readouterr().err
    _equal(first, again)
    assert json.loads(entry.read_text())["range"]["name"] == "c1"  # written again

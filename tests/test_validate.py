"""graphopt.validate: gates, streaming metrics against numpy on full arrays, accuracy, compare."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from rich.console import Console

from graphopt.errors import GateFailed, GraphoptError, RecipeError
from graphopt.validate import FidelityAccumulator, Gates, load_metric

# ---------------------------------------------------------------------------- helpers


def outputs(n: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "logits": rng.standard_normal((n, 10)).astype(np.float32),
        "features": rng.standard_normal((n, 4, 5)).astype(np.float32),
    }


def perturb(ref: dict[str, np.ndarray], scale: float, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in ref.items()
    }


def numpy_metrics(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """The metrics computed the obvious way, on the whole arrays at once."""
    a = ref.astype(np.float64).ravel()
    b = cand.astype(np.float64).ravel()
    return {
        "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
        "sqnr_db": float(10 * np.log10(np.sum(a**2) / np.sum((a - b) ** 2))),
        "max_abs": float(np.max(np.abs(a - b))),
        "mean_abs": float(np.mean(np.abs(a - b))),
    }


def accumulate(
    ref, cand, *, batch: int | None = None, labels=None, metric=None, gates: Gates | None = None
):
    acc = FidelityAccumulator(list(ref), metric=metric)
    n = len(next(iter(ref.values())))
    step = batch or n
    for start in range(0, n, step):
        part = slice(start, start + step)
        acc.update(
            {k: v[part] for k, v in ref.items()},
            {k: v[part] for k, v in cand.items()},
            None if labels is None else labels[part],
        )
    return acc.report(gates or Gates())


def by_name(report, name):
    return next(o for o in report.outputs if o.name == name)


# ---------------------------------------------------------------------------- gates


def test_gates_from_mapping_and_back():
    gates = Gates.from_mapping(
        {"min_cosine": 0.99, "max_accuracy_drop": 1, "min_sqnr_db": None}, "t"
    )
    assert gates == Gates(min_cosine=0.99, max_accuracy_drop=1.0)
    assert gates.to_dict() == {"min_cosine": 0.99, "max_accuracy_drop": 1.0}
    assert Gates.from_mapping(gates.to_dict(), "t") == gates
    assert Gates().to_dict() == {}


@pytest.mark.parametrize(
    ("mapping", "words"),
    [
        (
            {"min_cosin": 0.9},
            ["recipe x.yaml", "unknown validation gate 'min_cosin'", "min_cosine"],
        ),
        ({"min_cosine": "high"}, ["'min_cosine' must be a number", "'high'"]),
        ({"max_abs_error": True}, ["'max_abs_error' must be a number"]),
        ({"min_cosine": 1.5}, ["'min_cosine' is 1.5", "[-1, 1]"]),
        ({"max_accuracy_drop": -0.01}, ["'max_accuracy_drop'", ">= 0"]),
        ({"min_sqnr_db": float("nan")}, ["'min_sqnr_db'"]),
    ],
)
def test_gates_reject_bad_values_naming_them(mapping, words):
    with pytest.raises(RecipeError) as info:
        Gates.from_mapping(mapping, "recipe x.yaml")
    text = info.value.paragraph()
    for word in words:
        assert word in text


def test_gates_reject_non_mapping():
    with pytest.raises(RecipeError, match="must be a mapping"):
        Gates.from_mapping([0.99], "recipe x.yaml")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- metrics


def test_identical_outputs():
    ref = outputs()
    report = accumulate(ref, {k: v.copy() for k, v in ref.items()}, gates=Gates(min_cosine=1.0))
    assert report and report.failures == []
    for out in report.outputs:
        assert out.cosine == 1.0
        assert out.sqnr_db == math.inf
        assert out.max_abs == 0.0 and out.mean_abs == 0.0
        assert out.samples == 50
    assert by_name(report, "logits").top1_agreement == 1.0
    assert by_name(report, "features").top1_agreement is None  # 3-D: not logits-like
    assert report.worst_cosine == 1.0 and report.min_sqnr_db == math.inf


def test_perturbed_outputs_match_numpy_on_the_full_arrays():
    ref = outputs()
    cand = perturb(ref, 0.05)
    report = accumulate(ref, cand)
    for name in ref:
        expected = numpy_metrics(ref[name], cand[name])
        out = by_name(report, name)
        for key, value in expected.items():
            assert getattr(out, key) == pytest.approx(value, rel=1e-12), (name, key)
        assert out.elements == ref[name].size
    agree = np.mean(ref["logits"].argmax(1) == cand["logits"].argmax(1))
    assert by_name(report, "logits").top1_agreement == pytest.approx(agree)
    assert report.worst_cosine == min(o.cosine for o in report.outputs)
    assert report.min_sqnr_db == min(o.sqnr_db for o in report.outputs)


def test_streaming_equals_one_batch():
    ref = outputs(n=103)
    cand = perturb(ref, 0.1)
    whole = accumulate(ref, cand)
    for batch in (1, 7, 32):
        streamed = accumulate(ref, cand, batch=batch)
        assert streamed.samples == whole.samples == 103
        for a, b in zip(whole.outputs, streamed.outputs, strict=True):
            for key in ("cosine", "sqnr_db", "max_abs", "mean_abs"):
                assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-9), (batch, key)
            assert b.top1_agreement == a.top1_agreement


def test_chunking_inside_a_batch_gives_the_same_numbers(monkeypatch):
    import graphopt.validate as validate

    ref = outputs()
    cand = perturb(ref, 0.1)
    whole = accumulate(ref, cand)
    monkeypatch.setattr(validate, "_CHUNK", 37)
    chunked = accumulate(ref, cand)
    for a, b in zip(whole.outputs, chunked.outputs, strict=True):
        assert b.cosine == pytest.approx(a.cosine, rel=1e-12)
        assert b.sqnr_db == pytest.approx(a.sqnr_db, rel=1e-12)
        assert b.max_abs == a.max_abs


def test_zero_outputs():
    zeros = {"y": np.zeros((4, 3), np.float32)}
    same = accumulate(zeros, {"y": np.zeros((4, 3), np.float32)})
    out = same.outputs[0]
    assert (out.cosine, out.sqnr_db, out.max_abs) == (1.0, math.inf, 0.0)
    differs = accumulate(zeros, {"y": np.ones((4, 3), np.float32)})
    out = differs.outputs[0]
    assert (out.cosine, out.sqnr_db, out.max_abs) == (0.0, -math.inf, 1.0)


def test_gate_failures_are_readable_sentences():
    ref = outputs()
    cand = perturb(ref, 0.3)
    gates = Gates(min_cosine=0.999, min_sqnr_db=40, max_abs_error=0.01, min_top1_agreement=1.0)
    report = accumulate(ref, cand, gates=gates)
    assert not report and not report.passed
    logits = by_name(report, "logits")
    cosine_text = next(f for f in report.failures if "cosine" in f)
    assert cosine_text.startswith("output 'logits': cosine 0.9")
    assert cosine_text.endswith("< min_cosine 0.999")
    assert f"{logits.cosine:.4g}" in cosine_text
    assert any(
        f.startswith("output 'features': SQNR ") and "< min_sqnr_db 40" in f
        for f in report.failures
    )
    assert any("max abs error" in f and "> max_abs_error 0.01" in f for f in report.failures)
    assert any("top-1 agreement" in f and "< min_top1_agreement 1" in f for f in report.failures)
    with pytest.raises(GateFailed, match="min_cosine"):
        report.raise_for_failures()


def test_a_value_just_under_its_gate_prints_with_enough_digits():
    ref = {"y": np.ones((1, 1000), np.float32)}
    cand = {"y": ref["y"].copy()}
    cand["y"][0, 0] = 1.00001
    report = accumulate(ref, cand, gates=Gates(max_abs_error=1e-5))
    (failure,) = report.failures
    number = failure.split("max abs error ")[1].split(" >")[0]
    assert float(number) > 1e-5


def test_nan_in_candidate_is_a_failure_without_any_gate():
    ref = outputs()
    cand = {k: v.copy() for k, v in ref.items()}
    cand["logits"][3, 2] = np.nan
    cand["features"][0, 0, 0] = np.inf
    report = accumulate(ref, cand)
    assert not report
    logits = by_name(report, "logits")
    assert logits.nonfinite == 1 and math.isnan(logits.cosine) and logits.max_abs == math.inf
    assert math.isnan(report.worst_cosine)
    assert any("'logits'" in f and "1 non-finite value(s) (NaN/inf)" in f for f in report.failures)
    assert any("'features'" in f and "non-finite" in f for f in report.failures)


def test_equal_non_finite_values_in_both_models_agree():
    ref = outputs()
    ref["logits"][:, 0] = -np.inf  # a masked class
    cand = {k: v.copy() for k, v in ref.items()}
    report = accumulate(ref, cand, gates=Gates(min_cosine=0.9999))
    assert report, report.failures
    assert by_name(report, "logits").elements == ref["logits"].size - 50


def test_nan_in_reference_only_is_reported():
    ref = outputs()
    cand = {k: v.copy() for k, v in ref.items()}
    ref["features"][1, 1, 1] = np.nan
    report = accumulate(ref, cand)
    assert not report
    assert any("the reference has 1 non-finite" in f for f in report.failures)


def test_missing_and_misshapen_outputs_are_failures_not_crashes():
    ref = outputs()
    cand = {"features": ref["features"][:, :2]}
    report = accumulate(ref, cand, gates=Gates(min_cosine=0.5))
    assert not report
    assert "output 'logits': missing from the candidate's outputs" in report.failures
    assert (
        "output 'features': shape [50, 2, 5] in the candidate but [50, 4, 5] in the reference"
        in report.failures
    )
    assert all(o.cosine is None for o in report.outputs)
    assert report.worst_cosine is None


def test_no_samples_fails():
    report = FidelityAccumulator(["y"]).report()
    assert not report and report.failures == ["no samples were compared (the data is empty)"]


def test_top1_gate_without_logits_output_fails_closed():
    ref = {"y": np.ones((4, 3, 2), np.float32)}
    report = accumulate(ref, ref, gates=Gates(min_top1_agreement=0.9))
    assert not report
    assert "no output is logits-like" in report.failures[0]


# ---------------------------------------------------------------------------- accuracy


def test_accuracy_of_both_models_with_labels():
    ref = outputs(n=60)
    cand = perturb(ref, 0.8)
    labels = np.random.default_rng(5).integers(0, 10, 60)
    ref_acc = np.mean(ref["logits"].argmax(1) == labels)
    cand_acc = np.mean(cand["logits"].argmax(1) == labels)
    assert ref_acc != cand_acc
    for batch in (None, 7):
        report = accumulate(ref, cand, labels=labels, batch=batch)
        assert report.metric_name == "top-1 accuracy"
        assert report.reference_accuracy == pytest.approx(ref_acc)
        assert report.candidate_accuracy == pytest.approx(cand_acc)
        assert report.accuracy_drop == pytest.approx(ref_acc - cand_acc)
    drop = ref_acc - cand_acc
    assert accumulate(ref, cand, labels=labels, gates=Gates(max_accuracy_drop=drop))
    failed = accumulate(ref, cand, labels=labels, gates=Gates(max_accuracy_drop=drop - 0.01))
    assert not failed
    assert failed.failures[0].startswith(f"top-1 accuracy dropped by {drop:.4g}")
    assert f"reference {ref_acc:.4f}, candidate {cand_acc:.4f}" in failed.failures[0]


def test_accuracy_labels_as_column_or_one_hot():
    ref = outputs(n=20)
    labels = ref["logits"].argmax(1)
    assert accumulate(ref, ref, labels=labels[:, None]).reference_accuracy == 1.0
    one_hot = np.eye(10, dtype=np.float32)[labels]
    assert accumulate(ref, ref, labels=one_hot).reference_accuracy == 1.0


def test_labels_that_do_not_fit_are_a_data_error():
    ref = outputs(n=20)
    with pytest.raises(
        GraphoptError, match=r"Labels of shape \[20, 3\] do not fit output 'logits'"
    ):
        accumulate(ref, ref, labels=np.zeros((20, 3), np.int64))


def test_accuracy_gate_without_labels_fails_closed():
    ref = outputs()
    report = accumulate(ref, ref, gates=Gates(max_accuracy_drop=0.01))
    assert not report
    assert report.reference_accuracy is None and report.metric_name is None
    assert "the data has no labels" in report.failures[0]


def test_candidate_accuracy_when_its_first_output_is_missing():
    ref = outputs()
    labels = np.zeros(50, np.int64)
    report = accumulate(
        ref, {"features": ref["features"]}, labels=labels, gates=Gates(max_accuracy_drop=0.5)
    )
    assert report.reference_accuracy is not None and report.candidate_accuracy is None
    assert any("could not be measured" in f for f in report.failures)


METRIC_SOURCE = """
import numpy as np

def mean_error(outputs, labels):
    return float(np.mean(np.abs(outputs["features"].reshape(len(labels), -1).mean(1) - labels)))

not_a_function = 3
"""


def test_user_metric_from_a_file_is_a_sample_weighted_mean(tmp_path):
    path = tmp_path / "my_metric.py"
    path.write_text(METRIC_SOURCE)
    metric = load_metric(f"{path}:mean_error")
    ref = outputs(n=23)
    cand = perturb(ref, 0.2)
    labels = np.random.default_rng(3).standard_normal(23)

    def expected(out):
        return np.mean(np.abs(out["features"].reshape(23, -1).mean(1) - labels))

    report = accumulate(ref, cand, labels=labels, metric=metric, batch=5)  # 5+5+5+5+3
    assert report.metric_name == "mean_error"
    assert report.reference_accuracy == pytest.approx(expected(ref), rel=1e-12)
    assert report.candidate_accuracy == pytest.approx(expected(cand), rel=1e-12)


def test_load_metric_errors(tmp_path):
    path = tmp_path / "my_metric.py"
    path.write_text(METRIC_SOURCE)
    with pytest.raises(GraphoptError, match="no callable 'not_a_function'"):
        load_metric(f"{path}:not_a_function")
    with pytest.raises(GraphoptError, match="does not exist"):
        load_metric(f"{tmp_path / 'missing.py'}:f")
    with pytest.raises(GraphoptError, match="not of the form module:function"):
        load_metric("just_a_name")
    with pytest.raises(GraphoptError, match="Could not import"):
        load_metric("graphopt_no_such_module_xyz:f")


def test_a_metric_that_raises_or_returns_junk_is_a_clear_error():
    ref = outputs(n=4)
    labels = np.zeros(4)

    def broken(outputs, labels):
        raise KeyError("scores")

    with pytest.raises(GraphoptError, match="metric '.*broken' raised KeyError"):
        accumulate(ref, ref, labels=labels, metric=broken)

    def junk(outputs, labels):
        return "good"

    with pytest.raises(GraphoptError, match="returned 'good'"):
        accumulate(ref, ref, labels=labels, metric=junk)


# ---------------------------------------------------------------------------- rendering


def test_to_dict_is_strict_json_and_table_renders():
    ref = outputs()
    cand = {k: v.copy() for k, v in ref.items()}
    cand["features"][0, 0, 0] = np.nan
    labels = np.zeros(50, np.int64)
    report = accumulate(ref, cand, labels=labels, gates=Gates(min_cosine=0.99))
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["passed"] is False
    assert data["gates"] == {"min_cosine": 0.99}
    assert data["outputs"][0]["sqnr_db"] == "inf"
    assert data["outputs"][1]["cosine"] == "nan"
    assert data["worst_cosine"] == "nan"
    assert data["metric"] == "top-1 accuracy"
    console = Console(width=160, record=True)
    console.print(report.table())
    text = console.export_text()
    assert "logits" in text and "FAIL" in text and "NaN/inf in candidate" in text
    assert "top-1 accuracy: reference" in text


# ---------------------------------------------------------------------------- compare on ORT


def mlp(path, *, noise: float = 0.0, drop_output: bool = False, nan: bool = False):
    """x[N,8] -> Gemm -> Relu (hidden) -> Gemm -> logits[N,5]; weights + noise built in code."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    w2 = rng.standard_normal((5, 16)).astype(np.float32)
    if noise:
        w1 = w1 + noise * np.random.default_rng(9).standard_normal(w1.shape).astype(np.float32)
    if nan:
        w2[1, 3] = np.nan
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])]
    if not drop_output:
        outputs.append(helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", 16]))
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1),
            helper.make_node("Relu", ["h"], ["hidden"]),
            helper.make_node("Gemm", ["hidden", "w2"], ["logits"], transB=1),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        outputs,
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path, w1, w2


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((45, 8)).astype(np.float32)
    labels = rng.integers(0, 5, 45)
    path = tmp_path / "val.npz"
    np.savez(path, x=x, labels=labels)
    return path, x, labels


def open_data(model_path, data_path):
    from graphopt.data import open_dataset
    from graphopt.model import load_model

    return open_dataset(data_path, load_model(model_path).input_specs())


def test_compare_identical_models(tmp_path, data):
    from graphopt.model import load_model
    from graphopt.validate import compare

    path, *_ = mlp(tmp_path / "ref.onnx")
    report = compare(
        path,
        load_model(path),
        open_data(path, data[0]),
        gates=Gates(min_cosine=0.999999, min_sqnr_db=100, max_accuracy_drop=0.0),
        batch_size=8,
        device="cpu",
        workdir=tmp_path / "work",
    )
    assert report, report.failures
    assert report.samples == 45 and [o.name for o in report.outputs] == ["logits", "hidden"]
    for out in report.outputs:
        assert out.cosine == 1.0 and out.sqnr_db == math.inf and out.max_abs == 0.0
    assert report.reference_accuracy == report.candidate_accuracy
    assert "val.npz" in (report.data or "") and not report.random_data


def test_compare_perturbed_model_against_numpy(tmp_path, data):
    from graphopt.validate import compare

    data_path, x, labels = data
    ref_path, w1, w2 = mlp(tmp_path / "ref.onnx")
    cand_path, v1, _ = mlp(tmp_path / "cand.onnx", noise=0.05)

    def forward(a, b):
        hidden = np.maximum(x.astype(np.float64) @ a.T.astype(np.float64), 0.0)
        return {"logits": hidden @ b.T.astype(np.float64), "hidden": hidden}

    ref, cand = forward(w1, w2), forward(v1, w2)
    dataset = open_data(ref_path, data_path)
    report = compare(ref_path, cand_path, dataset, batch_size=7, device="cpu")
    one_batch = compare(ref_path, cand_path, dataset, batch_size=64, device="cpu")
    for name in ("logits", "hidden"):
        expected = numpy_metrics(ref[name], cand[name])
        out, whole = by_name(report, name), by_name(one_batch, name)
        for key, value in expected.items():
            # float32 ORT vs float64 numpy: the outputs themselves differ by ~1e-7
            assert getattr(out, key) == pytest.approx(value, rel=1e-3), (name, key)
            assert getattr(out, key) == pytest.approx(getattr(whole, key), rel=1e-9), (name, key)
    agree = np.mean(ref["logits"].argmax(1) == cand["logits"].argmax(1))
    assert by_name(report, "logits").top1_agreement == pytest.approx(agree)
    assert report.reference_accuracy == pytest.approx(np.mean(ref["logits"].argmax(1) == labels))
    assert report.candidate_accuracy == pytest.approx(np.mean(cand["logits"].argmax(1) == labels))
    strict = compare(ref_path, cand_path, dataset, gates=Gates(min_cosine=0.99999), device="cpu")
    assert not strict and any("min_cosine 0.99999" in f for f in strict.failures)


def test_compare_candidate_missing_an_output_or_producing_nan(tmp_path, data):
    from graphopt.validate import compare

    ref_path, *_ = mlp(tmp_path / "ref.onnx")
    dataset = open_data(ref_path, data[0])
    missing, *_ = mlp(tmp_path / "missing.onnx", drop_output=True)
    report = compare(ref_path, missing, dataset, device="cpu")
    assert not report
    assert report.failures == ["output 'hidden': missing from the candidate's outputs"]
    assert by_name(report, "logits").cosine == 1.0
    broken, *_ = mlp(tmp_path / "nan.onnx", nan=True)
    report = compare(ref_path, broken, dataset, device="cpu")
    assert not report
    assert any(
        f.startswith("output 'logits': the candidate has 45 non-finite") for f in report.failures
    )

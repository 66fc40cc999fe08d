"""tests calibration/calibrate.py and reduce.py: every method against a brute-force
computation on all captured activations, batch-size invariance, per-channel ranges, the
opset 17 and 18 forms of ReduceMin/ReduceMax, and the errors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from graphopt import runtime
from graphopt.calibration import CalibrationError, TensorRange, calibrate
from graphopt.data import Dataset
from graphopt.errors import DataError, GraphoptError
from graphopt.model import Model
from tests.calibration import bruteforce
from tests.calibration.nets import (
    CONV_TENSORS,
    MATMUL_TENSORS,
    conv_data,
    conv_net,
    matmul_data,
    matmul_net,
)

METHODS = ["minmax", "percentile", "entropy", "mse"]
# ONNX Runtime's kernels may round the last bit differently for another batch size.


def assert_close(actual: np.ndarray, desired: np.ndarray) -> None:
    np.testing.assert_allclose(actual, desired, rtol=1e-6, atol=1e-12)


def activations(model: Model, dataset: Dataset, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Every value of every named tensor over the whole dataset (test-sized data only)."""
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}

    def keep(_batch: object, values: dict[str, np.ndarray]) -> None:
        for name in names:
            parts[name].append(values[name].astype(np.float64))

    runtime.capture(model, dataset, names, keep, batch_size=16, device="cpu")
    return {n: np.concatenate(v) for n, v in parts.items()}


@pytest.fixture(scope="module")
def conv_case() -> tuple[Model, Dataset, dict[str, np.ndarray]]:
    model, data = conv_net(), conv_data(48)
    return model, data, activations(model, data, CONV_TENSORS)


@pytest.fixture(scope="module")
def matmul_case() -> tuple[Model, Dataset, dict[str, np.ndarray]]:
    model, data = matmul_net(), matmul_data(256)
    return model, data, activations(model, data, MATMUL_TENSORS)


def _cases(request: pytest.FixtureRequest, which: str):
    case = request.getfixturevalue(f"{which}_case")
    names = CONV_TENSORS if which == "conv" else MATMUL_TENSORS
    return (*case, names)


# ---------------------------------------------------------------------------- minmax


@pytest.mark.parametrize("which", ["conv", "matmul"])
def test_minmax_is_the_observed_range(request: pytest.FixtureRequest, which: str) -> None:
    model, data, values, names = _cases(request, which)
    symmetric = calibrate(model, data, names, device="cpu")
    asymmetric = calibrate(model, data, names, symmetric=False, device="cpu")
    assert list(symmetric) == names
    for name in names:
        x = values[name]
        assert isinstance(symmetric[name], TensorRange)
        assert symmetric[name].low.dtype == np.float64 and symmetric[name].low.shape == ()
        assert_close(symmetric[name].high, np.abs(x).max())
        assert_close(symmetric[name].low, -np.abs(x).max())
        assert_close(asymmetric[name].low, x.min())
        assert_close(asymmetric[name].high, x.max())
        assert symmetric[name].samples == len(data)
        assert symmetric[name].method == "minmax" and symmetric[name].axis is None
        np.testing.assert_array_equal(asymmetric[name].amax(), symmetric[name].high)


@pytest.mark.parametrize(
    ("which", "per_channel"),
    [
        ("conv", {"c1": 1, "r2": 1, "x": 1}),  # opset 17: axes attribute
        ("conv", {"c1": -3, "c2": 2}),  # a negative axis; a spatial axis
        ("matmul", {"h": 1, "o": -1, "x": 1}),  # opset 18: axes input
    ],
)
def test_per_channel_minmax(
    request: pytest.FixtureRequest, which: str, per_channel: dict[str, int]
) -> None:
    model, data, values, _ = _cases(request, which)
    names = list(per_channel)
    found = calibrate(model, data, names, per_channel=per_channel, device="cpu")
    loose = calibrate(model, data, names, per_channel=per_channel, symmetric=False, device="cpu")
    for name, axis in per_channel.items():
        x = values[name]
        axis %= x.ndim
        others = tuple(a for a in range(x.ndim) if a != axis)
        assert found[name].axis == axis
        assert_close(loose[name].low, x.min(axis=others))
        assert_close(loose[name].high, x.max(axis=others))
        assert_close(found[name].high, np.abs(x).max(axis=others))
        np.testing.assert_array_equal(found[name].low, -found[name].high)
        assert found[name].high.shape == (x.shape[axis],)


def test_per_channel_on_the_batch_axis_is_refused(conv_case) -> None:
    model, data, _ = conv_case  # 48 samples: batches of 32 and 16
    with pytest.raises(CalibrationError, match="32 channels on axis 0 in one batch and 16"):
        calibrate(model, data, ["c1"], per_channel={"c1": 0}, device="cpu")


def test_per_channel_and_per_tensor_together(conv_case) -> None:
    model, data, values = conv_case
    found = calibrate(model, data, ["c1", "c2"], per_channel={"c1": 1}, device="cpu")
    assert found["c1"].high.shape == (8,) and found["c2"].high.shape == ()
    assert_close(found["c2"].high, np.abs(values["c2"]).max())


# ---------------------------------------------------------------------------- histograms


@pytest.mark.parametrize("which", ["conv", "matmul"])
@pytest.mark.parametrize("percentile", [99.99, 99.0])
def test_percentile_against_the_raw_samples(
    request: pytest.FixtureRequest, which: str, percentile: float
) -> None:
    model, data, values, names = _cases(request, which)
    found = calibrate(model, data, names, method="percentile", percentile=percentile, device="cpu")
    for name in names:
        x = np.abs(values[name]).ravel()
        width = x.max() / 2048
        t = float(found[name].high)
        assert float(found[name].low) == -t
        target = percentile / 100 * x.size
        assert np.count_nonzero(x < t - width) <= target <= np.count_nonzero(x <= t + width)
        if percentile <= 99.0 and x.size > 10000:
            assert abs(t - np.percentile(x, percentile)) <= 2 * width


def test_signed_percentile_cuts_each_tail(conv_case) -> None:
    model, data, values = conv_case
    found = calibrate(model, data, ["c1", "c2"], method="percentile", percentile=99.0,
                      symmetric=False, device="cpu")  # fmt: skip
    for name in ("c1", "c2"):
        x = values[name].ravel()
        width = (x.max() - x.min()) / 2048
        low, high = float(found[name].low), float(found[name].high)
        assert abs(low - np.percentile(x, 0.5)) <= 2 * width
        assert abs(high - np.percentile(x, 99.5)) <= 2 * width


@pytest.mark.parametrize("which", ["conv", "matmul"])
def test_entropy_against_a_plain_kl_search(request: pytest.FixtureRequest, which: str) -> None:
    model, data, values, names = _cases(request, which)
    bins = 512
    found = calibrate(model, data, names, method="entropy", bins=bins, device="cpu")
    signed = calibrate(
        model, data, names, method="entropy", bins=bins, symmetric=False, device="cpu"
    )
    for name in names:
        x = values[name]
        positive, negative, width = bruteforce.signed_histograms(x, bins)
        if x.min() >= 0:  # one side: TensorRT's search on |x|
            divergences = bruteforce.kl_divergences(positive)
            best = min(divergences.values())
            chosen = round(float(found[name].high) / width)
            assert float(found[name].high) == pytest.approx(chosen * width, rel=1e-9)
            # Counts binned in float32 may differ from np.histogram's by a value on an edge.
            assert divergences[chosen] <= best + 1e-6, name
            continue
        # Both signs: each side searched on its own, the symmetric range takes the larger.
        above = bruteforce.side_threshold(positive, zero_spike=True) * width
        below = bruteforce.side_threshold(negative, zero_spike=False) * width
        assert float(found[name].high) == pytest.approx(max(above, below), abs=2 * width), name
        assert float(signed[name].high) == pytest.approx(min(x.max(), above), abs=2 * width)
        assert float(signed[name].low) == pytest.approx(max(x.min(), -below), abs=2 * width)


@pytest.mark.parametrize("which", ["conv", "matmul"])
def test_mse_against_quantizing_the_samples(request: pytest.FixtureRequest, which: str) -> None:
    model, data, values, names = _cases(request, which)
    bins = 512
    found = calibrate(model, data, names, method="mse", bins=bins, device="cpu")
    for name in names:
        x = values[name]
        _, best_error = bruteforce.best_mse_threshold(x, bins)
        ours = bruteforce.quantization_mse(x, float(found[name].high))
        assert ours <= best_error * 1.05 + 1e-12, name


def test_mse_intersects_the_signed_range(conv_case) -> None:
    # entropy's signed ranges take one threshold per side: test_entropy_against_a_plain_kl_search
    model, data, values = conv_case
    for method in ("mse",):
        sym = calibrate(model, data, ["r1", "c2"], method=method, device="cpu")
        signed = calibrate(model, data, ["r1", "c2"], method=method, symmetric=False, device="cpu")
        for name in ("r1", "c2"):
            t = float(sym[name].high)
            x = values[name]
            assert_close(signed[name].low, max(x.min(), -t))
            assert_close(signed[name].high, min(x.max(), t))
    assert float(signed["r1"].low) == 0.0  # a ReLU output stays non-negative


def test_methods_give_different_ranges(matmul_case) -> None:
    model, data, _ = matmul_case
    highs = {
        method: float(calibrate(model, data, ["h"], method=method, device="cpu")["h"].high)
        for method in METHODS
    }
    assert len(set(highs.values())) == 4, highs
    assert highs["minmax"] == max(highs.values())


@pytest.mark.parametrize("method", METHODS)
def test_ranges_do_not_depend_on_the_batch_size(conv_case, method: str) -> None:
    model, data, _ = conv_case
    results = [
        calibrate(model, data, CONV_TENSORS, method=method, batch_size=size, device="cpu")
        for size in (1, 8, 32)
    ]
    for name in CONV_TENSORS:
        reference = results[0][name]
        for other in results[1:]:
            np.testing.assert_allclose(other[name].low, reference.low, rtol=1e-6, atol=0)
            np.testing.assert_allclose(other[name].high, reference.high, rtol=1e-6, atol=0)


def test_small_batch_budget_captures_in_groups(conv_case, monkeypatch) -> None:
    """With room for less than one sample's activations, the histogram pass captures the
    tensors in groups (one run each), and the ranges stay the same."""
    model, data, _ = conv_case
    sessions = []
    original = runtime.create_session

    def counting(*args, **kwargs):
        sessions.append(kwargs.get("extra_outputs", ()))
        return original(*args, **kwargs)

    monkeypatch.setattr(runtime, "create_session", counting)
    names = ["c1", "c2", "r2"]
    roomy = calibrate(model, data, names, method="percentile", device="cpu")
    assert len(sessions) == 2  # pass one, then one capture of all three
    sessions.clear()
    tight = calibrate(model, data, names, method="percentile", device="cpu", max_batch_bytes=3000)
    assert len(sessions) == 4  # pass one, then one capture per tensor (2 KiB per sample each)
    for name in names:
        assert float(tight[name].high) == float(roomy[name].high)


# ---------------------------------------------------------------------------- samples


def test_samples_uses_the_first_ones(conv_case) -> None:
    model, data, values = conv_case
    found = calibrate(model, data, ["c1"], samples=10, batch_size=4, device="cpu")
    assert found["c1"].samples == 10
    assert_close(found["c1"].high, np.abs(values["c1"][:10]).max())
    everything = calibrate(model, data, ["c1"], samples=10_000, device="cpu")
    assert everything["c1"].samples == len(data)


def test_samples_must_fill_a_fixed_batch() -> None:
    model = conv_net(batch=4)
    data = conv_data(12)
    assert calibrate(model, data, ["c1"], samples=8, batch_size=4, device="cpu")["c1"].samples == 8
    with pytest.raises(DataError, match="multiple of the batch size 4"):
        calibrate(model, data, ["c1"], samples=6, device="cpu")


def test_fixed_batch_model_with_histograms() -> None:
    model = conv_net(batch=4)
    data = conv_data(12)
    found = calibrate(model, data, ["c1", "r2"], method="entropy", batch_size=4, device="cpu")
    assert found["c1"].samples == 12


# ---------------------------------------------------------------------------- errors


def test_unknown_tensor(conv_case) -> None:
    model, data, _ = conv_case
    with pytest.raises(CalibrationError, match="'nope'") as info:
        calibrate(model, data, ["c1", "nope"], device="cpu")
    assert isinstance(info.value, ValueError) and isinstance(info.value, GraphoptError)
    assert info.value.tensors == ("nope",)


def test_non_float_tensor(conv_case) -> None:
    model, data, _ = conv_case
    with pytest.raises(CalibrationError, match=r"'pred' \(int64\)") as info:
        calibrate(model, data, ["c1", "pred"], device="cpu")
    assert info.value.tensors == ("pred",)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "kl"}, "method 'kl'"),
        ({"percentile": 0.0}, "percentile=0.0"),
        ({"percentile": 100.5}, "percentile=100.5"),
        ({"bins": 64}, "bins=64"),
        ({"samples": 0}, "samples=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"nonfinite": "ignore"}, "nonfinite='ignore'"),
        ({"method": "entropy", "per_channel": {"c1": 1}}, "'minmax' only"),
        ({"per_channel": {"r1": 1}}, "'r1'"),
        ({"per_channel": {"c1": 4}}, "axis 4"),
    ],
)
def test_bad_options(conv_case, options: dict, message: str) -> None:
    model, data, _ = conv_case
    with pytest.raises(CalibrationError, match=message):
        calibrate(model, data, ["c1"], device="cpu", **options)


def test_non_finite_values_raise_or_are_skipped() -> None:
    from onnx import TensorProto, helper

    from tests.calibration.nets import ArrayDataset, _model

    graph = helper.make_graph(
        [
            helper.make_node("Log", ["x"], ["log"]),  # log(0) = -inf
            helper.make_node("Sqrt", ["x"], ["root"]),  # sqrt(-1) = nan
            helper.make_node("Abs", ["x"], ["abs"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4])
            for n in ("log", "root", "abs")
        ],
    )
    model = _model(graph, 17)
    data = ArrayDataset({"x": np.array([[0.0, 1.0, 2.0, 3.0], [-1.0, 1.0, 2.0, 3.0]], np.float32)})
    for method in ("minmax", "percentile"):
        with pytest.raises(CalibrationError, match="inf or NaN") as info:
            calibrate(model, data, ["log", "root", "abs"], method=method, device="cpu")
        assert info.value.tensors == ("log", "root")
        found = calibrate(
            model, data, ["log", "root", "abs"], method=method, nonfinite="skip", device="cpu"
        )
        assert list(found) == ["abs"]
        assert float(found["abs"].high) == pytest.approx(3.0, rel=1e-6)


def test_empty_tensor_list_and_duplicates(conv_case) -> None:
    model, data, _ = conv_case
    assert calibrate(model, data, [], device="cpu") == {}
    found = calibrate(model, data, ["c1", "c1", "x"], device="cpu")
    assert list(found) == ["c1", "x"]


def test_the_model_is_not_modified(conv_case) -> None:
    model, data, _ = conv_case
    before = model.to_proto().SerializeToString()
    calibrate(model, data, ["c1", "r2"], method="entropy", per_channel=None, device="cpu")
    calibrate(model, data, ["c1"], per_channel={"c1": 1}, device="cpu")
    assert model.to_proto().SerializeToString() == before


def test_constant_tensor_has_its_value_as_range() -> None:
    from onnx import TensorProto, helper

    from tests.calibration.nets import ArrayDataset, _model

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "zero"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])],
    )
    model = _model(graph, 17)
    data = ArrayDataset({"x": np.ones((3, 2), np.float32)})
    for method in METHODS:
        found = calibrate(model, data, ["z"], method=method, device="cpu")["z"]
        assert float(found.high) == 0.0 and float(found.low) == 0.0


def test_tensor_inside_a_subgraph_is_named_as_such() -> None:
    from onnx import TensorProto, helper

    from tests.calibration.nets import ArrayDataset, _model

    def branch(name: str, op: str) -> object:
        return helper.make_graph(
            [helper.make_node(op, ["x"], [f"{name}_out"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["N", 2])],
        )

    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["c"]),
            helper.make_node(
                "If", ["c"], ["y"], then_branch=branch("then", "Relu"),
                else_branch=branch("else", "Neg"),
            ),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])],
    )  # fmt: skip
    model = _model(graph, 17)
    data = ArrayDataset({"x": np.ones((3, 2), np.float32)})
    with pytest.raises(CalibrationError, match="'then_out'") as info:
        calibrate(model, data, ["y", "then_out"], device="cpu")
    assert "inside an If/Loop/Scan body" in info.value.paragraph()
    assert float(calibrate(model, data, ["y"], device="cpu")["y"].high) == 1.0


def test_float16_tensors() -> None:
    from onnx import TensorProto, helper

    from tests.calibration.nets import ArrayDataset, _model

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
         helper.make_node("Mul", ["h", "h"], ["sq"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("sq", TensorProto.FLOAT16, ["N", 4])],
    )  # fmt: skip
    model = _model(graph, 17)
    x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    data = ArrayDataset({"x": x})
    squares = x.astype(np.float16).astype(np.float32) ** 2
    for method in METHODS:
        found = calibrate(model, data, ["h", "sq"], method=method, device="cpu")
        assert 0 < float(found["sq"].high) <= float(squares.max()) * 1.001
        if method == "minmax":
            assert float(found["sq"].high) == pytest.approx(float(squares.max()), rel=1e-3)


def test_tensor_types_only_onnx_runtime_knows() -> None:
    """A custom operator's output has no type ONNX shape inference can give: ONNX Runtime
    runs it, and pass one checks the type on the first batch."""
    from onnx import TensorProto, helper

    from graphopt.calibration.reduce import Target, reduce_ranges
    from tests.calibration.nets import ArrayDataset

    graph = helper.make_graph(
        [helper.make_node("Gelu", ["x"], ["g"], domain="com.microsoft"),
         helper.make_node("Relu", ["g"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )  # fmt: skip
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    proto.ir_version = 10
    import onnx_ir as ir

    model = Model(ir=ir.from_proto(proto))
    assert model.graph.node(0).outputs[0].dtype is None
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    data = ArrayDataset({"x": x})
    for method in METHODS:
        found = calibrate(model, data, ["g"], method=method, device="cpu")
        assert 0 < float(found["g"].high) <= np.abs(x).max()
    # An integer tensor of unknown type is refused once ONNX Runtime has shown its type.
    model = conv_net()
    with pytest.raises(CalibrationError, match=r"'pred' \(int64\)"):
        reduce_ranges(model, conv_data(8), [Target("pred", None, 1, None)], histograms=False,
                      batch_size=4, device="cpu", threads=None, workdir=None)  # fmt: skip


def test_work_in_the_background_hands_its_errors_to_the_caller() -> None:
    from graphopt.calibration.calibrate import _in_background

    closed = []

    def items():
        try:
            yield 1
            yield 2
            raise RuntimeError("ORT failed on batch 3")
        finally:
            closed.append(True)

    got = []
    with pytest.raises(RuntimeError, match="batch 3"):
        for item in _in_background(items()):
            got.append(item)
    assert got == [1, 2] and closed == [True]

    def endless():
        try:
            while True:
                yield 0
        finally:
            closed.append("endless")

    for _ in _in_background(endless()):
        break  # the caller stops early: the worker is joined and the generator closed
    assert closed[-1] == "endless"

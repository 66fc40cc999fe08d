"""channels' mean compensation: a removed channel's mean contribution goes into the readers'
biases, so each reader's output keeps its mean over the calibration data exactly (a linear
reader's E[y] depends on its inputs only through their means), where plain removal shifts
it; dead channels stay exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.context import Context
from graphopt.data import open_dataset
from graphopt.model import Model
from graphopt.passes.base import build_options, get_pass
from graphopt.runtime import create_session
from tests.models import make_model

R = np.random.default_rng(7)


def _f(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (R.standard_normal(shape) * scale).astype(np.float32)


def _conv_net() -> Model:
    """x[N,3,9,9] -> Conv 3x3 (16, bias) -> Relu -> Conv 3x3 pad 1 stride 2 (8, no bias) -> y"""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2]),
    ]
    inits = [
        numpy_helper.from_array(_f(16, 3, 3, 3), "w1"),
        numpy_helper.from_array(_f(16, scale=2.0) + 1.0, "b1"),  # large positive means
        numpy_helper.from_array(_f(8, 16, 3, 3), "w2"),
    ]
    proto = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 5, 5])],
        inits,
    )
    return Model(ir=ir.from_proto(proto))


def _mlp(*, gemm: bool) -> Model:
    """x[N,6] -> Gemm (12) -> Relu -> MatMul w[12,4] (no bias) or Gemm transB -> y"""
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
    ]
    inits = [
        numpy_helper.from_array(_f(6, 12), "w1"),
        numpy_helper.from_array(_f(12) + 1.0, "b1"),
    ]
    if gemm:
        nodes.append(helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1, beta=0.5))
        inits += [numpy_helper.from_array(_f(4, 12), "w2"), numpy_helper.from_array(_f(4), "b2")]
    else:
        nodes.append(helper.make_node("MatMul", ["r", "w2"], ["y"]))
        inits.append(numpy_helper.from_array(_f(12, 4), "w2"))
    proto = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    return Model(ir=ir.from_proto(proto))


def _prune(model: Model, tmp_path: Path, data: Path, **options) -> object:
    ctx = Context(
        workdir=tmp_path,
        device="cpu",
        calib_data=open_dataset(data, model.input_specs()),
        batch_size=16,
    )
    opts = build_options(get_pass("channels"), {"ratio": 0.5, "round_to": 1, **options})
    return get_pass("channels")(opts).run(model, ctx)


def _output_mean(model: Model, x: np.ndarray) -> np.ndarray:
    y = create_session(model, device="cpu").run({"x": x})["y"]
    return y.reshape(y.shape[0], y.shape[1], -1).mean(axis=(0, 2))


@pytest.mark.parametrize(
    "make",
    [_conv_net, lambda: _mlp(gemm=False), lambda: _mlp(gemm=True)],
    ids=["conv3x3-padded-strided", "matmul-no-bias", "gemm-transB-beta"],
)
def test_compensation_keeps_each_readers_output_mean(tmp_path: Path, make) -> None:
    original = make()
    shape = [64, *[int(d) for d in original.input_specs()[0].shape[1:]]]
    x = R.standard_normal(shape).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    want = _output_mean(original, x)
    plain, compensated = original.copy(), original.copy()
    result = _prune(plain, tmp_path, tmp_path / "d.npz", compensate="none")
    assert result.stats["channels_removed"] > 0
    result = _prune(compensated, tmp_path, tmp_path / "d.npz")
    assert result.stats["readers_compensated"] == 1
    np.testing.assert_allclose(_output_mean(compensated, x), want, rtol=1e-4, atol=1e-4)
    assert np.abs(_output_mean(plain, x) - want).max() > 0.1


def test_dead_channels_stay_exact_with_compensation(tmp_path: Path) -> None:
    model = _conv_net()
    w1 = model.graph.initializers["w1"]
    b1 = model.graph.initializers["b1"]
    w, b = w1.const_value.numpy().copy(), b1.const_value.numpy().copy()
    w[::2] = 0  # half the channels are dead: zero weights, zero bias (Relu keeps them 0)
    b[::2] = 0
    w[1::2] *= 10  # the live ones are the largest by l2
    w1.const_value = ir.tensor(w, name="w1")
    b1.const_value = ir.tensor(b, name="b1")
    x = R.standard_normal((32, 3, 9, 9)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    before = create_session(model, device="cpu").run({"x": x})["y"]
    _prune(model, tmp_path, tmp_path / "d.npz")
    assert model.graph.initializers["w2"].const_value.shape[1] == 8
    after = create_session(model, device="cpu").run({"x": x})["y"]
    # float rounding only (the compensated Conv gains a zero bias input)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6 * np.abs(before).max())


def test_without_data_it_says_so(tmp_path: Path) -> None:
    model = _conv_net()
    opts = build_options(get_pass("channels"), {"ratio": 0.5, "round_to": 1})
    result = get_pass("channels")(opts).run(model, Context(workdir=tmp_path, device="cpu"))
    assert result.modified
    assert any("not handed" in w for w in result.warnings)


_SMALL_LAST = np.array([1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1], np.float32)


def _mixed_channels_net(reader: str) -> Model:
    """x -> a linear layer of 8 channels whose last 4 are small mixtures of the first 4 (plus
    a constant, except before a padded Conv, where the zero border would break it) -> reader.

    The reader's weights on the mixtures are small too, so l2 importance removes them; the
    kept channels explain them exactly."""
    mix = _f(4, 4, scale=0.1)
    if reader == "conv3x3":
        w_first = _f(4, 4, 1, 1)
        w1 = np.concatenate([w_first, np.einsum("rk,kcij->rcij", mix, w_first)])
        nodes = [
            helper.make_node("Conv", ["x", "w1"], ["h"]),
            helper.make_node("Conv", ["h", "w2", "b2"], ["y"], pads=[1, 1, 1, 1]),
        ]
        inits = [
            numpy_helper.from_array(w1.astype(np.float32), "w1"),
            numpy_helper.from_array(_f(5, 8, 3, 3) * _SMALL_LAST[None, :, None, None], "w2"),
            numpy_helper.from_array(_f(5), "b2"),
        ]
        shapes = (["N", 4, 6, 6], ["N", 5, 6, 6])
    else:
        w_first, b_first = _f(4, 4), _f(4)
        w1 = np.concatenate([w_first, w_first @ mix.T], axis=1)  # [in, out]
        b1 = np.concatenate([b_first, mix @ b_first + 0.3])
        nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"])]
        inits = [
            numpy_helper.from_array(w1.astype(np.float32), "w1"),
            numpy_helper.from_array(b1.astype(np.float32), "b1"),
        ]
        if reader == "gemm":
            nodes.append(helper.make_node("Gemm", ["h", "w2"], ["y"], transB=1, alpha=0.7))
            inits.append(numpy_helper.from_array(_f(5, 8) * _SMALL_LAST, "w2"))
        else:
            nodes.append(helper.make_node("MatMul", ["h", "w2"], ["y"]))
            inits.append(numpy_helper.from_array(_f(8, 5) * _SMALL_LAST[:, None], "w2"))
        shapes = (["N", 4], ["N", 5])
    proto = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shapes[0])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shapes[1])],
        inits,
    )
    return Model(ir=ir.from_proto(proto))


@pytest.mark.parametrize("reader", ["conv3x3", "gemm", "matmul"])
def test_regression_recovers_channels_the_kept_ones_explain(tmp_path: Path, reader: str) -> None:
    original = _mixed_channels_net(reader)
    shape = [int(d) if isinstance(d, int) else 64 for d in original.input_specs()[0].shape]
    x = R.standard_normal(shape).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    held_out = R.standard_normal(shape).astype(np.float32)
    want = create_session(original, device="cpu").run({"x": held_out})["y"]
    errors = {}
    for method in ("regression", "mean"):
        model = original.copy()
        result = _prune(model, tmp_path, tmp_path / "d.npz", compensate=method)
        assert result.stats["channels_removed"] == 4
        assert result.stats["readers_compensated"] == 1
        got = create_session(model, device="cpu").run({"x": held_out})["y"]
        errors[method] = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    # the ridge (1e-2 of each kept channel's variance) is all that is left (~5e-4 here)
    assert errors["regression"] < 5e-3 * scale, errors
    assert errors["regression"] < 0.02 * errors["mean"], errors


def test_regression_beats_the_mean_on_held_out_data(tmp_path: Path) -> None:
    """A Relu net, where channels are only partly explained by each other: the regression
    fitted on calibration data still leaves a smaller output error on other data (here a
    little: 16 weakly correlated channels)."""
    original = _conv_net()
    x = R.standard_normal((64, 3, 9, 9)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    held_out = R.standard_normal((64, 3, 9, 9)).astype(np.float32)
    want = create_session(original, device="cpu").run({"x": held_out})["y"]
    errors = {}
    for method in ("regression", "mean", "none"):
        model = original.copy()
        _prune(model, tmp_path, tmp_path / "d.npz", compensate=method)
        got = create_session(model, device="cpu").run({"x": held_out})["y"]
        errors[method] = float(np.mean((got - want) ** 2))
    assert errors["regression"] < errors["mean"] < errors["none"], errors


def test_a_shared_reader_weight_falls_back_to_the_mean(tmp_path: Path) -> None:
    """Two readers of one weight initializer: it cannot change for one of them alone."""
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y1"]),
        helper.make_node("MatMul", ["r", "w2"], ["y2"]),
        helper.make_node("Add", ["y1", "y2"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(_f(6, 12), "w1"),
        numpy_helper.from_array(_f(12) + 1.0, "b1"),
        numpy_helper.from_array(_f(12, 4), "w2"),
    ]
    proto = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    model = Model(ir=ir.from_proto(proto))
    x = R.standard_normal((64, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    want = _output_mean(model, x)
    result = _prune(model, tmp_path, tmp_path / "d.npz")
    assert result.stats["readers_compensated"] == 2
    np.testing.assert_allclose(_output_mean(model, x), want, rtol=1e-4, atol=1e-4)


def test_tensors_too_wide_for_their_second_moments_get_the_mean(
    tmp_path: Path, monkeypatch
) -> None:
    """Above MAX_REGRESSION_CHANNELS (C×C float64 statistics) a reader falls back to the mean."""
    import importlib

    # the module, not the function of the same name the package exports
    compensate_module = importlib.import_module("graphopt.passes.channels.compensate")
    monkeypatch.setattr(compensate_module, "MAX_REGRESSION_CHANNELS", 4)
    original = _mixed_channels_net("gemm")  # the reader sums 8 channels
    x = R.standard_normal((64, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    outputs = {}
    for method in ("regression", "mean"):
        model = original.copy()
        result = _prune(model, tmp_path, tmp_path / "d.npz", compensate=method)
        assert result.stats["readers_compensated"] == 1
        outputs[method] = create_session(model, device="cpu").run({"x": x})["y"]
    np.testing.assert_array_equal(outputs["regression"], outputs["mean"])

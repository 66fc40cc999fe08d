"""Whole-model gradients: a ResNet-like and a MobileNet-like network with all trainables,
under the cross-entropy + distillation loss, against finite differences in float64 and
ONNX Runtime in float32; the losses themselves against PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphopt.train import Loss, build_training_graph
from tests.train.gradcheck import (
    Reference,
    assert_close_scaled,
    assert_fd_agrees,
    directional_fd,
    op_model,
    ort_gradients,
)
from tests.train.nets import conv_bias_bn, mobilenet_like, resnet_like

LOSSES = [
    Loss.cross_entropy("logits", weight=0.5),
    Loss.distillation("logits", temperature=2.0, weight=2.0),
]


def _feeds(classes: int, batch: int = 2, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((batch, 3, 12, 12)),
        "logits.labels": rng.integers(0, classes, batch).astype(np.int64),
        "logits.teacher": rng.standard_normal((batch, classes)) * 2,
    }


@pytest.mark.parametrize(
    ("build", "classes", "count"),
    [(resnet_like, 10, 20), (mobilenet_like, 5, 21), (conv_bias_bn, 4, 14)],
)
def test_whole_model_gradients(build, classes, count):
    model = build(np.float64)
    graph = build_training_graph(model, LOSSES)
    onnx.checker.check_model(graph.proto, full_check=True)
    # Every weight, bias, BN scale and shift; not the running statistics or Clip's bounds.
    stats = {
        n.inputs[i].name for n in model.graph if n.op_type == "BatchNormalization" for i in (3, 4)
    }
    scalars = {k for k, v in model.graph.initializers.items() if v.const_value.size == 1}
    assert set(graph.trainables) == set(model.graph.initializers) - stats - scalars
    assert len(graph.trainables) == count
    feeds = _feeds(classes)
    reference = Reference(graph)
    assert_fd_agrees(directional_fd(reference, feeds, graph.initial, directions=2), rtol=1e-5)

    loss64, grads64 = reference.run(feeds, graph.initial)
    graph32 = build_training_graph(build(np.float32), LOSSES)
    feeds32 = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in feeds.items()}
    loss32, grads32 = ort_gradients(graph32, feeds32, graph32.initial)
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    for name in graph.trainables:
        assert_close_scaled(grads32[name], grads64[name], rtol=1e-4)


def test_losses_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 6)), rng.standard_normal((6, 5))
    model = op_model("MatMul", {"a": a, "b": b})
    losses = [
        Loss.cross_entropy("y", weight=0.3),
        Loss.distillation("y", temperature=3.0, weight=0.7),
        Loss.mse("y", weight=0.1),
    ]
    graph = build_training_graph(model, losses, trainables=["b"])
    feeds = {
        "y.labels": np.array([0, 4, 2, 2], dtype=np.int64),
        "y.teacher": rng.standard_normal((4, 5)) * 3,
        "y.target": rng.standard_normal((4, 5)),
    }
    loss, grads = Reference(graph).run(feeds, graph.initial)

    tb = torch.tensor(b, requires_grad=True)
    logits = torch.tensor(a) @ tb
    t = 3.0
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor(feeds["y.labels"]))
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(logits / t, -1),
        torch.log_softmax(torch.tensor(feeds["y.teacher"]) / t, -1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    mse = ((logits - torch.tensor(feeds["y.target"])) ** 2).mean()
    total = 0.3 * ce + 0.7 * kl + 0.1 * mse
    total.backward()
    assert loss == pytest.approx(float(total.detach()), rel=1e-12)
    np.testing.assert_allclose(grads["b"], tb.grad.numpy(), rtol=1e-10, atol=1e-13)


def test_dynamic_batch_runs_at_any_batch_size():
    graph = build_training_graph(resnet_like(np.float32, batch="N"), LOSSES)
    for batch in (1, 3):
        feeds = {
            k: v.astype(np.float32) if v.dtype.kind == "f" else v
            for k, v in _feeds(10, batch).items()
        }
        loss, grads = ort_gradients(graph, feeds, graph.initial)
        assert np.isfinite(loss)
        assert all(grads[k].shape == graph.initial[k].shape for k in graph.trainables)


def _offset_conv_bn(dtype: type, feeds: dict[str, np.ndarray]):
    """conv (no bias) -> BN whose running mean is the conv output's batch mean -> Relu ->
    pool -> Gemm. With inputs far from zero, BN's input sits far from zero against its
    spread, where sum(dy * x) - mean * sum(dy) cancels most."""
    from numpy.lib.stride_tricks import sliding_window_view

    from tests.train.nets import Net

    n = Net(7, dtype)
    w = n.rng.standard_normal((8, 3, 3, 3)) / np.sqrt(27)
    xp = np.pad(feeds["x"], ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.einsum("nchwij,mcij->nmhw", sliding_window_view(xp, (3, 3), axis=(2, 3)), w)
    y = n.op("Conv", ["x", n.const(w, "w")], pads=[1, 1, 1, 1])
    r = n.rng
    params = [r.uniform(0.5, 1.5, 8), r.standard_normal(8) * 0.1,
              conv.mean(axis=(0, 2, 3)), conv.var(axis=(0, 2, 3))]  # fmt: skip
    y = n.op("BatchNormalization", [y, *(n.const(p, "bn") for p in params)])
    y = n.op("Flatten", [n.op("GlobalAveragePool", [n.op("Relu", [y])])], axis=1)
    n.op("Gemm", [y, n.weight([4, 8]), n.const(np.zeros(4), "fc_b")], transB=1)
    n.nodes[-1].output[0] = "logits"
    return n.model({"x": [2, 3, 12, 12]}, ["logits"])


@pytest.mark.parametrize("offset", [0.0, 10.0])
def test_batch_norm_scale_gradient_from_the_conv(offset):
    # BN's scale gradient comes from the Conv's weight gradient (no pass over dY): right in
    # float64, and as close in float32 when the inputs sit at 10x their spread (the BN
    # input's mean is then up to 5x its spread per channel, against 0.1 without offset).
    feeds = _feeds(4)
    feeds["x"] = feeds["x"] + offset
    graph = build_training_graph(_offset_conv_bn(np.float64, feeds), LOSSES)
    bn = next(n for n in graph.proto.graph.node if n.op_type == "BatchNormalization")
    assert not any(
        n.op_type == "Sub" and bn.input[0] in n.input for n in graph.proto.graph.node
    )  # the direct form, sum(dy * (x - mean)), is not built
    reference = Reference(graph)
    assert_fd_agrees(directional_fd(reference, feeds, graph.initial, directions=2), rtol=1e-5)
    _, grads64 = reference.run(feeds, graph.initial)
    graph32 = build_training_graph(_offset_conv_bn(np.float32, feeds), LOSSES)
    feeds32 = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in feeds.items()}
    _, grads32 = ort_gradients(graph32, feeds32, graph32.initial)
    for name in graph.trainables:
        assert_close_scaled(grads32[name], grads64[name], rtol=1e-4)

"""Per-op gradients: every rule against directional finite differences in float64 (always),
PyTorch autograd in float64 (when torch is installed), and ONNX Runtime in float32.

Each case is one node whose inputs are all initializers, so the trainables are the node's
float inputs (data included) and the loss is the MSE of its output(s) against a random
target. Activations with kinks (Relu, Clip, MaxPool, ...) are checked at random points, which
lie away from the kinks for a step of 1e-6.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from tests.train.gradcheck import (
    Loss,
    Reference,
    assert_close_scaled,
    assert_fd_agrees,
    build_training_graph,
    directional_fd,
    op_model,
    ort_gradients,
)

R = np.random.default_rng(1234)


def rand(*shape: int, low: float | None = None) -> np.ndarray:
    if low is not None:  # magnitudes in [low, low + 1), random signs: safe divisors
        return (R.uniform(low, low + 1, shape) * R.choice([-1, 1], shape)).astype(np.float64)
    return R.standard_normal(shape)


def own(seed: int, *shape: int) -> np.ndarray:
    """Normal values from a generator of their own, so that a case added to CASES leaves
    the values every later case draws from R unchanged."""
    return np.random.default_rng(seed).standard_normal(shape)


def ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


@dataclass
class Case:
    id: str
    op: str
    inputs: dict[str, np.ndarray | None]
    attrs: dict[str, Any] = field(default_factory=dict)
    torch: Callable[..., Any] | None = None  # (torch, F, tensors by name) -> output(s)
    outputs: int = 1
    opset: int = 18
    trainables: list[str] | None = None
    losses_on: list[int] | None = None  # outputs the loss reads (default all)
    torch_rtol: float = 1e-9


def pad2d(F, x, pads):  # ONNX pads (hb, wb, he, we) -> torch's (wb, we, hb, he)
    hb, wb, he, we = pads
    return F.pad(x, (wb, we, hb, he))


CASES = [
    # ---------------------------------------------------------------- Conv
    Case("conv-pad", "Conv", {"x": rand(2, 3, 6, 6), "w": rand(4, 3, 3, 3), "b": rand(4)},
         {"pads": [1, 1, 1, 1]}, lambda T, F, v: F.conv2d(v["x"], v["w"], v["b"], padding=1)),
    Case("conv-stride-asym-pads", "Conv", {"x": rand(2, 3, 7, 6), "w": rand(4, 3, 3, 2)},
         {"pads": [1, 0, 0, 1], "strides": [2, 2]},
         lambda T, F, v: F.conv2d(pad2d(F, v["x"], (1, 0, 0, 1)), v["w"], stride=2)),
    Case("conv-dilation", "Conv", {"x": rand(1, 2, 8, 8), "w": rand(3, 2, 3, 3)},
         {"pads": [2, 2, 2, 2], "dilations": [2, 2]},
         lambda T, F, v: F.conv2d(v["x"], v["w"], padding=2, dilation=2)),
    Case("conv-dilation-stride", "Conv", {"x": rand(1, 2, 9, 8), "w": rand(3, 2, 2, 3)},
         {"pads": [1, 0, 1, 2], "dilations": [2, 1], "strides": [2, 3]},
         lambda T, F, v: F.conv2d(pad2d(F, v["x"], (1, 0, 1, 2)), v["w"], stride=(2, 3),
                                  dilation=(2, 1))),
    # strided im2col (a one-hot Conv) with a dilation and an input that does not divide by
    # the stride
    Case("conv-stride3-dilation", "Conv", {"x": own(1, 2, 3, 11, 10), "w": own(2, 4, 3, 3, 2)},
         {"pads": [2, 1, 0, 2], "dilations": [2, 2], "strides": [3, 3]},
         lambda T, F, v: F.conv2d(pad2d(F, v["x"], (2, 1, 0, 2)), v["w"], stride=3,
                                  dilation=2)),
    Case("conv-depthwise-s2", "Conv", {"x": own(3, 2, 4, 7, 8), "w": own(4, 4, 1, 3, 3)},
         {"pads": [1, 1, 1, 1], "group": 4, "strides": [2, 2]},
         lambda T, F, v: F.conv2d(v["x"], v["w"], stride=2, padding=1, groups=4)),
    Case("conv-depthwise-s2-dilation-unused-edge", "Conv",  # the last input row is unused
         {"x": own(5, 2, 3, 10, 9), "w": own(6, 3, 1, 3, 3), "b": own(7, 3)},
         {"strides": [2, 2], "dilations": [1, 2], "group": 3},
         lambda T, F, v: F.conv2d(v["x"], v["w"], v["b"], stride=2, dilation=(1, 2),
                                  groups=3)),
    Case("conv-groups", "Conv", {"x": rand(2, 4, 5, 5), "w": rand(6, 2, 3, 3), "b": rand(6)},
         {"pads": [1, 1, 1, 1], "strides": [2, 2], "group": 2},
         lambda T, F, v: F.conv2d(v["x"], v["w"], v["b"], stride=2, padding=1, groups=2)),
    Case("conv-depthwise", "Conv", {"x": rand(2, 4, 6, 6), "w": rand(4, 1, 3, 3), "b": rand(4)},
         {"pads": [1, 1, 1, 1], "group": 4},
         lambda T, F, v: F.conv2d(v["x"], v["w"], v["b"], padding=1, groups=4)),
    Case("conv-depthwise-multiplier-s2", "Conv", {"x": rand(2, 4, 7, 7), "w": rand(8, 1, 3, 3)},
         {"pads": [1, 1, 1, 1], "group": 4, "strides": [2, 2]},
         lambda T, F, v: F.conv2d(v["x"], v["w"], stride=2, padding=1, groups=4)),
    Case("conv-1x1", "Conv", {"x": rand(2, 3, 4, 4), "w": rand(5, 3, 1, 1)}, {},
         lambda T, F, v: F.conv2d(v["x"], v["w"])),
    Case("conv-1x1-padded", "Conv", {"x": own(8, 2, 3, 4, 5), "w": own(9, 5, 3, 1, 1)},
         {"pads": [1, 0, 1, 2]}, lambda T, F, v: F.conv2d(pad2d(F, v["x"], (1, 0, 1, 2)), v["w"])),
    Case("conv-large-map", "Conv",  # >= 1,024 output positions: dW per image
         {"x": own(10, 2, 2, 32, 33), "w": own(11, 3, 2, 3, 3), "b": own(12, 3)},
         {"pads": [1, 1, 1, 1]}, lambda T, F, v: F.conv2d(v["x"], v["w"], v["b"], padding=1)),
    Case("conv-strided-per-image", "Conv",  # im2col, then a MatMul per image (>= 256)
         {"x": own(13, 2, 3, 33, 34), "w": own(14, 4, 3, 3, 3)},
         {"pads": [1, 1, 1, 1], "strides": [2, 2]},
         lambda T, F, v: F.conv2d(v["x"], v["w"], stride=2, padding=1)),
    Case("conv-1x1-groups", "Conv", {"x": own(15, 2, 4, 3, 5), "w": own(16, 6, 2, 1, 1)},
         {"group": 2}, lambda T, F, v: F.conv2d(v["x"], v["w"], groups=2)),
    # stride 1 with taps sliced batch-innermost: grouped, and 1-D
    Case("conv-groups-s1", "Conv", {"x": own(17, 2, 4, 5, 6), "w": own(18, 6, 2, 3, 3)},
         {"pads": [1, 1, 1, 1], "group": 2},
         lambda T, F, v: F.conv2d(v["x"], v["w"], padding=1, groups=2)),
    Case("conv-1d-s1", "Conv", {"x": own(19, 2, 3, 9), "w": own(20, 4, 3, 3)},
         {"pads": [2, 0], "dilations": [2]},
         lambda T, F, v: F.conv1d(F.pad(v["x"], (2, 0)), v["w"], dilation=2)),
    Case("conv-1d", "Conv", {"x": rand(2, 3, 9), "w": rand(4, 3, 3), "b": rand(4)},
         {"pads": [1, 1], "strides": [2]},
         lambda T, F, v: F.conv1d(v["x"], v["w"], v["b"], stride=2, padding=1)),
    Case("conv-same-upper", "Conv", {"x": rand(1, 2, 6, 6), "w": rand(3, 2, 3, 3)},
         {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
         lambda T, F, v: F.conv2d(pad2d(F, v["x"], (0, 0, 1, 1)), v["w"], stride=2)),
    # ---------------------------------------------------------------- Gemm / MatMul
    Case("gemm", "Gemm", {"a": rand(3, 4), "b": rand(4, 5), "c": rand(5)}, {},
         lambda T, F, v: v["a"] @ v["b"] + v["c"]),
    Case("gemm-transA-alpha", "Gemm", {"a": rand(4, 3), "b": rand(4, 5), "c": rand(3, 5)},
         {"transA": 1, "alpha": 0.5}, lambda T, F, v: 0.5 * v["a"].T @ v["b"] + v["c"]),
    Case("gemm-transB-beta", "Gemm", {"a": rand(3, 4), "b": rand(5, 4), "c": rand(1, 5)},
         {"transB": 1, "beta": 2.0}, lambda T, F, v: v["a"] @ v["b"].T + 2.0 * v["c"]),
    Case("gemm-both-trans", "Gemm", {"a": rand(4, 3), "b": rand(5, 4), "c": rand(3, 1)},
         {"transA": 1, "transB": 1, "alpha": 1.5, "beta": 0.5},
         lambda T, F, v: 1.5 * v["a"].T @ v["b"].T + 0.5 * v["c"]),
    Case("gemm-no-c", "Gemm", {"a": rand(3, 4), "b": rand(4, 2)}, {},
         lambda T, F, v: v["a"] @ v["b"]),
    Case("matmul-batched", "MatMul", {"a": rand(2, 3, 4), "b": rand(4, 5)}, {},
         lambda T, F, v: v["a"] @ v["b"]),
    Case("matmul-broadcast", "MatMul", {"a": rand(2, 1, 3, 4), "b": rand(3, 4, 2)}, {},
         lambda T, F, v: v["a"] @ v["b"]),
    Case("matmul-vec-left", "MatMul", {"a": rand(4), "b": rand(2, 4, 3)}, {},
         lambda T, F, v: v["a"] @ v["b"]),
    Case("matmul-vec-right", "MatMul", {"a": rand(2, 3, 4), "b": rand(4)}, {},
         lambda T, F, v: v["a"] @ v["b"]),
    Case("matmul-dot", "MatMul", {"a": rand(4), "b": rand(4)}, {},
         lambda T, F, v: v["a"] @ v["b"]),
    # ---------------------------------------------------------------- broadcasting arithmetic
    Case("add-broadcast", "Add", {"a": rand(2, 3, 4), "b": rand(3, 1)}, {},
         lambda T, F, v: v["a"] + v["b"]),
    Case("sub-both-broadcast", "Sub", {"a": rand(2, 1, 4), "b": rand(2, 3, 1)}, {},
         lambda T, F, v: v["a"] - v["b"]),
    Case("mul-broadcast", "Mul", {"a": rand(2, 3, 4), "b": rand(4)}, {},
         lambda T, F, v: v["a"] * v["b"]),
    Case("div-broadcast", "Div", {"a": rand(2, 3, 4), "b": rand(1, 3, 1, low=0.5)}, {},
         lambda T, F, v: v["a"] / v["b"]),
    Case("neg", "Neg", {"x": rand(2, 3)}, {}, lambda T, F, v: -v["x"]),
    Case("exp", "Exp", {"x": rand(2, 3)}, {}, lambda T, F, v: T.exp(v["x"])),
    Case("log", "Log", {"x": np.abs(rand(2, 3, low=0.5))}, {}, lambda T, F, v: T.log(v["x"])),
    # ---------------------------------------------------------------- activations
    Case("relu", "Relu", {"x": rand(3, 4, 5)}, {}, lambda T, F, v: F.relu(v["x"])),
    Case("clip", "Clip", {"x": rand(3, 4, 5), "lo": np.array(-0.5), "hi": np.array(0.7)}, {},
         lambda T, F, v: T.clamp(v["x"], -0.5, 0.7), trainables=["x"]),
    Case("clip-max-only", "Clip", {"x": rand(3, 4, 5), "lo": None, "hi": np.array(6.0 / 4)}, {},
         lambda T, F, v: T.clamp(v["x"], max=1.5), trainables=["x"]),
    Case("sigmoid", "Sigmoid", {"x": rand(3, 4)}, {}, lambda T, F, v: T.sigmoid(v["x"])),
    # Float attributes are float32 in ONNX: the cases use values float32 holds exactly.
    Case("hardsigmoid", "HardSigmoid", {"x": 3 * rand(3, 4, 5)}, {"alpha": 0.25, "beta": 0.375},
         lambda T, F, v: T.clamp(0.25 * v["x"] + 0.375, 0, 1)),
    # onnx.reference evaluates HardSwish's 1/6 in float32.
    Case("hardswish", "HardSwish", {"x": 3 * rand(3, 4, 5)}, {},
         lambda T, F, v: F.hardswish(v["x"]), torch_rtol=1e-6),
    Case("leakyrelu", "LeakyRelu", {"x": rand(3, 4, 5)}, {"alpha": 0.125},
         lambda T, F, v: F.leaky_relu(v["x"], 0.125)),
    Case("tanh", "Tanh", {"x": rand(3, 4)}, {}, lambda T, F, v: T.tanh(v["x"])),
    # ---------------------------------------------------------------- normalization, pools
    Case("batchnorm", "BatchNormalization",
         {"x": rand(2, 3, 4, 4), "s": rand(3), "b": rand(3), "m": rand(3),
          "v": np.abs(rand(3, low=0.5))},
         {"epsilon": 2.0**-10},
         lambda T, F, v: F.batch_norm(v["x"], v["m"], v["v"], v["s"], v["b"], False, 0.0,
                                      2.0**-10),
         trainables=["x", "s", "b"]),
    Case("batchnorm-2d", "BatchNormalization",
         {"x": rand(4, 3), "s": rand(3), "b": rand(3), "m": rand(3),
          "v": np.abs(rand(3, low=0.5))}, {"epsilon": 2.0**-16},
         lambda T, F, v: F.batch_norm(v["x"], v["m"], v["v"], v["s"], v["b"], False, 0.0,
                                      2.0**-16),
         trainables=["x", "s", "b"]),
    Case("globalaveragepool", "GlobalAveragePool", {"x": rand(2, 3, 4, 5)}, {},
         lambda T, F, v: v["x"].mean(dim=(2, 3), keepdim=True)),
    Case("averagepool-pad-exclude", "AveragePool", {"x": rand(2, 3, 7, 7)},
         {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
         lambda T, F, v: F.avg_pool2d(v["x"], 3, 2, 1, count_include_pad=False)),
    Case("averagepool-pad-include", "AveragePool", {"x": rand(2, 3, 6, 6)},
         {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
          "count_include_pad": 1},
         lambda T, F, v: F.avg_pool2d(v["x"], 3, 2, 1, count_include_pad=True)),
    Case("averagepool-2x2", "AveragePool", {"x": rand(2, 3, 6, 6)},
         {"kernel_shape": [2, 2], "strides": [2, 2]}, lambda T, F, v: F.avg_pool2d(v["x"], 2)),
    Case("maxpool-3x3-s2", "MaxPool", {"x": rand(2, 3, 7, 7)},
         {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
         lambda T, F, v: F.max_pool2d(v["x"], 3, 2, 1)),
    Case("maxpool-2x2", "MaxPool", {"x": rand(2, 3, 6, 6)},
         {"kernel_shape": [2, 2], "strides": [2, 2]}, lambda T, F, v: F.max_pool2d(v["x"], 2)),
    # ---------------------------------------------------------------- data movement
    Case("flatten", "Flatten", {"x": rand(2, 3, 4)}, {"axis": 1},
         lambda T, F, v: v["x"].reshape(2, 12)),
    Case("reshape", "Reshape", {"x": rand(2, 3, 4), "s": ints(4, -1)}, {},
         lambda T, F, v: v["x"].reshape(4, 6)),
    Case("squeeze", "Squeeze", {"x": rand(2, 1, 3), "a": ints(1)}, {},
         lambda T, F, v: v["x"].squeeze(1)),
    Case("unsqueeze", "Unsqueeze", {"x": rand(2, 3), "a": ints(0, 3)}, {},
         lambda T, F, v: v["x"][None, :, :, None]),
    Case("transpose", "Transpose", {"x": rand(2, 3, 4)}, {"perm": [2, 0, 1]},
         lambda T, F, v: v["x"].permute(2, 0, 1)),
    Case("identity", "Identity", {"x": rand(2, 3)}, {}, lambda T, F, v: v["x"]),
    Case("concat", "Concat", {"a": rand(2, 1, 3), "b": rand(2, 4, 3), "c": rand(2, 2, 3)},
         {"axis": 1}, lambda T, F, v: T.cat([v["a"], v["b"], v["c"]], 1)),
    Case("split", "Split", {"x": rand(2, 5, 3), "s": ints(2, 3)}, {"axis": 1},
         lambda T, F, v: T.split(v["x"], [2, 3], 1), outputs=2),
    Case("split-one-used", "Split", {"x": rand(2, 6)}, {"axis": 1, "num_outputs": 3},
         lambda T, F, v: T.split(v["x"], 2, 1)[1], outputs=3, losses_on=[1]),
    Case("slice", "Slice",
         {"x": rand(3, 5, 6), "st": ints(1, 0), "en": ints(3, -1), "ax": ints(1, 2)}, {},
         lambda T, F, v: v["x"][:, 1:3, 0:-1]),
    Case("slice-steps", "Slice",
         {"x": rand(3, 5, 6), "st": ints(0, -1), "en": ints(5, -100), "ax": ints(1, 2),
          "sp": ints(2, -2)}, {},
         lambda T, F, v: T.flip(v["x"], [2])[:, 0:5:2, 0::2]),
    # ---------------------------------------------------------------- softmax, reductions
    Case("softmax", "Softmax", {"x": rand(2, 3, 4)}, {"axis": -1},
         lambda T, F, v: T.softmax(v["x"], -1)),
    Case("softmax-axis1", "Softmax", {"x": rand(2, 3, 4)}, {"axis": 1},
         lambda T, F, v: T.softmax(v["x"], 1)),
    Case("logsoftmax", "LogSoftmax", {"x": rand(2, 5)}, {},
         lambda T, F, v: T.log_softmax(v["x"], -1)),
    Case("reducesum", "ReduceSum", {"x": rand(2, 3, 4), "a": ints(1)}, {"keepdims": 0},
         lambda T, F, v: v["x"].sum(1)),
    Case("reducesum-all", "ReduceSum", {"x": rand(2, 3, 4)}, {},
         lambda T, F, v: v["x"].sum().reshape(1, 1, 1)),
    Case("reducemean", "ReduceMean", {"x": rand(2, 3, 4), "a": ints(0, -1)}, {},
         lambda T, F, v: v["x"].mean((0, 2), keepdim=True)),
    Case("reducemean-opset13", "ReduceMean", {"x": rand(2, 3, 4)}, {"axes": [1], "keepdims": 0},
         lambda T, F, v: v["x"].mean(1), opset=13),
]  # fmt: skip


def _setup(case: Case, dtype: type = np.float64):
    model = op_model(case.op, case.inputs, case.attrs, outputs=case.outputs,
                     opset=case.opset, dtype=dtype)  # fmt: skip
    outs = [f"y{i}" for i in range(case.outputs)] if case.outputs > 1 else ["y"]
    chosen = [outs[i] for i in case.losses_on] if case.losses_on is not None else outs
    losses = [Loss.mse(o) for o in chosen]
    trainables = case.trainables or [
        k for k, v in case.inputs.items() if v is not None and np.asarray(v).dtype.kind == "f"
    ]
    graph = build_training_graph(model, losses, trainables=trainables)
    return graph, chosen


def _targets(graph, seed: int = 7) -> dict[str, np.ndarray]:
    """Random MSE targets, shaped as the loss inputs declare (static in these cases)."""
    rng = np.random.default_rng(seed)
    targets = {}
    for inp in graph.proto.graph.input:
        if inp.name in graph.loss_inputs:
            dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            targets[inp.name] = rng.standard_normal(dims)
    return targets


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_gradient_matches_finite_differences(case: Case):
    graph, chosen = _setup(case)
    feeds = _targets(graph)
    pairs = directional_fd(Reference(graph), feeds, graph.initial)
    assert_fd_agrees(pairs, rtol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_gradient_matches_torch(case: Case):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    graph, chosen = _setup(case)
    feeds = _targets(graph)
    loss, grads = Reference(graph).run(feeds, graph.initial)
    tensors = {
        k: torch.tensor(np.asarray(v, dtype=np.float64), requires_grad=k in graph.initial)
        for k, v in case.inputs.items()
        if v is not None and np.asarray(v).dtype.kind == "f"
    }
    outs = case.torch(torch, F, tensors)
    outs = list(outs) if isinstance(outs, tuple | list) else [outs]
    total = 0
    for name, out in zip(chosen, outs, strict=True):
        target = torch.tensor(feeds[f"{name}.target"])
        total = total + ((out - target) ** 2).mean()
    total.backward()
    assert loss == pytest.approx(float(total.detach()), rel=case.torch_rtol)
    for name in graph.trainables:
        expected = tensors[name].grad.numpy()
        np.testing.assert_allclose(grads[name], expected, rtol=case.torch_rtol, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_onnxruntime_float32_matches_float64(case: Case):
    graph64, chosen = _setup(case)
    feeds = _targets(graph64)
    loss64, grads64 = Reference(graph64).run(feeds, graph64.initial)
    graph32, _ = _setup(case, np.float32)
    feeds32 = {k: v.astype(np.float32) for k, v in feeds.items()}
    loss32, grads32 = ort_gradients(graph32, feeds32, graph32.initial)
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    for name in graph64.trainables:
        assert grads32[name].dtype == np.float32
        assert_close_scaled(grads32[name], grads64[name], rtol=2e-5)

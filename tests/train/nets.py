"""Small networks for the whole-model gradient checks and training tests, built with
onnx.helper in float32 or float64 (ONNX Runtime has no float64 Conv, so float64 models are
evaluated with onnx.reference)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt.model import Model
from tests.train.gradcheck import model_from_proto


class Net:
    def __init__(self, seed: int = 0, dtype: type = np.float64) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, array: np.ndarray, base: str = "c", *, exact: bool = False) -> str:
        name = base if exact else self.name(base)
        array = np.asarray(array)
        if array.dtype.kind == "f":
            array = array.astype(self.dtype)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, shape: Sequence[int], base: str = "w", *, exact: bool = False) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        array = self.rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
        return self.const(array, base, exact=exact)

    def op(self, op_type: str, inputs: Sequence[str], **attrs: object) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, *, stride: int = 1,
             group: int = 1, bias: bool = False) -> str:  # fmt: skip
        inputs = [x, self.weight([cout, cin // group, k, k])]
        if bias:
            inputs.append(self.const(self.rng.standard_normal(cout) * 0.1, "b"))
        return self.op("Conv", inputs, pads=[k // 2] * 4, strides=[stride] * 2, group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [r.uniform(0.5, 1.5, c), r.standard_normal(c) * 0.1,
                  r.standard_normal(c) * 0.1, r.uniform(0.5, 1.5, c)]  # fmt: skip
        return self.op("BatchNormalization", [x, *(self.const(p, "bn") for p in params)])

    def model(self, inputs: dict[str, list], outputs: list[str]) -> Model:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))
        graph = helper.make_graph(
            self.nodes, "net",
            [helper.make_tensor_value_info(k, elem, v) for k, v in inputs.items()],
            [helper.make_tensor_value_info(o, elem, None) for o in outputs],
            self.inits,
        )  # fmt: skip
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        proto.ir_version = 9
        proto = onnx.shape_inference.infer_shapes(proto)
        onnx.checker.check_model(proto, full_check=True)
        return model_from_proto(proto)


def resnet_like(dtype: type = np.float64, batch: int | str = 2, seed: int = 0) -> Model:
    """conv+BN+relu stem, max pool, a basic block and a strided block with a projection
    shortcut (residual adds), global average pool, Flatten, Gemm: 10 logits."""
    n = Net(seed, dtype)
    x = n.op("Relu", [n.bn(n.conv("x", 3, 8), 8)])
    x = n.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    y = n.op("Relu", [n.bn(n.conv(x, 8, 8), 8)])
    y = n.bn(n.conv(y, 8, 8), 8)
    x = n.op("Relu", [n.op("Add", [x, y])])
    y = n.op("Relu", [n.bn(n.conv(x, 8, 16, stride=2), 16)])
    y = n.bn(n.conv(y, 16, 16), 16)
    shortcut = n.bn(n.conv(x, 8, 16, k=1, stride=2), 16)
    x = n.op("Relu", [n.op("Add", [y, shortcut])])
    x = n.op("Flatten", [n.op("GlobalAveragePool", [x])], axis=1)
    n.op("Gemm", [x, n.weight([10, 16]), n.const(np.zeros(10), "fc_b")], transB=1)
    n.nodes[-1].output[0] = "logits"
    return n.model({"x": [batch, 3, 12, 12]}, ["logits"])


def mobilenet_like(dtype: type = np.float64, batch: int | str = 2, seed: int = 1) -> Model:
    """conv+BN+hardswish stem at stride 2, an inverted residual block (1x1 expand, depthwise
    3x3, squeeze-excitation with Relu and HardSigmoid, 1x1 project, residual add), a strided
    depthwise block with Relu6 (Clip), average pool, Flatten, Gemm."""
    n = Net(seed, dtype)
    x = n.op("HardSwish", [n.bn(n.conv("x", 3, 8, stride=2), 8)])
    y = n.op("HardSwish", [n.bn(n.conv(x, 8, 16, k=1), 16)])
    y = n.op("HardSwish", [n.bn(n.conv(y, 16, 16, group=16), 16)])
    s = n.op("GlobalAveragePool", [y])
    s = n.op("Relu", [n.conv(s, 16, 4, k=1, bias=True)])
    s = n.op("HardSigmoid", [n.conv(s, 4, 16, k=1, bias=True)], alpha=1.0 / 6, beta=0.5)
    y = n.op("Mul", [y, s])
    y = n.bn(n.conv(y, 16, 8, k=1), 8)
    x = n.op("Add", [x, y])
    lo, hi = n.const(np.array(0.0), "lo"), n.const(np.array(6.0), "hi")
    x = n.op("Clip", [n.bn(n.conv(x, 8, 8, group=8, stride=2), 8), lo, hi])
    x = n.op("AveragePool", [x], kernel_shape=[3, 3], strides=[1, 1])
    x = n.op("Flatten", [x], axis=1)
    n.op("Gemm", [x, n.weight([8, 5]), n.const(np.zeros(5), "fc_b")])
    n.nodes[-1].output[0] = "logits"
    return n.model({"x": [batch, 3, 12, 12]}, ["logits"])


def conv_bias_bn(dtype: type = np.float64, batch: int | str = 2, seed: int = 2) -> Model:
    """Convs with a bias before a BatchNormalization (a dense 3x3, a strided depthwise 3x3, a
    1x1), the first one's output also read by a residual Add, global average pool, Gemm."""
    n = Net(seed, dtype)
    a = n.bn(n.conv("x", 3, 8, bias=True), 8)
    x = n.op("Relu", [a])
    x = n.op("Relu", [n.bn(n.conv(x, 8, 8, group=8, stride=2, bias=True), 8)])
    x = n.bn(n.conv(x, 8, 8, k=1, bias=True), 8)
    x = n.op("Add", [x, n.op("MaxPool", [a], kernel_shape=[2, 2], strides=[2, 2])])
    x = n.op("Flatten", [n.op("GlobalAveragePool", [x])], axis=1)
    n.op("Gemm", [x, n.weight([4, 8]), n.const(np.zeros(4), "fc_b")], transB=1)
    n.nodes[-1].output[0] = "logits"
    return n.model({"x": [batch, 3, 12, 12]}, ["logits"])


def mlp(dtype: type = np.float32, seed: int = 0, hidden: int = 16, classes: int = 3) -> Model:
    """Gemm + Relu + Gemm on 4 features (weights w1, b1, w2, b2), batch dynamic."""
    n = Net(seed, dtype)
    w1, b1 = n.weight([4, hidden], "w1", exact=True), n.const(np.zeros(hidden), "b1", exact=True)
    h = n.op("Relu", [n.op("Gemm", ["x", w1, b1])])
    w2, b2 = (
        n.weight([hidden, classes], "w2", exact=True),
        n.const(np.zeros(classes), "b2", exact=True),
    )
    n.op("Gemm", [h, w2, b2])
    n.nodes[-1].output[0] = "logits"
    return n.model({"x": ["N", 4]}, ["logits"])

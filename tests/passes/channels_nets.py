"""Small networks for the channels tests, built with onnx.helper: one per architecture
pattern channel removal must get exactly right (residual adds, bottlenecks, grouped and
depthwise convolutions, squeeze-excitation, dense concats, split/resize necks, flatten
heads, transformer FFN and attention heads)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Net:
    """Appends nodes and seeded weights; `model()` checks and returns the ModelProto."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, array: np.ndarray, base: str = "c") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, shape: Sequence[int], base: str = "w") -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = 1.0 / np.sqrt(max(fan_in, 1))
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32), base)

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs: object):
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0], **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, stride: int = 1,
             bias: bool = True) -> str:  # fmt: skip
        inputs = [x, self.weight([cout, cin // group, k, k])]
        if bias:
            inputs.append(
                self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "b")
            )
        return self.op("Conv", inputs, pads=[k // 2] * 4, group=group, strides=[stride] * 2)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [
            r.uniform(0.5, 1.5, c), r.standard_normal(c) * 0.1, r.standard_normal(c) * 0.1,
            r.uniform(0.5, 1.5, c),
        ]  # fmt: skip
        names = [self.const(p.astype(np.float32), "bn") for p in params]
        return self.op("BatchNormalization", [x, *names])

    def cbr(self, x: str, cin: int, cout: int, k: int = 3, **kw: object) -> str:
        return self.op("Relu", [self.bn(self.conv(x, cin, cout, k, **kw), cout)])

    def model(
        self, inputs: dict[str, list], outputs: list[str], opset: int = 17
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "net",
            [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 9
        model = onnx.shape_inference.infer_shapes(model)  # fills in the output shapes
        onnx.checker.check_model(model, full_check=True)
        return model


def resnet_basic() -> onnx.ModelProto:
    """stem -> [conv-bn-relu -> conv-bn] + identity -> relu -> head conv."""
    n = Net(1)
    s = n.cbr("x", 3, 16)
    h = n.cbr(s, 16, 24)
    h = n.bn(n.conv(h, 24, 16), 16)
    r = n.op("Relu", [n.op("Add", [h, s])])
    return n.model({"x": ["N", 3, 8, 8]}, [n.conv(r, 16, 8)])


def bottleneck() -> onnx.ModelProto:
    """1x1 reduce -> 3x3 stride 2 -> 1x1 expand, plus a strided 1x1 projection shortcut."""
    n = Net(2)
    s = n.cbr("x", 3, 16)
    h = n.cbr(s, 16, 8, k=1)
    h = n.cbr(h, 8, 8, stride=2)
    h = n.bn(n.conv(h, 8, 32, k=1), 32)
    p = n.bn(n.conv(s, 16, 32, k=1, stride=2), 32)
    r = n.op("Relu", [n.op("Add", [h, p])])
    return n.model({"x": ["N", 3, 8, 8]}, [n.conv(r, 32, 8, k=1)])


def grouped() -> onnx.ModelProto:
    """ResNeXt-style: 1x1 -> grouped 3x3 (4 groups) -> 1x1."""
    n = Net(3)
    h = n.cbr("x", 3, 32, k=1)
    h = n.cbr(h, 32, 32, group=4)
    return n.model({"x": ["N", 3, 8, 8]}, [n.conv(h, 32, 8, k=1)])


def mobilenet_se() -> onnx.ModelProto:
    """Inverted residual with a depthwise 3x3, SE (GAP -> 1x1 -> Relu -> 1x1 -> HardSigmoid,
    Mul) and Clip (ReLU6); then a depthwise conv with channel multiplier 2."""
    n = Net(4)
    s = n.bn(n.conv("x", 3, 8), 8)
    e = n.op(
        "Clip", [n.bn(n.conv(s, 8, 24, k=1), 24), n.const(np.float32(0)), n.const(np.float32(6))]
    )
    d = n.op(
        "Clip",
        [n.bn(n.conv(e, 24, 24, group=24), 24), n.const(np.float32(0)), n.const(np.float32(6))],
    )
    g = n.op("GlobalAveragePool", [d])
    g = n.op("Relu", [n.conv(g, 24, 8, k=1)])
    g = n.op("HardSigmoid", [n.conv(g, 8, 24, k=1)], alpha=1 / 6, beta=0.5)
    m = n.op("Mul", [d, g])
    p = n.bn(n.conv(m, 24, 8, k=1), 8)
    r = n.op("Add", [p, s])
    dm = n.op("Relu", [n.bn(n.conv(r, 8, 16, group=8), 16)])
    return n.model({"x": ["N", 3, 8, 8]}, [n.conv(dm, 16, 8, k=1)])


def densenet() -> onnx.ModelProto:
    """Dense block: every layer reads the Concat of all earlier outputs."""
    n = Net(5)
    s = n.cbr("x", 3, 8)
    a = n.cbr(s, 8, 8)
    c1 = n.op("Concat", [s, a], axis=1)
    b = n.cbr(c1, 16, 8)
    c2 = n.op("Concat", [s, a, b], axis=1)
    return n.model({"x": ["N", 3, 8, 8]}, [n.conv(c2, 24, 8, k=1)])


def yolo_neck() -> onnx.ModelProto:
    """Split in two, one half through a conv and a 2x Resize (scales), the other through a
    Resize with explicit sizes; Concat; a channel Slice; a conv."""
    n = Net(6)
    p = n.cbr("x", 3, 16)
    a, b = n.op("Split", [p, n.const(np.array([8, 8], np.int64))], n_out=2, axis=1)
    b = n.cbr(b, 8, 8)
    roi = n.const(np.zeros(0, np.float32))
    up_b = n.op("Resize", [b, roi, n.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    up_a = n.op("Resize", [a, roi, "", n.const(np.array([2, 8, 16, 16], np.int64))], mode="nearest")
    cat = n.op("Concat", [up_a, up_b], axis=1)
    q = n.cbr(cat, 16, 16)
    sl = n.op("Slice", [q, n.const(np.array([4], np.int64)), n.const(np.array([16], np.int64)),
                        n.const(np.array([1], np.int64))])  # fmt: skip
    return n.model({"x": [2, 3, 8, 8]}, [n.conv(sl, 12, 8, k=1)])


def flatten_head() -> onnx.ModelProto:
    """conv-bn-relu -> MaxPool -> Flatten -> Gemm(transB); and a second head through
    Reshape [0, -1] -> MatMul."""
    n = Net(7)
    h = n.cbr("x", 3, 16)
    h = n.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    f = n.op("Flatten", [h], axis=1)
    y1 = n.op("Gemm", [f, n.weight([10, 16 * 16]), n.const(np.zeros(10, np.float32))], transB=1)
    h2 = n.cbr("x", 3, 8)
    r = n.op("Reshape", [h2, n.const(np.array([0, -1], np.int64))])
    y2 = n.op("MatMul", [r, n.weight([8 * 64, 6])])
    return n.model({"x": ["N", 3, 8, 8]}, [y1, y2])


def ffn() -> onnx.ModelProto:
    """x -> LayerNorm -> MatMul+bias -> Relu -> MatMul+bias -> + x."""
    n = Net(8)
    ln = n.op("LayerNormalization", ["x", n.const(np.ones(16, np.float32)),
                                      n.const(np.zeros(16, np.float32))], axis=-1)  # fmt: skip
    h = n.op("Add", [n.op("MatMul", [ln, n.weight([16, 64])]), n.weight([64])])
    h = n.op("Relu", [h])
    h = n.op("Add", [n.op("MatMul", [h, n.weight([64, 16])]), n.weight([16])])
    return n.model({"x": ["N", 5, 16]}, [n.op("Add", [h, "x"])])

"""Element-wise ops: broadcasting arithmetic and activations."""

from __future__ import annotations

import onnx

from graphopt.train.graph import Emitter, attributes
from graphopt.train.rules import rule

Grads = list[str | None]


def _binary(
    em: Emitter, node: onnx.NodeProto, dy: str, needed: list[bool], da: str | None, db: str | None
) -> Grads:
    y_shape = em.shape(node.output[0])
    out: Grads = [None, None]
    for i, grad in enumerate((da, db)):
        if needed[i] and grad is not None:
            out[i] = em.unbroadcast(grad, y_shape, node.input[i])
    return out


@rule("Add")
def _add(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    (dy,) = dys
    return _binary(em, node, dy, needed, dy, dy)


@rule("Sub")
def _sub(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    (dy,) = dys
    return _binary(em, node, dy, needed, dy, em.op("Neg", [dy]) if needed[1] else None)


@rule("Mul")
def _mul(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    (dy,) = dys
    a, b = node.input
    da = em.op("Mul", [dy, b]) if needed[0] else None
    db = em.op("Mul", [dy, a]) if needed[1] else None
    return _binary(em, node, dy, needed, da, db)


@rule("Div")
def _div(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    (dy,) = dys
    _, b = node.input
    y = node.output[0]
    da = em.op("Div", [dy, b]) if needed[0] else None
    # d(a/b)/db = -a/b² = -y/b
    db = em.op("Neg", [em.op("Div", [em.op("Mul", [dy, y]), b])]) if needed[1] else None
    return _binary(em, node, dy, needed, da, db)


@rule("Sum")
def _sum(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    (dy,) = dys
    y_shape = em.shape(node.output[0])
    return [
        em.unbroadcast(dy, y_shape, x) if need else None
        for x, need in zip(node.input, needed, strict=True)
    ]


@rule("Neg")
def _neg(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    return [em.op("Neg", [dys[0]])]


@rule("Exp")
def _exp(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    return [em.op("Mul", [dys[0], node.output[0]])]


@rule("Log")
def _log(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    return [em.op("Div", [dys[0], node.input[0]])]


@rule("Identity")
def _identity(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    return [dys[0]]


@rule("Relu")
def _relu(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    # A multiply by a 0/1 mask: about 8x faster in ORT than Where.
    positive = em.op("Greater", [node.output[0], em.const(0.0)])
    return [em.op("Mul", [dys[0], em.mask(positive)])]


@rule("Clip", inputs=(0,))
def _clip(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    # Inclusive bounds, as PyTorch's clamp: the gradient passes where min <= x <= max.
    x = node.input[0]
    bounds = list(node.input[1:]) + ["", ""]
    low, high = bounds[0], bounds[1]
    conds = []
    if low:
        conds.append(em.op("Not", [em.op("Less", [x, low])]))
    if high:
        conds.append(em.op("Not", [em.op("Greater", [x, high])]))
    if not conds:
        return [dys[0]]
    cond = conds[0] if len(conds) == 1 else em.op("And", conds)
    return [em.op("Mul", [dys[0], em.mask(cond)])]


@rule("Sigmoid")
def _sigmoid(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    y = node.output[0]
    slope = em.op("Mul", [y, em.op("Sub", [em.const(1.0), y])])
    return [em.op("Mul", [dys[0], slope])]


@rule("Tanh")
def _tanh(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    y = node.output[0]
    slope = em.op("Sub", [em.const(1.0), em.op("Mul", [y, y])])
    return [em.op("Mul", [dys[0], slope])]


def _hard_sigmoid_mask(em: Emitter, x: str, alpha: float, beta: float) -> str:
    """1 where 0 < alpha*x + beta < 1 (the linear part), else 0."""
    v = em.op("Add", [em.op("Mul", [x, em.const(alpha)]), em.const(beta)])
    inside = em.op("And", [em.op("Greater", [v, em.const(0.0)]), em.op("Less", [v, em.const(1.0)])])
    return em.mask(inside)


@rule("HardSigmoid")
def _hard_sigmoid(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    attrs = attributes(node)
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    mask = _hard_sigmoid_mask(em, node.input[0], alpha, beta)
    return [em.op("Mul", [dys[0], em.op("Mul", [mask, em.const(alpha)])])]


@rule("HardSwish")
def _hard_swish(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    # y = x * hs(x), hs = HardSigmoid(alpha=1/6, beta=0.5): dy/dx = hs(x) + x * alpha * mask
    x = node.input[0]
    alpha = 1.0 / 6.0
    hs = em.op("HardSigmoid", [x], alpha=alpha, beta=0.5)
    mask = _hard_sigmoid_mask(em, x, alpha, 0.5)
    slope = em.op("Add", [hs, em.op("Mul", [em.op("Mul", [x, em.const(alpha)]), mask])])
    return [em.op("Mul", [dys[0], slope])]


@rule("LeakyRelu")
def _leaky_relu(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    alpha = float(attributes(node).get("alpha", 0.01))
    positive = em.mask(em.op("Greater", [node.input[0], em.const(0.0)]))
    slope = em.op("Add", [em.op("Mul", [positive, em.const(1.0 - alpha)]), em.const(alpha)])
    return [em.op("Mul", [dys[0], slope])]

"""Element-wise math: powers and roots, Erf and Gelu, Abs, Max/Min, Where, Cast."""

from __future__ import annotations

import math

import numpy as np
import onnx

from graphopt.train.graph import FLOAT_TYPES, Emitter, attributes
from graphopt.train.rules import rule

Grads = list[str | None]


@rule("Sqrt")
def _sqrt(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    # d sqrt(x) = 0.5 / sqrt(x)
    return [em.op("Div", [em.op("Mul", [dys[0], em.const(0.5)]), node.output[0]])]


@rule("Reciprocal")
def _reciprocal(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    # d (1/x) = -1/x² = -y²
    y = node.output[0]
    return [em.op("Neg", [em.op("Mul", [dys[0], em.op("Mul", [y, y])])])]


@rule("Abs")
def _abs(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    # Sign(0) = 0: no gradient at the kink, as PyTorch.
    return [em.op("Mul", [dys[0], em.op("Sign", [node.input[0]])])]


@rule("Erf")
def _erf(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    # d erf(x) = 2/sqrt(pi) * exp(-x²)
    x = node.input[0]
    bell = em.op("Exp", [em.op("Neg", [em.op("Mul", [x, x])])])
    return [em.op("Mul", [dys[0], em.op("Mul", [bell, em.const(2.0 / math.sqrt(math.pi))])])]


# Gelu's tanh form, with the constants as ONNX's function body has them (float32).
_GELU_K = float(np.float32(0.044715))
_GELU_C = float(np.float32(math.sqrt(2.0 / math.pi)))


@rule("Gelu")
def _gelu(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    x = node.input[0]
    approximate = attributes(node).get("approximate", "none")
    if approximate == "none":
        # y = x * Phi(x): dy/dx = Phi(x) + x * phi(x)
        cdf = em.op(
            "Mul",
            [em.op("Add", [em.op("Erf", [em.op("Mul", [x, em.const(math.sqrt(0.5))])]),
                           em.const(1.0)]), em.const(0.5)],
        )  # fmt: skip
        pdf = em.op(
            "Mul",
            [em.op("Exp", [em.op("Mul", [em.op("Mul", [x, x]), em.const(-0.5)])]),
             em.const(1.0 / math.sqrt(2.0 * math.pi))],
        )  # fmt: skip
        slope = em.op("Add", [cdf, em.op("Mul", [x, pdf])])
    elif approximate == "tanh":
        # y = 0.5 x (1 + t), t = tanh(c (x + k x³)):
        # dy/dx = 0.5 (1 + t) + 0.5 x (1 - t²) c (1 + 3 k x²)
        x2 = em.op("Mul", [x, x])
        inner = em.op(
            "Mul", [x, em.op("Add", [em.op("Mul", [x2, em.const(_GELU_K)]), em.const(1.0)])]
        )
        t = em.op("Tanh", [em.op("Mul", [inner, em.const(_GELU_C)])])
        half = em.op("Mul", [em.op("Add", [t, em.const(1.0)]), em.const(0.5)])
        sech2 = em.op("Sub", [em.const(1.0), em.op("Mul", [t, t])])
        du = em.op("Add", [em.op("Mul", [x2, em.const(3.0 * _GELU_K)]), em.const(1.0)])
        rest = em.op("Mul", [em.op("Mul", [em.op("Mul", [x, em.const(0.5 * _GELU_C)]), sech2]), du])
        slope = em.op("Add", [half, rest])
    else:
        raise em.error(f"approximate='{approximate}' is not a Gelu mode this rule knows")
    return [em.op("Mul", [dys[0], slope])]


@rule("Pow")
def _pow(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    (dy,) = dys
    x, e = node.input
    y = node.output[0]
    y_shape = em.shape(y)
    out: Grads = [None, None]
    if needed[0]:
        value = em.const_value(e)
        if value is not None and np.asarray(value).size == 1:
            k = float(np.asarray(value).reshape(()))
            if k == 1.0:
                slope = None
            elif k == 2.0:
                slope = em.op("Mul", [x, em.const(2.0)])
            else:  # k x^(k-1), well defined at x = 0 for k >= 1 (unlike k y / x)
                slope = em.op("Mul", [em.op("Pow", [x, em.const(k - 1.0)]), em.const(k)])
        else:
            ef = e if em.types.get(e) == em.types.get(x) else em.op("Cast", [e], to=em.types[x])
            slope = em.op("Mul", [em.op("Pow", [x, em.op("Sub", [ef, em.const(1.0)])]), ef])
        dx = dy if slope is None else em.op("Mul", [dy, slope])
        out[0] = em.unbroadcast(dx, y_shape, x)
    if needed[1]:
        # d x^e / de = x^e log(x); PyTorch's convention: 0 where x = 0 (log(0) = -inf).
        log = em.op("Log", [x])
        zero = em.op("Equal", [x, em.const(0.0)])
        de = em.op("Where", [zero, em.const(0.0), em.op("Mul", [y, log])])
        out[1] = em.unbroadcast(em.op("Mul", [dy, de]), y_shape, e)
    return out


@rule("Max", "Min")
def _max_min(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    # The gradient goes to the input that is the result; on ties to the first such input.
    (dy,) = dys
    y = node.output[0]
    y_shape = em.shape(y)
    if len(node.input) == 1:
        return [dy]
    out: Grads = [None] * len(node.input)
    last = max(i for i, need in enumerate(needed) if need)
    taken: str | None = None  # where an earlier input already is the result
    for i, x in enumerate(node.input[: last + 1]):
        hit = em.op("Equal", [x, y])
        if needed[i]:
            mine = hit if taken is None else em.op("And", [hit, em.op("Not", [taken])])
            out[i] = em.unbroadcast(em.op("Mul", [dy, em.mask(mine)]), y_shape, x)
        if i < last:
            taken = hit if taken is None else em.op("Or", [taken, hit])
    return out


@rule("Where", inputs=(1, 2))
def _where(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    (dy,) = dys
    cond, a, b = node.input
    y_shape = em.shape(node.output[0])
    to_a = em.op("Mul", [dy, em.mask(cond)])  # shaped as the result (dy is)
    out: Grads = [None, None, None]
    if needed[1]:
        out[1] = em.unbroadcast(to_a, y_shape, a)
    if needed[2]:
        out[2] = em.unbroadcast(em.op("Sub", [dy, to_a]), y_shape, b)
    return out


@rule("Cast")
def _cast(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    # Reached only between float types: a Cast to an integer type has no float output, so
    # the builder never marks it as depending on a trainable and no gradient arrives.
    return [_cast_back(em, node, dys[0])]


@rule("CastLike", inputs=(0,))
def _cast_like(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    return [_cast_back(em, node, dys[0]), None]


def _cast_back(em: Emitter, node: onnx.NodeProto, dy: str | None) -> str:
    x = node.input[0]
    to = em.types.get(x)
    if to not in FLOAT_TYPES:
        raise em.error(f"its input '{x}' is not float32/float64")
    if em.types.get(node.output[0]) == to:
        return dy  # type: ignore[return-value]
    return em.op("Cast", [dy], to=to, shape=em.shape(x))

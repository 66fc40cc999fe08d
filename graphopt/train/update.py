"""The optimizer step as ONNX nodes: SGD (momentum, Nesterov) and AdamW inside the training graph.

`with_update` appends, after the backward pass, the nodes that update every trainable: the
weights and the optimizer state (momentum buffers, Adam moments) are graph inputs, their
updated values are graph outputs, and the hyperparameters (learning rate, momentum, betas,
eps, weight decay, and Adam's step count) are float64 scalar inputs, fed each step, so a
schedule changes them without rebuilding the session. With IO binding on CUDA, weights and
state can then stay on the device between steps.

The arithmetic is the numpy optimizers' (graphopt.train.optim) operation for operation, with
each float64 hyperparameter rounded to the weights' type where numpy rounds it, so both give
the same weights to float32 rounding. Pruning masks multiply the gradients inside the graph
(the gradient outputs are the masked ones): a pruned weight's gradient, momentum, moments and
decoupled weight decay are all zero, so it stays exactly zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt.train.builder import TrainingGraph
from graphopt.train.optim import SGD, AdamW, Optimizer

DOUBLE = onnx.TensorProto.DOUBLE


@dataclass
class UpdateGraph:
    """A training graph that also updates the weights and the optimizer state.

    Attributes:
        proto: the graph: the training graph's inputs plus `state_inputs` and `hyper`;
            its outputs plus `new_weights` and `state_outputs`. The gradient outputs are
            the masked gradients.
        hyper: hyperparameter ("lr", "momentum", ...) -> its float64 scalar input.
        new_weights: trainable -> the output holding its updated value.
        state_inputs: (slot, trainable) -> input name; slots are "momentum" (SGD), "m" and
            "v" (AdamW).
        state_outputs: (slot, trainable) -> output name of the updated state.
        key: what is baked into the graph (optimizer kind, Nesterov, momentum and weight
            decay on/off); an optimizer with another key needs a new graph.
    """

    proto: onnx.ModelProto
    hyper: dict[str, str]
    new_weights: dict[str, str]
    state_inputs: dict[tuple[str, str], str] = field(default_factory=dict)
    state_outputs: dict[tuple[str, str], str] = field(default_factory=dict)
    key: tuple[object, ...] = ()

    def hyper_feeds(self, optimizer: Optimizer, step: int) -> dict[str, np.ndarray]:
        """The hyperparameter feeds for the step numbered `step` (from 1)."""
        values = _hyper_values(optimizer, step)
        return {name: np.array(values[key], dtype=np.float64) for key, name in self.hyper.items()}


def update_key(optimizer: Optimizer) -> tuple[object, ...] | None:
    """What an update graph bakes in for `optimizer`; None for an optimizer it cannot run."""
    # The last entry, whether weight decay is on, leaves its nodes out when it is off (~2 of
    # the ~5 nodes per trainable: per-node dispatch shows on small nets).
    decays = bool(optimizer.weight_decay)
    if type(optimizer) is SGD:
        return ("sgd", bool(optimizer.momentum), bool(optimizer.nesterov), decays)
    if type(optimizer) is AdamW:
        return ("adamw", decays)
    return None


def state_slots(optimizer: Optimizer) -> tuple[str, ...]:
    if isinstance(optimizer, AdamW):
        return ("m", "v")
    return ("momentum",) if optimizer.momentum else ()


def state_store(optimizer: Optimizer, slot: str) -> dict[str, np.ndarray]:
    """The optimizer's own dict for a state slot (the numpy and in-graph steps share it)."""
    if isinstance(optimizer, AdamW):
        return optimizer._m if slot == "m" else optimizer._v
    return optimizer._buffers


def with_update(
    graph: TrainingGraph, optimizer: Optimizer, masks: Mapping[str, np.ndarray]
) -> UpdateGraph:
    """The training graph of `graph` with `optimizer`'s step appended (a new proto)."""
    key = update_key(optimizer)
    if key is None:
        raise TypeError(f"No in-graph update for {type(optimizer).__name__}.")
    proto = onnx.ModelProto()
    proto.CopyFrom(graph.proto)
    g = proto.graph
    names = {v.name for v in g.input} | {t.name for t in g.initializer}
    names.update(o for n in g.node for o in n.output)
    prefix = "optim"
    while any(n.startswith(prefix + "/") for n in names):
        prefix += "_"
    em = _Emitter(g, prefix)
    elem = {v.name: v.type.tensor_type.elem_type for v in g.input}

    # Mask the gradients where they are produced: the gradient outputs become masked ones.
    grads: dict[str, str] = {}
    producers = {o: n for n in g.node for o in n.output}
    for name, out in graph.gradients.items():
        mask = masks.get(name)
        if mask is not None:
            raw = em.fresh(f"raw/{name}")
            producers[out].output[0] = raw
            g.node.append(helper.make_node("Mul", [raw, em.const(mask, mask.dtype)], [out]))
        grads[name] = out

    slots = state_slots(optimizer)
    hyper_names = _HYPER[key[0]]
    hyper = {h: f"{prefix}/{h}" for h in hyper_names}
    for name in hyper.values():
        g.input.append(helper.make_tensor_value_info(name, DOUBLE, []))
    state_inputs: dict[tuple[str, str], str] = {}
    state_outputs: dict[tuple[str, str], str] = {}
    new_weights: dict[str, str] = {}
    scalars = _Scalars(em, hyper)
    for name, grad in grads.items():
        t = elem[name]
        dims = [d.dim_value for d in _input(g, name).type.tensor_type.shape.dim]
        state, outs = {}, {"weight": f"{prefix}/new/{name}"}
        for slot in slots:
            state_inputs[(slot, name)] = state[slot] = f"{prefix}/{slot}/{name}"
            state_outputs[(slot, name)] = outs[slot] = f"{prefix}/new_{slot}/{name}"
            g.input.append(helper.make_tensor_value_info(state[slot], t, dims))
        if key[0] == "sgd":
            _sgd(
                em, scalars, t, name, grad, state, outs, nesterov=bool(key[2]), decay=bool(key[-1])
            )
        else:
            _adamw(em, scalars, t, name, grad, state, outs, decay=bool(key[-1]))
        new_weights[name] = outs["weight"]
        for out in outs.values():
            g.output.append(helper.make_tensor_value_info(out, t, dims))
    g.initializer.extend(em.initializers)
    return UpdateGraph(
        proto=proto,
        hyper=hyper,
        new_weights=new_weights,
        state_inputs=state_inputs,
        state_outputs=state_outputs,
        key=key,
    )


_HYPER = {
    "sgd": ("lr", "momentum", "weight_decay"),
    "adamw": ("lr", "beta1", "beta2", "eps", "weight_decay", "step"),
}


def _hyper_values(optimizer: Optimizer, step: int) -> dict[str, float]:
    if isinstance(optimizer, AdamW):
        b1, b2 = optimizer.betas
        return {"lr": optimizer.lr, "beta1": b1, "beta2": b2, "eps": optimizer.eps,
                "weight_decay": optimizer.weight_decay, "step": float(step)}  # fmt: skip
    return {"lr": optimizer.lr, "momentum": optimizer.momentum,
            "weight_decay": optimizer.weight_decay}  # fmt: skip


def _input(g: onnx.GraphProto, name: str) -> onnx.ValueInfoProto:
    return next(v for v in g.input if v.name == name)


class _Emitter:
    def __init__(self, graph: onnx.GraphProto, prefix: str) -> None:
        self.graph = graph
        self.prefix = prefix
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def fresh(self, base: str) -> str:
        self.count += 1
        return f"{self.prefix}/{base}_{self.count}"

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: object) -> str:
        out = out or self.fresh(op_type)
        self.graph.node.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def const(self, value: np.ndarray | float, dtype: object = np.float64) -> str:
        name = self.fresh("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name


class _Scalars:
    """Scalars derived once from the float64 hyperparameter inputs, rounded to a weight type
    where the numpy optimizers round them (a Python float meeting a float32 array)."""

    def __init__(self, em: _Emitter, hyper: dict[str, str]) -> None:
        self.em = em
        self.hyper = hyper
        self.cache: dict[tuple[str, int], str] = {}

    def double(self, key: str) -> str:
        cached = self.cache.get((key, DOUBLE))
        if cached is not None:
            return cached
        em, h = self.em, self.hyper
        one = em.const(1.0)
        if key in h:
            value = h[key]
        elif key == "one_minus_beta1":
            value = em.op("Sub", [one, h["beta1"]])
        elif key == "one_minus_beta2":
            value = em.op("Sub", [one, h["beta2"]])
        elif key == "decay":  # 1 - lr * weight_decay
            value = em.op("Sub", [one, em.op("Mul", [h["lr"], h["weight_decay"]])])
        elif key == "step_size":  # lr / (1 - beta1^t)
            c1 = em.op("Sub", [one, em.op("Pow", [h["beta1"], h["step"]])])
            value = em.op("Div", [h["lr"], c1])
        elif key == "c2":  # 1 - beta2^t
            value = em.op("Sub", [one, em.op("Pow", [h["beta2"], h["step"]])])
        else:
            raise KeyError(key)
        self.cache[(key, DOUBLE)] = value
        return value

    def __call__(self, key: str, elem_type: int) -> str:
        cached = self.cache.get((key, elem_type))
        if cached is None:
            value = self.double(key)
            if elem_type != DOUBLE:
                value = self.em.op("Cast", [value], to=elem_type)
            cached = self.cache[(key, elem_type)] = value
        return cached


def _sgd(
    em: _Emitter, s: _Scalars, t: int, w: str, g: str, state: dict[str, str],
    outs: dict[str, str], *, nesterov: bool, decay: bool,
) -> None:  # fmt: skip
    # optim.SGD: g += wd * w; buf = momentum * buf + g; d = g + momentum * buf (Nesterov)
    # or buf; w -= lr * d. A zero buffer on the first step gives buf = g, as numpy's copy.
    if decay:
        g = em.op("Add", [g, em.op("Mul", [s("weight_decay", t), w])])
    if "momentum" in state:
        buf = em.op("Add", [em.op("Mul", [state["momentum"], s("momentum", t)]), g],
                    outs["momentum"])  # fmt: skip
        g = em.op("Add", [g, em.op("Mul", [s("momentum", t), buf])]) if nesterov else buf
    em.op("Sub", [w, em.op("Mul", [s("lr", t), g])], outs["weight"])


def _adamw(
    em: _Emitter, s: _Scalars, t: int, w: str, g: str, state: dict[str, str],
    outs: dict[str, str], *, decay: bool,
) -> None:  # fmt: skip
    # optim.AdamW: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g²; w *= 1 - lr wd;
    # w -= (lr / c1) m / (sqrt(v / c2) + eps).
    m = em.op("Add", [em.op("Mul", [state["m"], s("beta1", t)]),
                      em.op("Mul", [s("one_minus_beta1", t), g])], outs["m"])  # fmt: skip
    v = em.op("Add", [em.op("Mul", [state["v"], s("beta2", t)]),
                      em.op("Mul", [s("one_minus_beta2", t), em.op("Mul", [g, g])])],
              outs["v"])  # fmt: skip
    decayed = em.op("Mul", [w, s("decay", t)]) if decay else w
    denom = em.op("Add", [em.op("Sqrt", [em.op("Div", [v, s("c2", t)])]), s("eps", t)])
    step = em.op("Div", [em.op("Mul", [s("step_size", t), m]), denom])
    em.op("Sub", [decayed, step], outs["weight"])

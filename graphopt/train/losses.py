"""Losses written into the training graph as ordinary ONNX nodes.

The loss nodes join the forward graph, so the backward pass differentiates them with the
same rules as the model. Each loss reads one float tensor of the model (usually an output)
and one extra graph input: the regression target, the integer labels, or the teacher's
logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphopt.errors import GraphoptError
from graphopt.train.graph import Emitter, Shape

LossKind = Literal["mse", "cross_entropy", "kl"]


@dataclass(frozen=True, kw_only=True)
class Loss:
    """One term of the training loss, `weight` times:

    - "mse": mean((y - target)²) over all elements;
    - "cross_entropy": mean over samples of -log softmax(y)[label], integer labels along
      class axis `axis`;
    - "kl": T²·KL(softmax(t/T) ‖ softmax(y/T)), summed over classes and averaged over
      samples, with teacher logits t and temperature T (the distillation loss).

    Attributes:
        kind: which loss.
        output: the model tensor the loss reads (an output or any float tensor).
        weight: the term's factor in the total loss.
        temperature: T of the "kl" loss.
        axis: the class axis of "cross_entropy" and "kl".
        target: the graph input that carries the target, labels or teacher logits
            (default: "<output>.target", "<output>.labels", "<output>.teacher").
    """

    kind: LossKind
    output: str
    weight: float = 1.0
    temperature: float = 1.0
    axis: int = -1
    target: str | None = None

    @classmethod
    def mse(cls, output: str, *, weight: float = 1.0, target: str | None = None) -> Loss:
        return cls(kind="mse", output=output, weight=weight, target=target)

    @classmethod
    def cross_entropy(
        cls, output: str, *, weight: float = 1.0, axis: int = -1, target: str | None = None
    ) -> Loss:
        return cls(kind="cross_entropy", output=output, weight=weight, axis=axis, target=target)

    @classmethod
    def distillation(
        cls,
        output: str,
        *,
        temperature: float = 1.0,
        weight: float = 1.0,
        axis: int = -1,
        target: str | None = None,
    ) -> Loss:
        return cls(
            kind="kl", output=output, weight=weight, temperature=temperature, axis=axis,
            target=target,
        )  # fmt: skip

    @property
    def input_name(self) -> str:
        suffix = {"mse": "target", "cross_entropy": "labels", "kl": "teacher"}[self.kind]
        return self.target or f"{self.output}.{suffix}"

    def check(self) -> None:
        if self.kind not in ("mse", "cross_entropy", "kl"):
            raise GraphoptError(
                f"Unknown loss kind '{self.kind}'.", hint="Use mse, cross_entropy or kl."
            )
        if not math.isfinite(self.weight):
            raise GraphoptError(
                f"The weight of the {self.kind} loss on '{self.output}' is {self.weight}."
            )
        if self.kind == "kl" and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise GraphoptError(
                f"The distillation temperature must be a positive number (got {self.temperature}).",
                hint="Typical values are 1 to 8.",
            )


def emit_losses(
    em: Emitter, losses: list[Loss], shapes: dict[str, Shape | None]
) -> tuple[str, list[onnx.ValueInfoProto]]:
    """Emit every loss term and their weighted sum; return (total, the new graph inputs)."""
    terms = []
    inputs = []
    for loss in losses:
        y = loss.output
        y_shape = shapes.get(y)
        if y_shape is None:
            raise GraphoptError(
                f"The {loss.kind} loss reads '{y}', whose rank is unknown after shape inference."
            )
        dims = [d if d is not None else f"{y}.dim{i}" for i, d in enumerate(y_shape)]
        rank = len(y_shape)
        if loss.kind == "mse":
            inputs.append(helper.make_tensor_value_info(loss.input_name, em.elem_type, dims))
            diff = em.op("Sub", [y, loss.input_name])
            term = em.reduce("ReduceMean", em.op("Mul", [diff, diff]), None, keepdims=False)
        elif loss.kind == "cross_entropy":
            axis = _axis(loss, rank)
            label_dims = dims[:axis] + dims[axis + 1 :]
            inputs.append(
                helper.make_tensor_value_info(loss.input_name, TensorProto.INT64, label_dims)
            )
            log_p = em.op("LogSoftmax", [y], axis=axis)
            onehot = em.mask(
                em.op(
                    "Equal", [em.unsqueeze(loss.input_name, [axis]), _classes(em, y, y_shape, axis)]
                )
            )
            picked = em.reduce("ReduceSum", em.op("Mul", [onehot, log_p]), [axis], keepdims=False)
            term = em.op("Neg", [em.reduce("ReduceMean", picked, None, keepdims=False)])
        else:
            axis = _axis(loss, rank)
            inputs.append(helper.make_tensor_value_info(loss.input_name, em.elem_type, dims))
            t = loss.temperature
            student, teacher = y, loss.input_name
            if t != 1.0:
                student = em.op("Div", [student, em.const(t)])
                teacher = em.op("Div", [teacher, em.const(t)])
            log_q = em.op("LogSoftmax", [student], axis=axis)
            p = em.op("Softmax", [teacher], axis=axis)
            log_p = em.op("LogSoftmax", [teacher], axis=axis)
            kl = em.reduce(
                "ReduceSum", em.op("Mul", [p, em.op("Sub", [log_p, log_q])]), [axis], keepdims=False
            )
            term = em.reduce("ReduceMean", kl, None, keepdims=False)
            if t != 1.0:
                term = em.op("Mul", [term, em.const(t * t)])
        if loss.weight != 1.0:
            term = em.op("Mul", [term, em.const(loss.weight)])
        terms.append(term)
    total = em.add_all(terms)
    return total, inputs


def _axis(loss: Loss, rank: int) -> int:
    if not -rank <= loss.axis < rank:
        raise GraphoptError(
            f"The {loss.kind} loss on '{loss.output}' uses class axis {loss.axis}, but the "
            f"tensor has {rank} axes."
        )
    return loss.axis % rank


def _classes(em: Emitter, y: str, y_shape: Shape, axis: int) -> str:
    """0..K-1 along `axis` (1 elsewhere), to compare integer labels against."""
    trailing = [1] * (len(y_shape) - 1 - axis)
    k = y_shape[axis]
    if isinstance(k, int):
        return em.const(np.arange(k, dtype=np.int64).reshape([k, *trailing]), np.int64)
    count = em.op("Squeeze", [em.op("Shape", [y], start=axis, end=axis + 1), em.ints([0])])
    classes = em.op("Range", [em.const(0, np.int64), count, em.const(1, np.int64)])
    return em.op("Reshape", [classes, em.ints([-1, *trailing])])

"""Gradient rules, one per ONNX op type, grouped by op family.

A rule is `rule(em, node, grad_outputs, needed) -> grad_inputs`: given the gradients of the
node's outputs (None where an output does not reach the loss) and which inputs need a
gradient (they depend on a trainable), it emits nodes through the Emitter `em` and returns
one gradient name per input (None where not needed). Rules emit only what is needed.

`DIFFERENTIABLE[op]` lists the input positions a gradient can flow through (all float
inputs when absent): Reshape's shape, Clip's bounds, BatchNormalization's frozen statistics
are not.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from graphopt.train.graph import Emitter

Rule = Callable[[Emitter, onnx.NodeProto, list[str | None], list[bool]], list[str | None]]

RULES: dict[str, Rule] = {}
DIFFERENTIABLE: dict[str, tuple[int, ...]] = {}


def rule(*op_types: str, inputs: tuple[int, ...] | None = None) -> Callable[[Rule], Rule]:
    """Register a rule for `op_types`; `inputs`: the differentiable input positions."""

    def register(fn: Rule) -> Rule:
        for op_type in op_types:
            RULES[op_type] = fn
            if inputs is not None:
                DIFFERENTIABLE[op_type] = inputs
        return fn

    return register


def differentiable(op_type: str, index: int) -> bool:
    positions = DIFFERENTIABLE.get(op_type)
    return positions is None or index in positions


from graphopt.train.rules import (  # noqa: E402  (the modules register into RULES)
    conv,
    elementwise,
    linear,
    math,
    norm,
    normalization,
    quant,
    reduce,
    shape,
    spatial,
)

__all__ = ["DIFFERENTIABLE", "RULES", "Rule", "differentiable", "rule"]
_MODULES = (conv, elementwise, linear, math, norm, normalization, quant, reduce, shape, spatial)

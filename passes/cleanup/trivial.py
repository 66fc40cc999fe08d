"""Identity and inference-mode Dropout removal: `y = op(x)` becomes `x` itself.

Own rules rather than onnx-ir's IdentityEliminationPass, which can rename a graph output away
when one value feeds two outputs, and rewrites the declared shape of graph inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graphopt.passes.cleanup.common import constant, onnx_nodes, plain_attr, remove_node


def identity_refusal(node: ir.Node, opset: int = 0) -> str | None:
    """Why `y = op(x)` cannot be replaced by `x` itself (None when it can)."""
    del opset  # every Identity is one
    if not node.inputs or node.inputs[0] is None or not node.outputs:
        return "it has no input"
    x, y = node.inputs[0], node.outputs[0]
    if not y.is_graph_output():
        return None
    if x.is_graph_input() or x.is_initializer():
        return "it passes a graph input or weight straight to a graph output"
    if x.is_graph_output():
        return "its input is already a graph output under another name"
    producer = x.producer()
    if producer is None or producer.graph is not node.graph:
        return "its input comes from an enclosing graph"
    return None


def dropout_refusal(node: ir.Node, opset: int) -> str | None:
    """Why a Dropout is not an identity here (None when it is)."""
    mask = node.outputs[1] if len(node.outputs) > 1 else None
    if mask is not None and (mask.uses() or mask.is_graph_output()):
        return "its mask output is used"
    if opset < 7 and plain_attr(node, "is_test", 0) != 1:
        return f"Dropout-{opset} without is_test=1 runs in training mode"
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is not None:
        tensor = constant(training)
        if tensor is None:
            return "its training_mode is not a constant"
        if np.asarray(tensor.numpy()).any():
            return "its training_mode is true"
    return identity_refusal(node)


#: The check of each op this module removes.
REFUSALS: dict[str, Callable[[ir.Node, int], str | None]] = {
    "Identity": identity_refusal,
    "Dropout": dropout_refusal,
}


def remove_all(m: ir.Model, op_type: str) -> int:
    """Replace every removable `op_type` node (a key of `REFUSALS`) by its input."""
    count = 0
    for node, opset in onnx_nodes(m, op_type):
        if REFUSALS[op_type](node, opset) is None:
            _bypass(node)
            count += 1
    return count


def _bypass(node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    assert x is not None
    # When y is a graph output, x now stands for it: x takes its name and declared type.
    remove_node(node, y, x, rename=y.is_graph_output())

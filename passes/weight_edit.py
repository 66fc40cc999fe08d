"""Replacing a constant input of one node without touching the other nodes that read it.

`smoothquant` and `bias-correction` rewrite weights, biases and LayerNorm parameters. An
initializer may be shared (deduplicated weights, one scalar read by many Muls), so a new value
is written in place only when this node is its sole reader; otherwise the node gets a fresh
initializer and the old one stays for its other readers.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.quantize.graphutil import NameSource, node_label


def set_constant(node: ir.Node, index: int, array: np.ndarray, names: NameSource) -> None:
    """Make input `index` of `node` the constant `array` (adding the input if it is absent).

    Args:
        node: a node of a graph (not a function body).
        index: the input to set; inputs up to it are added as absent when missing.
        array: the new value; its dtype becomes the value's type.
        names: fresh names for new initializers.
    """
    graph = node.graph
    assert isinstance(graph, ir.Graph)
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is not None and _sole_initializer_use(graph, value):
        value.const_value = ir.tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)
        value.type = ir.TensorType(value.const_value.dtype)
        return
    base = value.name if value is not None and value.name else f"{node_label(node)}_in{index}"
    name = names.take(f"{base}_{node.name or node.op_type}".replace(" ", "_"))
    tensor = ir.tensor(array, name=name)
    new = ir.Value(
        name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor
    )
    graph.register_initializer(new)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    # A Constant node left without readers is removed by the pipeline after the pass.
    node.replace_input_with(index, new)


def _sole_initializer_use(graph: ir.Graph, value: ir.Value) -> bool:
    return (
        bool(value.name)
        and graph.initializers.get(value.name) is value
        and len(value.uses()) == 1
        and not value.is_graph_output()
        and not value.is_graph_input()
    )

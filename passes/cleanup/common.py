"""IR helpers the cleanup rules share: finding nodes, reading constants and attributes, and
removing a node whose output another value takes over."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import onnx_ir as ir

ONNX_DOMAINS = ("", "ai.onnx")
FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}
)

_Scalar = TypeVar("_Scalar", int, float)

# Ops whose output has the rank of their broadcast inputs (used to bound x's rank).
_BROADCASTING = frozenset(
    {
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Relu",
        "Clip",
        "Sigmoid",
        "HardSigmoid",
        "Tanh",
        "LeakyRelu",
        "Neg",
        "Abs",
        "Exp",
        "Sqrt",
        "Pow",
        "Max",
        "Min",
        "Where",
        "Erf",
        "Cast",
        "Identity",
    }
)
# Ops whose output always has rank >= 3 (N, C and at least one spatial axis).
_IMAGE_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "BatchNormalization",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "InstanceNormalization",
        "Resize",
        "Upsample",
    }
)
_MAX_DEPTH = 12


def is_onnx_op(node: ir.Node, *op_types: str) -> bool:
    return node.op_type in op_types and node.domain in ONNX_DOMAINS


def nodes_with_opset(m: ir.Model, *, functions: bool = True) -> Iterator[tuple[ir.Node, int]]:
    """Every node of the model, subgraphs (and functions) included, with its ONNX opset."""
    main = m.opset_imports.get("", m.opset_imports.get("ai.onnx", 1))
    for node in ir.traversal.RecursiveGraphIterator(m.graph):
        yield node, main
    if not functions:
        return
    for function in m.functions.values():
        opset = function.opset_imports.get("", main)
        for node in ir.traversal.RecursiveGraphIterator(function):
            yield node, opset


def onnx_nodes(m: ir.Model, op_type: str, *, functions: bool = True) -> list[tuple[ir.Node, int]]:
    """A rule's pattern: every ONNX `op_type` node with its opset, listed before any rewrite."""
    return [
        (n, opset)
        for n, opset in nodes_with_opset(m, functions=functions)
        if is_onnx_op(n, op_type)
    ]


def node_label(node: ir.Node) -> str:
    return node.name or f"{node.op_type} -> {node.outputs[0].name if node.outputs else '?'}"


def constant(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The value's tensor if it is fixed: an initializer users cannot feed, or a Constant."""
    if value is None or value.is_graph_input():
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:  # a malformed Constant node
        return None


def plain_attr(node: ir.Node, name: str, default: _Scalar) -> _Scalar | None:
    """An INT or FLOAT attribute (which one follows `default`'s type), `default` when absent,
    or None when it is a function-attribute reference or of another type."""
    attr = node.attributes.get(name)
    if attr is None:
        return default
    if isinstance(default, int):
        return None if attr.is_ref() or attr.type != ir.AttributeType.INT else attr.as_int()
    return None if attr.is_ref() or attr.type != ir.AttributeType.FLOAT else attr.as_float()


def remove_node(node: ir.Node, output: ir.Value, replacement: ir.Value, *, rename: bool) -> None:
    """Remove `node`, using `replacement` wherever its `output` was used.

    With `rename`, `replacement` also takes the output's name and declared type and shape, so
    a graph output keeps its contract.
    """
    graph = node.graph
    assert graph is not None
    name, type_, shape = output.name, output.type, output.shape
    ir.convenience.replace_all_uses_with(output, replacement, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    if rename:
        replacement.name = name
        if type_ is not None:
            replacement.type = type_
        if shape is not None:
            replacement.shape = shape


def all_value_names(m: ir.Model) -> set[str]:
    """Every value name in the model's graphs (for making new names unique)."""
    names: set[str] = set()
    for graph in m.graphs():
        names.update(v.name for v in graph.inputs if v.name)
        names.update(graph.initializers)
        for node in graph:
            names.update(v.name for v in node.outputs if v.name)
    return names


def new_initializer(graph: ir.Graph, base: str, array: np.ndarray, names: set[str]) -> ir.Value:
    """A new initializer holding `array`, named `base` (made unique against `names`)."""
    name, suffix = base, 1
    while name in names:
        suffix += 1
        name = f"{base}_{suffix}"
    names.add(name)
    tensor = ir.tensor(array, name=name)
    value = ir.Value(
        name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor
    )
    graph.register_initializer(value)
    return value


def min_rank(value: ir.Value | None, depth: int = 0) -> int:
    """A lower bound on the rank of `value` (0 when nothing is known)."""
    if value is None or depth > _MAX_DEPTH:
        return 0
    if value.shape is not None:
        return len(value.shape)
    tensor = constant(value)
    if tensor is not None:
        return len(tensor.shape)
    producer = value.producer()
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return 0
    if producer.op_type in _IMAGE_OPS:
        return 3
    if producer.op_type in _BROADCASTING:
        return max((min_rank(v, depth + 1) for v in producer.inputs), default=0)
    return 0

"""IR helpers the quantize modules share: what a value is (activation, weight, already
quantized), who produces and reads it, and fresh names for new values and nodes."""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

from graphopt.passes.cleanup.common import constant, is_onnx_op, node_label, plain_attr

__all__ = [
    "NameSource",
    "already_quantized",
    "constant",
    "float_activation",
    "is_onnx_op",
    "known_shape",
    "node_label",
    "plain_attr",
    "producer_op",
]

QUANTIZE = "QuantizeLinear"
DEQUANTIZE = "DequantizeLinear"


def producer_op(value: ir.Value | None) -> str | None:
    """The ONNX op type that produces `value`, or None (graph input, weight, other domain)."""
    if value is None:
        return None
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    return node.op_type


def float_activation(value: ir.Value | None, *, assume_float: bool = False) -> bool:
    """A float32 tensor computed at run time (a graph input or a node output, not a weight).

    With `assume_float`, a value of unknown type counts as float32 (the caller knows from the
    op's type constraints, e.g. a Conv whose weight is float32).
    """
    if value is None:
        return False
    if value.dtype != ir.DataType.FLOAT and not (assume_float and value.dtype is None):
        return False
    if constant(value) is not None:
        return False
    return value.is_graph_input() or value.producer() is not None


def already_quantized(value: ir.Value | None) -> bool:
    """Whether `value` is a DequantizeLinear output or already feeds a QuantizeLinear: a
    second run must leave it (and the op reading it) alone."""
    if value is None:
        return False
    if producer_op(value) == DEQUANTIZE:
        return True
    return any(is_onnx_op(user, QUANTIZE) and index == 0 for user, index in value.uses())


def known_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The value's shape when every dimension is a known integer, else None."""
    if value is None or value.shape is None:
        return None
    dims = []
    for dim in value.shape:
        if not isinstance(dim, int):
            return None
        dims.append(dim)
    return tuple(dims)


class NameSource:
    """Fresh value and node names derived from a base name, never clashing with the graph's."""

    def __init__(self, graph: ir.Graph) -> None:
        self._taken: set[str] = set()
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.name:
                self._taken.add(node.name)
            self._taken.update(v.name for v in node.outputs if v.name)
            self._taken.update(v.name for v in node.inputs if v is not None and v.name)
        self._taken.update(v.name for v in graph.inputs if v.name)
        self._taken.update(v.name for v in graph.outputs if v.name)
        self._taken.update(name for name in graph.initializers if name)

    def take(self, base: str) -> str:
        name, i = base, 1
        while name in self._taken:
            i += 1
            name = f"{base}_{i}"
        self._taken.add(name)
        return name

    def take_all(self, bases: Iterable[str]) -> list[str]:
        return [self.take(base) for base in bases]

"""What the pass measures around its rules: counts for the stats, a fingerprint that tells
when a round changed nothing, and the graph's I/O contract, put back at the end."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

IOSignature = tuple[list[Any], list[Any]]


def count_nodes(m: ir.Model) -> int:
    return sum(1 for graph in m.graphs() for _ in graph) + sum(
        1 for f in m.functions.values() for _ in f
    )


def count_initializers(m: ir.Model) -> int:
    return sum(len(graph.initializers) for graph in m.graphs())


def fingerprint(m: ir.Model) -> int:
    """A hash of everything a rule can change except tensor bytes (which only change together
    with an initializer's name)."""
    parts: list[Any] = [tuple(sorted(m.opset_imports.items())), tuple(m.functions)]
    graphs: list[ir.Graph | ir.Function] = [*m.graphs(), *m.functions.values()]
    for graph in graphs:
        parts.append(tuple(v.name for v in graph.inputs))
        parts.append(tuple(v.name for v in graph.outputs))
        if isinstance(graph, ir.Graph):
            parts.append(tuple(graph.initializers))
        for node in graph:
            parts.append(
                (
                    node.domain,
                    node.op_type,
                    node.name,
                    tuple(None if v is None else v.name for v in node.inputs),
                    tuple(v.name for v in node.outputs),
                    tuple(node.attributes),
                )
            )
    return hash(tuple(parts))


def io_signature(graph: ir.Graph) -> IOSignature:
    def spec(v: ir.Value) -> tuple[str | None, ir.TypeProtocol | None, ir.Shape | None]:
        return v.name, v.type, None if v.shape is None else v.shape.copy()

    return [spec(v) for v in graph.inputs], [spec(v) for v in graph.outputs]


def restore_io(graph: ir.Graph, signature: IOSignature) -> None:
    """Put back declared types and shapes of graph inputs and outputs.

    The folder and shape merging may refine them (e.g. copy an inner value's static shape onto
    a dynamic graph input); the model's contract must not change.
    """
    for values, specs in ((graph.inputs, signature[0]), (graph.outputs, signature[1])):
        for value, (name, type_, shape) in zip(values, specs, strict=True):
            if value.name != name:
                raise RuntimeError(f"cleanup renamed graph value {name!r} to {value.name!r}")
            value.type = type_
            value.shape = shape

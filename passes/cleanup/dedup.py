"""Merging initializers with identical dtype, shape and bytes."""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir
import onnx_ir.passes.common as ir_passes


def deduplicate(m: ir.Model) -> bool:
    """onnx-ir's hashing deduplication, run only where two initializers could be equal.

    It reads every weight: skip that when no two initializers of a graph share dtype and
    shape, and unmap external weights it mapped, so a big model's pages do not stay mapped.
    """
    if not any(_may_collide(graph) for graph in m.graphs()):
        return False
    unmapped = [
        v.const_value
        for graph in m.graphs()
        for v in graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor) and v.const_value.raw is None
    ]
    modified = ir_passes.DeduplicateHashedInitializersPass()(m).modified
    for tensor in unmapped:
        tensor.release()
    return modified


def _may_collide(graph: ir.Graph) -> bool:
    """Whether two of the graph's initializers share dtype and shape."""
    keys = Counter(
        (v.const_value.dtype, tuple(v.const_value.shape.numpy()))
        for v in graph.initializers.values()
        if v.const_value is not None
    )
    return any(n > 1 for n in keys.values())

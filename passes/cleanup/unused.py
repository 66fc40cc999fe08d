"""Removing what nothing uses: nodes, optional outputs, functions and opset imports
(onnx-ir's passes), counted for the pass's stats."""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir
import onnx_ir.passes.common as ir_passes


def remove_unused(m: ir.Model, stats: Counter[str]) -> bool:
    """Remove unused nodes and functions; True if anything was removed."""
    modified = ir_passes.RemoveUnusedNodesPass()(m).modified
    functions = len(m.functions)
    modified |= ir_passes.RemoveUnusedFunctionsPass()(m).modified
    stats["functions_removed"] += functions - len(m.functions)
    return modified


def remove_unused_opsets(m: ir.Model, stats: Counter[str]) -> bool:
    """Remove opset imports no node of the model or of its functions needs."""
    opsets = _count_opsets(m)
    modified = ir_passes.RemoveUnusedOpsetsPass()(m).modified
    stats["opsets_removed"] += opsets - _count_opsets(m)
    return modified


def _count_opsets(m: ir.Model) -> int:
    return len(m.opset_imports) + sum(len(f.opset_imports) for f in m.functions.values())

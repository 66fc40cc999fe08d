"""Raising the default-domain opset to 13, which per-channel DequantizeLinear needs, when
that keeps every op's meaning.

An op is safe to carry from opset `v` to 13 when, between its schema at `v` and at 13, no
attribute the node uses went away, every input keeps its name and position, new inputs are
optional, and the op is not one whose meaning changed without a signature change (Softmax,
LogSoftmax and Hardmax over an axis other than the last). Anything else (Squeeze with an
`axes` attribute, Split with `split`, Clip-6 with `min`/`max`, Upsample, ...) makes the raise
unsafe, and the pass says which nodes stand in the way.
"""

from __future__ import annotations

import onnx.defs
import onnx_ir as ir

from graphopt.passes.cleanup.common import nodes_with_opset
from graphopt.passes.quantize.graphutil import node_label, plain_attr

_AXIS_SEMANTICS_CHANGED = frozenset({"Softmax", "LogSoftmax", "Hardmax"})


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def blockers(model: ir.Model, target: int) -> list[str]:
    """Why the main graph's ops cannot move to opset `target` ("node (op): reason" each)."""
    current = default_opset(model)
    out = []
    seen: set[str] = set()
    for node, opset in nodes_with_opset(model, functions=False):
        if node.domain not in ("", "ai.onnx") or opset >= target:
            continue
        reason = _blocker(node, opset, target)
        if reason is not None:
            text = f"{node_label(node)} ({node.op_type}-{current}): {reason}"
            if text not in seen:
                seen.add(text)
                out.append(text)
    return out


def raise_opset(model: ir.Model, target: int) -> None:
    """Set the default-domain opset import to `target` (callers check `blockers` first)."""
    key = "" if "" in model.opset_imports or "ai.onnx" not in model.opset_imports else "ai.onnx"
    model.opset_imports[key] = target


def _blocker(node: ir.Node, old: int, new: int) -> str | None:
    op = node.op_type
    try:
        before = onnx.defs.get_schema(op, old, "")
        after = onnx.defs.get_schema(op, new, "")
    except onnx.defs.SchemaError:
        return "unknown op"
    if after.deprecated:
        return f"deprecated by opset {new}"
    if before.since_version == after.since_version:
        return None
    removed = [name for name in node.attributes if name not in after.attributes]
    if removed:
        return f"uses attribute(s) {', '.join(removed)}, gone by opset {new}"
    old_inputs = [p.name for p in before.inputs]
    new_inputs = [p.name for p in after.inputs]
    if new_inputs[: len(old_inputs)] != old_inputs:
        return f"its inputs changed by opset {new} ({old_inputs} -> {new_inputs})"
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    for param in after.inputs[len(old_inputs) :]:
        if param.option != optional:
            return f"opset {new} adds the required input '{param.name}'"
    if [p.name for p in after.outputs][: len(before.outputs)] != [p.name for p in before.outputs]:
        return f"its outputs changed by opset {new}"
    if op in _AXIS_SEMANTICS_CHANGED and before.since_version < 13 <= after.since_version:
        if not _last_axis(node):
            return "it normalizes over more than the last axis before opset 13"
    return None


def _last_axis(node: ir.Node) -> bool:
    """Whether a Softmax-like node works on the last axis only (same meaning before and
    after opset 13)."""
    axis = plain_attr(node, "axis", 1)
    if axis == -1:
        return True
    x = node.inputs[0] if node.inputs else None
    if axis is None or x is None or x.shape is None:
        return False
    return axis == len(x.shape) - 1

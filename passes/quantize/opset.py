"""Raising the default-domain opset to what the quantize pass needs (13 for per-channel
int8 DequantizeLinear, 19 for float8 Q/DQ), when every op keeps its meaning there.

An op is carried from opset `v` to the target as it is when, between its schema at `v` and
at the target, no attribute the node uses went away, every input keeps its position (and its
name, but for renames that keep the meaning: BatchNormalization's mean/var became
input_mean/input_var at 15), new inputs are optional, and the outputs the node uses keep
theirs. A few ops are rewritten (as `onnx.version_converter` does, without a trip through
protobuf):

- Squeeze, Unsqueeze, ReduceSum (13) and ReduceMean, ReduceMax, ReduceMin, ReduceProd,
  ReduceL1, ReduceL2, ReduceLogSum, ReduceLogSumExp, ReduceSumSquare (18): the `axes`
  attribute becomes a constant input;
- Split: the `split` attribute becomes a constant input (13); from 18 an even Split with
  neither gets `num_outputs` (opset 18 requires one of the two);
- Softmax, LogSoftmax, Hardmax: before 13 they normalize over every axis from `axis` on
  (the input taken as 2-D); at 13 over `axis` alone. Over the last axis both agree and the
  node stays; otherwise (or when the rank is unknown) it becomes Flatten(axis) -> op(axis=-1)
  -> Reshape(Shape(x)), which computes the old meaning at opset 13;
- RoiAlign: opset 16 added `coordinate_transformation_mode` with default half_pixel; the
  earlier behaviour is written out as output_half_pixel.

Anything else (Clip-6 with `min`/`max`, Pad-2, Upsample, Slice-1, TopK-1, Resize-11 with
coordinate_transformation_mode tf_half_pixel_for_nn, which opset 13 dropped, ...) makes the
raise unsafe, and the pass says which nodes stand in the way.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx.defs
import onnx_ir as ir

from graphopt.passes.cleanup.common import nodes_with_opset
from graphopt.passes.quantize.graphutil import NameSource, node_label, plain_attr

_SOFTMAX_LIKE = frozenset({"Softmax", "LogSoftmax", "Hardmax"})
_ATTRIBUTE_TO_INPUT = {
    "Squeeze": "axes",
    "Unsqueeze": "axes",
    "ReduceSum": "axes",
    "Split": "split",
    **{
        f"Reduce{name}": "axes"
        for name in (
            "Mean",
            "Max",
            "Min",
            "Prod",
            "L1",
            "L2",
            "LogSum",
            "LogSumExp",
            "SumSquare",
        )
    },
}
# Inputs renamed between versions with the same meaning: op -> {old name: new name}.
_RENAMED_INPUTS = {"BatchNormalization": {"mean": "input_mean", "var": "input_var"}}


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def blockers(model: ir.Model, target: int) -> list[str]:
    """Why the model's ops cannot move to opset `target` ("node (op-version): reason" each)."""
    current = default_opset(model)
    out = []
    for node, opset in _old_nodes(model, target):
        if _rewrite_for(node, opset, target) is not None:
            continue
        reason = _blocker(node, opset, target)
        if reason is not None:
            text = f"{node_label(node)} ({node.op_type}-{current}): {reason}"
            if text not in out:
                out.append(text)
    return out


def raise_opset(model: ir.Model, target: int) -> int:
    """Rewrite the ops that need it and set the default-domain opset to `target` (callers
    check `blockers` first). Returns the number of nodes rewritten."""
    rewritten = 0
    names = NameSource(model.graph)
    for node, opset in _old_nodes(model, target):
        rewrite = _rewrite_for(node, opset, target)
        if rewrite is not None:
            rewrite(node, names)
            rewritten += 1
    key = "" if "" in model.opset_imports or "ai.onnx" not in model.opset_imports else "ai.onnx"
    model.opset_imports[key] = target
    return rewritten


def _old_nodes(model: ir.Model, target: int) -> list[tuple[ir.Node, int]]:
    return [
        (node, opset)
        for node, opset in nodes_with_opset(model, functions=False)
        if node.domain in ("", "ai.onnx") and opset < target
    ]


def _schemas(op: str, old: int, new: int) -> tuple[onnx.defs.OpSchema, onnx.defs.OpSchema] | None:
    try:
        return onnx.defs.get_schema(op, old, ""), onnx.defs.get_schema(op, new, "")
    except onnx.defs.SchemaError:
        return None


def _blocker(node: ir.Node, old: int, new: int) -> str | None:
    schemas = _schemas(node.op_type, old, new)
    if schemas is None:
        return "unknown op"
    before, after = schemas
    if after.deprecated:
        return f"deprecated by opset {new}"
    if before.since_version == after.since_version:
        return None
    removed = [name for name in node.attributes if name not in after.attributes]
    if removed:
        return f"uses attribute(s) {', '.join(removed)}, gone by opset {new}"
    mode = node.attributes.get("coordinate_transformation_mode")
    if (
        node.op_type == "Resize"
        and before.since_version < 13
        and mode is not None
        and mode.type == ir.AttributeType.STRING
        and mode.as_string() == "tf_half_pixel_for_nn"
    ):
        return f"coordinate_transformation_mode tf_half_pixel_for_nn is gone by opset {new}"
    renamed = _RENAMED_INPUTS.get(node.op_type, {})
    old_inputs = [renamed.get(p.name, p.name) for p in before.inputs]
    new_inputs = [p.name for p in after.inputs]
    if new_inputs[: len(old_inputs)] != old_inputs:
        return f"its inputs changed by opset {new} ({old_inputs} -> {new_inputs})"
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    for param in after.inputs[len(old_inputs) :]:
        if param.option != optional:
            return f"opset {new} adds the required input '{param.name}'"
    used = _used_outputs(node)
    if [p.name for p in after.outputs][:used] != [p.name for p in before.outputs][:used]:
        return f"its outputs changed by opset {new}"
    return None


def _used_outputs(node: ir.Node) -> int:
    """How many leading outputs the node has (the last one not left empty, counted)."""
    named = [i for i, value in enumerate(node.outputs) if value.name]
    return named[-1] + 1 if named else len(node.outputs)


Rewrite = Callable[[ir.Node, NameSource], None]


def _rewrite_for(node: ir.Node, old: int, new: int) -> Rewrite | None:
    """The rewrite that carries `node` to opset `new`, if it needs (and has) one."""
    schemas = _schemas(node.op_type, old, new)
    if schemas is None or schemas[0].since_version == schemas[1].since_version:
        return None
    op = node.op_type
    since_before, since_after = schemas[0].since_version, schemas[1].since_version
    if op == "RoiAlign" and since_before < 16 <= since_after:
        if "coordinate_transformation_mode" in node.attributes:
            return None
        return _roialign_output_half_pixel
    if op == "Split" and "split" not in node.attributes and since_before < 18 <= since_after:
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            return None  # the split sizes are an input already
        return _split_num_outputs
    if op in _SOFTMAX_LIKE and since_before < 13 <= since_after:
        if _last_axis(node):
            return None  # same meaning: only the version changes
        if set(node.attributes) <= {"axis"}:
            return _flatten_softmax
        return None
    attribute = _ATTRIBUTE_TO_INPUT.get(op)
    if attribute is None or attribute not in node.attributes:
        return None
    if attribute in schemas[1].attributes or set(node.attributes) - {attribute} - set(
        schemas[1].attributes
    ):
        return None
    return _attribute_to_input


def _attribute_to_input(node: ir.Node, names: NameSource) -> None:
    attribute = _ATTRIBUTE_TO_INPUT[node.op_type]
    values = np.asarray(node.attributes[attribute].as_ints(), np.int64)
    graph = node.graph
    assert isinstance(graph, ir.Graph)
    name = names.take(f"{node.name or node.op_type}_{attribute}")
    value = ir.Value(name=name, shape=ir.Shape(values.shape), type=ir.TensorType(ir.DataType.INT64))
    value.const_value = ir.tensor(values, name=name)
    graph.register_initializer(value)
    node.resize_inputs(2)
    node.replace_input_with(1, value)
    del node.attributes[attribute]


def _roialign_output_half_pixel(node: ir.Node, names: NameSource) -> None:
    """RoiAlign before 16 computed what opset 16 calls output_half_pixel."""
    node.attributes["coordinate_transformation_mode"] = ir.AttrString(
        "coordinate_transformation_mode", "output_half_pixel"
    )


def _split_num_outputs(node: ir.Node, names: NameSource) -> None:
    """An even Split: opset 18 wants the number of outputs said."""
    node.attributes["num_outputs"] = ir.AttrInt64("num_outputs", len(node.outputs))


def _flatten_softmax(node: ir.Node, names: NameSource) -> None:
    """op(x, axis=k) before 13 == Reshape(op(Flatten(x, axis=k), axis=-1), Shape(x))."""
    graph = node.graph
    assert isinstance(graph, ir.Graph)
    x = node.inputs[0]
    assert x is not None
    axis = plain_attr(node, "axis", 1)
    base = node.name or node.op_type
    flat = ir.Value(name=names.take(f"{base}_flat"), type=x.type)
    shape = ir.Value(name=names.take(f"{base}_shape"), type=ir.TensorType(ir.DataType.INT64))
    flatten = ir.Node(
        "",
        "Flatten",
        [x],
        [ir.AttrInt64("axis", axis or 0)],
        outputs=[flat],
        name=names.take(f"{base}_Flatten"),
    )
    shape_of = ir.Node("", "Shape", [x], outputs=[shape], name=names.take(f"{base}_Shape"))
    graph.insert_before(node, [flatten, shape_of])
    output = node.outputs[0]
    normalized = ir.Value(name=names.take(f"{base}_2d"), type=output.type)
    replacement = ir.Node(
        "", node.op_type, [flat], [ir.AttrInt64("axis", -1)], outputs=[normalized], name=node.name
    )
    reshaped = ir.Value(name=names.take(f"{base}_reshaped"), type=output.type, shape=output.shape)
    reshape = ir.Node(
        "", "Reshape", [normalized, shape], outputs=[reshaped], name=names.take(f"{base}_Reshape")
    )
    graph.insert_after(node, [replacement, reshape])
    # The Reshape's output takes over the old output (its name too, if it is a graph output).
    ir.convenience.replace_all_uses_with(output, reshaped, replace_graph_outputs=True)
    old_name = output.name
    graph.remove(node, safe=True)
    if reshaped.is_graph_output():
        reshaped.name = old_name


def _last_axis(node: ir.Node) -> bool:
    """Whether a Softmax-like node works on the last axis only (the same meaning before and
    after opset 13)."""
    axis = plain_attr(node, "axis", 1)
    if axis == -1:
        return True
    x = node.inputs[0] if node.inputs else None
    if axis is None or x is None or x.shape is None:
        return False
    return axis == len(x.shape) - 1

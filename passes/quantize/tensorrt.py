"""The `tensorrt` placement profile: NVIDIA's rules for explicit (Q/DQ) quantization.

- Each selected Conv/ConvTranspose/Gemm/MatMul reads its activation input through a
  QuantizeLinear -> DequantizeLinear pair (per-tensor, symmetric int8, zero point 0) and its
  weight as int8 behind a per-output-channel DequantizeLinear (`insert` does the weights).
  With precision fp8 (Hopper and later) the same places get float8 e4m3fn Q/DQ instead, zero
  points 0 of that type, scales amax / 448; the model needs opset 19.
- Only the readers that need it switch to the dequantized value: nothing else in the graph
  sees quantization noise, and no Q/DQ lands between a Conv and the BatchNormalization or
  ReLU after it, nor on a Conv's output for its own sake.
- Residual Add: when one input comes straight from a quantized Conv (its only reader), the
  other (skip) input gets Q/DQ, so TensorRT fuses the Add into that Conv as an int8 residual.
  When both inputs come from quantized Convs, the second input is the skip.
- Concat: the quantized inputs of a Concat (and its output, when quantized) share one scale,
  set by the range of the Concat's output (the union of its inputs' ranges), so TensorRT can
  drop the requantization around it.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.passes.quantize.graphutil import (
    already_quantized,
    float_activation,
    is_onnx_op,
    node_label,
)
from graphopt.passes.quantize.plan import Plan
from graphopt.passes.quantize.qparams import Precision
from graphopt.passes.quantize.sites import Excluder, Exclusion, Selection


def plan_tensorrt(
    graph: ir.Graph,
    selection: Selection,
    excluder: Excluder,
    forbidden: frozenset[str] = frozenset(),
    *,
    precision: Precision = "int8",
) -> Plan:
    """Q/DQ placement for TensorRT; user exclusions of residual Adds go to `selection`."""
    plan = Plan(symmetric=True, precision=precision, quantize_bias=False, forbidden=forbidden)
    for site in selection.sites:
        plan.sites.append(site)
        for index in site.activations:
            value = site.node.inputs[index]
            assert value is not None
            plan.add(value, (site.node, index))
    quantized = {site.node for site in selection.sites}
    for node in graph:
        if is_onnx_op(node, "Add"):
            _residual_add(node, quantized, plan, selection, excluder)
    for node in graph:
        if is_onnx_op(node, "Concat"):
            _concat(node, plan)
    return plan


def _residual_add(
    node: ir.Node, quantized: set[ir.Node], plan: Plan, selection: Selection, excluder: Excluder
) -> None:
    if len(node.inputs) != 2 or any(already_quantized(v) for v in node.inputs):
        return
    fused = [i for i, v in enumerate(node.inputs) if _straight_from_quantized_conv(v, quantized)]
    # Add has one type for both inputs, and a Conv's output is float here.
    if not fused or not all(float_activation(v, assume_float=True) for v in node.inputs):
        return
    if excluder.matches(node):
        exclusion = Exclusion(
            node_label(node), node.op_type, "user", "residual input left in float"
        )
        if exclusion not in selection.excluded:  # placement may be made more than once
            selection.excluded.append(exclusion)
        return
    skip = 1 if fused == [0] or len(fused) == 2 else 0
    value = node.inputs[skip]
    assert value is not None
    plan.add(value, (node, skip))


def _straight_from_quantized_conv(value: ir.Value | None, quantized: set[ir.Node]) -> bool:
    if value is None or value.is_graph_output():
        return False
    producer = value.producer()
    if producer is None or producer not in quantized or producer.op_type != "Conv":
        return False
    return len(list(value.uses())) == 1


def _concat(node: ir.Node, plan: Plan) -> None:
    output = node.outputs[0]
    members = [v.name for v in node.inputs if v is not None and v.name in plan]
    if not members or output.name is None:
        return
    if output.name in plan:
        members.append(output.name)
    first = members[0]
    for other in members[1:]:
        plan.share(first, other)
    plan.cover(first, output.name)

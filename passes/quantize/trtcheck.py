"""The TensorRT constraint check: what TensorRT's explicit quantization refuses, found before
an engine build does.

Every QuantizeLinear and DequantizeLinear of the model (subgraphs included) is checked:

- the default-domain opset is at least 13 (per-channel DequantizeLinear needs it), and at
  least 19 where the quantized type is float8 (Q/DQ take float8 from opset 19);
- the quantized type is signed: int8, float8 e4m3fn (fp8, Hopper and later) or int4; a
  QuantizeLinear without a zero point produces uint8, which TensorRT cannot take;
- every zero point is a constant 0 (for fp8 +0: the bit pattern of -0 is refused too);
- a DequantizeLinear reading a QuantizeLinear takes the same quantized type, and a compute
  op does not read int8 and fp8 inputs at once (TensorRT runs a quantized layer in one
  type; a conservative reading of its docs, which show no layer mixing the two);
- every scale is a constant, positive and finite;
- per-channel scales appear only on the weight input of Conv (axis 0), ConvTranspose (axis 1),
  Gemm (axis 0 with transB=1, else 1) or MatMul (the last axis of B): activations are
  per-tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.passes.quantize.graphutil import (
    DEQUANTIZE,
    QUANTIZE,
    constant,
    is_onnx_op,
    node_label,
    plain_attr,
)

MIN_OPSET = 13
#: QuantizeLinear/DequantizeLinear take float8 types from opset 19.
FP8_MIN_OPSET = 19
_FP8_TYPES = frozenset({ir.DataType.FLOAT8E4M3FN})
_ALLOWED_TYPES = frozenset({ir.DataType.INT8, ir.DataType.FLOAT8E4M3FN, ir.DataType.INT4})


@dataclass(frozen=True)
class Violation:
    """One node TensorRT would refuse, and why."""

    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.node}: {self.message}"


def check_tensorrt(model: ir.Model) -> list[Violation]:
    """Every TensorRT explicit-quantization constraint the model breaks (empty: none)."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    violations: list[Violation] = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if not is_onnx_op(node, QUANTIZE, DEQUANTIZE):
            continue
        label = node_label(node)
        problems = []
        if opset < MIN_OPSET:
            problems.append(f"the model's opset is {opset}; TensorRT needs Q/DQ at opset 13+")
        elif opset < FP8_MIN_OPSET and _quantized_type(node) in _FP8_TYPES:
            problems.append(f"the model's opset is {opset}; float8 Q/DQ need opset 19+")
        problems += _type_problems(node)
        problems += _pair_problems(node)
        problems += _zero_point_problems(node)
        problems += _scale_problems(node)
        violations.extend(Violation(label, problem) for problem in problems)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        mixed = _mixed_inputs(node)
        if mixed:
            violations.append(Violation(node_label(node), mixed))
    return violations


def _quantized_type(node: ir.Node) -> ir.DataType | None:
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    if zero_point is not None:
        return zero_point.dtype
    if node.op_type == QUANTIZE:
        output_dtype = plain_attr(node, "output_dtype", 0)
        return ir.DataType(output_dtype) if output_dtype else ir.DataType.UINT8
    x = node.inputs[0]
    return None if x is None else x.dtype


def _type_problems(node: ir.Node) -> list[str]:
    qtype = _quantized_type(node)
    if qtype is None:
        return []
    if qtype == ir.DataType.UINT8:
        what = "activation" if _is_activation(node) else "weight"
        return [f"uint8 {what} quantization; TensorRT takes only signed int8"]
    if qtype not in _ALLOWED_TYPES:
        return [f"quantized type {qtype.name} is not one TensorRT takes (int8, fp8 e4m3, int4)"]
    return []


def _zero_point_problems(node: ir.Node) -> list[str]:
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    if zero_point is None:
        return []
    tensor = constant(zero_point)
    if tensor is None:
        return ["its zero point is computed at run time; TensorRT needs a constant 0"]
    values = np.asarray(tensor.numpy()).astype(np.float64)
    nonzero = values[(values != 0) | np.isnan(values)]
    if nonzero.size:
        return [f"zero point {nonzero.flat[0]:g} != 0; TensorRT needs symmetric quantization"]
    if np.any(np.signbit(values)):
        return ["zero point -0 (a float8 -0 is not the bit pattern 0 TensorRT expects)"]
    return []


def _pair_problems(node: ir.Node) -> list[str]:
    """A DequantizeLinear that reads a QuantizeLinear's output in another type."""
    if node.op_type != DEQUANTIZE or not node.inputs or node.inputs[0] is None:
        return []
    producer = node.inputs[0].producer()
    if producer is None or not is_onnx_op(producer, QUANTIZE):
        return []
    mine, theirs = _quantized_type(node), _quantized_type(producer)
    if mine is None or theirs is None or mine == theirs:
        return []
    return [f"it dequantizes {mine.name} but '{node_label(producer)}' quantizes to {theirs.name}"]


def _mixed_inputs(node: ir.Node) -> str | None:
    """Why a node reading DequantizeLinear outputs of both int8 and float8 is refused (int4
    weights with fp8 activations, W4A8, are left alone)."""
    if is_onnx_op(node, QUANTIZE, DEQUANTIZE):
        return None
    kinds = {}
    for value in node.inputs:
        producer = None if value is None else value.producer()
        if producer is None or not is_onnx_op(producer, DEQUANTIZE):
            continue
        qtype = _quantized_type(producer)
        if qtype == ir.DataType.INT8 or qtype in _FP8_TYPES:
            kinds["fp8" if qtype in _FP8_TYPES else "int8"] = qtype
    if len(kinds) < 2:
        return None
    names = " and ".join(sorted(qtype.name for qtype in kinds.values()))
    return f"it reads {names} inputs; TensorRT runs a quantized layer in one type"


def _scale_problems(node: ir.Node) -> list[str]:
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    tensor = constant(scale)
    if tensor is None:
        return ["its scale is computed at run time; TensorRT needs a constant"]
    values = np.asarray(tensor.numpy(), np.float64)
    problems = []
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        problems.append("a scale is not positive and finite")
    if values.size > 1 and not plain_attr(node, "block_size", 0):
        problems += _axis_problems(node)
    return problems


def _axis_problems(node: ir.Node) -> list[str]:
    """A per-channel node must feed a weight input, along its output-channel axis."""
    axis = plain_attr(node, "axis", 1)
    if node.op_type == QUANTIZE:
        if _is_activation(node):
            return ["per-channel QuantizeLinear of an activation; TensorRT needs per-tensor"]
        return []  # a Q of a float weight: the DQ after it is judged
    rank = _rank(node)
    problems = []
    for user, index in node.outputs[0].uses():
        expected = _weight_axis(user, index, rank)
        if expected is None:
            problems.append(
                f"per-channel DequantizeLinear read by {user.op_type} input {index}, which is "
                "not a weight; TensorRT quantizes activations per tensor"
            )
            continue
        normalized = None if axis is None else (axis + rank if axis < 0 and rank else axis)
        if normalized != expected:
            problems.append(
                f"per-channel axis {axis} on the weight of {user.op_type} "
                f"'{node_label(user)}'; its output-channel axis is {expected}"
            )
    return problems


def _rank(node: ir.Node) -> int:
    x = node.inputs[0]
    if x is not None and x.shape is not None:
        return len(x.shape)
    tensor = constant(x)
    return 0 if tensor is None else len(tensor.shape)


def _weight_axis(user: ir.Node, index: int, rank: int) -> int | None:
    if index != 1 or user.domain not in ("", "ai.onnx"):
        return None
    if user.op_type == "Conv":
        return 0
    if user.op_type == "ConvTranspose":
        return 1
    if user.op_type == "Gemm":
        return 0 if plain_attr(user, "transB", 0) else 1
    if user.op_type == "MatMul":
        return rank - 1 if rank >= 2 else None
    return None


def _is_activation(node: ir.Node) -> bool:
    """A Q of a run-time tensor, or a DQ of one (weights are constants on both sides)."""
    return constant(node.inputs[0]) is None

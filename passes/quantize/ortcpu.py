"""The `ort-cpu` placement profile: the QDQ patterns ONNX Runtime's CPU provider fuses into
integer kernels (its QDQ selectors, onnxruntime/core/optimizer/qdq_transformer).

U8S8: activations uint8 with a zero point (asymmetric), weights int8 symmetric per channel,
biases int32 with scale = input scale x weight scale (a Gemm's alpha folded into its weight).
On x86 CPUs without VNNI, ORT's U8S8 kernels add pairs of uint8 x int8 products in int16
(VPMADDUBSW), which saturates (ORT's documented caveat): on PP-OCRv4 that cost 1.9 points of
character error rate. There (`kernels_for_this_cpu`, for `ort_kernels=auto`) graphopt rounds
the weights of GEMM-based ops to 7 bits, [-63, 63] (u8s7: 2 x 255 x 63 fits int16), and keeps
8 bits for depthwise convolutions, which ORT accumulates in int32; U8S8 speed, no saturation.
`ort_kernels=u8u8` instead stores 8-bit weights as uint8 with zero point 128 (U8U8 kernels,
slower, no saturation, the full 8 bits).

- Conv: DQ(x), DQ(w), DQ(b) -> Conv -> Q(y) becomes QLinearConv, so a Conv's output is
  quantized too. When a Relu (or Clip) is the Conv's only reader, the Relu's output is
  quantized instead: ORT drops a Relu made redundant by the Q after it.
- MatMul / Gemm: DQ(a), DQ(b) -> MatMul becomes MatMulIntegerToFloat, or QLinearMatMul when
  the output is quantized as well; Gemm becomes QGemm (bias only when beta is 1).
- The int8 region then grows from those ops, to a fixed point:
  - ops that only move data (MaxPool, Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Slice,
    Expand, Gather, Tile, Resize): input and output share one scale (forwards and backwards),
    so ORT drops their Q/DQ and moves int8 data;
  - AveragePool, GlobalAveragePool, LeakyRelu, Sigmoid with a quantized input get a quantized
    output (QLinear* kernels);
  - Add and Mul (QLinearAdd, QLinearMul) whose run-time inputs are all quantized already,
    and Concat (QLinearConcat) with at least one quantized input and only run-time float
    inputs, get every input and the output quantized (after a following Relu, as for
    Conv). An Add/Mul with an input from a float op is left in float: quantizing that input
    adds a rounding that saves no int8 data. A hard-swish x * HardSigmoid(x) after a
    QLinearConv is such a Mul (ORT has no integer HardSigmoid); with its gate and product
    quantized, PP-OCRv4's u8u8 minmax CER was 3.05 % instead of 1.12 % (200 lines).
- Every reader of a quantized tensor reads the dequantized value (ORT's fusions need the
  producer to feed only Q), except ops the user excluded, which keep reading the float value.
  Graph outputs are never quantized.
"""

from __future__ import annotations

import platform
from pathlib import Path

import onnx_ir as ir

from graphopt.passes.quantize.graphutil import (
    already_quantized,
    constant,
    float_activation,
    is_onnx_op,
    plain_attr,
)
from graphopt.passes.quantize.plan import Plan
from graphopt.passes.quantize.sites import Excluder, Selection

#: The int8 weight range [-63, 63] of u8s7: the sum of two uint8 x int8 products,
#: 2 x 255 x 63 = 32,130, fits VPMADDUBSW's int16 (2 x 255 x 127 = 64,770 does not).
SEVEN_BIT_LIMIT = 63

_DATA_MOVEMENT = frozenset(
    {
        "MaxPool",
        "Reshape",
        "Transpose",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Slice",
        "Expand",
        "Gather",
        "Tile",
        "Resize",
    }
)
_UNARY = frozenset({"AveragePool", "GlobalAveragePool", "LeakyRelu", "Sigmoid"})
_MULTI_INPUT = frozenset({"Add", "Mul", "Concat"})
_RELU_LIKE = frozenset({"Relu", "Clip"})


def plan_ortcpu(
    graph: ir.Graph,
    selection: Selection,
    excluder: Excluder,
    forbidden: frozenset[str] = frozenset(),
    *,
    unsigned_weights: bool = False,
    weight_limit: int = 127,
) -> Plan:
    """Q/DQ placement for ONNX Runtime's CPU integer kernels (U8U8 with `unsigned_weights`,
    7-bit U8S8 with `weight_limit` 63)."""
    plan = Plan(
        symmetric=False,
        quantize_bias=True,
        unsigned_weights=unsigned_weights,
        weight_limit=weight_limit,
        forbidden=forbidden,
    )
    plan.float_readers = {node for node in graph if excluder.matches(node)}
    for site in selection.sites:
        plan.sites.append(site)
        if _depthwise(site.node):
            plan.full_range.add(site.node)
        for index in site.activations:
            value = site.node.inputs[index]
            assert value is not None
            plan.add(value)
        if site.node.op_type == "Conv":
            output = _after_relu(site.node.outputs[0])
            if _quantizable(output):
                plan.add(output)
    nodes = [node for node in graph if node.domain in ("", "ai.onnx")]
    nodes = [node for node in nodes if node not in plan.float_readers]
    changed = True
    while changed:
        changed = False
        for node in nodes:
            changed |= _grow(node, plan)
    return plan


def _depthwise(node: ir.Node) -> bool:
    """A Conv with one input and one output channel per group: ONNX Runtime's QLinearConv
    runs it with its depthwise kernel, which accumulates in int32 (measured: 8-bit weights
    do not saturate there, while with two outputs per group, on the GEMM path, they do)."""
    if node.op_type != "Conv":
        return False
    weight = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    group = plain_attr(node, "group", 1)
    if weight is None or group is None or len(weight.shape) < 3:
        return False
    return group > 1 and weight.shape[0] == group and weight.shape[1] == 1


def _grow(node: ir.Node, plan: Plan) -> bool:
    op = node.op_type
    if not node.inputs or node.inputs[0] is None or not node.outputs:
        return False
    x, y = node.inputs[0], node.outputs[0]
    if op in _DATA_MOVEMENT:
        if x.name in plan and y.name in plan:
            return plan.share(x.name, y.name)  # type: ignore[arg-type]
        for src, dst in ((x, y), (y, x)):  # forwards, then backwards
            if src.name in plan and dst.name not in plan and _quantizable(dst) and plan.add(dst):
                plan.share(src.name, dst.name)  # type: ignore[arg-type]
                return True
        return False
    if op in _UNARY:
        if x.name in plan and _quantizable(y) and y.name not in plan:
            return plan.add(y)
        return False
    if op in _MULTI_INPUT:
        inputs = [v for v in node.inputs if v is not None]
        if not any(v.name in plan for v in inputs):
            return False
        if op != "Concat" and not all(v.name in plan for v in inputs):
            return False  # an input from a float op: see the module docstring
        if not all(_quantizable(v) for v in inputs):
            return False
        output = _after_relu(y) if op != "Concat" else y
        if not _quantizable(output) or any(v.name in plan.forbidden for v in [*inputs, output]):
            return False
        changed = False
        for value in [*inputs, output]:
            changed |= value.name not in plan and plan.add(value)
        return changed
    return False


def _after_relu(value: ir.Value) -> ir.Value:
    """The output of a Relu/Clip that is `value`'s only reader, else `value` itself."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return value
    user, _ = uses[0]
    if is_onnx_op(user, *_RELU_LIKE) and user.outputs:
        return user.outputs[0]
    return value


def _quantizable(value: ir.Value | None) -> bool:
    """A run-time float tensor, not yet quantized, not a graph output. Untyped values count
    as float: every op here has one type for the inputs and outputs it connects, and one of
    them is float (a compute op's input or output, or an already planned tensor)."""
    if value is None or not float_activation(value, assume_float=True):
        return False
    return not already_quantized(value) and not value.is_graph_output()


_X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})


def kernels_for_this_cpu() -> tuple[str, str]:
    """("u8s8" | "u8s7", why) for the CPU graphopt runs on."""
    machine = platform.machine().lower()
    if machine not in _X86:
        return "u8s8", f"{machine or 'this'} CPU: integer dot products accumulate in int32"
    flags = _cpu_flags()
    if flags is None:
        return (
            "u8s7",
            "x86 CPU whose VNNI support could not be read: 7-bit weights keep U8S8 from saturating",
        )
    if flags & _VNNI_FLAGS:
        return "u8s8", "x86 CPU with VNNI: U8S8 accumulates in int32"
    return (
        "u8s7",
        "x86 CPU without VNNI: 7-bit weights keep U8S8's int16 partial sums from saturating",
    )


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None

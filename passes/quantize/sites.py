"""Which compute ops get quantized, and why the others do not.

A *site* is a Conv, ConvTranspose, Gemm or MatMul that will read quantized inputs: its
activation input(s) get a QuantizeLinear -> DequantizeLinear pair and its constant weight is
stored as int8 behind a DequantizeLinear. Every candidate that is left in float gets an
`Exclusion` with a reason code, so the report (and `--explain`) can say why:

- ``user``: matched an `exclude` entry (a node name, ``re:<regex>`` on names, ``op:<OpType>``);
- ``small-channels``: fewer than `min_channels` output channels, or a dot product (input
  channels per group x kernel area for a convolution, K for Gemm/MatMul) shorter than
  `min_channels`: int8 buys nothing there and costs the most precision (a depthwise 3x3
  convolution sums 9 terms, a 10-class classifier head has 10 outputs);
- ``GEMV``: (tensorrt) the activation operand has a single row and all its dims are known, so
  the op is a matrix-vector product, memory bound, where int8 does not pay for its Q/DQ;
- ``attention``: a MatMul of two activations (the attention core) or a Softmax;
- ``LayerNorm``, ``GELU``: LayerNormalization, Gelu and Erf stay in float;
- ``dynamic-weight``: the weight is computed at run time, not a constant;
- ``dtype``: the op does not compute in float32 (float16 models need opset 19 Q/DQ, later);
- ``no-int8-kernel``: (ort-cpu) ONNX Runtime's CPU provider has no fused integer kernel;
- ``subgraph``: inside an If/Loop/Scan body, which this pass does not rewrite.

Ops that already read a DequantizeLinear output are left alone and only counted, so a second
run changes nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir

from graphopt.passes.quantize.graphutil import (
    already_quantized,
    constant,
    float_activation,
    known_shape,
    node_label,
    plain_attr,
)

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FLOAT_OPS = {
    "LayerNormalization": "LayerNorm",
    "Softmax": "attention",
    "Gelu": "GELU",
    "Erf": "GELU",
}


@dataclass(frozen=True)
class Exclusion:
    """A candidate op left in float, with its reason code and a sentence for people."""

    node: str
    op: str
    reason: str
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"node": self.node, "op": self.op, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True, eq=False)
class Site:
    """A compute op to quantize.

    Attributes:
        node: the Conv/ConvTranspose/Gemm/MatMul.
        activations: input indices that carry activations (one, or two for a MatMul of two
            activations).
        weight: input index of the constant weight, None for a MatMul of two activations.
        axis: the weight's output-channel axis (per-channel scales run along it).
        bias: input index of a constant bias (Conv, ConvTranspose, Gemm), if any.
    """

    node: ir.Node
    activations: tuple[int, ...]
    weight: int | None
    axis: int | None
    bias: int | None = None


class Excluder:
    """The `exclude` option: node names, ``re:<regex>`` searched in names, ``op:<OpType>``."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self._names: set[str] = set()
        self._regexes: list[tuple[str, re.Pattern[str]]] = []
        self._ops: set[str] = set()
        for pattern in patterns:
            kind, rule = parse_exclude(pattern)
            if kind == "re":
                self._regexes.append((pattern, re.compile(rule)))
            elif kind == "op":
                self._ops.add(rule)
            else:
                self._names.add(rule)
        self._used: set[str] = set()

    def matches(self, node: ir.Node) -> bool:
        hit = False
        name = node.name or ""
        if name and name in self._names:
            self._used.add(name)
            hit = True
        if node.op_type in self._ops:
            self._used.add(f"op:{node.op_type}")
            hit = True
        for pattern, regex in self._regexes:
            if name and regex.search(name):
                self._used.add(pattern)
                hit = True
        return hit

    def unused(self) -> list[str]:
        """Entries that matched no node so far (likely typos)."""
        entries = [*self._names, *(f"op:{op}" for op in self._ops)]
        entries += [pattern for pattern, _ in self._regexes]
        return sorted(entry for entry in entries if entry not in self._used)


def parse_exclude(pattern: str) -> tuple[str, str]:
    """("name" | "re" | "op", rule); raises ValueError on an empty entry or a bad regex."""
    if pattern.startswith("re:"):
        rule = pattern[3:]
        try:
            re.compile(rule)
        except re.error as exc:
            raise ValueError(
                f"exclude entry {pattern!r} is not a valid regular expression ({exc})"
            ) from None
        return "re", rule
    if pattern.startswith("op:"):
        if not pattern[3:]:
            raise ValueError("exclude entry 'op:' names no op type")
        return "op", pattern[3:]
    if not pattern:
        raise ValueError("exclude entries must not be empty")
    return "name", pattern


@dataclass
class Selection:
    """The result of `select`: sites, exclusions, and ops already quantized (left alone)."""

    sites: list[Site]
    excluded: list[Exclusion]
    already_quantized: int


def select(
    graph: ir.Graph,
    *,
    target: str,
    excluder: Excluder,
    min_channels: int,
    quantize_attention: bool,
) -> Selection:
    """Every compute op of the main graph as a site or an exclusion (subgraphs: excluded)."""
    selection = Selection([], [], 0)
    top_level = {id(node) for node in graph}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        op = node.op_type
        if op not in COMPUTE_OPS and op not in _FLOAT_OPS:
            continue
        label = node_label(node)
        if id(node) not in top_level:
            if op in COMPUTE_OPS:
                selection.excluded.append(
                    Exclusion(label, op, "subgraph", "inside an If/Loop/Scan body")
                )
            continue
        if op in _FLOAT_OPS:
            excluded = excluder.matches(node)
            reason = "user" if excluded else _FLOAT_OPS[op]
            selection.excluded.append(Exclusion(label, op, reason, "kept in float"))
            continue
        result = _compute_site(node, target, excluder, min_channels, quantize_attention)
        if result is None:
            selection.already_quantized += 1
        elif isinstance(result, Exclusion):
            selection.excluded.append(result)
        else:
            selection.sites.append(result)
    return selection


def _compute_site(
    node: ir.Node, target: str, excluder: Excluder, min_channels: int, quantize_attention: bool
) -> Site | Exclusion | None:
    op = node.op_type
    label = node_label(node)

    def refuse(reason: str, detail: str) -> Exclusion:
        return Exclusion(label, op, reason, detail)

    if len(node.inputs) < 2:
        return refuse("dtype", "it has fewer than two inputs")
    x, w = node.inputs[0], node.inputs[1]
    if already_quantized(x) or already_quantized(w):
        return None
    if excluder.matches(node):
        return refuse("user", "excluded by the exclude option")
    if op == "MatMul" and float_activation(x) and float_activation(w):
        if not quantize_attention:
            return refuse("attention", "MatMul of two activations (attention core)")
        return Site(node, activations=(0, 1), weight=None, axis=None)
    tensor = constant(w)
    # The op's type constraint gives an untyped input the weight's type.
    weight_is_float = tensor is not None and tensor.dtype == ir.DataType.FLOAT
    if not float_activation(x, assume_float=weight_is_float):
        if x is not None and x.dtype == ir.DataType.FLOAT:
            return refuse("dynamic-weight", "its activation input is a constant")
        return refuse("dtype", "its input is not float32")
    if tensor is None:
        return refuse("dynamic-weight", "its weight is computed at run time")
    if tensor.dtype != ir.DataType.FLOAT:
        return refuse("dtype", "its weight is not float32")
    if op == "ConvTranspose" and target == "ort-cpu":
        return refuse("no-int8-kernel", "ONNX Runtime's CPU provider has no QLinearConvTranspose")
    shape = tuple(int(d) for d in tensor.shape.numpy())
    geometry = _geometry(node, shape)
    if isinstance(geometry, str):
        return refuse("dtype", geometry)
    axis, outputs, reduction = geometry
    if outputs < min_channels or reduction < min_channels:
        return refuse(
            "small-channels",
            f"{outputs} output channels, dot products of {reduction} (minimum {min_channels})",
        )
    if target == "tensorrt" and _is_gemv(node, x):
        return refuse("GEMV", "its activation has a single row: a matrix-vector product")
    bias = None
    if op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2:
        if node.inputs[2] is not None and constant(node.inputs[2]) is not None:
            bias = 2
    return Site(node, activations=(0,), weight=1, axis=axis, bias=bias)


def _geometry(node: ir.Node, shape: tuple[int, ...]) -> tuple[int, int, int] | str:
    """(output-channel axis, output channels, dot-product length) of the weight, or why not."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        if len(shape) < 3:
            return f"a {op} weight of rank {len(shape)}"
        kernel = math.prod(shape[2:])
        if op == "Conv":
            return 0, shape[0], shape[1] * kernel
        group = plain_attr(node, "group", 1) or 1
        return 1, shape[1] * group, (shape[0] // group) * kernel
    if op == "Gemm":
        if len(shape) != 2:
            return f"a Gemm weight of rank {len(shape)}"
        if plain_attr(node, "transB", 0):
            return 0, shape[0], shape[1]
        return 1, shape[1], shape[0]
    # MatMul: B is [..., K, N]
    if len(shape) < 2:
        return "a MatMul with a vector weight"
    return len(shape) - 1, shape[-1], shape[-2]


def _is_gemv(node: ir.Node, x: ir.Value) -> bool:
    shape = known_shape(x)
    if shape is None:
        return False
    if node.op_type == "Gemm":
        if len(shape) != 2:
            return False
        rows = shape[1] if plain_attr(node, "transA", 0) else shape[0]
        return rows == 1
    return math.prod(shape[:-1]) == 1


def exclusion_counts(excluded: Sequence[Exclusion]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for item in excluded:
        counts[item.reason] = counts.get(item.reason, 0) + 1
    return dict(sorted(counts.items()))

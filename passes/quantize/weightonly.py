"""Weight-only int4: MatMul and Gemm weights stored as blockwise int4 behind opset 21's
DequantizeLinear (``axis=0, block_size=B``); activations stay float, no QuantizeLinear.

Every weight is stored as [K, N] (K the reduction axis): a Gemm with ``transB=1`` gets its
weight transposed and ``transB=0``, because ONNX Runtime (1.31, CPU, optimization level
extended and above) fuses DequantizeLinear -> MatMul and -> Gemm(transB=0) into
MatMulNBits, and leaves a DequantizeLinear on axis 1 unfused. MatMulNBits quantizes the
activations to int8 by default (session option ``session.qdq_matmulnbits_accuracy_level``,
4); at level 0 or 1 it reproduces the unfused float result.

Weights are rounded to nearest (`blockwise`), after AWQ's per-input-channel scaling with
``method="awq"`` (`awq`). Sites are those of the int8 pass (`sites.select`) restricted to
MatMul and Gemm, with one more reason code, ``weight-rank`` (a MatMul whose weight is not 2-D,
a batched weight). A weight read by several sites is quantized once. The model's opset is
raised to 21 (IR version at least 10, which int4 tensors need) when there is anything to
quantize; ops that would change meaning stop the pass with their names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from graphopt.context import Context
from graphopt.errors import GraphoptError, PassFailed
from graphopt.model import Model
from graphopt.passes.quantize import awq, blockwise, opset
from graphopt.passes.quantize.graphutil import (
    DEQUANTIZE,
    NameSource,
    already_quantized,
    constant,
    node_label,
    plain_attr,
)
from graphopt.passes.quantize.sites import Excluder, Exclusion, exclusion_counts, select

#: The opset whose DequantizeLinear has `block_size` and reads int4.
INT4_OPSET = 21
#: The first IR version with int4 tensors.
INT4_IR_VERSION = 10
_OPS = ("MatMul", "Gemm")
_PASS = "quantize"
# Ops whose meaning changes before opset 21 in ways `opset.blockers` does not see.
_CHANGED_BY_21 = {
    "GroupNormalization": (
        21,
        "its scale and bias are per group before opset 21, per channel from 21",
    ),
    "DFT": (20, "its axis becomes an input with another default at opset 20"),
}


@dataclass
class WeightOnlyResult:
    """What `quantize_weights_int4` did: the report's numbers, warnings for the user, and the
    MatMuls/Gemms left in float with their reasons."""

    modified: bool
    stats: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    excluded: list[Exclusion] = field(default_factory=list)


@dataclass(frozen=True)
class _Site:
    node: ir.Node
    k_axis: int  # of the weight as stored in the graph: 0, or 1 for Gemm transB


def quantize_weights_int4(
    model: Model,
    ctx: Context,
    *,
    method: Literal["rtn", "awq"],
    block_size: int,
    excluder: Excluder,
    min_channels: int,
    samples: int,
    symmetric: bool = True,
) -> WeightOnlyResult:
    """Store the constant weights of MatMul/Gemm as blockwise int4 behind DequantizeLinear.

    Args:
        model: edited in place.
        ctx: calibration data (only `method="awq"` reads it), device, batch size, seed.
        method: "rtn" (round to nearest) or "awq" (activation-aware scales, then RTN).
        block_size: rows of K per scale, a power of two >= 16.
        excluder: the user's exclude entries.
        min_channels: weights with fewer than this many input or output channels stay float.
        samples: calibration samples AWQ uses (the first N).
        symmetric: zero point 0 (left out); else an int4 zero point per block.

    Raises:
        ValueError: a bad block size.
        GraphoptError: AWQ without calibration data.
        PassFailed: the opset cannot be raised to 21 without changing an op's meaning.
    """
    blockwise.check_block_size(block_size)
    m = model.ir
    sites, excluded, already = _select(m.graph, excluder, min_channels)
    stats: dict[str, Any] = {
        "precision": "int4",
        "weight_method": method,
        "block_size": block_size,
        "symmetric": symmetric,
        "quantized_nodes": 0,
        "weights_quantized": 0,
        "dequantize_linear": 0,
        "transposed_gemms": 0,
        "weight_bytes_before": 0,
        "weight_bytes_after": 0,
        "already_quantized": already,
        "excluded_count": len(excluded),
        "excluded_by_reason": exclusion_counts(excluded),
        "excluded": [item.to_dict() for item in excluded],
    }
    warnings = [f"exclude entry '{entry}' matched no node" for entry in excluder.unused()]
    if not sites:
        return WeightOnlyResult(False, stats, warnings, excluded)
    raise_from = _opset_to_raise(m)
    names = NameSource(m.graph)
    if method == "awq":
        stats.update(_awq(model, ctx, sites, block_size, symmetric, samples, names))
    if raise_from is not None:
        stats["opset_raised_from"] = raise_from
        stats["opset_rewritten_nodes"] = opset.raise_opset(m, INT4_OPSET)
    m.ir_version = max(m.ir_version, INT4_IR_VERSION)
    stats.update(_rewrite(m.graph, sites, block_size, symmetric, names))
    return WeightOnlyResult(True, stats, warnings, excluded)


# ---------------------------------------------------------------------------- sites


def _select(
    graph: ir.Graph, excluder: Excluder, min_channels: int
) -> tuple[list[_Site], list[Exclusion], int]:
    """MatMul/Gemm sites with a constant 2-D float weight, exclusions, and how many already
    read a DequantizeLinear output."""
    selection = select(
        graph,
        target="ort-cpu",
        excluder=excluder,
        min_channels=min_channels,
        quantize_attention=False,
    )
    excluded = [item for item in selection.excluded if item.op in _OPS]
    sites = []
    for site in selection.sites:
        node = site.node
        if node.op_type not in _OPS or site.weight is None:
            continue
        tensor = constant(node.inputs[1])
        assert tensor is not None
        if len(tensor.shape) != 2:
            excluded.append(
                Exclusion(
                    node_label(node),
                    node.op_type,
                    "weight-rank",
                    f"a weight of rank {len(tensor.shape)}: blocked int4 needs a 2-D [K, N]",
                )
            )
            continue
        trans_b = node.op_type == "Gemm" and plain_attr(node, "transB", 0)
        sites.append(_Site(node, 1 if trans_b else 0))
    already = sum(
        1
        for node in graph
        if node.op_type in _OPS
        and node.domain in ("", "ai.onnx")
        and any(already_quantized(value) for value in node.inputs[:2])
    )
    return sites, excluded, already


def _opset_to_raise(m: ir.Model) -> int | None:
    """The opset to raise from (None when already 21 or newer); fails the pass naming the
    ops that would change meaning."""
    current = opset.default_opset(m)
    if current >= INT4_OPSET:
        return None
    stopped = opset.blockers(m, INT4_OPSET)
    for node in ir.traversal.RecursiveGraphIterator(m.graph):
        changed = _CHANGED_BY_21.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if changed is not None and current < changed[0]:
            stopped.append(f"{node_label(node)} ({node.op_type}-{current}): {changed[1]}")
        if node.op_type == "GridSample" and current < 20:
            mode = node.attributes.get("mode")
            if mode is not None and mode.as_string() in ("bilinear", "bicubic"):
                stopped.append(
                    f"{node_label(node)} (GridSample-{current}): mode '{mode.as_string()}' is "
                    "renamed at opset 20"
                )
    if not stopped:
        return current
    more = f"; and {len(stopped) - 5} more" if len(stopped) > 5 else ""
    raise PassFailed(
        f"The model uses opset {current}, and blockwise int4 weights need opset {INT4_OPSET} "
        f"(DequantizeLinear with block_size), but raising it would change these ops: "
        f"{'; '.join(stopped[:5])}{more}.",
        pass_name=_PASS,
        node=stopped[0].split(" (")[0],
        hint=f"Re-export the model at opset {INT4_OPSET} (or convert it with "
        "onnx.version_converter) and run again, or use precision=int8, which needs opset 13.",
    )


# ---------------------------------------------------------------------------- AWQ


def _awq(
    model: Model,
    ctx: Context,
    sites: list[_Site],
    block_size: int,
    symmetric: bool,
    samples: int,
    names: NameSource,
) -> dict[str, Any]:
    """Search and fold AWQ scales (the float model keeps its math); the stats about it."""
    if ctx.calib_data is None:
        raise GraphoptError(
            "weight_method=awq chooses its scales from activations, and no calibration data "
            "was given.",
            hint="Pass --data with a few hundred representative inputs, or use "
            "weight_method=rtn, which needs none.",
        )
    planned = awq.plan([(site.node, site.k_axis) for site in sites])
    fallbacks = list(planned.fallbacks)
    if planned.groups:
        awq.collect(model, ctx, planned.groups, samples)
    layers = []
    for group in planned.groups:
        labels = tuple(node_label(node) for node, _ in group.readers)
        if not group.finite or group.rows is None or group.mean_abs is None:
            detail = f"'{group.name}' holds inf or NaN on the calibration data"
            fallbacks.append(awq.Fallback(labels, "non-finite", detail))
            continue
        weight = np.concatenate([_as_kn(node, axis) for node, axis in group.readers], axis=1)
        found = awq.search(
            group.rows, weight, group.mean_abs, block_size=block_size, symmetric=symmetric
        )
        if found.alpha > 0:
            awq.apply(group, found.scales, names)
        layers.append(
            {
                "activation": group.name,
                "nodes": list(labels),
                "fold": [step.describe() for step in group.folds],
                "alpha": found.alpha,
                "rows": found.rows,
                "rtn_error": found.rtn_error,
                "awq_error": found.error,
            }
        )
    return {
        "awq_samples": samples,
        "awq_scaled_nodes": sum(len(layer["nodes"]) for layer in layers if layer["alpha"] > 0),
        "awq_layers": layers,
        "awq_fallback_count": sum(len(item.nodes) for item in fallbacks),
        "awq_fallback": [item.to_dict() for item in fallbacks],
    }


def _as_kn(node: ir.Node, k_axis: int) -> np.ndarray:
    tensor = constant(node.inputs[1])
    assert tensor is not None
    array = np.asarray(tensor.numpy(), np.float32)
    return array.T if k_axis == 1 else array


# ---------------------------------------------------------------------------- rewrite


def _rewrite(
    graph: ir.Graph, sites: list[_Site], block_size: int, symmetric: bool, names: NameSource
) -> dict[str, Any]:
    """Replace each site's weight with DequantizeLinear of an int4 [K, N] initializer."""
    # Keyed by weight and K axis: a MatMul and a transB Gemm read the same tensor as two
    # different [K, N] matrices.
    readers: dict[tuple[int, int], list[_Site]] = {}
    for site in sites:
        readers.setdefault((id(site.node.inputs[1]), site.k_axis), []).append(site)
    dequantized: dict[tuple[int, int], ir.Value] = {}
    stats = {"bytes_before": 0, "bytes_after": 0, "transposed": 0}
    order = {id(node): i for i, node in enumerate(graph)}
    for key, group in readers.items():
        w = group[0].node.inputs[1]
        assert w is not None
        first = min(group, key=lambda s: order[id(s.node)]).node
        kn = _as_kn(group[0].node, group[0].k_axis)
        dequantized[key] = _dequantize_node(graph, names, w, kn, first, block_size, symmetric)
        stats["bytes_before"] += kn.size * 4
        stats["bytes_after"] += sum(
            v.const_value.nbytes
            for v in dequantized[key].producer().inputs  # type: ignore[union-attr]
            if v is not None and v.const_value is not None
        )
    originals = {id(s.node.inputs[1]): s.node.inputs[1] for s in sites}
    for site in sites:
        site.node.replace_input_with(1, dequantized[(id(site.node.inputs[1]), site.k_axis)])
        if site.k_axis == 1:
            site.node.attributes["transB"] = ir.AttrInt64("transB", 0)
            stats["transposed"] += 1
    for w in originals.values():
        assert w is not None
        if not w.uses() and w.name in graph.initializers:
            graph.initializers.pop(w.name)
    return {
        "quantized_nodes": len(sites),
        "weights_quantized": len(readers),
        "dequantize_linear": len(readers),
        "transposed_gemms": stats["transposed"],
        "weight_bytes_before": stats["bytes_before"],
        "weight_bytes_after": stats["bytes_after"],
    }


def _dequantize_node(
    graph: ir.Graph,
    names: NameSource,
    weight: ir.Value,
    kn: np.ndarray,
    before: ir.Node,
    block_size: int,
    symmetric: bool,
) -> ir.Value:
    """int4 values, scales (and zero points) as initializers, and the DequantizeLinear that
    reads them, placed before `before`; returns its output."""
    base = weight.name or "weight"
    quantized = blockwise.quantize(kn, block_size, symmetric=symmetric)
    inputs = [
        _initializer(graph, names.take(f"{base}_int4"), quantized.int4_values()),
        _initializer(graph, names.take(f"{base}_int4_scale"), quantized.scales),
    ]
    zero_points = quantized.int4_zero_points()
    if zero_points is not None:
        inputs.append(_initializer(graph, names.take(f"{base}_int4_zero_point"), zero_points))
    output = ir.Value(
        name=names.take(f"{base}_dequantized"),
        shape=ir.Shape(kn.shape),
        type=ir.TensorType(ir.DataType.FLOAT),
    )
    node = ir.Node(
        "",
        DEQUANTIZE,
        inputs,
        [ir.AttrInt64("axis", 0), ir.AttrInt64("block_size", block_size)],
        outputs=[output],
        name=names.take(f"{base}_DequantizeLinear"),
    )
    graph.insert_before(before, node)
    return output


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(np.ascontiguousarray(array), name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value

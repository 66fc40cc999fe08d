"""Applying a plan: QuantizeLinear -> DequantizeLinear pairs on activations, int8 or fp8
weights behind DequantizeLinear, int32 biases (ort-cpu). Everything new is named after the tensor
it stands for (``<name>_quantized``, ``<name>_scale``, ...), made unique in the graph."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.passes.quantize import qparams
from graphopt.passes.quantize.graphutil import (
    DEQUANTIZE,
    QUANTIZE,
    NameSource,
    constant,
    plain_attr,
)
from graphopt.passes.quantize.plan import ALL, Plan
from graphopt.passes.quantize.qparams import QParams, RangeLike
from graphopt.passes.quantize.sites import Site


@dataclass
class Inserted:
    """What `apply` added."""

    quantize_linear: int = 0
    dequantize_linear: int = 0
    weights: int = 0
    biases: int = 0


class MissingRange(ValueError):
    """Calibration returned no range for a tensor the plan quantizes."""


def group_params(plan: Plan, ranges: Mapping[str, RangeLike]) -> dict[str, QParams]:
    """Tensor name -> its group's parameters."""
    params: dict[str, QParams] = {}
    for root, members in plan.groups().items():
        missing = [name for name in members if name in plan and name not in ranges]
        if missing:
            raise MissingRange(f"no calibrated range for {', '.join(missing)}")
        # A Concat output that widens the group but could not be measured is skipped.
        members = [name for name in members if name in ranges]
        shared = qparams.activation_params(
            (ranges[m] for m in members), symmetric=plan.symmetric, precision=plan.precision
        )
        for name in members:
            if name in plan:
                params[name] = shared
        params.setdefault(root, shared)
    return params


def apply(
    graph: ir.Graph, plan: Plan, ranges: Mapping[str, RangeLike], *, per_channel: bool
) -> Inserted:
    """Rewrite `graph` as `plan` says, with scales from `ranges` (tensor name -> range)."""
    params = group_params(plan, ranges)
    names = NameSource(graph)
    inserted = Inserted()
    scale_values: dict[str, tuple[ir.Value, ir.Value]] = {}
    for name, readers in plan.readers.items():
        root = plan.group(name)
        if root not in scale_values:
            scale_values[root] = _scale_and_zero_point(graph, names, root, params[name])
        scale, zero_point = scale_values[root]
        _insert_pair(
            graph, names, plan.values[name], readers, plan.float_readers, scale, zero_point
        )
        inserted.quantize_linear += 1
        inserted.dequantize_linear += 1
    weights: dict[tuple[str, int | None, float, int], ir.Value] = {}
    for site in plan.sites:
        if site.weight is None:
            continue
        axis = site.axis if per_channel else None
        w = site.node.inputs[site.weight]
        assert w is not None and w.name is not None
        alpha = _gemm_alpha(site.node)
        if alpha is None:
            continue
        limit = qparams.INT8_MAX if site.node in plan.full_range else plan.weight_limit
        key = (w.name, axis, alpha, limit)
        if key not in weights:
            weights[key] = _quantized_weight(
                graph,
                names,
                site.node,
                w,
                axis,
                alpha,
                unsigned=plan.unsigned_weights,
                limit=limit,
                precision=plan.precision,
            )
            inserted.weights += 1
            inserted.dequantize_linear += 1
        site.node.replace_input_with(site.weight, weights[key])
        if alpha != 1.0:
            # Folded into the weight: ORT fuses only Gemms with alpha 1 into QGemm.
            site.node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
        _drop_if_unused(graph, w)
        if plan.quantize_bias and site.bias is not None:
            inserted.biases += _quantize_bias(graph, names, site, weights[key])
    inserted.dequantize_linear += inserted.biases
    return inserted


# ---------------------------------------------------------------------------- activations


def _scale_and_zero_point(
    graph: ir.Graph, names: NameSource, base: str, params: QParams
) -> tuple[ir.Value, ir.Value]:
    scale = _initializer(graph, names.take(f"{base}_scale"), np.asarray(params.scale, np.float32))
    zero_point = _initializer(
        graph, names.take(f"{base}_zero_point"), np.asarray(params.zero_point)
    )
    return scale, zero_point


def _insert_pair(
    graph: ir.Graph,
    names: NameSource,
    value: ir.Value,
    readers: set[tuple[ir.Node, int]] | None,
    float_readers: set[ir.Node],
    scale: ir.Value,
    zero_point: ir.Value,
) -> None:
    uses = list(value.uses())  # before the QuantizeLinear becomes a reader too
    base = value.name or "tensor"
    qtype = zero_point.dtype
    assert qtype is not None
    quantized = ir.Value(
        name=names.take(f"{base}_quantized"),
        type=ir.TensorType(qtype),
        shape=None if value.shape is None else value.shape.copy(),
    )
    dequantized = ir.Value(
        name=names.take(f"{base}_dequantized"),
        type=ir.TensorType(ir.DataType.FLOAT),
        shape=None if value.shape is None else value.shape.copy(),
    )
    q = ir.Node(
        "",
        QUANTIZE,
        [value, scale, zero_point],
        outputs=[quantized],
        name=names.take(f"{base}_QuantizeLinear"),
    )
    dq = ir.Node(
        "",
        DEQUANTIZE,
        [quantized, scale, zero_point],
        outputs=[dequantized],
        name=names.take(f"{base}_DequantizeLinear"),
    )
    producer = value.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, [q, dq])
    else:
        first = next(iter(graph), None)
        if first is None:
            graph.extend([q, dq])
        else:
            graph.insert_before(first, [q, dq])
    for user, index in uses:
        if readers is ALL:
            if user in float_readers:
                continue
        elif (user, index) not in readers:
            continue
        user.replace_input_with(index, dequantized)


# ---------------------------------------------------------------------------- weights


def _gemm_alpha(node: ir.Node) -> float | None:
    """A Gemm's alpha (1.0 for other ops), None when it is not a plain float."""
    if node.op_type != "Gemm":
        return 1.0
    return plain_attr(node, "alpha", 1.0)


def _quantized_weight(
    graph: ir.Graph,
    names: NameSource,
    node: ir.Node,
    weight: ir.Value,
    axis: int | None,
    factor: float = 1.0,
    *,
    unsigned: bool = False,
    limit: int = qparams.INT8_MAX,
    precision: qparams.Precision = "int8",
) -> ir.Value:
    """An int8 (or fp8) copy of `weight` x `factor` behind a DequantizeLinear; with
    `unsigned` the same int8 values stored as uint8 with zero point 128."""
    tensor = constant(weight)
    assert tensor is not None
    array = np.asarray(tensor.numpy(), np.float32)
    if factor != 1.0:
        array = array * np.float32(factor)
    scales = qparams.weight_scales(array, axis, precision, limit=limit)
    if precision == "fp8":
        values = qparams.quantize_weight_fp8(array, scales, axis)
        zero_points = np.zeros(scales.shape, qparams.FP8)
    else:
        values = qparams.quantize_weight(array, scales, axis, limit=limit)
        zero_points = np.zeros_like(scales, np.int8)
    if unsigned:
        values, zero_points = qparams.as_unsigned(values), np.full_like(scales, 128, np.uint8)
    base = weight.name or "weight"
    q = _initializer(graph, names.take(f"{base}_quantized"), values)
    scale = _initializer(graph, names.take(f"{base}_scale"), scales)
    zero_point = _initializer(graph, names.take(f"{base}_zero_point"), zero_points)
    attributes = [] if axis is None else [ir.AttrInt64("axis", axis)]
    dequantized = ir.Value(
        name=names.take(f"{base}_dequantized"),
        type=ir.TensorType(ir.DataType.FLOAT),
        shape=ir.Shape(array.shape),
    )
    dq = ir.Node(
        "",
        DEQUANTIZE,
        [q, scale, zero_point],
        attributes,
        outputs=[dequantized],
        name=names.take(f"{base}_DequantizeLinear"),
    )
    graph.insert_before(node, dq)
    return dequantized


def _quantize_bias(
    graph: ir.Graph,
    names: NameSource,
    site: Site,
    weight_dq: ir.Value,
) -> int:
    """int32 bias behind a DequantizeLinear, scale = input scale x weight scale (a Gemm's
    alpha is already in the weight, its beta goes into the values); 1 if done, 0 if the bias
    does not fit."""
    node = site.node
    bias = node.inputs[site.bias] if site.bias is not None else None
    x_scale = _dequantized_scale(node.inputs[site.activations[0]])
    tensor = constant(bias)
    producer = weight_dq.producer()
    if bias is None or tensor is None or x_scale is None or producer is None:
        return 0
    values = np.asarray(tensor.numpy(), np.float32)
    weight_scales = constant(producer.inputs[1])
    assert weight_scales is not None
    w_scales = np.asarray(weight_scales.numpy(), np.float32)
    assert site.axis is not None
    channels = producer.inputs[0].const_value.shape[site.axis]  # type: ignore[union-attr]
    if node.op_type == "Gemm":
        beta = plain_attr(node, "beta", 1.0)
        if beta is None:
            return 0
        values = values * np.float32(beta)
    if values.shape not in ((channels,), (1, channels)):
        return 0
    values = values.reshape(channels)
    scales = (x_scale * np.broadcast_to(w_scales, (channels,))).astype(np.float32)
    base = bias.name or "bias"
    q = _initializer(graph, names.take(f"{base}_quantized"), qparams.quantize_bias(values, scales))
    scale = _initializer(graph, names.take(f"{base}_scale"), scales)
    dequantized = ir.Value(
        name=names.take(f"{base}_dequantized"),
        type=ir.TensorType(ir.DataType.FLOAT),
        shape=ir.Shape([channels]),
    )
    dq = ir.Node(
        "",
        DEQUANTIZE,
        [q, scale],
        [ir.AttrInt64("axis", 0)],
        outputs=[dequantized],
        name=names.take(f"{base}_DequantizeLinear"),
    )
    graph.insert_before(node, dq)
    node.replace_input_with(site.bias, dequantized)  # type: ignore[arg-type]
    if node.op_type == "Gemm":
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    _drop_if_unused(graph, bias)
    return 1


# ---------------------------------------------------------------------------- helpers


def _dequantized_scale(value: ir.Value | None) -> np.float32 | None:
    """The per-tensor scale of the DequantizeLinear that produces `value`, if one does."""
    producer = None if value is None else value.producer()
    if producer is None or producer.op_type != DEQUANTIZE or len(producer.inputs) < 2:
        return None
    scale = constant(producer.inputs[1])
    if scale is None or scale.size != 1:
        return None
    return np.float32(np.asarray(scale.numpy()).reshape(()))


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(np.array(array, order="C"), name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if value.uses() or value.is_graph_input() or value.is_graph_output():
        return
    if value.name in graph.initializers and graph.initializers[value.name] is value:
        graph.initializers.pop(value.name)

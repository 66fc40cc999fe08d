"""Bias correction: cancel the mean output shift that int8 weight quantization will cause.

Rounding a layer's weights W to their int8 grid Q(W) moves each output's mean by
`(Q(W) - W)·E[x]`, the same on every input, and the errors of neighbouring layers add up
(Nagel et al., "Data-free quantization", 2019; Banner et al., 2019). This pass computes that
shift with the very Q(W) the `quantize` pass will produce — `quantize.qparams.weight_scales`
and `quantize_weight`, per output channel along the axis `quantize.sites` uses (Conv 0,
Gemm by transB, MatMul the last) — and E[x], each input channel's mean over the calibration
data, and subtracts it from the bias: `b' = b - (Q(W) - W)·E[x]`.

The layers corrected are exactly those `quantize` with `target=tensorrt` will quantize: the
pass asks `quantize.sites.select` with the same `exclude` and `min_channels` (on a copy of the
model with inferred shapes, so GEMVs are recognised as `quantize` does), and leaves the others,
whose weights stay float, alone.

- Conv (grouped and depthwise too): the mean output of channel o (group g) over all output
  positions is `Σ_c Σ_k W[o, c, k]·M_k[g·C/G + c]`, where M_k is the mean of the zero-padded
  input over the positions kernel tap k reads (strides, dilations, pads and auto_pad
  followed). M_k comes from the mean input sample (streamed, [C, H, W]), so the correction is
  exact for the mean over positions, borders and padding included. When the inputs change
  size between batches there is no mean sample, and M_k is taken as the per-channel mean
  over all samples and positions, which is right away from the borders only (stats key
  ``approximate``).
- Gemm (transA, transB, alpha, beta): `C' = C - alpha·E[x]·ΔW / beta`.
- MatMul: corrected through the Add of a constant bias that follows it (the pattern
  exporters write, fused by TensorRT); a MatMul without one is skipped (``no-bias-add``),
  since a new Add would change the graph `quantize` places Q/DQ in.
- A Conv or Gemm without a bias gets one when the shift is not negligible (over 1e-6 of the
  output's typical magnitude); a negligible shift changes nothing (``negligible``).
- ConvTranspose is skipped: its shift depends on the output position (stride phase).

A corrected node is marked (node metadata ``graphopt.bias_correction``), so a second run, even
on the saved model, changes nothing. Run the pass after `smoothquant` (which changes W) and
before `quantize`, with the same `min_channels`, `exclude` and `per_channel` as `quantize`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_passes

from graphopt.context import Context
from graphopt.model import Model
from graphopt.passes import channel_stats
from graphopt.passes.base import Pass, PassResult, option, register_pass
from graphopt.passes.conv_geometry import window_means
from graphopt.passes.quantize import qparams
from graphopt.passes.quantize.graphutil import (
    NameSource,
    constant,
    is_onnx_op,
    node_label,
    plain_attr,
)
from graphopt.passes.quantize.sites import (
    Excluder,
    Exclusion,
    Site,
    exclusion_counts,
    parse_exclude,
    select,
)
from graphopt.passes.weight_edit import set_constant

MARK = "graphopt.bias_correction"
_NEGLIGIBLE = 1e-6


@dataclass(frozen=True, kw_only=True)
class BiasCorrectionOptions:
    """Which layers are corrected (the same choice `quantize` makes) and on how much data."""

    samples: int = option(128, "calibration samples used (the first N)", range=(1, None))
    exclude: tuple[str, ...] = option(
        (),
        "ops left alone (give quantize the same): node names, 're:<regex>' on names, "
        "or 'op:<OpType>'",
    )
    min_channels: int = option(
        16,
        "quantize's min_channels: layers it leaves in float (fewer output channels or shorter "
        "dot products than this) are not corrected",
        range=(1, None),
    )
    per_channel: bool = option(
        True, "quantize's per_channel: one weight scale per output channel (else per tensor)"
    )

    def __post_init__(self) -> None:
        for entry in self.exclude:
            parse_exclude(entry)


@dataclass(frozen=True)
class _Target:
    """A site to correct: where its bias goes and how its activation is laid out."""

    site: Site
    weight: np.ndarray
    activation: str
    axis: int  # channel axis of the activation
    bias_node: ir.Node  # the node whose input `bias_index` holds the bias
    bias_index: int


@dataclass(frozen=True)
class _Skip:
    node: str
    op: str
    reason: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"node": self.node, "op": self.op, "reason": self.reason, "detail": self.detail}


@register_pass
class BiasCorrectionPass(Pass[BiasCorrectionOptions]):
    """Subtracts from each bias the mean output shift that int8 weights will cause.

    Changes: biases of the Conv/Gemm/MatMul(+Add) layers `quantize` (target=tensorrt) will
    quantize; a Conv or Gemm without a bias gets one. Preserves: graph structure, input/output
    names, types and shapes. Lossy in float by design (it pre-compensates the int8 weights):
    validate after `quantize`.
    """

    name = "bias-correction"
    options_type = BiasCorrectionOptions
    summary = "correct biases for the mean shift int8 weight quantization will cause"

    def run(self, model: Model, ctx: Context) -> PassResult:
        channel_stats.require_data(ctx, self.name, "to measure each layer's mean input")
        opts = self.options
        excluder = Excluder(opts.exclude)
        sites, left_float = _quantized_sites(model, excluder, opts.min_channels)
        warnings = [f"exclude entry '{entry}' matched no node" for entry in excluder.unused()]
        targets: list[_Target] = []
        skipped: list[_Skip] = []
        for site in sites:
            target = _check(site)
            if isinstance(target, _Skip):
                skipped.append(target)
            else:
                targets.append(target)
        means = channel_stats.collect(
            model,
            ctx,
            [(t.activation, t.axis) for t in targets],
            samples=opts.samples,
            sample_means=any(t.site.node.op_type == "Conv" for t in targets),
        )
        names = NameSource(model.graph)
        corrected: list[dict[str, Any]] = []
        approximate: list[str] = []
        new_biases = 0
        for target in targets:
            stats = means[(target.activation, target.axis)]
            label, op = node_label(target.site.node), target.site.node.op_type
            if not stats.finite:
                skipped.append(_Skip(label, op, "non-finite", "inf or NaN on the calibration data"))
                continue
            taps = _tap_means(target.site.node, target.weight, stats)
            if taps is None:
                approximate.append(label)
            shift, magnitude = _shift(target, stats.mean, taps, opts.per_channel)
            if not np.any(np.abs(shift) > _NEGLIGIBLE * max(float(np.max(magnitude)), 1e-30)):
                skipped.append(_Skip(label, op, "negligible", "the mean shift is below rounding"))
                continue
            new_biases += _subtract(target, shift, names)
            target.site.node.metadata_props[MARK] = "corrected"
            corrected.append(
                {
                    "node": label,
                    "op": op,
                    "max_abs_shift": float(np.max(np.abs(shift))),
                    "mean_abs_shift": float(np.mean(np.abs(shift))),
                }
            )
        stats_out = {
            "corrected": len(corrected),
            "biases_added": new_biases,
            "skipped_count": len(skipped),
            "skipped_by_reason": dict(sorted(Counter(s.reason for s in skipped).items())),
            "left_float_by_quantize": exclusion_counts(left_float),
            "approximate": [n for n in approximate if n in {c["node"] for c in corrected}],
            "layers": corrected,
            "skipped": [s.to_dict() for s in skipped],
        }
        return PassResult(modified=bool(corrected), stats=stats_out, warnings=warnings)


def _quantized_sites(
    model: Model, excluder: Excluder, min_channels: int
) -> tuple[list[Site], list[Exclusion]]:
    """The sites `quantize` (target=tensorrt) will quantize, as nodes of `model`.

    `select` recognises GEMVs from inferred shapes; they are inferred on a copy, whose
    top-level nodes map one to one, in order, onto the model's.
    """
    copy = model.ir.clone()
    ir_passes.ShapeInferencePass(check_type=False, strict_mode=False)(copy)
    originals = list(model.graph)
    position = {id(node): i for i, node in enumerate(copy.graph)}
    if len(position) != len(originals):
        raise AssertionError("shape inference changed the number of nodes")
    selection = select(
        copy.graph,
        target="tensorrt",
        excluder=excluder,
        min_channels=min_channels,
        quantize_attention=False,
    )
    sites = []
    for site in selection.sites:
        if site.weight is None:
            continue
        node = originals[position[id(site.node)]]
        sites.append(Site(node, site.activations, site.weight, site.axis, site.bias))
    return sites, selection.excluded


def _check(site: Site) -> _Target | _Skip:
    """Where the correction of `site` goes, or why it is skipped."""
    node = site.node
    label, op = node_label(node), node.op_type

    def skip(reason: str, detail: str) -> _Skip:
        return _Skip(label, op, reason, detail)

    if node.metadata_props.get(MARK):
        return skip("already-corrected", "corrected by an earlier run")
    x = node.inputs[0]
    assert x is not None and site.weight is not None
    tensor = constant(node.inputs[site.weight])
    assert tensor is not None
    w = np.asarray(tensor.numpy(), np.float32)
    if not x.name:
        return skip("unnamed", "its activation has no name to capture")
    if op == "ConvTranspose":
        return skip("ConvTranspose", "the shift depends on the output position (stride phase)")
    if op == "Conv":
        if len(node.inputs) > 2 and node.inputs[2] is not None and constant(node.inputs[2]) is None:
            return skip("dynamic-bias", "its bias is computed at run time")
        return _Target(site, w, x.name, 1, node, 2)
    if op == "Gemm":
        if len(node.inputs) > 2 and node.inputs[2] is not None and constant(node.inputs[2]) is None:
            return skip("dynamic-bias", "its C is computed at run time")
        if plain_attr(node, "alpha", 1.0) is None or plain_attr(node, "beta", 1.0) is None:
            return skip("dynamic-bias", "its alpha or beta is not a plain float")
        has_c = len(node.inputs) > 2 and node.inputs[2] is not None
        if has_c and plain_attr(node, "beta", 1.0) == 0.0:
            return skip("dynamic-bias", "its C is multiplied by beta=0")
        return _Target(site, w, x.name, 0 if plain_attr(node, "transA", 0) else 1, node, 2)
    # MatMul
    if w.ndim != 2:
        return skip("batched-weight", f"its weight has rank {w.ndim}")
    y = node.outputs[0]
    uses = y.uses()
    if y.is_graph_output() or len(uses) != 1 or not is_onnx_op(uses[0][0], "Add"):
        return skip("no-bias-add", "its output is not read by one Add only")
    add, index = uses[0]
    other = 1 - index
    bias = constant(add.inputs[other])
    if bias is None or bias.dtype != ir.DataType.FLOAT:
        return skip("no-bias-add", "the Add after it adds no constant float32 bias")
    shape = tuple(bias.shape.numpy())
    if shape and shape[-1] not in (1, w.shape[1]):
        return skip("no-bias-add", f"the bias {list(shape)} does not run along its outputs")
    return _Target(site, w, x.name, -1, add, other)


def _shift(
    target: _Target, mean: np.ndarray, taps: np.ndarray | None, per_channel: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(ΔW·E[x] per output channel, |W|·|E[x]|: the size it is negligible against)."""
    w = target.weight
    axis = target.site.axis if per_channel else None
    scales = qparams.weight_scales(w, axis)
    q = qparams.quantize_weight(w, scales, axis)
    # As DequantizeLinear computes it: int8 times the float32 scale.
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    dequantized = q.astype(np.float32) * np.asarray(scales, np.float32).reshape(shape)
    delta = dequantized.astype(np.float64) - w.astype(np.float64)
    node = target.site.node
    if node.op_type == "Conv":
        if taps is None:  # the same mean under every tap
            taps = np.repeat(mean[:, None], int(np.prod(w.shape[2:])), axis=1)
        return _conv_shift(node, delta, taps), _conv_shift(node, np.abs(w), np.abs(taps))
    if node.op_type == "Gemm":
        alpha = float(plain_attr(node, "alpha", 1.0))  # type: ignore[arg-type]
        trans_b = plain_attr(node, "transB", 0)
        d, a = (delta.T, np.abs(w).T) if trans_b else (delta, np.abs(w))
        return alpha * (mean @ d), abs(alpha) * (np.abs(mean) @ a)
    return mean @ delta, np.abs(mean) @ np.abs(w)


def _conv_shift(node: ir.Node, delta: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Σ over a group's input channels c and the kernel taps k of ΔW[o, c, k]·M_k[g(o)·C/G + c]
    (taps: [C, kernel taps], M_k per input channel)."""
    out_channels, per_group = delta.shape[0], delta.shape[1]
    groups = int(plain_attr(node, "group", 1) or 1)
    flat = delta.reshape(out_channels, per_group, -1)  # [O, C/G, K]
    group_of = np.arange(out_channels) // (out_channels // groups)
    inputs = taps.reshape(groups, per_group, -1)[group_of]  # [O, C/G, K]
    return np.sum(flat * inputs, axis=(1, 2))


def _tap_means(
    node: ir.Node, w: np.ndarray, stats: channel_stats.ChannelStats
) -> np.ndarray | None:
    """M[c, k]: the mean of the zero-padded input channel c over the positions tap k reads,
    from the mean input sample; None when there is none (inputs of varying size) or the
    Conv's attributes are not plain."""
    mean = stats.sample_mean
    if node.op_type != "Conv" or mean is None or mean.ndim != w.ndim - 1:
        return None
    taps = window_means(node, mean, tuple(w.shape[2:]))
    return None if taps is None else taps.reshape(mean.shape[0], -1)


def _subtract(target: _Target, shift: np.ndarray, names: NameSource) -> int:
    """Subtract the shift from the target's bias; 1 when a bias had to be added."""
    node, index = target.bias_node, target.bias_index
    value = node.inputs[index] if index < len(node.inputs) else None
    old = constant(value)
    if node.op_type == "Gemm":
        beta = float(plain_attr(node, "beta", 1.0)) if old is not None else 1.0  # type: ignore[arg-type]
        if old is None:
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        shift = shift / beta
    base = np.zeros(shift.shape) if old is None else np.asarray(old.numpy(), np.float64)
    set_constant(node, index, (base - shift).astype(np.float32), names)
    return int(old is None)

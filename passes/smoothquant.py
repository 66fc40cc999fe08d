"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before int8.

A few channels of an activation (after a LayerNorm, typically) can be 10-100x larger than the
rest; one per-tensor int8 scale then wastes most of its levels on them. For a consumer
`Y = X·W` the identity `X·W = (X / s)·(s·W)` holds for any per-input-channel `s > 0`, so with

    s_j = max|X_j|^α / max|W_j|^(1-α)

the activation's channels are flattened and the weights' rows (quantized per output channel,
where a large row costs little) take the difference. `1/s` is folded into the op that produces
`X`, so the model gains no node and, in float, computes the same thing.

Pattern: an activation read at input 0 of MatMul, Gemm (transA=0) or 1x1 Conv (group 1)
nodes with constant weights (the *consumers*; Q, K and V after one LayerNorm form one group and
share one `s`, from the largest of their weights). Check (`_check_group`, each refusal has a
reason code): every reader of the activation is such a consumer, and the path back to an op
that can absorb a per-channel division exactly is private to the group:

- LayerNormalization over the last axis: gamma and beta are divided;
- Mul or Div by a constant: the constant is divided (multiplied, for Div);
- a MatMul, Gemm or Conv with a constant weight: its output channels and bias are divided;
- on the way there, an Add of a constant (its bias is divided) and Relu/LeakyRelu, which
  commute with a positive per-channel scale (`s > 0` always).

Rewrite (`_apply`): consumer weights times `s`, absorber divided by `s`. With `alpha=auto` the
α of each group is searched on a grid (0.0 to 1.0 in steps of 0.1) for the least int8 error of
the consumers' outputs on a random subsample of calibration rows, quantized as the `quantize`
pass does for TensorRT: per-tensor symmetric int8 activations with the abs-max after scaling,
per-output-channel symmetric int8 weights (`quantize.qparams`). A group whose best α does not
cut that error by 1 % is left alone (reason ``no-gain``), and one whose `s` is already all
ones within 0.1 % (a second run) is ``balanced``, so running the pass twice changes nothing.

Left out: Conv kernels larger than 1x1 and grouped Convs as consumers (the rescale is exact
for them too, but the α search would need im2col); Gemm with transA=1; absorbing into
BatchNormalization (run `cleanup` first, which folds it into the Conv before it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from graphopt.calibration import TensorRange
from graphopt.context import Context
from graphopt.model import Model
from graphopt.passes import channel_stats
from graphopt.passes.base import Pass, PassResult, option, register_pass
from graphopt.passes.quantize import qparams
from graphopt.passes.quantize.graphutil import (
    NameSource,
    already_quantized,
    constant,
    is_onnx_op,
    node_label,
    plain_attr,
)
from graphopt.passes.quantize.sites import Excluder, parse_exclude
from graphopt.passes.weight_edit import set_constant

ALPHA_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
#: Rows of each activation kept for the α search and the error estimate. The search costs
#: rows x channels x outputs x 11 multiply-adds per group; 256 rows tell the alphas apart.
SEARCH_ROWS = 256
_CONSUMERS = ("MatMul", "Gemm", "Conv")
_S_RANGE = (1e-5, 1e5)  # s is clipped into this range (as the reference implementation does)
_BALANCED = 1e-3  # |log s| under this for every channel: nothing left to smooth
_MIN_GAIN = 0.01  # alpha=auto smooths only when the int8 error drops by at least this much


@dataclass(frozen=True, kw_only=True)
class SmoothQuantOptions:
    """How much of each activation's range moves into the weights, and where."""

    alpha: float | Literal["auto"] = option(
        0.5,
        "migration strength in [0, 1], how much of each activation channel's range moves "
        "into the weights (0.5 in the paper); or auto: searched per group for the least int8 "
        "output error",
        range=(0.0, 1.0),
    )
    samples: int = option(128, "calibration samples used (the first N)", range=(1, None))
    exclude: tuple[str, ...] = option(
        (), "consumers left alone: node names, 're:<regex>' on names, or 'op:<OpType>'"
    )

    def __post_init__(self) -> None:
        if self.alpha != "auto" and not (
            isinstance(self.alpha, int | float) and 0.0 <= self.alpha <= 1.0
        ):
            raise ValueError(f"alpha must be a number in [0, 1] or 'auto', not {self.alpha!r}")
        for entry in self.exclude:
            parse_exclude(entry)


# ---------------------------------------------------------------------------- the match


@dataclass(frozen=True)
class _Consumer:
    """A MatMul/Gemm/Conv reading the activation; its weight's input- and output-channel axes."""

    node: ir.Node
    weight: np.ndarray
    in_axis: int
    out_axis: int


@dataclass(frozen=True)
class _Step:
    """One op on the way from the activation back to the absorber, and how it takes 1/s.

    kind: "layernorm" (divide scale and bias), "mul" / "div" (divide / multiply the constant
    at `index`), "bias" (an Add: divide the constant at `index`), "relu" (pass through),
    "weights" (a MatMul/Gemm/Conv: divide its output channels and bias).
    """

    kind: str
    node: ir.Node
    index: int = 1


@dataclass
class _Group:
    activation: ir.Value
    channels: int
    axis: int  # channel axis of the activation, counted from the end (-1: last)
    consumers: list[_Consumer]
    steps: list[_Step]


@dataclass(frozen=True)
class _Refusal:
    reason: str
    detail: str


@dataclass
class _Outcome:
    """What happened to one group, for the stats."""

    activation: str
    consumers: list[str]
    absorber: str = ""
    alpha: float | None = None
    reason: str = ""
    detail: str = ""
    error_before: float | None = None
    error_after: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"activation": self.activation, "consumers": self.consumers}
        for key in ("absorber", "alpha", "reason", "detail", "error_before", "error_after"):
            value = getattr(self, key)
            if value not in ("", None):
                out[key] = round(value, 6) if isinstance(value, float) else value
        return out | self.extra


@register_pass
class SmoothQuantPass(Pass[SmoothQuantOptions]):
    """Divides activation channels by s and multiplies the consumers' weight rows by s.

    Changes: weights of MatMul/Gemm/1x1 Conv consumers, and the parameters of the op that
    absorbs 1/s (LayerNorm gamma and beta, a Mul/Div constant, an Add bias, the output
    channels of a preceding MatMul/Gemm/Conv); activation ranges. Preserves: the graph's
    nodes, input/output names, types and shapes. Lossless in float (an exact
    re-parameterisation); run it before `quantize`, whose int8 error it lowers.
    """

    name = "smoothquant"
    options_type = SmoothQuantOptions
    summary = "SmoothQuant: move activation outliers into the weights before int8 quantization"
    lossless = True

    def run(self, model: Model, ctx: Context) -> PassResult:
        channel_stats.require_data(ctx, self.name, "to measure each activation channel's range")
        opts = self.options
        graph = model.graph
        excluder = Excluder(opts.exclude)
        groups, outcomes = _find_groups(graph, excluder)
        warnings = [f"exclude entry '{entry}' matched no node" for entry in excluder.unused()]
        requests = [(g.activation.name, g.axis) for g in groups]
        measured = channel_stats.collect(
            model, ctx, requests, samples=opts.samples, rows=SEARCH_ROWS
        )
        names = NameSource(graph)
        smoothed = 0
        for group in groups:
            outcome = self._smooth(group, measured[(group.activation.name, group.axis)])
            if not outcome.reason:
                _apply(group, outcome.extra.pop("s"), names)
                smoothed += 1
            outcomes.append(outcome)
        done = [o.to_dict() for o in outcomes if not o.reason]
        skipped = [o.to_dict() for o in outcomes if o.reason]
        stats = {
            "alpha": opts.alpha,
            "groups_smoothed": smoothed,
            "groups_skipped": len(skipped),
            "skipped_by_reason": dict(sorted(Counter(o["reason"] for o in skipped).items())),
            "alphas": [o["alpha"] for o in done],
            "smoothed": done,
            "skipped": skipped,
        }
        return PassResult(modified=smoothed > 0, stats=stats, warnings=warnings)

    def _smooth(self, group: _Group, stats: channel_stats.ChannelStats) -> _Outcome:
        """Choose s for the group (α fixed or searched), or say why the group stays."""
        outcome = _Outcome(
            group.activation.name,
            [node_label(c.node) for c in group.consumers],
            absorber=node_label(group.steps[-1].node),
        )
        if not stats.finite:
            outcome.reason, outcome.detail = "non-finite", "inf or NaN on the calibration data"
            return outcome
        if stats.channels != group.channels or stats.rows is None:
            outcome.reason = "channel-mismatch"
            outcome.detail = f"{stats.channels} channels measured, {group.channels} expected"
            return outcome
        absmax = stats.absmax
        wmax = np.max([_row_absmax(c) for c in group.consumers], axis=0)
        identity = np.ones(group.channels)
        before = _int8_error(group, stats.rows, absmax, identity)
        alphas = ALPHA_GRID if self.options.alpha == "auto" else (float(self.options.alpha),)
        errors = [_int8_error(group, stats.rows, absmax, _scales(absmax, wmax, a)) for a in alphas]
        best = int(np.argmin(errors))
        alpha, s = alphas[best], _scales(absmax, wmax, alphas[best])
        outcome.alpha, outcome.error_before, outcome.error_after = alpha, before, errors[best]
        if float(np.max(np.abs(np.log(s)))) < _BALANCED:
            outcome.reason, outcome.detail = "balanced", "s is 1 for every channel already"
        elif self.options.alpha == "auto" and not errors[best] < (1 - _MIN_GAIN) * before:
            outcome.reason = "no-gain"
            outcome.detail = f"the int8 error {before:.3g} drops to {errors[best]:.3g} at best"
        else:
            outcome.extra = {"s": s, "s_min": float(s.min()), "s_max": float(s.max())}
        return outcome


# ---------------------------------------------------------------------------- pattern, check


def _find_groups(graph: ir.Graph, excluder: Excluder) -> tuple[list[_Group], list[_Outcome]]:
    """Every activation read at input 0 of a MatMul/Gemm/Conv: a group or a refusal."""
    groups: list[_Group] = []
    refused: list[_Outcome] = []
    seen: set[int] = set()
    for node in graph:
        if not is_onnx_op(node, *_CONSUMERS) or not node.inputs or node.inputs[0] is None:
            continue
        x = node.inputs[0]
        if id(x) in seen or constant(x) is not None:
            continue
        seen.add(id(x))
        result = _check_group(x, excluder)
        if isinstance(result, _Group):
            groups.append(result)
        else:
            readers = [node_label(user) for user, _ in x.uses()]
            refused.append(
                _Outcome(x.name or "?", readers, reason=result.reason, detail=result.detail)
            )
    return groups, refused


def _check_group(x: ir.Value, excluder: Excluder) -> _Group | _Refusal:
    if already_quantized(x):
        return _Refusal("already-quantized", "the activation is already quantized")
    if x.is_graph_output():
        return _Refusal("other-readers", "the activation is also a graph output")
    consumers = []
    for user, index in x.uses():
        consumer = _check_consumer(user, index, excluder)
        if isinstance(consumer, _Refusal):
            return consumer
        consumers.append(consumer)
    geometry = {(_channels(c), _activation_axis(c)) for c in consumers}
    if len(geometry) != 1:
        return _Refusal("channel-mismatch", "its consumers disagree on the channel count")
    ((channels, axis),) = geometry
    steps = _absorber(x, axis, channels)
    if isinstance(steps, _Refusal):
        return steps
    return _Group(x, channels, axis, consumers, steps)


def _check_consumer(node: ir.Node, index: int, excluder: Excluder) -> _Consumer | _Refusal:
    label = f"{node.op_type} '{node_label(node)}'"
    if node.graph is None or not is_onnx_op(node, *_CONSUMERS) or index != 0:
        return _Refusal("other-readers", f"{label} also reads it (input {index})")
    if excluder.matches(node):
        return _Refusal("user", f"{label} is excluded by the exclude option")
    w_value = node.inputs[1] if len(node.inputs) > 1 else None
    if already_quantized(w_value):
        return _Refusal("already-quantized", f"the weight of {label} is already quantized")
    tensor = constant(w_value)
    if tensor is None:
        return _Refusal("dynamic-weight", f"the weight of {label} is computed at run time")
    if tensor.dtype != ir.DataType.FLOAT:
        return _Refusal("dtype", f"the weight of {label} is not float32")
    w = tensor.numpy()
    op = node.op_type
    if op == "MatMul":
        if w.ndim < 2:
            return _Refusal("unsupported-consumer", f"{label} has a vector weight")
        return _Consumer(node, w, w.ndim - 2, w.ndim - 1)
    if op == "Gemm":
        if plain_attr(node, "transA", 0) != 0 or w.ndim != 2:
            return _Refusal("unsupported-consumer", f"{label} transposes its activation")
        trans_b = plain_attr(node, "transB", 0)
        return _Consumer(node, w, 1, 0) if trans_b else _Consumer(node, w, 0, 1)
    if plain_attr(node, "group", 1) != 1 or w.ndim < 3 or any(k != 1 for k in w.shape[2:]):
        return _Refusal("unsupported-consumer", f"{label} is not a 1x1 Conv with group 1")
    return _Consumer(node, w, 1, 0)


def _channels(consumer: _Consumer) -> int:
    return int(consumer.weight.shape[consumer.in_axis])


def _activation_axis(consumer: _Consumer) -> int:
    """The activation's channel axis, counted from the end (its rank is the Conv weight's)."""
    if consumer.node.op_type == "Conv":
        return 1 - consumer.weight.ndim
    return -1


def _absorber(x: ir.Value, axis: int, channels: int) -> list[_Step] | _Refusal:
    """The ops from `x` back to one that absorbs a per-channel 1/s exactly, or why none does."""
    steps: list[_Step] = []
    value = x
    while True:
        node = value.producer()
        if node is None:
            what = "a graph input" if value.is_graph_input() else "not computed by a node"
            return _Refusal("no-absorbing-producer", f"'{value.name}' is {what}")
        op = node.op_type
        if not is_onnx_op(node, op) or node.graph is not x.graph:
            return _Refusal("no-absorbing-producer", f"'{value.name}' comes from {op}")
        label = f"{op} '{node_label(node)}'"
        if op in ("Relu", "LeakyRelu", "Add"):
            step = _through(node, label, axis, channels)
            if isinstance(step, _Refusal):
                return step
            steps.append(step)
            value = node.inputs[0 if op != "Add" else 1 - step.index]  # type: ignore[assignment]
            if len(value.uses()) != 1 or value.is_graph_output():
                return _Refusal("other-readers", f"'{value.name}' is read outside the group")
            continue
        if op == "LayerNormalization":
            step = _layernorm(node, label, axis, channels)
        elif op in ("Mul", "Div"):
            step = _scaling(node, label, axis, channels)
        elif op in _CONSUMERS:
            step = _weights(node, label, axis, channels)
        else:
            step = _Refusal(
                "no-absorbing-producer", f"it comes from {label}, which cannot absorb a scale"
            )
        if isinstance(step, _Refusal):
            return step
        steps.append(step)
        return steps


def _through(node: ir.Node, label: str, axis: int, channels: int) -> _Step | _Refusal:
    """Relu/LeakyRelu (commute with s > 0) or an Add of a constant bias."""
    if node.op_type != "Add":
        return _Step("relu", node)
    index = _constant_operand(node)
    if index is None:
        return _Refusal("no-absorbing-producer", f"{label} adds two activations")
    refusal = _broadcasts(node, index, label, axis, channels)
    return refusal or _Step("bias", node, index)


def _scaling(node: ir.Node, label: str, axis: int, channels: int) -> _Step | _Refusal:
    index = _constant_operand(node)
    if index is None:
        return _Refusal("no-absorbing-producer", f"{label} has no constant operand")
    if node.op_type == "Div" and index != 1:
        return _Refusal("no-absorbing-producer", f"{label} divides a constant by the activation")
    refusal = _broadcasts(node, index, label, axis, channels)
    return refusal or _Step(node.op_type.lower(), node, index)


def _constant_operand(node: ir.Node) -> int | None:
    """The index of the one constant float32 input of a binary op, or None."""
    if len(node.inputs) != 2:
        return None
    found = [i for i, v in enumerate(node.inputs) if constant(v) is not None]
    if len(found) != 1:
        return None
    tensor = constant(node.inputs[found[0]])
    return found[0] if tensor is not None and tensor.dtype == ir.DataType.FLOAT else None


def _broadcasts(node: ir.Node, index: int, label: str, axis: int, channels: int) -> _Refusal | None:
    """Whether the constant divided per channel still broadcasts to the op's output shape."""
    tensor = constant(node.inputs[index])
    assert tensor is not None
    shape = tuple(tensor.shape.numpy())
    if len(shape) >= -axis and shape[axis] not in (1, channels):
        return _Refusal("channel-mismatch", f"the constant of {label} has shape {list(shape)}")
    return None


def _layernorm(node: ir.Node, label: str, axis: int, channels: int) -> _Step | _Refusal:
    ln_axis = plain_attr(node, "axis", -1)
    rank = (
        None
        if node.inputs[0] is None or node.inputs[0].shape is None
        else node.inputs[0].shape.rank()
    )
    if axis != -1 or not (ln_axis == -1 or (rank is not None and ln_axis == rank - 1)):
        return _Refusal("no-absorbing-producer", f"{label} normalizes over more than the channels")
    for i in (1, 2):
        value = node.inputs[i] if len(node.inputs) > i else None
        if value is None and i == 2:
            continue
        tensor = constant(value)
        if tensor is None or tensor.dtype != ir.DataType.FLOAT:
            return _Refusal(
                "no-absorbing-producer", f"the scale or bias of {label} is not constant"
            )
        if tuple(tensor.shape.numpy()) != (channels,):
            return _Refusal("channel-mismatch", f"the scale or bias of {label} is not [{channels}]")
    return _Step("layernorm", node)


def _weights(node: ir.Node, label: str, axis: int, channels: int) -> _Step | _Refusal:
    """A MatMul/Gemm/Conv producer: its output channels (and bias) take 1/s."""
    w = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.dtype != ir.DataType.FLOAT or constant(node.inputs[0]) is not None:
        return _Refusal("no-absorbing-producer", f"{label} has no constant float32 weight")
    if already_quantized(node.inputs[1]):
        return _Refusal("already-quantized", f"the weight of {label} is already quantized")
    shape = tuple(w.shape.numpy())
    op = node.op_type
    if op == "Conv":
        out_channels, out_axis = (shape[0] if shape else 0), 1 - len(shape)
    elif op == "Gemm":
        trans_b = plain_attr(node, "transB", 0)
        out_channels = shape[0] if trans_b else shape[-1]
        out_axis = -1
    else:
        out_channels, out_axis = (shape[-1] if len(shape) >= 2 else 0), -1
    if out_channels != channels or out_axis != axis:
        return _Refusal("channel-mismatch", f"the output channels of {label} are not the input's")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and constant(bias) is None:
        return _Refusal("no-absorbing-producer", f"the bias of {label} is not a constant")
    return _Step("weights", node)


# ---------------------------------------------------------------------------- the numbers


def _row_absmax(consumer: _Consumer) -> np.ndarray:
    """max |W| over everything but the input-channel axis: one value per input channel."""
    w = np.abs(consumer.weight.astype(np.float64))
    return np.max(
        np.moveaxis(w, consumer.in_axis, 0).reshape(w.shape[consumer.in_axis], -1), axis=1
    )


def _scales(absmax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^α / max|W_j|^(1-α), 1 where a channel is all zeros, clipped."""
    low, high = _S_RANGE
    a, w = np.maximum(absmax, low), np.maximum(wmax, low)
    s = np.power(a, alpha) / np.power(w, 1.0 - alpha)
    s = np.where((absmax > 0) & (wmax > 0), s, 1.0)
    return np.clip(s, low, high)


def _int8_error(group: _Group, rows: np.ndarray, absmax: np.ndarray, s: np.ndarray) -> float:
    """Sum over the consumers of ||Q(X/s)·Q(s·W) - X·W||² / ||X·W||² on the sampled rows.

    Activations: per-tensor symmetric int8 with the abs-max after scaling (the calibrated
    range); weights: per-output-channel symmetric int8 — as `quantize` does for TensorRT.
    """
    x = rows.astype(np.float64)
    scaled = (x / s).astype(np.float32)
    amax = float(np.max(absmax / s)) if absmax.size else 0.0
    act = qparams.activation_params(
        [TensorRange("x", np.float64(-amax), np.float64(amax), None, "minmax", 1)], symmetric=True
    )
    xq = np.clip(np.rint(scaled / act.scale), -128, 127).astype(np.float32) * act.scale
    total = 0.0
    for c in group.consumers:
        w = c.weight.astype(np.float64) * _along(s, c.weight.ndim, c.in_axis)
        w32 = w.astype(np.float32)
        scales = qparams.weight_scales(w32, c.out_axis)
        wq = qparams.quantize_weight(w32, scales, c.out_axis).astype(np.float32)
        wq = wq * _along(scales, w32.ndim, c.out_axis)
        ref = x @ _as_matrix(c.weight.astype(np.float64), c.in_axis)
        got = xq.astype(np.float64) @ _as_matrix(wq.astype(np.float64), c.in_axis)
        total += float(np.sum((got - ref) ** 2) / max(float(np.sum(ref**2)), 1e-30))
    return total


def _as_matrix(w: np.ndarray, in_axis: int) -> np.ndarray:
    """The weight as [input channels, everything else]."""
    return np.moveaxis(w, in_axis, 0).reshape(w.shape[in_axis], -1)


def _along(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """`v` shaped to broadcast along `axis` of an `ndim`-rank array (axis may be negative)."""
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return np.asarray(v).reshape(shape)


# ---------------------------------------------------------------------------- rewrite


def _apply(group: _Group, s: np.ndarray, names: NameSource) -> None:
    """Consumers' weight rows times s; the absorber (and the ops on the way) divided by s."""
    for c in group.consumers:
        w = c.weight.astype(np.float64) * _along(s, c.weight.ndim, c.in_axis)
        set_constant(c.node, 1, w.astype(np.float32), names)
    # 1/s shaped along the activation's channel axis, counted from the end.
    trailing = -group.axis - 1
    inverse = (1.0 / s).reshape((-1,) + (1,) * trailing)
    for step in group.steps:
        _absorb(step, s, inverse, names)


def _absorb(step: _Step, s: np.ndarray, inverse: np.ndarray, names: NameSource) -> None:
    node = step.node
    if step.kind == "relu":
        return
    if step.kind in ("mul", "bias", "div"):
        c = _numpy(node, step.index)
        new = c / inverse if step.kind == "div" else c * inverse
        set_constant(node, step.index, new.astype(np.float32), names)
        return
    if step.kind == "layernorm":
        for i in (1, 2):
            if len(node.inputs) > i and node.inputs[i] is not None:
                set_constant(node, i, (_numpy(node, i) / s).astype(np.float32), names)
        return
    # weights: the producer's output channels
    op = node.op_type
    w = _numpy(node, 1)
    if op == "Conv":
        out_axis = 0
    elif op == "Gemm":
        out_axis = 0 if plain_attr(node, "transB", 0) else 1
    else:
        out_axis = w.ndim - 1
    set_constant(node, 1, (w * _along(1.0 / s, w.ndim, out_axis)).astype(np.float32), names)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = _numpy(node, 2)
        new = bias / s if op == "Conv" else bias * (1.0 / s)  # Gemm C broadcasts on its last axis
        set_constant(node, 2, new.astype(np.float32), names)


def _numpy(node: ir.Node, index: int) -> np.ndarray:
    tensor = constant(node.inputs[index])
    assert tensor is not None
    return np.asarray(tensor.numpy(), np.float64)

"""Compensation: what a removed channel carried is handed to the channels that stay.

Removing channel c of a tensor that a Conv, Gemm or MatMul reads through a constant weight W
drops the term W[:, c]·x_c from every output of that reader. Two stand-ins for x_c, both
fitted on the calibration data (`channels:compensate=`):

- `mean`: its mean E[x_c], folded into the reader's bias (FLAP's bias compensation, An et al.
  2024, generalised to convolutions);
- `regression` (the default): its least-squares prediction from the kept channels of the
  same tensor, x_R ≈ A·x_K + b, with A = Cov(x_R, x_K)·Cov(x_K, x_K)⁻¹ (a small ridge keeps
  it well-posed) and b = E[x_R] − A·E[x_K]. The reader's weights on the kept channels take
  W_R·A and its bias takes W_R·b. Ordinary least squares leaves the smallest residual
  covariance of all linear predictors, so it would be the best choice for every reader at
  once, whatever its weights; with the ridge, each removed channel's own residual on the
  data it was fitted on is still no larger than the mean's (A = 0 is the mean). Channels that are (near) copies or mixtures of others, which
  pruning at high ratios removes by the hundred, come back almost for free. It needs the
  reader's weight to be its own initializer (written in place) and a tensor of at most
  `MAX_REGRESSION_CHANNELS` channels (its C×C statistics); otherwise the mean is used.

Both keep each reader's output mean exactly:

- Conv (group 1): the regression acts per position, so it goes into every kernel tap alike;
  the bias takes Σ_taps W[:, R, tap]·(M_R(tap) − A·M_K(tap)), with M the means of the
  zero-padded input channels over the positions each tap reads (passes.conv_geometry.
  window_means, the im2col column means), so borders are right;
- Gemm (transA=0) and MatMul with a constant 2-D weight, with the statistics over every
  token; a MatMul's bias is the constant of the Add right after it, or a new Add when there
  is none.

Channels that are zero everywhere (dead) have mean 0 and no covariance: compensating them
changes nothing, so exact removals stay exact. What neither can fix: the part of a channel
that the kept ones do not explain, and the drift of the statistics when the layers before are
pruned too (they are measured once, on the model before removal). Readers that are not such
weighted ops (element-wise, norms, a grouped Conv whose output channels go with its inputs)
get nothing: the group removes their slices together with the channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from graphopt.context import Context
from graphopt.model import Model
from graphopt.passes import channel_stats
from graphopt.passes.channels.groups import Analysis
from graphopt.passes.cleanup.common import constant
from graphopt.passes.conv_geometry import window_means
from graphopt.passes.quantize.graphutil import NameSource, plain_attr
from graphopt.passes.weight_edit import set_constant

Method = Literal["regression", "mean"]

# Ridge of the regression on standardised channels (a share of each kept channel's variance):
# small enough that a channel the others explain is replaced by them, large enough that
# collinear kept channels leave the solve well-posed.
RIDGE = 1e-2
# Widest tensor whose channels are regressed on each other: 4096² float64 is 128 MiB.
MAX_REGRESSION_CHANNELS = 4096


@dataclass(frozen=True)
class _Reader:
    """One weighted op reading removed channels of a tensor on its reduction axis."""

    node: ir.Node
    value: ir.Value
    axis: int
    removed: np.ndarray  # indices on `axis` of `value`


def compensate(
    model: Model,
    analysis: Analysis,
    removal: Mapping[int, np.ndarray],
    ctx: Context,
    samples: int,
    method: Method = "regression",
) -> tuple[int, int]:
    """Hand the removed channels' contribution to their readers (before `remove`).

    Returns:
        (readers compensated, readers left as they were: a bias that cannot take it).
    """
    readers = _readers(analysis, removal)
    if not readers:
        return 0, 0
    requests = list(dict.fromkeys((r.value.name or "", r.axis) for r in readers))
    regress = set()
    if method == "regression":
        regress = {(r.value.name or "", r.axis) for r in readers if _narrow(r)}
    stats = channel_stats.collect(
        model, ctx, requests, samples=samples, sample_means=True, second_moments=regress
    )
    names = NameSource(model.ir.graph)
    done = skipped = 0
    for reader in readers:
        stat = stats[(reader.value.name or "", reader.axis)]
        if not stat.finite:
            skipped += 1
            continue
        predictor = _regression(reader, stat) if method == "regression" else None
        if predictor is not None and not _writable(model.ir.graph, reader.node.inputs[1]):
            predictor = None  # a shared weight: the mean only
        shift = _shift(reader, stat, predictor)
        if shift is None or not _add_to_bias(reader.node, shift, names):
            skipped += 1
            continue
        if predictor is not None:
            _fold_into_weight(reader, predictor)
        done += 1
    return done, skipped


def _readers(analysis: Analysis, removal: Mapping[int, np.ndarray]) -> list[_Reader]:
    """The readers of removed channels, one per (node, tensor): a tensor that carries channels
    of several pruned groups (a Concat) gives its readers the union of their removals."""
    found: dict[tuple[int, int], _Reader] = {}
    for gid, channels in removal.items():
        group = analysis.groups[gid]
        weight_slots = {(id(slot.value), slot.axis) for slot in group.members if slot.is_constant}
        for slot, members in group.members.items():
            if slot.is_constant:
                continue
            removed = np.unique(members[np.asarray(channels, np.int64)].ravel())
            for node in {use.node for use in slot.value.uses()}:
                if not node.inputs or node.inputs[0] is not slot.value:
                    continue
                axis = _reduction_axis(node)
                if axis is None or (id(node.inputs[1]), axis) not in weight_slots:
                    continue
                key = (id(node), id(slot.value))
                known = found.get(key)
                if known is not None:
                    removed = np.union1d(known.removed, removed)
                found[key] = _Reader(node, slot.value, slot.axis, removed)
    return list(found.values())


def _reduction_axis(node: ir.Node) -> int | None:
    """The axis of the constant weight (input 1) that `node` sums its input's channels over,
    for the readers compensation handles; None for others. The group holding that weight
    slot proves the node reduces over the group's channels."""
    if len(node.inputs) < 2 or constant(node.inputs[1]) is None:
        return None
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Conv":
        return 1 if int(plain_attr(node, "group", 1) or 1) == 1 else None
    if node.op_type == "Gemm":
        if plain_attr(node, "transA", 0):
            return None
        return 1 if plain_attr(node, "transB", 0) else 0
    if node.op_type == "MatMul":
        weight = constant(node.inputs[1])
        return 0 if weight is not None and len(weight.shape) == 2 else None
    return None


def _narrow(reader: _Reader) -> bool:
    """Whether the tensor is narrow enough for its C×C second moments (float64) and their
    solve; a wider one (an LLM's FFN) gets the mean instead."""
    weight, axis = constant(reader.node.inputs[1]), _reduction_axis(reader.node)
    if weight is None or axis is None:
        return False
    return int(weight.shape[axis]) <= MAX_REGRESSION_CHANNELS  # the reader sums this many


@dataclass(frozen=True)
class _Predictor:
    """x_R ≈ A·x_K + b over one tensor's channels (R removed, K kept)."""

    kept: np.ndarray
    a: np.ndarray  # (|R|, |K|)


def _regression(reader: _Reader, stat: channel_stats.ChannelStats) -> _Predictor | None:
    moment = stat.second_moment
    if moment is None:
        return None
    removed = reader.removed
    kept = np.setdiff1d(np.arange(stat.channels), removed)
    if not len(kept):
        return None
    cov = moment - np.outer(stat.mean, stat.mean)
    # Solved on standardised kept channels, so the ridge is the same share of every
    # channel's variance whatever its scale; dead (constant) ones get no weight.
    sd = np.sqrt(np.clip(np.diag(cov)[kept], 0.0, None))
    live = sd > 1e-12 * max(float(sd.max(initial=0.0)), 1e-30)
    inv = np.where(live, 1.0 / np.where(live, sd, 1.0), 0.0)
    kk = cov[np.ix_(kept, kept)] * np.outer(inv, inv)
    rk = cov[np.ix_(removed, kept)] * inv
    a = np.linalg.solve(kk + RIDGE * np.eye(len(kept)), rk.T).T * inv
    if not np.isfinite(a).all():
        return None
    return _Predictor(kept=kept, a=a)


def _shift(
    reader: _Reader, stat: channel_stats.ChannelStats, predictor: _Predictor | None
) -> np.ndarray | None:
    """What the reader's bias takes: its weights on the removed channels times their mean, or
    with a predictor the mean of what it leaves unexplained (E[x_R] − A·E[x_K])."""
    node = reader.node
    weight = constant(node.inputs[1])
    assert weight is not None
    w = np.asarray(weight.numpy(), np.float64)
    idx = reader.removed
    if node.op_type == "Conv":
        mean = stat.sample_mean
        if mean is None or mean.ndim != w.ndim - 1:
            taps = np.repeat(stat.mean[:, None], int(np.prod(w.shape[2:])), axis=1)
        else:
            windows = window_means(node, mean, tuple(w.shape[2:]))
            if windows is None:
                return None
            taps = windows.reshape(mean.shape[0], -1)
        left = taps[idx]
        if predictor is not None:
            left = left - predictor.a @ taps[predictor.kept]
        flat = w.reshape(w.shape[0], w.shape[1], -1)
        return np.einsum("ock,ck->o", flat[:, idx], left)
    mean = stat.mean[idx]
    if predictor is not None:
        mean = mean - predictor.a @ stat.mean[predictor.kept]
    if node.op_type == "Gemm":
        alpha = float(plain_attr(node, "alpha", 1.0))  # type: ignore[arg-type]
        rows = w[:, idx].T if plain_attr(node, "transB", 0) else w[idx]
        return alpha * (mean @ rows)
    return mean @ w[idx]


def _writable(graph: ir.Graph, value: ir.Value | None) -> bool:
    """An initializer this reader alone reads: its values can change in place, so the channel
    groups that hold it (by identity) still see it."""
    return (
        value is not None
        and graph.initializers.get(value.name or "") is value
        and len(value.uses()) == 1
        and not value.is_graph_output()
    )


def _fold_into_weight(reader: _Reader, predictor: _Predictor) -> None:
    """W_K += W_R·A on the reader's reduction axis (every kernel tap alike for a Conv)."""
    value = reader.node.inputs[1]
    assert value is not None and value.const_value is not None
    old = value.const_value.numpy()
    w = np.array(old, dtype=np.float64, copy=True)  # a float64 weight may be a mapped file
    axis = _reduction_axis(reader.node)
    assert axis is not None
    moved = np.moveaxis(w, axis, 0)  # (C, ...) view
    update = np.tensordot(predictor.a.T, moved[reader.removed], axes=1)  # (|K|, ...)
    moved[predictor.kept] += update
    value.const_value = ir.tensor(w.astype(old.dtype), name=value.name)


def _add_to_bias(node: ir.Node, shift: np.ndarray, names: NameSource) -> bool:
    if node.op_type == "Conv":
        index, scale = 2, 1.0
        old = constant(node.inputs[2]) if len(node.inputs) > 2 else None
        return _set(node, index, old, shift * scale, names)
    if node.op_type == "Gemm":
        old = constant(node.inputs[2]) if len(node.inputs) > 2 else None
        if old is None:
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
            return _set(node, 2, None, shift, names)
        beta = float(plain_attr(node, "beta", 1.0))  # type: ignore[arg-type]
        if beta == 0 or (old.shape and len(old.shape) > 1):
            return False
        return _set(node, 2, old, shift / beta, names)
    return _matmul_bias(node, shift, names)


def _set(node: ir.Node, index: int, old, shift: np.ndarray, names: NameSource) -> bool:  # noqa: ANN001
    if old is not None:
        base = np.asarray(old.numpy(), np.float64)
        if base.shape not in ((), (1,), shift.shape):
            return False
        dtype = old.numpy().dtype
    else:
        base, dtype = np.zeros(shift.shape), np.float32
    set_constant(node, index, (base + shift).astype(dtype), names)
    return True


def _matmul_bias(node: ir.Node, shift: np.ndarray, names: NameSource) -> bool:
    """Add the shift to the constant of the Add after the MatMul, or insert one (a graph
    output keeps its name: it moves to the new Add)."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add" and not out.is_graph_output():
        add = uses[0].node
        other = 1 - uses[0].idx
        old = constant(add.inputs[other])
        if old is not None and tuple(old.shape) in ((shift.shape[0],), (1,), ()):
            return _set(add, other, old, shift, names)
    graph = node.graph
    assert graph is not None
    base = out.name or "matmul"
    name = names.take(f"{base}_compensation")
    bias = ir.Value(
        name=name,
        type=ir.TensorType(ir.DataType.FLOAT),
        shape=ir.Shape(shift.shape),
        const_value=ir.tensor(shift.astype(np.float32), name=name),
    )
    graph.register_initializer(bias)
    add = ir.node("Add", [out, bias], name=names.take(f"{node.name or 'MatMul'}_compensation"))
    added = add.outputs[0]
    added.shape, added.type = out.shape, out.type
    if out.is_graph_output():
        out.name = names.take(f"{base}_uncompensated")
        added.name = base
        graph.outputs[:] = [added if v is out else v for v in graph.outputs]
    else:
        added.name = names.take(f"{base}_compensated")
    for use in uses:
        use.node.replace_input_with(use.idx, added)
    graph.insert_after(node, add)
    return True

"""Importance scorers: one number per channel of a group; low numbers are removed first.

- `l1`/`l2`: the norm of every weight element the channel owns, over all its sources'
  output-channel weights and all its consumers' input-channel weights (Torch-Pruning's
  group norm);
- `bn`: |gamma| of the BatchNormalizations in the group (read before cleanup folds them;
  a group without one falls back to `l2`, and the pass says so);
- `activation`: the root mean square of the channel where its consumers read it (at the
  sources' outputs when none does) over the calibration data (streamed by `channel_stats`);
- `wanda`: structured Wanda, what removing the channel takes from the ops that read it;
- `taylor`: the first-order change of the loss when the channel's parameters are zeroed.

Structured Wanda. Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large
Language Models") scores weight W[o, j] of a layer by |W[o, j]|·‖X_j‖₂, X_j being input
feature j over every calibration token. Removing channel c removes input column c of every
op that reads it, so its structured score is the sum of its columns' scores:
    S(c) = Σ_readers Σ_o |W[o, c]|·‖X_c‖₂,
the column sum that FLAP (An et al., 2024, "Fluctuation-based Adaptive Structured Pruning
for Large Language Models") calls Wanda-sp. The producers' output rows are left out on
purpose: a row's |W|·‖X_in‖ says how large the channel is, not how much the model reads it
(that is `activation`), and it is on another scale than the columns. ‖X_c‖₂ is the exact
norm over all calibration rows (not a mean), so readers at different resolutions add up
with their real weight: Gemm/MatMul read one row per token; a Conv reads, per weight tap,
the zero-padded input at every output position (its im2col column), computed per tap from
the mean squared input sample (`conv_geometry.window_means`), borders included; a
ConvTranspose multiplies every input position of channel c by each of its weights. Every
E[x²] comes from one streamed ONNX Runtime run on a copy of the model with a Mul(x, x) per
activation read (as `prune`'s unstructured Wanda gets them). A group that no weighted op
reads falls back to `l2`, and the pass says so.

Taylor. Molchanov et al., 2019 ("Importance Estimation for Neural Network Pruning"):
zeroing a group of parameters w changes the loss by about -Σ w·∂L/∂w, so
    T(c) = mean over calibration batches of |Σ_{w of c} w·∂L_b/∂w|,
over every float initializer slice of channel c in the group (sources' rows, consumers'
columns, biases, norm scales); per batch, so that gradients of opposite sign in different
batches do not cancel. L_b is the cross-entropy of the model's output against the data's
labels, and the gradients come from graphopt's own engine (`graphopt.train`). Without labels
Taylor cannot run: a loss against the model's own outputs (self-distillation) is at its
minimum before pruning, its gradient is zero and it ranks nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from graphopt import console
from graphopt.context import Context
from graphopt.errors import DataError, GraphoptError
from graphopt.model import Model
from graphopt.passes.channels.groups import Analysis, Group, Slot
from graphopt.passes.channels.handlers import HANDLERS
from graphopt.passes.conv_geometry import conv_geometry, window_means
from graphopt.passes.quantize.graphutil import NameSource

if TYPE_CHECKING:
    from graphopt.data import Dataset
    from graphopt.passes.channel_stats import ChannelStats
    from graphopt.train import Trainer


def _per_index(array: np.ndarray, axis: int, p: int) -> np.ndarray:
    flat = np.moveaxis(np.asarray(array, np.float64), axis, 0).reshape(array.shape[axis], -1)
    return np.abs(flat).sum(axis=1) if p == 1 else np.square(flat).sum(axis=1)


def weight_norm(group: Group, analysis: Analysis, p: int) -> np.ndarray | None:
    """Group L1 (p=1) or L2 (p=2) norm per channel; None when no weight is a constant."""
    total = np.zeros(group.channels)
    found = False
    for slot, index in group.members.items():
        if "weight" not in slot.roles:
            continue
        array = analysis.view.array(slot.value)
        if array is None or not np.issubdtype(array.dtype, np.floating):
            continue
        found = True
        total += _per_index(array, slot.axis, p)[index].sum(axis=1)
    if not found:
        return None
    return total if p == 1 else np.sqrt(total)


def bn_scale(group: Group, analysis: Analysis) -> np.ndarray | None:
    """Sum of |gamma| over the group's BatchNormalizations; None when it has none."""
    total = np.zeros(group.channels)
    found = False
    for slot, index in group.members.items():
        if "bn-scale" not in slot.roles:
            continue
        array = analysis.view.array(slot.value)
        if array is None:
            continue
        found = True
        total += np.abs(np.asarray(array, np.float64))[index].sum(axis=1)
    return total if found else None


def activation_slots(group: Group) -> list[Slot]:
    """The activations the group's consumers read (what removing a channel takes from
    them), or where its channels are created when nothing reads them through weights."""
    read = [s for s in group.members if s.consumers and not s.is_constant]
    return read or [s for s in group.members if s.sources and not s.is_constant]


def activation_rms(group: Group, rms: Mapping[tuple[str, int], np.ndarray]) -> np.ndarray | None:
    """Sum over the source outputs of each channel's RMS; None when none was measured."""
    total = np.zeros(group.channels)
    found = False
    for slot in activation_slots(group):
        values = rms.get((slot.name, slot.axis))
        if values is None:
            continue
        found = True
        total += values[group.members[slot]].sum(axis=1)
    return total if found else None


# ---------------------------------------------------------------------------- wanda

_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
Reader = tuple[Slot, ir.Node]


def readers(group: Group, analysis: Analysis) -> list[Reader]:
    """(activation slot, op) for every op that reads the group's channels as the input
    channels of a constant float weight."""
    out = []
    for slot in group.members:
        if slot.is_constant or not slot.consumers:
            continue
        for node in dict.fromkeys(slot.nodes):
            if node.op_type not in _WEIGHTED or node.inputs[0] is not slot.value:
                continue
            weight = analysis.view.array(node.inputs[1])
            if weight is None or not np.issubdtype(weight.dtype, np.floating):
                continue
            visit = HANDLERS[node.op_type].visit(node, ("in", 0), slot.axis, analysis.view)
            if visit.consumer:
                out.append((slot, node))
    return out


def wanda(
    model: Model, ctx: Context, groups: list[Group], analysis: Analysis, samples: int
) -> tuple[dict[int, np.ndarray], list[str]]:
    """Structured Wanda scores of the groups that weighted ops read (the others are left
    out), and the ops whose norms were approximated (a Conv input whose size varies)."""
    from graphopt.passes import channel_stats

    by_group = {g.id: readers(g, analysis) for g in groups}
    probe = model.copy()
    values = {v.name: v for v in probe.graph.inputs}
    values.update({v.name: v for node in probe.graph for v in node.outputs})
    names = NameSource(probe.graph)
    squares: dict[tuple[str, int], str] = {}
    for slot, _ in (r for rs in by_group.values() for r in rs):
        key = (slot.name, slot.axis)
        if key not in squares:
            squares[key] = channel_stats.add_square(
                probe.graph, values[slot.name], names, "channels"
            )
    convs = any(n.op_type == "Conv" for rs in by_group.values() for _, n in rs)
    measured = channel_stats.collect(
        probe, ctx, [(sq, axis) for (_, axis), sq in squares.items()],
        samples=samples, sample_means=convs,
    )  # fmt: skip
    scores: dict[int, np.ndarray] = {}
    approximate: list[str] = []
    for group in groups:
        total = np.zeros(group.channels)
        for slot, node in by_group[group.id]:
            stats = measured[(squares[(slot.name, slot.axis)], slot.axis)]
            column, exact = _column_scores(node, analysis.view.array(node.inputs[1]), stats)
            if not exact:
                approximate.append(node.name or node.op_type)
            total += column[group.members[slot]].sum(axis=1)
        if by_group[group.id]:
            scores[group.id] = total
    return scores, sorted(set(approximate))


def _column_scores(
    node: ir.Node, weight: np.ndarray, stats: ChannelStats
) -> tuple[np.ndarray, bool]:
    """Σ_o |W[o, c]|·‖X_c‖₂ for every input channel c of `node` (its activation's axis), and
    whether the norms are exact."""
    mean_sq = np.maximum(np.asarray(stats.mean, np.float64), 0.0)
    count = stats.count
    w = np.abs(np.asarray(weight, np.float64))
    op = node.op_type
    if op in ("Gemm", "MatMul"):
        trans_b = op == "Gemm" and _int_attr(node, "transB") == 1
        k_axis = w.ndim - 1 if trans_b else w.ndim - 2
        column = np.moveaxis(w, k_axis, 0).reshape(w.shape[k_axis], -1).sum(axis=1)
        return column * np.sqrt(count * mean_sq), True
    if op == "ConvTranspose":  # each weight of input channel c meets every position of c
        return w.reshape(w.shape[0], -1).sum(axis=1) * np.sqrt(count * mean_sq), True
    groups = _int_attr(node, "group") or 1
    out_channels, per_group = w.shape[0], w.shape[1]
    kernel = tuple(w.shape[2:])
    energy = _conv_tap_energy(node, kernel, count, stats)  # [C, *kernel], Σ over rows
    exact = energy is not None
    if energy is None:  # the input size varies: every tap takes the channel's energy
        geometry = conv_geometry(node, (1,) * len(kernel), kernel)
        strides = 1 if geometry is None else int(np.prod(geometry[2]))
        energy = np.broadcast_to(
            (count * mean_sq / strides).reshape(-1, *([1] * len(kernel))), (len(mean_sq), *kernel)
        )
    norms = np.sqrt(energy).reshape(groups, per_group, *kernel)
    w = w.reshape(groups, out_channels // groups, per_group, *kernel)
    # column (g, j): Σ over the group's outputs and the taps of |W|·‖X‖
    column = np.einsum(
        "gojk,gjk->gj", w.reshape(*w.shape[:3], -1), norms.reshape(*norms.shape[:2], -1)
    )
    return column.reshape(-1), exact


def _conv_tap_energy(
    node: ir.Node, kernel: tuple[int, ...], count: int, stats: ChannelStats
) -> np.ndarray | None:
    """Σ over every im2col row of x² for each (input channel, tap): samples · output
    positions · the tap's mean over its window of the mean squared input sample."""
    mean = stats.sample_mean
    if mean is None or mean.ndim != len(kernel) + 1:
        return None
    taps = window_means(node, mean, kernel)
    geometry = conv_geometry(node, tuple(mean.shape[1:]), kernel)
    if taps is None or geometry is None:
        return None
    begins, ends, strides, dilations = geometry
    positions = 1
    for size, b, e, d, k, s in zip(
        mean.shape[1:], begins, ends, dilations, kernel, strides, strict=True
    ):
        positions *= (size + b + e - d * (k - 1) - 1) // s + 1
    samples = count / max(int(np.prod(mean.shape[1:])), 1)
    return samples * positions * np.maximum(taps, 0.0)


def _int_attr(node: ir.Node, name: str) -> int | None:
    attr = node.attributes.get(name)
    return None if attr is None or attr.is_ref() else int(attr.as_int())


# ---------------------------------------------------------------------------- taylor


def taylor(model: Model, ctx: Context, groups: list[Group], samples: int) -> dict[int, np.ndarray]:
    """First-order Taylor scores (mean over batches of |Σ w·∂L/∂w| per channel) of the
    groups that hold trainable initializers (the others are left out).

    Raises:
        DataError: no calibration data, or data without integer labels.
        GraphoptError: the gradient engine cannot differentiate the model, or the model has
            more than one output.
    """
    from graphopt.calibration.datasets import head
    from graphopt.passes.quantize.ranges import usable_samples
    from graphopt.train import GradientError

    data = head(_labelled(ctx), usable_samples(model, samples), model.input_specs())
    outputs = [v.name or "?" for v in model.graph.outputs]
    if len(outputs) != 1:
        raise GraphoptError(
            f"importance=taylor computes a cross-entropy loss on the model's output, but the "
            f"model has {len(outputs)} outputs ({', '.join(outputs)}).",
            hint="Use importance=wanda or importance=activation for this model.",
        )
    totals = {g.id: np.zeros(g.channels) for g in groups}
    trainer: Trainer | None = None
    seen = 0
    batches = console.track(
        data.batches(ctx.batch_size),
        total=data.num_batches(ctx.batch_size),
        description="channels: Taylor gradients",
    )
    try:
        for batch in batches:
            if trainer is None:
                trainer = _trainer(model, ctx, outputs[0], batch.feeds)
            labels = _int_labels(batch.labels, data.description)
            _, grads, _ = trainer.gradients({**batch.feeds, f"{outputs[0]}.labels": labels})
            for group in groups:
                change = _first_order(group, trainer.params, grads)
                totals[group.id] += batch.size * np.abs(change)
            seen += batch.size
    except GradientError as exc:
        raise GraphoptError(
            "importance=taylor needs the gradient of the loss through the whole model, and "
            f"graphopt's gradient engine cannot compute it: {exc.message}",
            hint="Use importance=wanda or importance=activation, which need no gradients.",
        ) from None
    if trainer is None:
        raise DataError(f"importance=taylor found no samples in {data.description}.")
    return {
        g.id: totals[g.id] / seen
        for g in groups
        if any(s.is_constant and s.name in trainer.params for s in g.members)
    }


def _trainer(model: Model, ctx: Context, output: str, feeds: Mapping[str, np.ndarray]) -> Trainer:
    """Gradients of the cross-entropy on `output` for every trainable initializer (no
    optimizer step is ever taken)."""
    from graphopt.train import SGD, Loss, Trainer

    return Trainer(
        model, [Loss.cross_entropy(output)], SGD(), input_shapes=_static_shapes(model, feeds),
        device=ctx.device, threads=ctx.threads, use_masks=False,
    )  # fmt: skip


def _first_order(
    group: Group, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]
) -> np.ndarray:
    """Σ w·∂L/∂w over each channel's slices of the group's trainable constants."""
    total = np.zeros(group.channels)
    for slot, index in group.members.items():
        grad = grads.get(slot.name) if slot.is_constant else None
        if grad is None:
            continue
        product = np.asarray(params[slot.name], np.float64) * grad
        per_index = np.moveaxis(product, slot.axis, 0).reshape(product.shape[slot.axis], -1)
        total += per_index.sum(axis=1)[index].sum(axis=1)
    return total


def _labelled(ctx: Context) -> Dataset:
    from graphopt.passes import channel_stats

    channel_stats.require_data(ctx, "channels", "to rank channels by importance=taylor")
    data = ctx.calib_data
    assert data is not None
    if not data.has_labels:
        raise DataError(
            f"importance=taylor ranks channels by how much the loss would change, which needs "
            f"labelled calibration data, and {data.description} has no labels. A loss against "
            "the model's own outputs (self-distillation) cannot stand in: it is at its minimum "
            "before anything is removed, so its gradient is zero and it ranks nothing.",
            hint="Add the labels (a 'labels' array in the .npz, or class sub-folders of "
            "images), or use importance=wanda or importance=activation, which need none.",
        )
    return data


def _int_labels(labels: np.ndarray | None, where: str) -> np.ndarray:
    if labels is None:
        raise DataError(f"A batch of {where} came without labels.")
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"importance=taylor uses a cross-entropy against integer class labels, but the "
            f"labels of {where} are {labels.dtype}.",
            hint="Save the labels as integer class indices.",
        )
    return labels.astype(np.int64)


def _static_shapes(model: Model, feeds: Mapping[str, np.ndarray]) -> dict[str, list[int | str]]:
    """The model's input shapes with every dynamic dim but the batch taken from the data
    (Conv and pool gradients need static spatial sizes)."""
    shapes: dict[str, list[int | str]] = {}
    for value in model.graph.inputs:
        array = feeds.get(value.name or "")
        if array is None or value.shape is None:
            continue
        dims: list[int | str] = []
        for k, (dim, size) in enumerate(zip(value.shape, array.shape, strict=False)):
            if isinstance(dim, int):
                dims.append(dim)
            elif k == 0:
                dims.append("batch")
            else:
                dims.append(int(size))
        shapes[value.name or ""] = dims
    return shapes

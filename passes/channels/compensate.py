"""Mean compensation: a removed channel leaves its average behind in the next layer's bias.

Removing channel c of a tensor that a Conv, Gemm or MatMul reads through a constant weight W
drops the term W[:, c]·x_c from every output of that reader. The best constant stand-in for
x_c is its mean over the calibration data, so the reader's bias takes W[:, c]·E[x_c] for
every removed c (FLAP's bias compensation, An et al. 2024, generalised to convolutions):

- Conv (group 1): Σ_c Σ_taps W[o, c, tap]·M[c, tap], with M the mean of the zero-padded input
  channel over the positions each kernel tap reads (passes.conv_geometry.window_means, the
  im2col column means), so borders are right;
- Gemm (transA=0) and MatMul with a constant 2-D weight: Σ_c E[x_c]·W[c, :] (W[:, c] for
  Gemm with transB), with E over every token; a MatMul's bias is the constant of the Add
  right after it, or a new Add when there is none.

Channels that are zero everywhere (dead) have mean 0: compensating them changes nothing, so
exact removals stay exact. What it cannot fix: the loss of the channels' variation around
their means. Readers that are not such weighted ops (element-wise, norms, a grouped Conv
whose output channels go with its inputs) get nothing: the group removes their slices
together with the channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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
) -> tuple[int, int]:
    """Fold the removed channels' means into their readers' biases (before `remove`).

    Returns:
        (readers compensated, readers left as they were: a bias that cannot take it).
    """
    readers = _readers(analysis, removal)
    if not readers:
        return 0, 0
    requests = list(dict.fromkeys((r.value.name or "", r.axis) for r in readers))
    stats = channel_stats.collect(model, ctx, requests, samples=samples, sample_means=True)
    names = NameSource(model.ir.graph)
    done = skipped = 0
    shifts: dict[int, tuple[_Reader, np.ndarray]] = {}
    for reader in readers:
        stat = stats[(reader.value.name or "", reader.axis)]
        shift = _shift(reader, stat)
        if shift is None or not stat.finite:
            skipped += 1
            continue
        key = id(reader.node)
        if key in shifts:  # one op reading removed channels of two slots (not expected)
            shifts[key] = (reader, shifts[key][1] + shift)
        else:
            shifts[key] = (reader, shift)
    for reader, shift in shifts.values():
        if _add_to_bias(reader.node, shift, names):
            done += 1
        else:
            skipped += 1
    return done, skipped


def _readers(analysis: Analysis, removal: Mapping[int, np.ndarray]) -> list[_Reader]:
    readers = []
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
                if axis is not None and (id(node.inputs[1]), axis) in weight_slots:
                    readers.append(_Reader(node, slot.value, slot.axis, removed))
    return readers


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


def _shift(reader: _Reader, stat: channel_stats.ChannelStats) -> np.ndarray | None:
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
        flat = w.reshape(w.shape[0], w.shape[1], -1)
        return np.einsum("ock,ck->o", flat[:, idx], taps[idx])
    mean = stat.mean[idx]
    if node.op_type == "Gemm":
        alpha = float(plain_attr(node, "alpha", 1.0))  # type: ignore[arg-type]
        rows = w[:, idx].T if plain_attr(node, "transB", 0) else w[idx]
        return alpha * (mean @ rows)
    return mean @ w[idx]


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

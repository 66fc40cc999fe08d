"""Removal: delete the chosen channels of every tensor in their groups.

Every constant slot (weights, biases, BatchNorm statistics, per-channel Q/DQ parameters,
per-channel operands of element-wise ops) is sliced; handlers rewrite what encodes channel
counts (Reshape shapes, Split sizes, Slice starts/ends, Resize sizes, Conv `group`, grouped
weights); the declared shapes of the activations get their new channel counts. Graph inputs
and outputs are never in a prunable group, so the model's signature stays as it was.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graphopt.passes.channels.groups import Analysis, Slot
from graphopt.passes.channels.handlers import HANDLERS, Rewriter
from graphopt.passes.channels.handlers.base import replace_constant

_EMPTY = np.zeros(0, np.int64)

#: model.metadata["channels"]: tensor name -> {axis: original indices kept}
Kept = dict[str, dict[int, list[int]]]


def remove(model: ir.Model, analysis: Analysis, removal: Mapping[int, np.ndarray]) -> Kept:
    """Remove channels `removal[group id]` (positions in the group) from the model in place.

    Returns, for every tensor that lost channels, the indices kept on each changed axis.
    """
    removed: dict[Slot, np.ndarray] = {}
    for gid, channels in removal.items():
        group = analysis.groups[gid]
        if not group.prunable:
            raise ValueError(f"group {gid} is refused: {'; '.join(group.refusals)}")
        channels = np.asarray(channels, np.int64)
        if len(np.unique(channels)) >= group.channels:
            raise ValueError(f"group {gid} would lose all its {group.channels} channels")
        for slot, index in group.members.items():
            hit = index[channels].reshape(-1)
            removed[slot] = np.union1d(removed.get(slot, _EMPTY), hit)
    if not removed:
        return {}
    lookup = {(id(s.value), s.axis): s for s in analysis.slots}

    def removed_of(value: ir.Value | None, axis: int) -> np.ndarray:
        slot = lookup.get((id(value), axis))
        return removed.get(slot, _EMPTY) if slot is not None else _EMPTY

    def new_size(value: ir.Value | None, axis: int) -> int | None:
        shape = analysis.view.shape(value)
        if shape is None or not isinstance(shape[axis], int):
            return None
        return int(shape[axis]) - len(removed_of(value, axis))  # type: ignore[arg-type]

    rw = Rewriter(model.graph, analysis.view, removed_of, new_size)
    nodes: dict[int, ir.Node] = {}
    for slot in removed:
        for node in slot.nodes:
            nodes.setdefault(id(node), node)
    for node in nodes.values():
        HANDLERS[node.op_type].rewrite(node, rw)

    kept: Kept = {}
    constants: dict[int, list[tuple[Slot, np.ndarray]]] = {}
    for slot, indices in removed.items():
        keep = np.setdiff1d(np.arange(slot.size), indices)
        kept.setdefault(slot.name, {})[slot.axis] = keep.tolist()
        if slot.is_constant:
            if id(slot.value) not in rw.claimed:
                constants.setdefault(id(slot.value), []).append((slot, keep))
        else:
            _set_dim(slot, len(keep))
    for items in constants.values():
        value = items[0][0].value
        array = analysis.view.array(value)
        assert array is not None
        for slot, keep in items:
            array = np.take(array, keep, axis=slot.axis)
        replace_constant(value, array)
    return kept


def _set_dim(slot: Slot, size: int) -> None:
    value = slot.value
    if value.shape is None or slot.axis >= value.shape.rank():
        return
    dims = list(value.shape)
    dims[slot.axis] = size
    value.shape = ir.Shape(dims)


def compose(previous: Kept, new: Kept) -> Kept:
    """Kept indices relative to the original model after a second removal."""
    out = {name: dict(axes) for name, axes in previous.items()}
    for name, axes in new.items():
        for axis, keep in axes.items():
            before = out.get(name, {}).get(axis)
            out.setdefault(name, {})[axis] = keep if before is None else [before[i] for i in keep]
    return out

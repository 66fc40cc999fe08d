"""Importance scorers: one number per channel of a group; low numbers are removed first.

- `l1`/`l2`: the norm of every weight element the channel owns, over all its sources'
  output-channel weights and all its consumers' input-channel weights (Torch-Pruning's
  group norm);
- `bn`: |gamma| of the BatchNormalizations in the group (read before cleanup folds them;
  a group without one falls back to `l2`, and the pass says so);
- `activation`: the root mean square of the channel where its consumers read it (at the
  sources' outputs when none does) over the calibration data (streamed by `channel_stats`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from graphopt.passes.channels.groups import Analysis, Group, Slot


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

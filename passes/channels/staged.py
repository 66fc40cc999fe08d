"""Remove planned channels a few groups at a time, each stage compensated on the model as the
stages before left it.

Compensation (`compensate.py`) fits its stand-ins on activations. Fitted once on the unpruned
model, the statistics of a deep layer no longer describe its input once the layers before it
have lost channels too, and the errors compound: on PP-OCRv4's recogniser with 40 % of every
group removed, one-shot regression compensation left a CER over 100 % (garbage lines) and the
staged one about 70 %, which distillation can start from. So the planned groups are taken in
graph order, in `stages` chunks; each chunk's readers are measured on the current model (one
streamed calibration run per stage), compensated, and its channels removed. The channel
analysis is rebuilt between stages (removal changes slot sizes and Concat offsets); a group is
found again by a constant it owns (its source's weight): the original indices of its channels
there, through what the earlier stages kept, name it and order its channels, even where two
groups share a source (a Conv whose output is split in two).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from graphopt.context import Context
from graphopt.errors import GraphoptError
from graphopt.model import Model
from graphopt.passes.channels.compensate import Method, compensate
from graphopt.passes.channels.groups import Analysis, Group
from graphopt.passes.channels.rewrite import Kept, compose, remove
from graphopt.passes.quantize.graphutil import node_label


def remove_in_stages(
    model: Model,
    analysis: Analysis,
    removal: Mapping[int, np.ndarray],
    ctx: Context,
    *,
    samples: int,
    method: Method,
    stages: int,
    reanalyze: Callable[[], Analysis],
) -> tuple[Kept, int, int]:
    """Compensate and remove `removal` (group id in `analysis` -> positions) in `stages`.

    Returns:
        (kept indices composed over the stages, readers compensated, readers skipped).
    """
    # sources are labelled as the analysis labels them: "<OpType> '<name>'"
    position = {f"{n.op_type} '{node_label(n)}'": i for i, n in enumerate(model.graph)}
    ordered = sorted(removal, key=lambda gid: _first(analysis.groups[gid], position))
    chunks = [list(c) for c in np.array_split(np.asarray(ordered), max(1, stages)) if len(c)]
    kept: Kept = {}
    done = skipped = 0
    current = analysis
    for i, chunk in enumerate(chunks):
        if i:
            current = reanalyze()
        stage: dict[int, np.ndarray] = {}
        for gid in chunk:
            group = analysis.groups[gid]
            found = _find(group, current, kept)
            if found is None:
                raise GraphoptError(
                    f"channels: after removing the first {i} stage(s), the group of "
                    f"{', '.join(group.sources) or 'a tensor'} was not found again, so its "
                    "planned channels cannot be placed.",
                    hint="Run with stages=1 (one-shot compensation) and report the model.",
                )
            now, rows = found
            stage[now.id] = rows[np.asarray(removal[gid], np.int64)]
        d, s = compensate(model, current, stage, ctx, samples, method)
        done, skipped = done + d, skipped + s
        kept = compose(kept, remove(model.ir, current, stage))
    return kept, done, skipped


def _find(group: Group, current: Analysis, kept: Kept) -> tuple[Group, np.ndarray] | None:
    """`group` (of the first analysis) in `current`, and for each of its channel positions the
    matching position in the group found. A group is known by a constant it owns (a weight or
    a bias of its sources): the original indices of its channels there, through `kept`."""
    for slot, rows in group.members.items():
        if not slot.is_constant:
            continue
        original = rows[:, 0]
        for candidate in current.prunable():
            for other, other_rows in candidate.members.items():
                if not other.is_constant or (other.name, other.axis) != (slot.name, slot.axis):
                    continue
                back = kept.get(slot.name, {}).get(slot.axis)
                now = other_rows[:, 0] if back is None else np.asarray(back)[other_rows[:, 0]]
                if sorted(now.tolist()) != sorted(original.tolist()):
                    continue
                position = {int(o): q for q, o in enumerate(now)}
                return candidate, np.asarray([position[int(o)] for o in original], np.int64)
    return None


def _first(group: Group, position: Mapping[str, int]) -> int:
    """Where the group's first source op stands in the graph (sorted nodes: graph order)."""
    return min((position.get(label, len(position)) for label in group.sources), default=0)

"""Selection: how many channels each group keeps, and which.

A group keeps `n - floor(ratio * n)` channels, rounded *up* to a multiple of `round_to`
(never fewer channels than asked for, and off-multiple channel counts run slower on GPUs
than the layer they came from); when each channel of a group is a block of d tensor channels
(an attention head), the multiple is counted in tensor channels. A group that cannot reach a multiple of `round_to` below its
current size keeps all its channels. A group read or written by a grouped Conv keeps the
same number in every conv group, so its kept count is also a multiple of the conv groups.
At least one channel is always kept.

With `global_ratio`, scores are divided by their group's mean so groups compare, the
lowest-scoring channels of the whole model are removed until `ratio` of all channels are,
and no group loses more than `max_ratio` of its channels; then the same rounding applies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from graphopt.passes.channels.groups import Group


def kept_count(channels: int, remove: int, round_to: int, blocks: int) -> int:
    """The smallest count >= channels - remove that is a multiple of round_to and blocks
    (and >= 1), or `channels` when there is none below it."""
    target = max(channels - remove, 1)
    step = math.lcm(max(round_to, 1), blocks)
    keep = -(-target // step) * step
    return keep if keep < channels else channels


def choose(scores: np.ndarray, keep: int, block_of: np.ndarray | None) -> np.ndarray:
    """Positions of the channels to remove: the lowest scores (ties: the later channel
    goes first), the same number in every conv group."""
    n = len(scores)
    if keep >= n:
        return np.zeros(0, np.int64)
    if block_of is None:
        order = np.lexsort((-np.arange(n), scores))
        return np.sort(order[: n - keep])
    blocks = np.unique(block_of)
    per_block = keep // len(blocks)
    out = []
    for b in blocks:
        members = np.nonzero(block_of == b)[0]
        order = np.lexsort((-members, scores[members]))
        out.append(members[order[: len(members) - per_block]])
    return np.sort(np.concatenate(out))


def _blocks(group: Group) -> int:
    return 1 if group.block_of is None else len(np.unique(group.block_of))


def _round_step(group: Group, round_to: int) -> int:
    """`round_to` in units of the group's channels: a channel that is a whole attention head
    (or KV group) of d weight columns keeps every tensor a multiple of round_to with any
    count of heads when d is."""
    widths = [
        int(index.shape[1])
        for slot, index in group.members.items()
        if slot.sources or slot.consumers or "weight" in slot.roles
    ]
    width = min(widths) if widths else 1
    return max(round_to // math.gcd(round_to, width), 1)


def plan(
    groups: list[Group],
    scores: Mapping[int, np.ndarray],
    *,
    ratio: float,
    round_to: int,
    global_ratio: bool,
    max_ratio: float,
) -> dict[int, np.ndarray]:
    """Group id -> positions of the channels to remove (groups losing none are left out)."""
    if global_ratio:
        targets = _global_targets(groups, scores, ratio, max_ratio)
    else:
        targets = {g.id: math.floor(min(ratio, max_ratio) * g.channels + 1e-9) for g in groups}
    out = {}
    for group in groups:
        step = _round_step(group, round_to)
        keep = kept_count(group.channels, targets[group.id], step, _blocks(group))
        removed = choose(scores[group.id], keep, group.block_of)
        if len(removed):
            out[group.id] = removed
    return out


def _global_targets(
    groups: list[Group], scores: Mapping[int, np.ndarray], ratio: float, max_ratio: float
) -> dict[int, int]:
    pooled = []
    for group in groups:
        s = scores[group.id]
        mean = float(np.mean(s)) if len(s) else 0.0
        normalized = s / mean if mean > 0 else np.zeros_like(s)
        pooled += [(float(v), group.id) for v in normalized]
    pooled.sort(key=lambda item: item[0])
    budget = math.floor(ratio * len(pooled) + 1e-9)
    caps = {g.id: math.floor(max_ratio * g.channels + 1e-9) for g in groups}
    targets = dict.fromkeys(caps, 0)
    for _, gid in pooled:
        if budget <= 0:
            break
        if targets[gid] < caps[gid]:
            targets[gid] += 1
            budget -= 1
    return targets

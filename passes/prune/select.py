"""Which weights to zero, from a score per weight (higher = more important): N:M groups,
a fraction of a layer, a fraction of each output, or one threshold over many layers.

All of it is vectorised numpy. The N:M selection ranks the M members of every group with
M·(M−1)/2 whole-array comparisons (6 for 2:4) on a strided view of the weight, never a
Python loop per group, and works through big weights in chunks to bound the temporaries.
Ties are broken by position (the earlier element is pruned first), so a selection is the
same on every run. A score of -1 marks a weight that must go (an earlier mask zeroed it):
scores are never negative otherwise, so those are chosen first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Weights ranked per chunk: small enough that the temporaries stay in cache and are reused
# (measured fastest on an 8192x8192 weight among 2^18..2^24).
_CHUNK_WEIGHTS = 1 << 18


def nm_keep(
    scores: np.ndarray,
    axis: int,
    n: int,
    m: int,
    *,
    absolute: bool = False,
    forced: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean keep-mask with exactly `n` kept in every group of `m` along `axis`.

    Args:
        scores: one score per weight, in the weight's layout; `scores.shape[axis]` must be a
            multiple of `m`.
        axis: the reduction axis.
        n: weights kept per group.
        m: group size.
        absolute: rank by |scores| (magnitude pruning straight from the weight, computed
            chunk by chunk instead of as a second full-size array).
        forced: a keep-mask whose False entries must be pruned (scored -1).
    """
    axis = axis % scores.ndim
    length = scores.shape[axis]
    if length % m:
        raise ValueError(f"axis {axis} holds {length} elements, not a multiple of {m}")
    outer = int(np.prod(scores.shape[:axis], dtype=np.int64)) * (length // m)
    inner = int(np.prod(scores.shape[axis + 1 :], dtype=np.int64))
    view = scores.reshape(outer, m, inner)
    held = None if forced is None else forced.reshape(outer, m, inner)
    keep = np.empty((outer, m, inner), dtype=bool)
    step = max(1, _CHUNK_WEIGHTS // max(m * inner, 1))
    for start in range(0, outer, step):
        part = slice(start, start + step)
        chunk = np.abs(view[part]) if absolute else view[part]
        if held is not None:
            chunk = np.where(held[part], chunk, chunk.dtype.type(-1))
        rank = np.zeros(chunk.shape, dtype=np.uint8)
        for i in range(m):
            for j in range(i + 1, m):
                # i outranks j when strictly larger; on a tie the later one (j) outranks i.
                above = chunk[:, i] > chunk[:, j]
                rank[:, i] += above
                rank[:, j] += ~above
        np.greater_equal(rank, m - n, out=keep[part])
    return keep.reshape(scores.shape)


def fraction_keep(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask that prunes exactly round(sparsity · size) of the lowest scores."""
    flat = scores.reshape(-1)
    count = int(round(sparsity * flat.size))
    prune = _lowest(flat, count)
    return ~prune.reshape(scores.shape)


def rows_keep(scores: np.ndarray, out_axes: Sequence[int], sparsity: float) -> np.ndarray:
    """Keep-mask pruning round(sparsity · row length) lowest scores of every output's row.

    Args:
        scores: one score per weight.
        out_axes: the axes that index the outputs; each output's row is everything else.
        sparsity: fraction pruned per row.
    """
    axes = [a % scores.ndim for a in out_axes]
    rest = [a for a in range(scores.ndim) if a not in axes]
    moved = np.transpose(scores, axes + rest)
    rows = moved.reshape(int(np.prod([scores.shape[a] for a in axes], dtype=np.int64)), -1)
    count = int(round(sparsity * rows.shape[1]))
    keep = np.ones(rows.shape, dtype=bool)
    if count:
        # argpartition's choice among equal scores is fixed for equal input: repeatable.
        lowest = np.argpartition(rows, count - 1, axis=1)[:, :count]
        np.put_along_axis(keep, lowest, False, axis=1)
    return np.transpose(keep.reshape(moved.shape), np.argsort(axes + rest))


def global_keep(scores: Sequence[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """Keep-masks pruning round(sparsity · total) lowest scores over all arrays together.

    Scores must all be float32, so the threshold compares alike in every array.

    Memory: one float32 copy of every score at once (4 bytes per weight), to find the
    threshold; ties at the threshold are pruned in array order.
    """
    total = sum(s.size for s in scores)
    count = int(round(sparsity * total))
    if count == 0:
        return [np.ones(s.shape, dtype=bool) for s in scores]
    joined = np.concatenate([np.asarray(s, np.float32).reshape(-1) for s in scores])
    threshold = np.partition(joined, count - 1)[count - 1]
    del joined
    masks = []
    left = count - sum(int(np.count_nonzero(s < threshold)) for s in scores)
    for s in scores:
        prune = s < threshold
        if left > 0:
            ties = np.flatnonzero(s.reshape(-1) == threshold)[:left]
            prune.reshape(-1)[ties] = True
            left -= len(ties)
        masks.append(~prune)
    return masks


def _lowest(flat: np.ndarray, count: int) -> np.ndarray:
    """Boolean array marking exactly `count` lowest entries (ties: earliest first)."""
    prune = np.zeros(flat.shape, dtype=bool)
    if count <= 0:
        return prune
    if count >= flat.size:
        prune[:] = True
        return prune
    threshold = np.partition(flat, count - 1)[count - 1]
    np.less(flat, threshold, out=prune)
    left = count - int(np.count_nonzero(prune))
    if left > 0:
        prune[np.flatnonzero(flat == threshold)[:left]] = True
    return prune

"""The N:M rule as TensorRT checks it: in every group of M consecutive weights along the
reduction axis, at most N are non-zero (2:4 for sparse tensor cores).

A weight is cut into groups along its reduction axis (Conv `[K, C, R, S]`: along C at every
(k, r, s); MatMul `[..., K, N]`: along K for every n; Gemm along K), which must hold a multiple
of M elements. This module only counts; it shares no code with the pruner (`select`), so the
two check each other. `graphopt inspect` can call `check_2_4` on any weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Groups per chunk when counting, to bound the temporary arrays on big weights.
_CHUNK_GROUPS = 1 << 22


@dataclass(frozen=True)
class NMCheck:
    """How many groups of one weight follow the N:M rule.

    Attributes:
        groups: groups of M along the reduction axis (0 when the axis is not a multiple of M).
        passing: groups with at most N non-zeros.
        applicable: False when the reduction axis is not a multiple of M (nothing checked).
    """

    groups: int
    passing: int
    applicable: bool = True

    @property
    def fraction(self) -> float:
        """Share of passing groups (1.0 when there are none)."""
        return self.passing / self.groups if self.groups else 1.0

    @property
    def compliant(self) -> bool:
        return self.applicable and self.passing == self.groups


def check_nm(weight: np.ndarray, axis: int, *, n: int = 2, m: int = 4) -> NMCheck:
    """Count the groups of `m` consecutive elements along `axis` with at most `n` non-zeros.

    Args:
        weight: any array; an exact 0 (or -0.0) counts as zero.
        axis: the reduction axis of the weight in this layout (negative counts from the end).
        n: the most non-zeros a group may hold.
        m: the group size.
    """
    array = np.asarray(weight)
    axis = axis % array.ndim
    length = array.shape[axis]
    if length % m:
        return NMCheck(0, 0, applicable=False)
    outer = int(np.prod(array.shape[:axis], dtype=np.int64)) * (length // m)
    inner = int(np.prod(array.shape[axis + 1 :], dtype=np.int64))
    view = array.reshape(outer, m, inner)
    passing = 0
    step = max(1, _CHUNK_GROUPS // max(inner, 1))
    for start in range(0, outer, step):
        nonzeros = np.count_nonzero(view[start : start + step], axis=1)
        passing += int(np.count_nonzero(nonzeros <= n))
    return NMCheck(outer * inner, passing)


def check_2_4(weight: np.ndarray, axis: int) -> NMCheck:
    """`check_nm` for TensorRT's 2:4 structured sparsity."""
    return check_nm(weight, axis, n=2, m=4)

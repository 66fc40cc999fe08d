"""Pruning masks in `model.metadata["masks"]`, for the passes that run later.

`masks[initializer name]` is a `PackedMask`: which elements of that initializer may be
non-zero (True) and which must stay zero (False), packed eight to a byte with `np.packbits`
(125 MB for a billion weights, against 1 GB as a boolean array). A later pass that changes
weights (distillation) multiplies by `mask.unpack()` so pruned weights stay zero; a second
`prune` keeps every zero of an existing mask (the union of the zeros). Plain boolean arrays
stored there by other code are accepted too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

METADATA_KEY = "masks"


@dataclass(frozen=True, eq=False)
class PackedMask:
    """A boolean keep-mask of `shape`, one bit per element (row-major, `np.packbits` order)."""

    shape: tuple[int, ...]
    bits: np.ndarray

    @classmethod
    def pack(cls, keep: np.ndarray) -> PackedMask:
        return cls(tuple(int(d) for d in keep.shape), np.packbits(keep.reshape(-1)))

    def unpack(self) -> np.ndarray:
        size = int(np.prod(self.shape, dtype=np.int64))
        return np.unpackbits(self.bits, count=size).astype(bool).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)

    def same_as(self, other: PackedMask) -> bool:
        return self.shape == other.shape and np.array_equal(self.bits, other.bits)


def existing_keep(
    metadata: Mapping[str, Any], name: str, shape: tuple[int, ...]
) -> np.ndarray | None:
    """The keep-mask stored for initializer `name`, or None; one of another shape is ignored
    (the weight was replaced since, e.g. by channel removal)."""
    mask = metadata.get(METADATA_KEY, {}).get(name)
    if isinstance(mask, PackedMask):
        return mask.unpack() if mask.shape == tuple(shape) else None
    if isinstance(mask, np.ndarray) and mask.shape == tuple(shape):
        return mask.astype(bool)
    return None


def store(metadata: dict[str, Any], name: str, keep: np.ndarray) -> bool:
    """Save the keep-mask of `name`; True when that changed what was stored."""
    masks = metadata.setdefault(METADATA_KEY, {})
    packed = PackedMask.pack(keep)
    old = masks.get(name)
    if isinstance(old, PackedMask) and old.same_as(packed):
        return False
    masks[name] = packed
    return True

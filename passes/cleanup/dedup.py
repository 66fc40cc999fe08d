"""Merging initializers with identical dtype, shape and bytes.

Two stages keep this cheap on big models: initializers are first grouped by dtype, shape and a
fingerprint of their first and last bytes, and only members of a group of two or more are
hashed in full. A model whose large weights differ (nearly all) is thus never read in full,
and an external weight that had to be read is unmapped again at once, so at most one
tensor's pages are mapped at a time.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

# Tensors up to this size are fingerprinted whole; larger ones by their two ends.
_EDGE_BYTES = 64 * 1024
_HASH_CHUNK_BYTES = 16 * 2**20


def deduplicate(m: ir.Model) -> bool:
    """Replace every initializer by the first one with the same dtype, shape and bytes.

    Graph inputs and outputs are never merged (a user may feed or read them by name).
    """
    modified = False
    for graph in m.graphs():
        groups: dict[tuple[object, ...], list[ir.Value]] = defaultdict(list)
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or value.is_graph_input() or value.is_graph_output():
                continue
            if tensor.dtype.is_string():
                continue
            key = (tensor.dtype, tuple(tensor.shape.numpy()), _summarize(tensor, _fingerprint))
            groups[key].append(value)
        for members in groups.values():
            if len(members) > 1:
                modified |= _merge_identical(graph, members)
    return modified


def _merge_identical(graph: ir.Graph, members: list[ir.Value]) -> bool:
    by_digest: dict[bytes, list[ir.Value]] = defaultdict(list)
    for value in members:
        assert value.const_value is not None
        by_digest[_summarize(value.const_value, _digest)].append(value)
    merged = False
    for same in by_digest.values():
        keep, *duplicates = same
        for duplicate in duplicates:
            duplicate.replace_all_uses_with(keep)
            graph.initializers.pop(duplicate.name)  # type: ignore[arg-type]
            merged = True
    return merged


def _summarize(tensor: ir.TensorProtocol, summary: Callable[[np.ndarray], bytes]) -> bytes:
    """`summary` of the tensor's bytes (a flat uint8 view); unmaps an external tensor again
    when it was not mapped before."""
    was_mapped = not isinstance(tensor, ir.ExternalTensor) or tensor.raw is not None
    data = np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8)
    try:
        return summary(data)
    finally:
        del data  # the view must go before the mapping can be closed
        if not was_mapped:
            tensor.release()  # type: ignore[union-attr]


def _fingerprint(data: np.ndarray) -> bytes:
    if data.size <= 2 * _EDGE_BYTES:
        return hashlib.sha256(data).digest()
    edges = hashlib.sha256(data[:_EDGE_BYTES])
    edges.update(data[-_EDGE_BYTES:])
    return edges.digest()


def _digest(data: np.ndarray) -> bytes:
    hashed = hashlib.sha512()
    for start in range(0, data.size, _HASH_CHUNK_BYTES):
        hashed.update(data[start : start + _HASH_CHUNK_BYTES])
    return hashed.digest()

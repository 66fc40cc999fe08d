"""A cache of calibrated ranges, so a re-run with other placement or precision skips ORT.

One small JSON file per tensor range, named by its key: a SHA-256 over

- how the tensor is computed: a Merkle fingerprint over the nodes it depends on (op, domain,
  opset, attributes, model-local function bodies) down to the graph inputs (name, dtype,
  shape) and initializers (dtype, shape and a hash of their bytes). Nodes downstream of the
  tensor, node and tensor names, and the rest of the model do not count, so a change
  elsewhere (or a renamed tensor) still hits;
- the data: a hash of every input's rows as streamed (one cheap read of the data, no ORT),
  cut so that it does not depend on the batch size;
- the method and the options that change its result (symmetric, percentile, bins, the
  channel axis).

The batch size, device and thread count are not part of the key: ranges do not depend on
them beyond float rounding inside ONNX Runtime.

Initializer hashes are kept in the tensor's `meta`, so a model (and its copies, which share
tensors) is hashed once per process; an external weight that had to be mapped to be hashed
is unmapped again at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphopt.calibration.ranges import TensorRange
from graphopt.console import track, warn
from graphopt.data import Dataset
from graphopt.model import Model

FORMAT = "graphopt-calibration-range/1"
_HASH_CHUNK_BYTES = 16 * 2**20
_META_DIGEST = "graphopt.calibration.sha256"


class CalibrationCache:
    """Calibrated ranges stored as JSON files in `folder` (made when first written).

    Attributes:
        hits: ranges served from the folder since this object was made.
        misses: ranges looked up and not found.
    """

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str, name: str) -> TensorRange | None:
        """The range stored under `key`, renamed to `name`; None when absent or unreadable."""
        path = self._path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT or data.get("key") != key:
                raise ValueError("not a range written by this version of graphopt")
            found = TensorRange.from_dict(data["range"], name=name)
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warn(f"ignoring the unreadable calibration cache entry '{path}' ({exc}).")
            self.misses += 1
            return None
        self.hits += 1
        return found

    def put(self, key: str, found: TensorRange) -> None:
        """Store a range under `key` (atomically: a reader never sees half a file)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": FORMAT, "key": key, "range": found.to_dict()})
        handle, temporary = tempfile.mkstemp(prefix=".range-", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(text)
            os.replace(temporary, self._path(key))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


# ---------------------------------------------------------------------------- keys


def range_keys(
    model: Model,
    dataset: Dataset,
    tensors: Sequence[tuple[str, dict[str, object]]],
    *,
    batch_size: int,
) -> dict[str, str]:
    """The cache key of each (tensor name, options) pair."""
    data = data_digest(dataset, batch_size)
    fingerprints = ValueFingerprints(model)
    keys = {}
    for name, options in tensors:
        text = json.dumps(
            {
                "format": FORMAT,
                "value": fingerprints.of(name).hex(),
                "data": data,
                "options": options,
            },
            sort_keys=True,
        )
        keys[name] = hashlib.sha256(text.encode()).hexdigest()
    return keys


def data_digest(dataset: Dataset, batch_size: int) -> str:
    """A hash of the dataset's inputs that does not depend on how they are batched.

    Each input's rows are hashed as one stream of bytes, with the runs of equal sample
    shape and dtype beside it; labels do not count.
    """
    streams: dict[str, hashlib._Hash] = {}
    runs: dict[str, list[list[object]]] = {}
    for batch in track(
        dataset.batches(batch_size),
        total=dataset.num_batches(batch_size),
        description="calibration: hashing data",
    ):
        for name, array in batch.feeds.items():
            stream = streams.setdefault(name, hashlib.sha256())
            rows = np.ascontiguousarray(array)
            stream.update(rows.reshape(-1).view(np.uint8).data)
            layout = [rows.dtype.str, list(rows.shape[1:])]
            shape_runs = runs.setdefault(name, [])
            if shape_runs and shape_runs[-1][0] == layout:
                shape_runs[-1][1] += int(rows.shape[0])  # type: ignore[operator]
            else:
                shape_runs.append([layout, int(rows.shape[0])])
    summary = {name: [streams[name].hexdigest(), runs[name]] for name in sorted(streams)}
    return hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()


class ValueFingerprints:
    """Merkle fingerprints of the main graph's values: how each one is computed.

    A value's fingerprint covers its producer (op, domain, overload, opset, attributes,
    the body of a model-local function), which output it is, and the fingerprints of the
    producer's inputs, down to graph inputs and initializers. Values that a node's
    subgraphs (If/Loop/Scan bodies) read from the main graph count as its inputs too.
    """

    def __init__(self, model: Model) -> None:
        self._model = model.ir
        graph = model.graph
        self._graph = graph
        self._by_name: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
        self._by_name.update({k: v for k, v in graph.initializers.items() if k})
        for node in graph:
            for output in node.outputs:
                if output.name:
                    self._by_name[output.name] = output
        self._values: dict[int, bytes] = {}
        self._nodes: dict[int, bytes] = {}

    def of(self, name: str) -> bytes:
        value = self._by_name[name]
        key = id(value)
        if key not in self._values:
            self._compute(value)
        return self._values[key]

    def _compute(self, root: ir.Value) -> None:
        """Fill in the fingerprints of `root` and everything it depends on, depth first
        without recursion (graphs can be deep)."""
        stack: list[tuple[ir.Value, bool]] = [(root, False)]
        open_values: set[int] = set()
        while stack:
            value, expanded = stack.pop()
            if id(value) in self._values:
                continue
            node = value.producer()
            if node is None or node.graph is not self._graph:
                self._values[id(value)] = self._leaf(value)
                continue
            inputs = self._node_inputs(node)
            if not expanded:
                if id(value) in open_values:
                    raise ValueError(f"The graph has a cycle through '{value.name}'.")
                open_values.add(id(value))
                stack.append((value, True))
                stack.extend((v, False) for v in inputs if id(v) not in self._values)
                continue
            if id(node) not in self._nodes:
                self._nodes[id(node)] = self._node(node, inputs)
            digest = hashlib.sha256(self._nodes[id(node)])
            digest.update(f"output {value.index()}".encode())
            self._values[id(value)] = digest.digest()

    def _node_inputs(self, node: ir.Node) -> list[ir.Value]:
        """The node's inputs, then main-graph values its subgraphs read (in order)."""
        inputs = [v for v in node.inputs if v is not None]
        for attr in node.attributes.values():
            if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else attr.value
                for sub in graphs:
                    inputs.extend(self._captured(sub))
        return inputs

    def _captured(self, subgraph: ir.Graph) -> Iterable[ir.Value]:
        for inner in ir.traversal.RecursiveGraphIterator(subgraph):
            for value in inner.inputs:
                if value is not None and self._by_name.get(value.name or "") is value:
                    yield value

    def _node(self, node: ir.Node, inputs: Sequence[ir.Value]) -> bytes:
        digest = hashlib.sha256()
        opset = self._model.opset_imports.get(node.domain)
        version = node.version if node.version is not None else opset
        digest.update(repr((node.domain, node.op_type, node.overload, version)).encode())
        for name in sorted(node.attributes):
            proto = ir.serde.serialize_attribute(node.attributes[name])
            digest.update(proto.SerializeToString(deterministic=True))
        function = self._model.functions.get((node.domain, node.op_type, node.overload))
        if function is not None:
            proto = ir.serde.serialize_function(function)
            digest.update(proto.SerializeToString(deterministic=True))
        slots = [
            b"-" if v is None else self._values[id(v)]
            for v in node.inputs  # optional inputs left out keep their position
        ]
        digest.update(b"inputs")
        for slot in slots:
            digest.update(slot)
        captured = inputs[len([v for v in node.inputs if v is not None]) :]
        digest.update(b"captured")
        for value in captured:
            digest.update((value.name or "").encode())
            digest.update(self._values[id(value)])
        return digest.digest()

    def _leaf(self, value: ir.Value) -> bytes:
        """A graph input, an initializer, or (never in a valid model) a dangling value."""
        digest = hashlib.sha256()
        kind = "value"
        tensor = value.const_value
        if tensor is not None:
            kind = "initializer"  # its bytes count (also when it is an input: none is fed)
        elif value.is_graph_input():
            kind = "input"
        dtype = value.dtype.name if value.dtype is not None else "?"
        shape = str(value.shape) if value.shape is not None else "?"
        # Data is fed by input name, so an input's name counts; a weight's does not.
        name = value.name if kind != "initializer" or value.is_graph_input() else ""
        digest.update(repr((kind, name, dtype, shape)).encode())
        if tensor is not None:
            digest.update(tensor_digest(tensor))
        return digest.digest()


def tensor_digest(tensor: ir.TensorProtocol) -> bytes:
    """SHA-256 of a tensor's dtype, shape and bytes, kept in its `meta` once computed."""
    meta = getattr(tensor, "meta", None)
    if meta is not None and _META_DIGEST in meta:
        return meta[_META_DIGEST]
    digest = hashlib.sha256(repr((tensor.dtype.name, tuple(tensor.shape.numpy()))).encode())
    was_mapped = not isinstance(tensor, ir.ExternalTensor) or tensor.raw is not None
    if tensor.dtype.is_string():
        for item in np.asarray(tensor.numpy()).reshape(-1):
            digest.update(len(item).to_bytes(8, "little") + bytes(item))
    else:
        data = np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8)
        try:
            for start in range(0, data.size, _HASH_CHUNK_BYTES):
                digest.update(data[start : start + _HASH_CHUNK_BYTES].data)
        finally:
            del data  # the view must go before the mapping can be closed
            if not was_mapped:
                tensor.release()  # type: ignore[union-attr]
    result = digest.digest()
    if meta is not None:
        meta[_META_DIGEST] = result
    return result

"""Model I/O: load an untrusted ONNX file once, keep it as onnx-ir, save it atomically.

A model file is untrusted input. Before anything is allocated from it, every external-data
reference is checked: its location must be a relative path that stays inside the model's
folder (no `..`, no absolute path, no symlink or hard link that leads out), and its offset and
length must lie inside the data file and agree with the tensor's declared dtype and shape.
Weights in external data stay memory-mapped until a pass touches them.

Saving writes into a temporary folder beside the destination and renames into place, so a
failure leaves no half-written file; it never writes onto the model's own input files and never
outside the output folder.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf import json_format, text_format
from google.protobuf.message import DecodeError

from graphopt.errors import ModelLoadError, ModelSaveError

# What onnx.load raises on a file that does not parse, in any of the formats it reads
# (binary protobuf, text proto, JSON, ONNX text).
_PARSE_ERRORS = (
    DecodeError,
    json_format.ParseError,
    text_format.ParseError,
    onnx.parser.ParseError,
    RuntimeError,
    ValueError,
    OSError,
)

# Protobuf cannot serialise a message of 2 GiB or more; stay clear of it with a margin.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
EXTERNAL_DATA_THRESHOLD_BYTES = int(1.8 * 2**30)


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of a graph input or output.

    Dimensions are ints when fixed, strings for named dynamic dims, None when unknown.
    """

    name: str
    dtype: np.dtype | None
    shape: tuple[int | str | None, ...] | None

    def shape_text(self) -> str:
        if self.shape is None:
            return "?"
        return "x".join("?" if d is None else str(d) for d in self.shape) or "scalar"


@dataclass
class Model:
    """An ONNX model in onnx-ir plus what graphopt tracks beside it.

    Attributes:
        ir: the onnx-ir model; passes edit it in place.
        path: the file it was loaded from, if any (never written to).
        metadata: graphopt's own state that later passes need, e.g. pruning masks under
            "masks" and channel maps under "channels". Plain data only, no globals.
    """

    ir: ir.Model
    path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def graph(self) -> ir.Graph:
        return self.ir.graph

    def input_specs(self) -> list[TensorSpec]:
        """Graph inputs the user must feed (inputs that are also initializers are left out)."""
        return [_spec(v) for v in self.graph.inputs if v.name not in self.graph.initializers]

    def output_specs(self) -> list[TensorSpec]:
        return [_spec(v) for v in self.graph.outputs]

    def initializer_bytes(self) -> int:
        """Bytes held by all initializers of all graphs (without loading external data)."""
        total = 0
        for graph in self.ir.graphs():
            for value in graph.initializers.values():
                if value.const_value is not None:
                    total += value.const_value.nbytes
        return total

    def to_proto(self) -> onnx.ModelProto:
        """Serialize to a protobuf with all weights inline (only for models under 2 GB)."""
        if self.initializer_bytes() >= EXTERNAL_DATA_THRESHOLD_BYTES:
            raise ModelSaveError(
                "The model's weights are too large for one protobuf message.",
                hint="Save it to a file with external data instead (save_model).",
            )
        proto = ir.serde.serialize_model(self.ir)
        _inline_external_tensors(proto, self.ir)
        return proto

    def copy(self) -> Model:
        """A deep copy whose edits do not touch this model (external weights stay mapped)."""
        return Model(ir=self.ir.clone(), path=self.path, metadata=_copy_metadata(self.metadata))


def _copy_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    import copy

    return copy.deepcopy(metadata)


def _spec(value: ir.Value) -> TensorSpec:
    dtype: np.dtype | None = None
    type_ = value.type
    if type_ is not None and isinstance(type_, ir.TensorType):
        try:
            dtype = np.dtype(type_.dtype.numpy())
        except (TypeError, NotImplementedError):
            dtype = None
    shape: tuple[int | str | None, ...] | None = None
    if value.shape is not None:
        dims: list[int | str | None] = []
        for dim in value.shape:
            if isinstance(dim, int):
                dims.append(dim)
            elif isinstance(dim, ir.SymbolicDim):
                dims.append(dim.value)
            else:
                dims.append(None)
        shape = tuple(dims)
    return TensorSpec(name=value.name or "", dtype=dtype, shape=shape)


# ---------------------------------------------------------------------------- loading


def load_model(path: str | os.PathLike[str]) -> Model:
    """Load an ONNX file, refusing unsafe or inconsistent external data up front.

    Raises:
        ModelLoadError: the file is missing, not a file, corrupt, truncated, or refers to
            external data outside its folder or beyond the end of a data file.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(
            f"Model file '{path}' does not exist.", hint="Check the path and try again."
        )
    if not path.is_file():
        raise ModelLoadError(f"'{path}' is not a file.", hint="Pass the path of an .onnx file.")
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except _PARSE_ERRORS as exc:
        raise ModelLoadError(
            f"'{path}' is not a readable ONNX model ({_first_line(exc)}).",
            hint="The file may be corrupt or truncated; export the model again.",
        ) from None
    _check_structure(proto, path)
    base_dir = path.resolve().parent
    for where, tensor in _all_tensor_protos(proto):
        _check_tensor(tensor, where, base_dir, path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx-ir raises a variety of errors on malformed protos
        raise ModelLoadError(
            f"'{path}' could not be read as an ONNX graph ({_first_line(exc)}).",
            hint="The file may be corrupt; check it with onnx.checker.check_model.",
        ) from None
    ir.external_data.set_base_dir(model.graph, os.fspath(base_dir))
    return Model(ir=model, path=path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_structure(proto: onnx.ModelProto, path: Path) -> None:
    """Catch files that parse as protobuf but are not a model (e.g. truncated to a prefix)."""
    if not proto.HasField("graph") or (len(proto.graph.node) == 0 and len(proto.graph.output) == 0):
        raise ModelLoadError(
            f"'{path}' holds no ONNX graph (no nodes and no outputs).",
            hint="The file may be truncated or not an ONNX model; export the model again.",
        )
    if proto.ir_version <= 0 or len(proto.opset_import) == 0:
        raise ModelLoadError(
            f"'{path}' has no IR version or opset import, so it is not a complete ONNX model.",
            hint="The file may be truncated; export the model again.",
        )


def _all_tensor_protos(proto: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every TensorProto in the model: initializers and tensor attributes, subgraphs too."""

    def graph_tensors(
        graph: onnx.GraphProto, prefix: str
    ) -> Iterator[tuple[str, onnx.TensorProto]]:
        for tensor in graph.initializer:
            yield f"{prefix}initializer '{tensor.name}'", tensor
        for sparse in graph.sparse_initializer:
            yield f"{prefix}sparse initializer '{sparse.values.name}'", sparse.values
            yield f"{prefix}sparse initializer '{sparse.values.name}' indices", sparse.indices
        for node in graph.node:
            for attr in node.attribute:
                where = f"{prefix}attribute '{attr.name}' of node '{node.name or node.op_type}'"
                if attr.HasField("t"):
                    yield where, attr.t
                for t in attr.tensors:
                    yield where, t
                if attr.HasField("g"):
                    yield from graph_tensors(attr.g, f"{prefix}{node.name}/")
                for g in attr.graphs:
                    yield from graph_tensors(g, f"{prefix}{node.name}/")

    yield from graph_tensors(proto.graph, "")
    for function in proto.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield f"attribute '{attr.name}' in function '{function.name}'", attr.t


def _declared_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's dtype and dims call for, or None for types without a fixed size."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        bits = ir.DataType(tensor.data_type).bitwidth
    except (ValueError, TypeError):
        return None
    count = 1
    for dim in tensor.dims:
        if dim < 0:
            return -1
        count *= dim
    return (count * bits + 7) // 8


def _check_tensor(tensor: onnx.TensorProto, where: str, base_dir: Path, path: Path) -> None:
    declared = _declared_nbytes(tensor)
    if declared == -1:
        raise ModelLoadError(
            f"{where} in '{path}' declares a negative dimension {list(tensor.dims)}.",
            hint="The model is malformed; export it again.",
        )
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        if (
            declared is not None
            and tensor.HasField("raw_data")
            and len(tensor.raw_data) != declared
        ):
            raise ModelLoadError(
                f"{where} in '{path}' declares shape {list(tensor.dims)} "
                f"({declared} bytes) but holds {len(tensor.raw_data)} bytes.",
                hint="The model is malformed or truncated; export it again.",
            )
        if not tensor.HasField("raw_data"):
            _check_typed_data(tensor, where, path)
        return
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    data_file = _contained_data_file(location, where, base_dir, path)
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise ModelLoadError(
            f"{where} in '{path}' has a non-numeric external-data offset or length.",
            hint="The model is malformed; export it again.",
        ) from None
    size = data_file.stat().st_size
    if offset < 0 or offset > size:
        raise ModelLoadError(
            f"{where} in '{path}' starts at byte {offset} of '{location}', "
            f"which holds only {size} bytes.",
            hint="The external data file is truncated or belongs to another model.",
        )
    available = size - offset
    if length is not None and (length < 0 or length > available):
        raise ModelLoadError(
            f"{where} in '{path}' reads {length} bytes at offset {offset} of '{location}', "
            f"past its end ({size} bytes).",
            hint="The external data file is truncated or belongs to another model.",
        )
    if declared is not None:
        stored = length if length is not None else available
        if (length is not None and declared != length) or declared > stored:
            raise ModelLoadError(
                f"{where} in '{path}' declares shape {list(tensor.dims)} ({declared} bytes) "
                f"but its external data holds {stored} bytes.",
                hint="The model is malformed or its data file truncated; export it again.",
            )


def _check_typed_data(tensor: onnx.TensorProto, where: str, path: Path) -> None:
    """Refuse inline values stored in a typed field (float_data, ...) that do not fill the
    declared shape: a tensor declaring [2**40] floats with one value must fail here, not
    later with a 4 TiB allocation inside a pass."""
    try:
        field_name = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    except (KeyError, ValueError):
        return
    count = 1
    for dim in tensor.dims:
        count *= dim
    if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        expected = 2 * count
    elif tensor.data_type == onnx.TensorProto.STRING:
        expected = count
    else:
        # Sub-byte types (int4, float4, ...) pack several values into each entry.
        bits = ir.DataType(tensor.data_type).bitwidth
        expected = count if bits >= 8 else (count * bits + 7) // 8
    stored = len(getattr(tensor, field_name))
    if stored != expected:
        raise ModelLoadError(
            f"{where} in '{path}' declares shape {list(tensor.dims)} ({count} values) "
            f"but holds {stored} entries in {field_name}.",
            hint="The model is malformed or truncated; export it again.",
        )


def _contained_data_file(location: str, where: str, base_dir: Path, path: Path) -> Path:
    """Resolve an external-data location, refusing anything that leaves the model's folder."""
    refuse_hint = (
        "External data must be a relative path inside the model's folder; "
        "graphopt refuses other locations because a model file is untrusted input."
    )
    if not location:
        raise ModelLoadError(f"{where} in '{path}' is external but names no data file.")
    if "\0" in location:
        raise ModelLoadError(
            f"{where} in '{path}' names an external data file with a NUL character ({location!r}).",
            hint=refuse_hint,
        )
    candidate = Path(location)
    if candidate.is_absolute() or location.startswith(("/", "\\")) or ":" in location[:3]:
        raise ModelLoadError(
            f"{where} in '{path}' points to the absolute path '{location}'.", hint=refuse_hint
        )
    if ".." in candidate.parts or ".." in location.replace("\\", "/").split("/"):
        raise ModelLoadError(
            f"{where} in '{path}' points outside the model's folder ('{location}').",
            hint=refuse_hint,
        )
    joined = base_dir / candidate
    real = Path(os.path.realpath(joined))
    if not real.is_relative_to(Path(os.path.realpath(base_dir))):
        raise ModelLoadError(
            f"{where} in '{path}' reaches '{real}' through a symbolic link, outside the "
            "model's folder.",
            hint=refuse_hint,
        )
    try:
        info = real.stat()
    except OSError:
        raise ModelLoadError(
            f"{where} in '{path}' needs the external data file '{location}', "
            f"which is missing from '{base_dir}'.",
            hint="Copy the data file next to the model.",
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise ModelLoadError(f"{where} in '{path}': '{location}' is not a regular file.")
    if info.st_nlink > 1:
        raise ModelLoadError(
            f"{where} in '{path}': '{location}' has {info.st_nlink} hard links; graphopt "
            "refuses hard-linked data files because they can alias files outside the folder.",
            hint="Copy the data file instead of linking it.",
        )
    return real


# ---------------------------------------------------------------------------- saving


@dataclass(frozen=True)
class SavedModel:
    """Where a model was written: the .onnx file and its external data file, if any."""

    path: Path
    data_path: Path | None

    def total_bytes(self) -> int:
        size = self.path.stat().st_size
        if self.data_path is not None:
            size += self.data_path.stat().st_size
        return size


def save_model(
    model: Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> SavedModel:
    """Write the model atomically: all files appear together or none does.

    Args:
        model: the model to write; it is not changed.
        path: destination .onnx file; its folder is created if needed.
        external_data: True to put weights in `<name>.data` beside the file, False to keep
            them inline, None to decide by size (external above 1.8 GB).

    Raises:
        ModelSaveError: the destination is one of the model's own input files, or cannot
            be written.
    """
    path = Path(path)
    data_name = path.name + ".data"
    if external_data is None:
        external_data = model.initializer_bytes() >= EXTERNAL_DATA_THRESHOLD_BYTES
    if not external_data and model.initializer_bytes() >= EXTERNAL_DATA_THRESHOLD_BYTES:
        raise ModelSaveError(
            f"The model's weights ({model.initializer_bytes() / 2**30:.2f} GiB) do not fit in "
            f"one protobuf file, so '{path}' cannot be written without external data.",
            hint="Save with external data.",
        )
    data_path = path.parent / data_name
    _refuse_input_files(model, path, data_path if external_data else None)
    for target in (path, data_path):
        # A folder in the way would otherwise be moved aside and deleted with the staging.
        if target.is_dir() and not target.is_symlink():
            raise ModelSaveError(
                f"Cannot write '{target}': a folder of that name is in the way.",
                hint="Choose another output file name (-o).",
            )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise ModelSaveError(f"Cannot create the output folder for '{path}' ({exc}).") from None
    try:
        staged = staging / path.name
        if external_data:
            ir.save(model.ir, staged, external_data=data_name, size_threshold_bytes=1024)
        else:
            onnx.save(model.to_proto(), os.fspath(staged))
        staged_data = staging / data_name
        if not staged_data.exists():
            # No tensor was large enough to go to external data.
            staged_data = None
        _publish(staged, path, staged_data, data_path, staging)
        if staged_data is None:
            # A stale data file from an earlier external save would only confuse users.
            if data_path.exists() and not _is_model_file(model, data_path):
                data_path.unlink()
    except OSError as exc:
        raise ModelSaveError(f"Could not write '{path}' ({exc}).") from None
    except ValueError as exc:
        # onnx-ir refuses to read an external tensor whose location leaves its base folder
        # (a model built in code, not loaded by load_model); nothing has been written then.
        raise ModelSaveError(
            f"Could not write '{path}': {_first_line(exc)}",
            hint="Every external tensor must live inside its model's folder.",
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return SavedModel(path=path, data_path=data_path if staged_data is not None else None)


def _publish(
    staged: Path, path: Path, staged_data: Path | None, data_path: Path, staging: Path
) -> None:
    """Rename the staged files into place, data file first; on failure restore what was there.

    An earlier data file at `data_path` is moved into the staging folder (deleted with it on
    success, moved back on failure), so a failed save leaves the folder as it found it.
    """
    if staged_data is None:
        os.replace(staged, path)
        return
    backup: Path | None = None
    if os.path.lexists(data_path):
        backup = staging / (data_path.name + ".previous")
        os.replace(data_path, backup)
    try:
        os.replace(staged_data, data_path)
        os.replace(staged, path)
    except OSError:
        if backup is not None:
            os.replace(backup, data_path)
        elif os.path.lexists(data_path):
            data_path.unlink()
        raise


def _model_files(model: Model) -> set[Path]:
    """The files a loaded model reads from: its .onnx and every external data file."""
    files: set[Path] = set()
    if model.path is not None:
        files.add(Path(os.path.realpath(model.path)))
    for graph in model.ir.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                files.add(Path(os.path.realpath(tensor.path)))
    return files


def _is_model_file(model: Model, candidate: Path) -> bool:
    return Path(os.path.realpath(candidate)) in _model_files(model)


def _refuse_input_files(model: Model, path: Path, data_path: Path | None) -> None:
    for target in (path, data_path):
        if target is not None and _is_model_file(model, target):
            raise ModelSaveError(
                f"Refusing to write '{target}': it is one of the input model's own files, "
                "and graphopt never modifies its input.",
                hint="Choose another output folder or file name (-o).",
            )


def _inline_external_tensors(proto: onnx.ModelProto, model: ir.Model) -> None:
    """Replace external-data references in a serialized proto by the tensors' bytes."""
    external = {
        value.name: value.const_value
        for graph in model.graphs()
        for value in graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    }
    if not external:
        return

    def fix(graph: onnx.GraphProto) -> None:
        for tensor in graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.name in external:
                tensor.raw_data = external[tensor.name].tobytes()
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    fix(attr.g)
                for g in attr.graphs:
                    fix(g)

    fix(proto.graph)


def model_file_bytes(model: Model) -> int | None:
    """Bytes on disk of the files the model was loaded from (.onnx plus external data)."""
    if model.path is None:
        return None
    return sum(path.stat().st_size for path in _model_files(model))


def check_output_path(model: Model, path: str | os.PathLike[str]) -> None:
    """Refuse, before any work is done, an output path that is one of the model's own files."""
    path = Path(path)
    _refuse_input_files(model, path, path.parent / (path.name + ".data"))

"""Export a model as one entry of a Triton Inference Server model repository.

Triton's documented layout (model_repository.md) is

    <repo>/<name>/config.pbtxt
    <repo>/<name>/<version>/model.onnx      (onnxruntime backend; + external data beside it)
    <repo>/<name>/<version>/model.plan      (tensorrt backend)

`export_triton` writes that entry atomically: everything is staged in a hidden folder inside
the repository, then renamed into place; a failure leaves the repository as it was. It never
writes the input model's own files, and refuses to replace an existing version folder unless
told to (`force`).

The config (protobuf text format, Triton's `inference.ModelConfig`) carries the inputs and
outputs with Triton data types and dims (without the batch dimension when max_batch_size > 0,
-1 where a dimension is dynamic), max_batch_size, dynamic batching with preferred batch sizes,
the instance group, and for the ONNX Runtime backend the TensorRT execution accelerator.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnx_ir as ir

from graphopt.benchmark import count_qdq
from graphopt.errors import GraphoptError, ModelSaveError
from graphopt.model import Model, save_model

Backend = Literal["onnxruntime", "tensorrt"]
InstanceKind = Literal["gpu", "cpu"]
Accelerator = Literal["none", "tensorrt"]
TrtPrecision = Literal["FP32", "FP16", "INT8"]

DEFAULT_MAX_BATCH = 8

# ONNX element type -> Triton DataType (model_config.proto). STRING is Triton's BYTES tensor,
# which the ONNX Runtime backend serves and the TensorRT backend does not.
TRITON_TYPES: dict[ir.DataType, str] = {
    ir.DataType.BOOL: "TYPE_BOOL",
    ir.DataType.UINT8: "TYPE_UINT8",
    ir.DataType.UINT16: "TYPE_UINT16",
    ir.DataType.UINT32: "TYPE_UINT32",
    ir.DataType.UINT64: "TYPE_UINT64",
    ir.DataType.INT8: "TYPE_INT8",
    ir.DataType.INT16: "TYPE_INT16",
    ir.DataType.INT32: "TYPE_INT32",
    ir.DataType.INT64: "TYPE_INT64",
    ir.DataType.FLOAT16: "TYPE_FP16",
    ir.DataType.FLOAT: "TYPE_FP32",
    ir.DataType.DOUBLE: "TYPE_FP64",
    ir.DataType.BFLOAT16: "TYPE_BF16",
    ir.DataType.STRING: "TYPE_STRING",
}

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True, kw_only=True)
class TritonOptions:
    """What the repository entry says.

    Attributes:
        backend: "onnxruntime" (model.onnx) or "tensorrt" (model.plan, given as a file).
        max_batch_size: None: DEFAULT_MAX_BATCH (or the largest preferred batch, if larger)
            when every input and output has a dynamic first dimension, else 0.
        preferred_batch: dynamic batching's preferred batch sizes (empty: Triton's choice).
        max_queue_delay_us: how long dynamic batching may wait to fill a batch.
        instance_group: where the instances run.
        instance_count: instances of the model.
        accelerator: for the onnxruntime backend, "tensorrt" runs it through ONNX Runtime's
            TensorRT execution provider inside Triton.
        trt_precision: the accelerator's precision_mode (None: INT8 for a model with Q/DQ
            nodes, FP32 otherwise).
        trt_workspace_mb: the accelerator's max_workspace_size_bytes, in MiB (None: default).
        version: the version folder to write.
        force: replace an existing version folder.
    """

    backend: Backend = "onnxruntime"
    max_batch_size: int | None = None
    preferred_batch: tuple[int, ...] = ()
    max_queue_delay_us: int = 100
    instance_group: InstanceKind = "gpu"
    instance_count: int = 1
    accelerator: Accelerator = "none"
    trt_precision: TrtPrecision | None = None
    trt_workspace_mb: int | None = None
    version: int = 1
    force: bool = False

    def __post_init__(self) -> None:
        if self.backend not in ("onnxruntime", "tensorrt"):
            raise GraphoptError(
                f"Unknown Triton backend '{self.backend}'.", hint="Use onnxruntime or tensorrt."
            )
        if self.instance_group not in ("gpu", "cpu"):
            raise GraphoptError(
                f"Unknown instance group '{self.instance_group}'.", hint="Use gpu or cpu."
            )
        if self.max_batch_size is not None and self.max_batch_size < 0:
            raise GraphoptError(f"--max-batch-size must be 0 or more (got {self.max_batch_size}).")
        if any(b < 1 for b in self.preferred_batch):
            raise GraphoptError(
                f"Preferred batch sizes must be positive (got {list(self.preferred_batch)})."
            )
        if self.version < 1:
            raise GraphoptError(f"The model version must be 1 or more (got {self.version}).")
        if self.instance_count < 1:
            raise GraphoptError(
                f"The instance count must be 1 or more (got {self.instance_count})."
            )
        if self.max_queue_delay_us < 0:
            raise GraphoptError("The dynamic batching queue delay must not be negative.")
        if self.backend == "tensorrt" and self.instance_group == "cpu":
            raise GraphoptError(
                "A TensorRT plan runs on a GPU only, so it cannot have a CPU instance group.",
                hint="Use --instance-group gpu, or --backend onnxruntime for CPU serving.",
            )
        if self.accelerator == "tensorrt" and self.backend != "onnxruntime":
            raise GraphoptError(
                "The TensorRT execution accelerator is an option of the onnxruntime backend; "
                "the tensorrt backend already runs a TensorRT plan.",
                hint="Drop --accelerator, or use --backend onnxruntime.",
            )
        if self.accelerator == "tensorrt" and self.instance_group == "cpu":
            raise GraphoptError(
                "The TensorRT execution accelerator needs GPU instances.",
                hint="Use --instance-group gpu, or drop --accelerator tensorrt.",
            )
        if self.accelerator == "none" and (
            self.trt_precision is not None or self.trt_workspace_mb is not None
        ):
            raise GraphoptError(
                "A TensorRT precision or workspace was given without --accelerator tensorrt.",
                hint="Add --accelerator tensorrt (onnxruntime backend), or drop those options.",
            )
        if self.trt_workspace_mb is not None and self.trt_workspace_mb < 1:
            raise GraphoptError("The TensorRT workspace must be at least 1 MiB.")


@dataclass(frozen=True)
class TritonTensor:
    """One input or output as the config states it."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None  # the model's own shape, when dims differ


@dataclass
class TritonExport:
    """What was written."""

    model_dir: Path
    config_path: Path
    model_file: Path
    data_file: Path | None
    config_text: str
    max_batch_size: int
    preferred_batch: tuple[int, ...]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_dir": str(self.model_dir),
            "config": str(self.config_path),
            "model_file": str(self.model_file),
            "data_file": str(self.data_file) if self.data_file else None,
            "max_batch_size": self.max_batch_size,
            "preferred_batch_size": list(self.preferred_batch),
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------- tensors


def triton_tensors(
    model: Model, *, batched: bool, backend: Backend
) -> tuple[list[TritonTensor], list[TritonTensor]]:
    """The model's inputs and outputs with Triton data types and dims.

    Raises:
        GraphoptError: a tensor has a type Triton cannot serve (or this backend cannot), or no
            declared rank.
    """
    graph = model.graph
    inputs = [v for v in graph.inputs if v.name not in graph.initializers]
    convert = [_tensor(v, "input", batched=batched, backend=backend) for v in inputs]
    outputs = [_tensor(v, "output", batched=batched, backend=backend) for v in graph.outputs]
    return convert, outputs


def _tensor(value: ir.Value, kind: str, *, batched: bool, backend: Backend) -> TritonTensor:
    name = value.name or ""
    type_ = value.type
    if not isinstance(type_, ir.TensorType):
        what = type(type_).__name__ if type_ is not None else "no type"
        raise GraphoptError(
            f"The model's {kind} '{name}' is not a plain tensor ({what}), and Triton's config "
            "describes tensors only.",
            hint="Export the model with tensor inputs and outputs (no sequences, maps or "
            "optionals).",
        )
    dtype = type_.dtype
    triton_type = TRITON_TYPES.get(dtype)
    if triton_type is None:
        raise GraphoptError(
            f"The model's {kind} '{name}' has element type {dtype.name}, which Triton has no "
            "data type for.",
            hint="Triton serves bool, (u)int8-64, fp16, bf16, fp32, fp64 and strings; cast the "
            "tensor at the model's edge (e.g. complex to two float channels, float8 or int4 to "
            "float16).",
        )
    if dtype == ir.DataType.STRING and backend == "tensorrt":
        raise GraphoptError(
            f"The model's {kind} '{name}' holds strings, which TensorRT (and so Triton's "
            "tensorrt backend) cannot take.",
            hint="Use --backend onnxruntime, or move string handling out of the model.",
        )
    if value.shape is None:
        raise GraphoptError(
            f"The model's {kind} '{name}' has no declared shape, and Triton needs at least its "
            "rank.",
            hint="Run shape inference on the model (e.g. onnx.shape_inference) or declare the "
            "shape when exporting.",
        )
    dims = [d if isinstance(d, int) else -1 for d in value.shape]
    if batched:
        dims = dims[1:]
    if not dims:
        # Triton wants at least one dim; a scalar (per sample) is stated as [1] reshaped to [].
        return TritonTensor(name, triton_type, (1,), reshape=())
    return TritonTensor(name, triton_type, tuple(dims))


def has_batch_dim(model: Model) -> bool:
    """Whether every input and output has a dynamic first dimension (the batch axis)."""
    graph = model.graph
    values = [v for v in graph.inputs if v.name not in graph.initializers] + list(graph.outputs)
    if not values:
        return False
    for value in values:
        shape = value.shape
        if shape is None or len(shape) == 0 or isinstance(shape[0], int):
            return False
    return True


# ---------------------------------------------------------------------------- config text


def render_config(
    name: str,
    options: TritonOptions,
    inputs: list[TritonTensor],
    outputs: list[TritonTensor],
    *,
    max_batch_size: int,
    preferred: tuple[int, ...],
    trt_precision: str | None,
) -> str:
    """The config.pbtxt text (protobuf text format of Triton's ModelConfig)."""
    lines = [f"name: {_quote(name)}"]
    if options.backend == "onnxruntime":
        lines += ['platform: "onnxruntime_onnx"', 'backend: "onnxruntime"']
        lines.append('default_model_filename: "model.onnx"')
    else:
        lines += ['platform: "tensorrt_plan"', 'backend: "tensorrt"']
        lines.append('default_model_filename: "model.plan"')
    lines.append(f"max_batch_size: {max_batch_size}")
    for key, tensors in (("input", inputs), ("output", outputs)):
        for tensor in tensors:
            lines.append(f"{key} {{")
            lines.append(f"  name: {_quote(tensor.name)}")
            lines.append(f"  data_type: {tensor.data_type}")
            lines.append(f"  dims: [ {', '.join(str(d) for d in tensor.dims)} ]")
            if tensor.reshape is not None:
                lines.append(f"  reshape: {{ shape: [ {', '.join(map(str, tensor.reshape))} ] }}")
            lines.append("}")
    if max_batch_size > 0:
        lines.append("dynamic_batching {")
        if preferred:
            lines.append(f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]")
        lines.append(f"  max_queue_delay_microseconds: {options.max_queue_delay_us}")
        lines.append("}")
    kind = "KIND_GPU" if options.instance_group == "gpu" else "KIND_CPU"
    lines.append("instance_group [")
    lines.append(f"  {{ count: {options.instance_count}, kind: {kind} }}")
    lines.append("]")
    if options.accelerator == "tensorrt":
        lines.append("optimization {")
        lines.append("  execution_accelerators {")
        lines.append("    gpu_execution_accelerator: [")
        lines.append("      {")
        lines.append('        name: "tensorrt"')
        parameters = {"precision_mode": trt_precision or "FP32"}
        if options.trt_workspace_mb is not None:
            parameters["max_workspace_size_bytes"] = str(options.trt_workspace_mb * 2**20)
        for key, value in parameters.items():
            lines.append(f"        parameters {{ key: {_quote(key)} value: {_quote(value)} }}")
        lines.append("      }")
        lines.append("    ]")
        lines.append("  }")
        lines.append("}")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    """A protobuf text-format string literal (UTF-8; quotes, backslashes and controls escaped)."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


# ---------------------------------------------------------------------------- bench results


def preferred_from_bench(
    path: str | os.PathLike[str], model_path: Path | None
) -> tuple[tuple[int, ...], list[str]]:
    """The throughput-optimal batch of a `graphopt bench --report` file, and warnings.

    Raises:
        GraphoptError: the file is missing, not JSON, or not a bench result.
    """
    from graphopt.benchmark import file_sha256

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GraphoptError(f"Bench result '{path}' does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GraphoptError(
            f"Bench result '{path}' is not readable JSON ({exc}).",
            hint="Write it with graphopt bench MODEL --report FILE.",
        ) from None
    best = data.get("best_batch") if isinstance(data, dict) else None
    if not isinstance(best, int) or isinstance(best, bool) or best < 1:
        raise GraphoptError(
            f"'{path}' is not a graphopt bench result (no positive 'best_batch').",
            hint="Write it with graphopt bench MODEL --report FILE.",
        )
    warnings = []
    recorded = data.get("model_sha256")
    if model_path is not None and recorded and recorded != file_sha256(model_path):
        warnings.append(
            f"'{path}' was measured on a different model file than '{model_path}'; its best "
            f"batch ({best}) may not suit this one"
        )
    if data.get("provider") == "CPUExecutionProvider":
        warnings.append(
            f"the best batch in '{path}' ({best}) was measured on ONNX Runtime's CPU provider; "
            "on a GPU it is usually larger"
        )
    return (best,), warnings


# ---------------------------------------------------------------------------- export


def export_triton(
    model: Model,
    repo: str | os.PathLike[str],
    name: str,
    options: TritonOptions,
    *,
    plan: str | os.PathLike[str] | None = None,
) -> TritonExport:
    """Write `repo/name/config.pbtxt` and `repo/name/<version>/model.onnx` (or `model.plan`).

    Args:
        model: the ONNX model; for the tensorrt backend, the model the plan was built from
            (it gives the inputs and outputs). Never modified.
        repo: the model repository folder (created if needed).
        name: the model's name in the repository.
        options: what the config says.
        plan: the TensorRT plan file (tensorrt backend only).

    Raises:
        GraphoptError: a bad name, option, dtype or plan; the version folder exists without
            `force`; or the input model lives in the folder to be replaced.
        ModelSaveError: the files could not be written.
    """
    repo = Path(repo)
    _check_name(name)
    plan_path = _check_plan(options, plan)
    batched_model = has_batch_dim(model)
    max_batch, preferred, notes = _batching(options, batched_model)
    inputs, outputs = triton_tensors(model, batched=max_batch > 0, backend=options.backend)
    if not inputs or not outputs:
        raise GraphoptError("The model has no inputs or no outputs, so Triton cannot serve it.")
    qdq = count_qdq(model)
    trt_precision = None
    if options.accelerator == "tensorrt":
        trt_precision = options.trt_precision or ("INT8" if qdq else "FP32")
        if qdq and trt_precision != "INT8":
            notes.append(
                f"the model holds {qdq} Q/DQ nodes but the TensorRT accelerator's precision is "
                f"{trt_precision}; ONNX Runtime's TensorRT provider needs INT8 to run them as int8"
            )
    elif options.backend == "onnxruntime" and options.instance_group == "gpu" and qdq:
        notes.append(
            f"the model holds {qdq} Q/DQ nodes and will run on ONNX Runtime's CUDA provider, "
            "which is slower than FP32 for them; add --accelerator tensorrt or serve a TensorRT "
            "plan (--backend tensorrt) for INT8 speed"
        )
    config_text = render_config(
        name,
        options,
        inputs,
        outputs,
        max_batch_size=max_batch,
        preferred=preferred,
        trt_precision=trt_precision,
    )
    model_dir = repo / name
    version_dir = model_dir / str(options.version)
    _check_target(model, version_dir, options.force, plan_path)
    if (model_dir / "config.pbtxt").exists() and not version_dir.exists():
        notes.append(
            f"replaced '{model_dir / 'config.pbtxt'}', which every version of '{name}' shares"
        )
    filename = "model.onnx" if options.backend == "onnxruntime" else "model.plan"
    data_file = _publish(
        model, repo, model_dir, version_dir, filename, config_text, plan_path, name
    )
    return TritonExport(
        model_dir=model_dir,
        config_path=model_dir / "config.pbtxt",
        model_file=version_dir / filename,
        data_file=data_file,
        config_text=config_text,
        max_batch_size=max_batch,
        preferred_batch=preferred,
        notes=notes,
    )


def _check_name(name: str) -> None:
    if not _NAME.match(name) or name in (".", ".."):
        raise GraphoptError(
            f"'{name}' cannot be a Triton model name here: it must be one folder name of "
            "letters, digits, '_', '-' and '.', not starting with '.' or '-'.",
            hint="Choose e.g. --name digits_cnn.",
        )


def _check_plan(options: TritonOptions, plan: str | os.PathLike[str] | None) -> Path | None:
    if options.backend == "onnxruntime":
        if plan is not None:
            raise GraphoptError(
                "--plan is for the tensorrt backend; the onnxruntime backend serves the ONNX "
                "model itself.",
                hint="Add --backend tensorrt, or drop --plan.",
            )
        return None
    if plan is None:
        raise GraphoptError(
            "The tensorrt backend serves a TensorRT plan, and none was given.",
            hint="Build one with `graphopt build MODEL -o model.plan` on the serving GPU, then "
            "pass --plan model.plan.",
        )
    path = Path(plan)
    if not path.is_file():
        raise GraphoptError(f"TensorRT plan '{path}' does not exist or is not a file.")
    if path.stat().st_size == 0:
        raise GraphoptError(f"TensorRT plan '{path}' is empty.")
    return path


def _batching(
    options: TritonOptions, batched_model: bool
) -> tuple[int, tuple[int, ...], list[str]]:
    notes: list[str] = []
    preferred = tuple(sorted(set(options.preferred_batch)))
    if options.max_batch_size is None:
        max_batch = max([DEFAULT_MAX_BATCH, *preferred]) if batched_model else 0
    else:
        max_batch = options.max_batch_size
    if max_batch > 0 and not batched_model:
        raise GraphoptError(
            f"--max-batch-size {max_batch} needs a batch dimension, but not every input and "
            "output of the model has a dynamic first dimension.",
            hint="Use --max-batch-size 0 (Triton then sends whole tensors), or export the "
            "model with a dynamic batch axis.",
        )
    if preferred and max_batch == 0:
        raise GraphoptError(
            "Preferred batch sizes need dynamic batching, which needs max_batch_size > 0.",
            hint="Drop --preferred-batch, or give the model a dynamic batch axis.",
        )
    too_big = [b for b in preferred if b > max_batch]
    if too_big:
        raise GraphoptError(
            f"Preferred batch size(s) {too_big} exceed max_batch_size {max_batch}.",
            hint="Raise --max-batch-size or lower --preferred-batch.",
        )
    if not batched_model:
        notes.append("the model has no dynamic batch dimension: max_batch_size 0, no batching")
    return max_batch, preferred, notes


def _check_target(model: Model, version_dir: Path, force: bool, plan: Path | None) -> None:
    if version_dir.exists() or version_dir.is_symlink():
        if not force:
            raise GraphoptError(
                f"'{version_dir}' already exists, and graphopt does not replace a model "
                "version unless told to.",
                hint="Add --force to replace it, or write another --version.",
            )
        if not version_dir.is_dir() or version_dir.is_symlink():
            raise GraphoptError(f"'{version_dir}' is in the way and is not a plain folder.")
    inside = Path(os.path.realpath(version_dir))
    sources = _source_files(model)
    if plan is not None:
        sources.add(Path(os.path.realpath(plan)))
    for source in sources:
        if source == inside or inside in source.parents:
            raise GraphoptError(
                f"The input '{source}' lives in '{version_dir}', which the export would "
                "replace; graphopt never modifies its input.",
                hint="Export into another repository or --version.",
            )


def _publish(
    model: Model,
    repo: Path,
    model_dir: Path,
    version_dir: Path,
    filename: str,
    config_text: str,
    plan: Path | None,
    name: str,
) -> Path | None:
    """Stage the entry in a hidden folder of `repo`, then rename it into place."""
    try:
        repo.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=repo))
    except OSError as exc:
        raise ModelSaveError(f"Cannot create the model repository '{repo}' ({exc}).") from None
    try:
        staged_version = staging / "version"
        staged_version.mkdir()
        data_file: Path | None = None
        if plan is not None:
            shutil.copyfile(plan, staged_version / filename)
        else:
            saved = save_model(
                model, staged_version / filename, external_data=_has_external(model) or None
            )
            data_file = saved.data_path
        (staging / "config.pbtxt").write_text(config_text, encoding="utf-8")
        created_dir = not model_dir.exists()
        model_dir.mkdir(exist_ok=True)
        backup_version = staging / "previous-version"
        backup_config = staging / "previous-config.pbtxt"
        config_path = model_dir / "config.pbtxt"
        moved_version = moved_config = placed = False
        try:
            if version_dir.exists():
                os.replace(version_dir, backup_version)
                moved_version = True
            if config_path.exists():
                os.replace(config_path, backup_config)
                moved_config = True
            os.replace(staged_version, version_dir)
            placed = True
            os.replace(staging / "config.pbtxt", config_path)
        except OSError:
            # Put back what was there, so a failure leaves the repository as it found it.
            if placed:
                shutil.rmtree(version_dir, ignore_errors=True)
            if moved_version:
                os.replace(backup_version, version_dir)
            if moved_config:
                os.replace(backup_config, config_path)
            if created_dir:
                shutil.rmtree(model_dir, ignore_errors=True)
            raise
    except OSError as exc:
        raise ModelSaveError(f"Could not write the Triton entry '{model_dir}' ({exc}).") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return version_dir / data_file.name if data_file is not None else None


def _source_files(model: Model) -> set[Path]:
    """The files the model was read from: its .onnx and every external data file."""
    files = {Path(os.path.realpath(model.path))} if model.path is not None else set()
    for graph in model.ir.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                files.add(Path(os.path.realpath(value.const_value.path)))
    return files


def _has_external(model: Model) -> bool:
    return any(
        isinstance(value.const_value, ir.ExternalTensor)
        for graph in model.ir.graphs()
        for value in graph.initializers.values()
    )

"""The teacher's side of distillation: its logits, one row per training sample.

The teacher may live in any framework. The user either exports its logits (`.npy` for one
output, `.npz` keyed by output name, rows aligned with the data's order) or gives a teacher
ONNX model, whose logits graphopt computes once (`export_logits`, also the
`graphopt export-logits` command) into a memory-mapped file in the run's scratch folder.

*Logits* here are what a softmax reads: when a model output is produced by Softmax or
LogSoftmax, the logits are that node's input (`logits_view`), on both the student's and the
teacher's side, so a model that ends in a softmax (PP-OCR's recognizer) is distilled on its
scores, not on saturated probabilities. A user file that holds probabilities instead (every
row non-negative and summing to 1) is recognised and turned into logits with log(p), which
gives the same softmax at every temperature.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphopt.console import track
from graphopt.data import Dataset
from graphopt.data.checks import names as quoted_names
from graphopt.errors import DataError
from graphopt.model import Model, load_model
from graphopt.runtime import Device, create_session

_SOFTMAX_OPS = ("Softmax", "LogSoftmax")
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_PROBABILITY_TOLERANCE = 1e-3
#: Probabilities below this become log(_TINY) logits (about -69), not -inf.
_TINY = 1e-30


@dataclass(frozen=True)
class TeacherSpec:
    """Where the teacher's logits come from: a file of logits, or a teacher model.

    With neither, a pipeline distils from the model as it was before its first pass.
    """

    logits: Path | None = None
    model: Path | Model | None = None
    is_original: bool = False  # the model is the pipeline's input, before its first pass

    def describe(self) -> str:
        if self.logits is not None:
            return f"logits file {self.logits.name}"
        if self.is_original:
            return "the original model"
        if isinstance(self.model, Path):
            return f"teacher model {self.model.name}"
        return "a teacher model"


@dataclass(frozen=True)
class LogitsView:
    """The tensor that carries an output's logits, and its class axis (None: not a softmax)."""

    output: str
    tensor: str
    axis: int | None

    @property
    def is_softmax(self) -> bool:
        return self.axis is not None


def logits_view(model: Model, output: str) -> LogitsView:
    """The logits behind `output`: a Softmax/LogSoftmax's input, or the output itself."""
    graph = model.graph
    value = next((v for v in graph.outputs if v.name == output), None)
    if value is None:
        raise DataError(
            f"The model has no output '{output}'.",
            hint=f"Its outputs are {quoted_names([v.name for v in graph.outputs])}.",
        )
    node = _through_qdq(value.producer())
    flattened = _flattened_softmax(node, value)
    if flattened is not None:
        return LogitsView(output=output, tensor=flattened[0], axis=flattened[1])
    if node is not None and node.op_type in _SOFTMAX_OPS and node.domain in ("", "ai.onnx"):
        source = node.inputs[0]
        if source is not None and source.name:
            attr = node.attributes.get("axis")
            shape = source.shape if source.shape is not None else value.shape
            rank = len(shape) if shape is not None else None
            axis = int(attr.as_int()) if attr is not None else -1
            if rank is not None and axis < 0:
                axis += rank
            return LogitsView(output=output, tensor=source.name, axis=axis)
    return LogitsView(output=output, tensor=output, axis=None)


def _flattened_softmax(node: ir.Node | None, output: ir.Value) -> tuple[str, int] | None:
    """(logits, class axis) of Reshape(Softmax(Flatten(x, axis=r-1))): the form a softmax
    over the last axis takes after an opset-12 model is converted to opset 13 (older
    Softmax flattened from its axis). A flatten of several axes is not one class axis."""
    if node is None or node.op_type != "Reshape" or output.shape is None:
        return None
    inner = node.inputs[0].producer() if node.inputs[0] is not None else None
    inner = _through_qdq(inner)
    if inner is None or inner.op_type not in _SOFTMAX_OPS:
        return None
    axis_attr = inner.attributes.get("axis")
    if axis_attr is not None and int(axis_attr.as_int()) not in (-1, 1):
        return None
    flatten = inner.inputs[0].producer() if inner.inputs[0] is not None else None
    if flatten is None or flatten.op_type != "Flatten" or flatten.inputs[0] is None:
        return None
    rank = len(output.shape)
    attr = flatten.attributes.get("axis")
    axis = int(attr.as_int()) if attr is not None else 1
    axis = axis + rank if axis < 0 else axis
    source = flatten.inputs[0]
    if axis != rank - 1 or not source.name:
        return None
    return source.name, rank - 1


def _through_qdq(node: ir.Node | None) -> ir.Node | None:
    """The op behind a chain of QuantizeLinear/DequantizeLinear (a quantized model may
    quantize its softmax's output)."""
    while node is not None and node.op_type in _QDQ_OPS and node.domain in ("", "ai.onnx"):
        source = node.inputs[0]
        node = source.producer() if source is not None else None
    return node


class TeacherLogits:
    """The teacher's logits for every sample of the training data, by student output name.

    Arrays are memory-mapped where the file format allows (.npy), so only the rows of a
    batch are read at a time.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], source: str) -> None:
        self.arrays = dict(arrays)
        self.source = source
        self.probabilities: dict[str, bool] = {}

    def __len__(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    def rows(self, output: str, indices: np.ndarray, *, as_logits: bool) -> np.ndarray:
        """The rows `indices` of `output`, as float32; probabilities become log(p) when
        `as_logits`."""
        order = np.argsort(indices)
        picked = np.asarray(self.arrays[output][indices[order]], dtype=np.float32)
        rows = np.empty_like(picked)
        rows[order] = picked
        if as_logits and self.probabilities.get(output):
            rows = np.log(np.maximum(rows, _TINY))
        return rows


def open_logits(path: Path, outputs: Sequence[str]) -> TeacherLogits:
    """Read a logits file: `.npy` for one output, `.npz` with one array per output name.

    Raises:
        DataError: the file is missing, unreadable, holds pickled objects, is not numeric,
            or does not name the outputs.
    """
    where = f"teacher logits '{path}'"
    if not path.is_file():
        raise DataError(f"The {where} do not exist.")
    suffix = path.suffix.lower()
    magic = {".npy": b"\x93NUMPY", ".npz": b"PK"}.get(suffix)
    if magic is not None:
        with open(path, "rb") as handle:
            if handle.read(len(magic)) != magic:
                raise DataError(
                    f"The {where} cannot be read: the file is not in numpy's {suffix} format."
                )
    try:
        if suffix == ".npy":
            if len(outputs) != 1:
                raise DataError(
                    f"The {where} hold one array, but {len(outputs)} outputs are distilled "
                    f"({quoted_names(list(outputs))}).",
                    hint="Give an .npz keyed by output name, or distil one output (outputs=...).",
                )
            arrays = {outputs[0]: np.load(path, mmap_mode="r", allow_pickle=False)}
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.keys())
                missing = [o for o in outputs if o not in keys]
                if missing and len(keys) == 1 and len(outputs) == 1:
                    missing = []
                    arrays = {outputs[0]: archive[keys[0]]}
                else:
                    arrays = {o: archive[o] for o in outputs if o in keys}
            if missing:
                raise DataError(
                    f"The {where} have no array for output(s) {quoted_names(missing)} "
                    f"(they hold {quoted_names(keys)}).",
                    hint="Key the .npz by the student's output names.",
                )
        else:
            raise DataError(
                f"The {where} must be an .npy or .npz file.",
                hint="Write them with numpy.save / numpy.savez, or `graphopt export-logits`.",
            )
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "python objects" in str(exc).lower():
            raise DataError(
                f"The {where} hold pickled Python objects, which graphopt does not load.",
                hint="Save plain numeric arrays.",
            ) from None
        raise DataError(f"The {where} cannot be read: {exc}.") from None
    except OSError as exc:
        raise DataError(f"The {where} cannot be read: {exc}.") from None
    for name, array in arrays.items():
        if array.dtype.kind != "f" or array.ndim < 1:
            raise DataError(
                f"The {where} for output '{name}' are {array.dtype} of shape "
                f"{list(array.shape)}; they must be a float array with one row per sample."
            )
    counts = {int(a.shape[0]) for a in arrays.values()}
    if len(counts) > 1:
        raise DataError(f"The arrays in the {where} have different sample counts ({counts}).")
    return TeacherLogits(arrays, path.name)


def check_against(
    teacher: TeacherLogits,
    samples: int,
    student_shapes: Mapping[str, tuple[int, ...]],
    views: Mapping[str, LogitsView],
) -> None:
    """Check the logits fit the data and the student, and find out which rows are
    probabilities rather than logits.

    Args:
        samples: the number of training samples.
        student_shapes: the student's logits shape per output on one sample (no batch axis).
        views: the logits view per output.

    Raises:
        DataError: a count or shape mismatch.
    """
    if len(teacher) != samples:
        raise DataError(
            f"The teacher's logits ({teacher.source}) have {len(teacher)} rows, but the "
            f"training data has {samples} samples; row i must be the teacher's output for "
            "sample i.",
            hint="Export the logits from the same data, in the same order "
            "(graphopt export-logits TEACHER --data D -o logits.npy).",
        )
    for output, shape in student_shapes.items():
        array = teacher.arrays[output]
        got = tuple(int(d) for d in array.shape[1:])
        if got != tuple(shape):
            raise DataError(
                f"The teacher's logits for output '{output}' have per-sample shape {list(got)}, "
                f"but the student's {'logits' if views[output].is_softmax else 'output'} "
                f"there has shape {list(shape)}.",
                hint="Distil a student whose output matches the teacher's, or choose the "
                "outputs to match with outputs=....",
            )
        axis = views[output].axis
        if axis is not None:
            head = np.asarray(array[: min(len(array), 64)], dtype=np.float64)
            sums = head.sum(axis=axis)
            teacher.probabilities[output] = bool(
                head.min() >= 0 and np.allclose(sums, 1.0, atol=_PROBABILITY_TOLERANCE)
            )


def export_logits(
    model: Model | Path,
    dataset: Dataset,
    destination: Path,
    *,
    outputs: Sequence[str] | None = None,
    batch_size: int = 32,
    device: Device = "auto",
    threads: int | None = None,
    workdir: Path | None = None,
) -> Path:
    """Run `model` over `dataset` and write its logits, one row per sample, to `destination`.

    One output is written as `.npy`, several as `.npz` keyed by output name (the suffix of
    `destination` must say which). The file appears only when complete.

    Args:
        model: the teacher (a Model or an .onnx path).
        outputs: the outputs to export (default: the model's first output).

    Returns:
        The path written.

    Raises:
        DataError: the outputs are unknown, vary in shape between batches, or the suffix does
            not fit the number of outputs.
    """
    teacher = load_model(model) if isinstance(model, Path) else model
    names = list(outputs) if outputs else [teacher.graph.outputs[0].name]
    views = [logits_view(teacher, name) for name in names]
    suffix = destination.suffix.lower()
    if suffix not in (".npy", ".npz") or (suffix == ".npy" and len(names) > 1):
        raise DataError(
            f"Cannot write logits of {len(names)} output(s) to '{destination}'.",
            hint="Use an .npy file for one output, an .npz file for several.",
        )
    session = create_session(
        teacher,
        device=device,
        threads=threads,
        extra_outputs=[v.tensor for v in views],
        workdir=workdir,
        only_extra=True,
    )
    total = len(dataset)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".logits-", dir=destination.parent) as scratch:
        columns: dict[str, np.ndarray] = {}
        row = 0
        batches = dataset.batches(batch_size)
        description = "teacher logits"
        for batch in track(batches, total=dataset.num_batches(batch_size), description=description):
            values = session.run(batch.feeds, [v.tensor for v in views])
            for view in views:
                value = np.asarray(values[view.tensor], dtype=np.float32)
                column = columns.get(view.output)
                if column is None:
                    column = np.lib.format.open_memmap(
                        os.path.join(scratch, f"{len(columns)}.npy"),
                        mode="w+",
                        dtype=np.float32,
                        shape=(total, *value.shape[1:]),
                    )
                    columns[view.output] = column
                if value.shape[1:] != column.shape[1:]:
                    raise DataError(
                        f"The teacher's output '{view.output}' changes shape between batches "
                        f"({list(column.shape[1:])} then {list(value.shape[1:])}); logits "
                        "must have one shape per sample.",
                        hint="Pad the data to one shape (e.g. a fixed width).",
                    )
                column[row : row + value.shape[0]] = value
            row += batch.size
        for column in columns.values():
            column.flush()
        partial = destination.with_name(destination.name + ".part")
        try:
            if suffix == ".npy":
                os.replace(os.path.join(scratch, "0.npy"), partial)
            else:
                with open(partial, "wb") as handle:
                    np.savez(handle, **columns)
            del columns
            os.replace(partial, destination)
        finally:
            partial.unlink(missing_ok=True)
    return destination

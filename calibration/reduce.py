"""Min and max of each tensor, reduced inside the graph.

`resolve_targets` finds the requested tensors in the model and checks they can be
calibrated (float, in the main graph). `reduce_ranges` runs a copy of the model with a
ReduceMin and a ReduceMax per tensor (keepdims=0; over every axis but the channel axis when
per channel) as extra outputs, so only those few numbers leave ONNX Runtime per batch, and
memory does not depend on the number of samples. For minmax a ReduceSum per tensor gives
away inf and NaN values (ONNX Runtime's ReduceMin/ReduceMax skip a NaN unless it comes
first); for the histogram pass, which finds them itself, a Size per tensor tells instead
how many elements one sample of it holds (run on one sample, to size its batches).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphopt import runtime
from graphopt.calibration.ranges import CalibrationError
from graphopt.data import Dataset
from graphopt.model import Model

FLOAT_TYPES = {
    ir.DataType.FLOAT: np.dtype(np.float32),
    ir.DataType.DOUBLE: np.dtype(np.float64),
    ir.DataType.FLOAT16: np.dtype(np.float16),
    ir.DataType.BFLOAT16: np.dtype(np.float32),  # captured as float32 for numpy
}
AXES_INPUT_OPSET = 18  # ReduceMin/ReduceMax take `axes` as an input from opset 18 on
DEFAULT_OPSET = 13


@dataclass(frozen=True)
class Target:
    """A tensor to calibrate: its dtype (None: unknown before ONNX Runtime runs it, then
    checked on the first batch), its rank when known, its channel axis if any."""

    name: str
    dtype: ir.DataType | None
    rank: int | None
    axis: int | None

    @property
    def itemsize(self) -> int:
        """Bytes per element as captured (4 when the type is unknown)."""
        return 4 if self.dtype is None else FLOAT_TYPES[self.dtype].itemsize


@dataclass
class Extremes:
    """What the reductions found for one tensor."""

    low: np.ndarray  # float64, () or (C,)
    high: np.ndarray
    per_sample: int  # the most elements one sample held (0 when not measured)
    samples: int
    finite_sums: bool = True  # every batch's sum was finite (no inf, no NaN)

    def finite(self) -> bool:
        return bool(
            self.finite_sums and np.isfinite(self.low).all() and np.isfinite(self.high).all()
        )

    def empty(self) -> bool:
        return bool((self.low > self.high).any())


# ---------------------------------------------------------------------------- targets


def resolve_targets(
    model: Model, names: Sequence[str], per_channel: Mapping[str, int]
) -> list[Target]:
    """The requested tensors, checked: they exist in the main graph and hold floats.

    Types (and, for per-channel tensors, ranks) missing from the model are inferred with
    ONNX shape inference on a copy. A type even that cannot tell (the output of a custom
    operator, say) is left to ONNX Runtime: the reductions check it on the first batch.

    Raises:
        CalibrationError: an unknown or non-float tensor, or a bad axis.
    """
    values = _main_values(model.graph)
    unknown = [n for n in names if n not in values]
    if unknown:
        inner = _subgraph_names(model.graph) & set(unknown)
        hint = "Name node outputs, graph inputs or initializers of the main graph."
        if inner:
            hint = (
                f"{_quoted(sorted(inner))} live(s) inside an If/Loop/Scan body, which "
                "calibration does not reach; " + hint[0].lower() + hint[1:]
            )
        raise CalibrationError(
            f"The model has no tensor(s) {_quoted(unknown)} to calibrate.",
            hint=hint,
            tensors=tuple(unknown),
        )
    needs_inference = [
        n
        for n in names
        if values[n].dtype is None or (n in per_channel and values[n].shape is None)
    ]
    if needs_inference:
        values = _inferred_values(model, names)
    targets: list[Target] = []
    wrong: list[tuple[str, str]] = []
    for name in names:
        value = values[name]
        dtype = value.dtype
        if dtype is not None and dtype not in FLOAT_TYPES:
            wrong.append((name, dtype.name.lower()))
            continue
        rank = None if value.shape is None else len(value.shape)
        targets.append(Target(name, dtype, rank, _axis(name, per_channel.get(name), rank)))
    if wrong:
        raise not_float(wrong)
    return targets


def not_float(wrong: Sequence[tuple[str, str]]) -> CalibrationError:
    """The error for (name, dtype) pairs of tensors that do not hold floats."""
    listing = ", ".join(f"'{name}' ({dtype})" for name, dtype in wrong)
    return CalibrationError(
        f"Only float tensors can be calibrated, and {listing} "
        f"{'is' if len(wrong) == 1 else 'are'} not.",
        hint="Leave integer and boolean tensors out (they stay unquantized).",
        tensors=tuple(name for name, _ in wrong),
    )


def _axis(name: str, axis: int | None, rank: int | None) -> int | None:
    if axis is None:
        return None
    if rank is None:
        raise CalibrationError(
            f"Per-channel calibration of '{name}' needs its rank, which the model does not "
            "give, even after shape inference.",
            hint="Export the model with shapes, or calibrate this tensor per tensor.",
            tensors=(name,),
        )
    if not -rank <= axis < rank:
        raise CalibrationError(
            f"Channel axis {axis} of '{name}' is out of range for a tensor of rank {rank}.",
            hint=f"Give an axis in {-rank}..{rank - 1}.",
            tensors=(name,),
        )
    return axis % rank


def _main_values(graph: ir.Graph) -> dict[str, ir.Value]:
    values: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    values.update({k: v for k, v in graph.initializers.items() if k})
    for node in graph:
        for output in node.outputs:
            if output.name:
                values[output.name] = output
    return values


def _subgraph_names(graph: ir.Graph) -> set[str]:
    names: set[str] = set()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.graph is not graph:
            names.update(o.name for o in node.outputs if o.name)
    return names


def _inferred_values(model: Model, names: Sequence[str]) -> dict[str, ir.Value]:
    from onnx_ir.passes.common import ShapeInferencePass

    copy = model.copy()
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(copy.ir)
    return _main_values(copy.graph)


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


# ---------------------------------------------------------------------------- reductions


@dataclass(frozen=True)
class _Outputs:
    low: str
    high: str
    total: str | None  # the sum: inf or NaN when any value is
    size: str | None  # the element count


def reduce_ranges(
    model: Model,
    dataset: Dataset,
    targets: Sequence[Target],
    *,
    histograms: bool,
    batch_size: int,
    device: runtime.Device,
    threads: int | None,
    workdir: Path | None,
) -> dict[str, Extremes]:
    """Min and max of every target over the whole dataset, in one streamed pass (with the
    element counts when a histogram pass follows, else with checks for inf and NaN)."""
    stats_model, outputs = build_stats_model(model, targets, histograms=histograms)
    session = runtime.create_session(stats_model, device=device, threads=threads, workdir=workdir)
    fetch = [n for o in outputs.values() for n in (o.low, o.high, o.total, o.size) if n is not None]
    found = {
        t.name: Extremes(
            low=np.full((), np.inf), high=np.full((), -np.inf), per_sample=0, samples=0
        )
        for t in targets
    }
    for batch, values in runtime.run_dataset(
        session, dataset, batch_size=batch_size, outputs=fetch, description="calibration: min/max"
    ):
        for target in targets:
            names, seen = outputs[target.name], found[target.name]
            if seen.samples == 0 and target.dtype is None:
                _check_float(targets, outputs, values)
            low = np.asarray(values[names.low], dtype=np.float64)
            high = np.asarray(values[names.high], dtype=np.float64)
            if seen.samples == 0:
                seen.low, seen.high = low.copy(), high.copy()
            else:
                _check_channels(target, seen.low, low)
                np.minimum(seen.low, low, out=seen.low)
                np.maximum(seen.high, high, out=seen.high)
            seen.samples += batch.size
            if names.total is not None:
                seen.finite_sums &= bool(np.isfinite(values[names.total]))
            if names.size is not None and batch.size:
                elements = int(np.asarray(values[names.size]))
                seen.per_sample = max(seen.per_sample, math.ceil(elements / batch.size))
    return found


def _check_float(
    targets: Sequence[Target], outputs: Mapping[str, _Outputs], values: Mapping[str, np.ndarray]
) -> None:
    """Tensors of unknown type: their minima (reduced in their own type) must be floats."""
    wrong = []
    for target in targets:
        if target.dtype is None:
            kind = np.asarray(values[outputs[target.name].low]).dtype
            if kind.kind != "f":
                wrong.append((target.name, kind.name))
    if wrong:
        raise not_float(wrong)


def _check_channels(target: Target, seen: np.ndarray, new: np.ndarray) -> None:
    if seen.shape != new.shape:
        raise CalibrationError(
            f"Tensor '{target.name}' has {seen.size} channels on axis {target.axis} in one "
            f"batch and {new.size} in another, so it has no fixed per-channel range.",
            hint="Calibrate it per tensor.",
            tensors=(target.name,),
        )


def build_stats_model(
    model: Model, targets: Sequence[Target], *, histograms: bool
) -> tuple[Model, dict[str, _Outputs]]:
    """A copy of the model that also outputs min, max, and Size (`histograms`) or sum of
    every target.

    Memory: ONNX Runtime orders nodes by a depth-first search from the graph's leaves,
    the last leaf first. Were the statistics leaves, the search from the last one would
    schedule most of the network before the earlier statistics, and every calibrated tensor
    of a batch would stay alive to the end. So every statistic also feeds one Concat (an
    output nobody reads) whose inputs come in graph order: the search then computes each
    tensor's statistics right after the tensor, and its buffer is freed as usual.
    """
    copy = model.copy()
    graph = copy.graph
    opset = copy.ir.opset_imports.get("")
    if opset is None:
        opset = DEFAULT_OPSET
        copy.ir.opset_imports[""] = opset
    builder = _Builder(graph, opset)
    values = _main_values(graph)
    outputs: dict[str, _Outputs] = {}
    for target in targets:
        outputs[target.name] = builder.add(target, values[target.name], histograms=histograms)
    builder.finish()
    return copy, outputs


class _Builder:
    """Adds the statistics nodes of one tensor at a time, with fresh names, then the chain
    of Concats that orders them (see `build_stats_model`)."""

    def __init__(self, graph: ir.Graph, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self.taken = set(_main_values(graph))
        self.counter = itertools.count()
        self.gathered: list[ir.Node] = []  # per tensor: the Concat of its statistics
        self.flat_shape: ir.Value | None = None

    def fresh(self, base: str) -> str:
        name = base
        while name in self.taken:
            name = f"{base}_{next(self.counter)}"
        self.taken.add(name)
        return name

    def add(self, target: Target, source: ir.Value, *, histograms: bool) -> _Outputs:
        compute = ir.DataType.DOUBLE if target.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT
        nodes: list[ir.Node] = []

        def node(op: str, inputs: list[ir.Value], attributes: dict[str, object], role: str):
            made = ir.node(op, inputs, attributes, name=self.fresh(f"{target.name}/calib_{role}"))
            made.outputs[0].name = self.fresh(f"{target.name}::calib_{role}")
            nodes.append(made)
            return made.outputs[0]

        data = source
        if target.dtype is not None and target.dtype != compute:
            data = node("Cast", [source], {"to": compute}, "cast")
        axes = None
        if target.axis is not None:
            axes = [a for a in range(target.rank or 0) if a != target.axis]
        reduced: list[ir.Value] = []
        for op, role in (("ReduceMin", "min"), ("ReduceMax", "max")):
            inputs = [data]
            attributes: dict[str, object] = {"keepdims": 0}
            if axes is not None and self.opset >= AXES_INPUT_OPSET:
                array = ir.tensor(np.array(axes, dtype=np.int64))
                inputs.append(node("Constant", [], {"value": array}, f"{role}_axes"))
            elif axes is not None:
                attributes["axes"] = axes
            reduced.append(node(op, inputs, attributes, role))
        total = None if histograms else node("ReduceSum", [data], {"keepdims": 0}, "sum")
        size = node("Size", [data], {}, "size") if histograms else None
        shape = ir.Shape([]) if axes is None else ir.Shape([None])
        pieces = []
        for value, dtype, dims in (
            (reduced[0], compute, shape),
            (reduced[1], compute, shape),
            (total, compute, ir.Shape([])),
            (size, ir.DataType.INT64, ir.Shape([])),
        ):
            if value is not None:
                # An unknown type stays unknown: ONNX Runtime infers it (and we check).
                known = target.dtype is not None or dtype == ir.DataType.INT64
                value.type = ir.TensorType(dtype) if known else None
                value.shape = dims
                self.graph.outputs.append(value)
                flat = node("Reshape", [value, self._flat_shape()], {}, "flat")
                pieces.append(node("Cast", [flat], {"to": ir.DataType.DOUBLE}, "double"))
        node("Concat", pieces, {"axis": 0}, "gather")
        self.gathered.append(nodes[-1])
        self._place(source, nodes)
        return _Outputs(
            reduced[0].name or "", reduced[1].name or "",
            None if total is None else total.name, None if size is None else size.name,
        )  # fmt: skip

    def _flat_shape(self) -> ir.Value:
        if self.flat_shape is None:
            made = ir.node("Constant", [], {"value": ir.tensor(np.array([-1], dtype=np.int64))})
            made.outputs[0].name = self.fresh("calib::flat_shape")
            self._place(None, [made])
            self.flat_shape = made.outputs[0]
        return self.flat_shape

    def finish(self) -> None:
        """Chain the tensors' statistics, in graph order, into one output nobody reads:
        link[0] = stats[0], link[k] = Concat(link[k-1], stats[k]). ONNX Runtime's search
        from that leaf takes the input of higher node index first, so each link[k-1] is
        placed after stats[k]: the search then reaches the statistics first to last, each
        right after the part of the network that makes its tensor."""
        if not self.gathered:
            return
        position = {node: i for i, node in enumerate(self.graph)}
        stats = sorted(self.gathered, key=position.__getitem__)
        link = stats[0].outputs[0]
        for k in range(1, len(stats)):
            concat = ir.node("Concat", [link, stats[k].outputs[0]], {"axis": 0})
            concat.name = self.fresh("calib/order")
            concat.outputs[0].name = self.fresh("calib::order")
            if k + 1 < len(stats):
                self.graph.insert_after(stats[k + 1], concat)
            else:
                self.graph.append(concat)
            link = concat.outputs[0]
        link.type = ir.TensorType(ir.DataType.DOUBLE)
        link.shape = ir.Shape([None])
        self.graph.outputs.append(link)

    def _place(self, source: ir.Value | None, nodes: list[ir.Node]) -> None:
        producer = None if source is None else source.producer()
        if producer is not None and producer.graph is self.graph:
            self.graph.insert_after(producer, nodes)
        elif len(self.graph) > 0:
            self.graph.insert_before(next(iter(self.graph)), nodes)
        else:
            self.graph.extend(nodes)

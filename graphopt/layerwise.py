"""Per-layer comparison: where does a candidate model depart from its reference?

Every float tensor that a node of the reference produces, and that the candidate also
produces under the same name and shape, is exposed as an extra output of both models and
compared batch by batch with the same streaming metrics as the final outputs. Passes keep
tensor names (quantization inserts Q/DQ on a tensor's consumers, not in place of its
producer), so after a pass most intermediate tensors can be matched.

Tensors are compared in groups, each group in its own run over the data, so memory holds one
batch of one group's activations, never all activations of all samples.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_passes
from rich.table import Table

from graphopt.console import track
from graphopt.data import Dataset
from graphopt.model import Model, load_model
from graphopt.validate import FidelityAccumulator, OutputFidelity


@dataclass(frozen=True)
class LayerFidelity:
    """How one intermediate tensor of the candidate compares with the reference's."""

    tensor: str
    node: str
    op_type: str
    fidelity: OutputFidelity

    def to_dict(self) -> dict[str, Any]:
        metrics = self.fidelity.to_dict()
        metrics.pop("name")
        return {"tensor": self.tensor, "node": self.node, "op_type": self.op_type} | metrics


@dataclass
class LayerReport:
    """Per-tensor fidelity in the reference's topological order."""

    layers: list[LayerFidelity]
    unmatched: list[str]
    samples: int
    data: str

    def first_departure(self, min_cosine: float) -> LayerFidelity | None:
        """The first tensor (in graph order) whose cosine falls below `min_cosine`."""
        for layer in self.layers:
            cosine = layer.fidelity.cosine
            if cosine is None or not cosine >= min_cosine:
                return layer
        return None

    def table(self, *, limit: int | None = None) -> Table:
        """The layers in graph order; with `limit`, the `limit` worst by cosine instead."""
        rows = self.layers
        title = f"Per-layer fidelity on {self.data} ({self.samples} samples)"
        if limit is not None and len(rows) > limit:
            rows = sorted(rows, key=_cosine_key)[:limit]
            title += f": the {limit} worst of {len(self.layers)} tensors"
        table = Table(title=title, title_justify="left")
        for column in ("#", "tensor", "op", "cosine", "SQNR dB", "max abs"):
            table.add_column(column, justify="right" if column not in ("tensor", "op") else "left")
        position = {id(layer): i for i, layer in enumerate(self.layers, start=1)}
        for layer in rows:
            f = layer.fidelity
            table.add_row(
                str(position[id(layer)]),
                layer.tensor,
                layer.op_type,
                _fmt(f.cosine, ".6f"),
                _fmt(f.sqnr_db, ".1f"),
                _fmt(f.max_abs, ".3g"),
            )
        if self.unmatched:
            table.caption = (
                f"{len(self.unmatched)} reference tensor(s) have no same-named, same-shaped "
                "tensor in the candidate and are not shown"
            )
        return table

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "data": self.data,
            "layers": [layer.to_dict() for layer in self.layers],
            "unmatched": self.unmatched,
        }


def compare_layers(
    reference: Model | str | os.PathLike[str],
    candidate: Model | str | os.PathLike[str],
    dataset: Dataset,
    *,
    batch_size: int = 32,
    device: str = "auto",
    threads: int | None = None,
    workdir: Path | None = None,
    group_size: int = 64,
    tensors: Sequence[str] | None = None,
) -> LayerReport:
    """Compare every intermediate float tensor the two models share, in graph order.

    Args:
        reference: the model to compare against.
        candidate: the model under test (e.g. after quantization).
        dataset: data both models run on.
        group_size: tensors exposed per run over the data; larger is faster and uses
            more memory (one batch of that many activations).
        tensors: compare only these (those that match); None compares every shared one.
    """
    from graphopt.runtime import create_session

    ref_model = _as_model(reference)
    cand_model = _as_model(candidate)
    matched, unmatched = _shared_tensors(ref_model, cand_model, with_outputs=tensors is not None)
    if tensors is not None:
        wanted = set(tensors)
        matched = [item for item in matched if item[0] in wanted]
        unmatched = [name for name in unmatched if name in wanted]
    layers: list[LayerFidelity] = []
    samples = 0
    groups = list(_groups(matched, group_size))
    for number, group in enumerate(groups, start=1):
        names = [tensor for tensor, _, _ in group]
        ref_session = create_session(
            ref_model,
            device=device,
            threads=threads,
            extra_outputs=names,
            workdir=workdir,
            only_extra=True,
        )
        cand_session = create_session(
            cand_model,
            device=device,
            threads=threads,
            extra_outputs=names,
            workdir=workdir,
            only_extra=True,
        )
        accumulator = FidelityAccumulator(names)
        batches = track(
            dataset.batches(batch_size),
            total=dataset.num_batches(batch_size),
            description=f"per-layer, group {number}/{len(groups)}",
        )
        for batch in batches:
            feeds = {name: batch.feeds[name] for name in ref_session.input_names}
            ref_values = ref_session.run(feeds, names)
            cand_feeds = {name: batch.feeds[name] for name in cand_session.input_names}
            cand_values = cand_session.run(cand_feeds, names)
            accumulator.update(ref_values, cand_values, None, samples=batch.size)
        report = accumulator.report()
        samples = report.samples
        by_name = {out.name: out for out in report.outputs}
        layers.extend(
            LayerFidelity(tensor=tensor, node=node, op_type=op, fidelity=by_name[tensor])
            for tensor, node, op in group
        )
    return LayerReport(
        layers=layers, unmatched=unmatched, samples=samples, data=dataset.description
    )


def _as_model(model: Model | str | os.PathLike[str]) -> Model:
    return model if isinstance(model, Model) else load_model(model)


def _typed_copy(model: Model) -> ir.Model:
    """A copy with inferred types and shapes on intermediate values (the model is untouched)."""
    copy = model.ir.clone()
    try:
        ir_passes.ShapeInferencePass(strict_mode=False)(copy)
    except Exception:  # shape inference is a help here, not a requirement
        pass
    return copy


def _produced(model: ir.Model) -> dict[str, tuple[str, str, ir.Value]]:
    """Tensor name → (producing node's name, op type, value) for the main graph."""
    produced = {}
    for node in model.graph:
        for value in node.outputs:
            if value.name:
                produced[value.name] = (node.name or "", node.op_type, value)
    return produced


def _shared_tensors(
    reference: Model, candidate: Model, *, with_outputs: bool = False
) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Float tensors produced in both models with the same name and compatible shape (graph
    outputs only `with_outputs`: the report of final outputs covers them otherwise)."""
    ref = _produced(_typed_copy(reference))
    cand = _produced(_typed_copy(candidate))
    outputs = set() if with_outputs else {value.name for value in reference.graph.outputs}
    matched, unmatched = [], []
    for name, (node, op, value) in ref.items():
        if name in outputs or not _is_float(value):
            continue
        other = cand.get(name)
        if other is None or not _same_shape(value, other[2]):
            unmatched.append(name)
            continue
        matched.append((name, node, op))
    return matched, unmatched


def _is_float(value: ir.Value) -> bool:
    dtype = value.dtype
    return dtype is not None and dtype.is_floating_point()


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    if a.shape is None or b.shape is None:
        return True  # not known here; a mismatch shows up as a problem in the report
    if len(a.shape) != len(b.shape):
        return False
    return all(
        x == y or not isinstance(x, int) or not isinstance(y, int)
        for x, y in zip(a.shape, b.shape, strict=True)
    )


def _groups(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + size]


def _cosine_key(layer: LayerFidelity) -> float:
    cosine = layer.fidelity.cosine
    return -np.inf if cosine is None or np.isnan(cosine) else cosine


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)

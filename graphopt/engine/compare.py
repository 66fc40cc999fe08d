"""A TensorRT plan against ONNX Runtime: `graphopt validate model.plan --reference model.onnx`.

The plan runs on the GPU (`graphopt.engine.run.PlanRunner`) and the reference ONNX model on
ONNX Runtime, batch by batch over the same data; their outputs (matched by name: TensorRT
keeps the ONNX names) stream into the validation step's `FidelityAccumulator`, so the result
is the same `FidelityReport` (per-output cosine, SQNR, max/mean error, top-1 agreement,
accuracy with labels, gates) that `graphopt validate` prints for two ONNX models. A data batch
smaller than the profile's minimum (or the engine's fixed batch) is padded by repeating its
samples, and the padding rows are dropped from the outputs before comparing.

Per-layer: to find where a Q/DQ model and its engine part, the tensors the reference and the
plan's source ONNX share (`graphopt.layerwise`'s matching) are marked as outputs of a copy of
the source ONNX (`mark_outputs`, a graph edit, before TensorRT parses it); a debug engine is
built from that copy with the plan's own build settings (read from its JSON sidecar), and each
marked tensor is compared with the reference's. Marking outputs stops TensorRT from fusing
across those tensors, so the debug engine is not bit-identical to the plan: the per-layer
numbers locate a divergence; the plan's own fidelity is the output comparison.

What runs without TensorRT (and is tested on CPU): `mark_outputs`, the streaming comparison
loop `compare_runs` (given any two runners, e.g. two ORT sessions), the padding and trimming,
and reading the sidecar. NOTHING HERE THAT CALLS TensorRT HAS RUN YET (see the README).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.console import track
from graphopt.data import Dataset
from graphopt.engine.options import BuildOptions
from graphopt.engine.shapes import parse_shape_specs
from graphopt.errors import GraphoptError
from graphopt.model import Model, load_model
from graphopt.validate import FidelityAccumulator, FidelityReport, Gates, Metric

Runner = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def compare_runs(
    run_reference: Runner,
    run_candidate: Runner,
    output_names: Sequence[str],
    dataset: Dataset,
    *,
    batch_size: int,
    gates: Gates | None = None,
    metric: Metric | None = None,
    description: str = "validating",
) -> FidelityReport:
    """Stream the dataset through two runners and compare their outputs by name.

    Args:
        run_reference: feeds -> the reference's outputs (at least `output_names`).
        run_candidate: feeds -> the candidate's outputs; a missing or misshapen one is a
            failure in the report.
        output_names: the outputs to compare, in report order.
    """
    accumulator = FidelityAccumulator(output_names, metric=metric)
    batches = track(
        dataset.batches(batch_size),
        total=dataset.num_batches(batch_size),
        description=description,
    )
    for batch in batches:
        reference = run_reference(batch.feeds)
        candidate = run_candidate(batch.feeds)
        accumulator.update(reference, candidate, batch.labels, samples=batch.size)
    report = accumulator.report(gates or Gates())
    report.data = dataset.description
    report.random_data = bool(dataset.is_random)
    return report


def compare_plan(
    reference: Model | str | os.PathLike[str],
    plan_path: str | os.PathLike[str],
    dataset: Dataset,
    *,
    gates: Gates | None = None,
    batch_size: int = 32,
    device: str = "auto",
    threads: int | None = None,
    metric: Metric | None = None,
    profile: int = 0,
    workdir: Path | None = None,
) -> FidelityReport:
    """Run the plan (TensorRT) and the reference (ONNX Runtime) on `dataset` and compare.

    The batch size is capped at the profile's largest batch.

    Raises:
        EngineUnavailable: TensorRT or cuda-python is missing (after the plan file is read).
        DataError: the data does not fit the plan's inputs or profile.
        RuntimeFailed: ONNX Runtime refused the reference.
    """
    from graphopt.engine.run import PlanRunner, read_plan_bytes
    from graphopt.runtime import create_session

    read_plan_bytes(plan_path)
    ref_session = create_session(reference, device=device, threads=threads, workdir=workdir)
    with PlanRunner(plan_path, profile=profile) as runner:
        span = runner.signature.batch_range(profile)
        size = min(batch_size, span[2]) if span is not None else batch_size
        names = list(ref_session.output_names)
        return compare_runs(
            lambda feeds: ref_session.run({n: feeds[n] for n in ref_session.input_names}),
            runner.run_batch,
            names,
            dataset,
            batch_size=size,
            gates=gates,
            metric=metric,
            description="validating (TensorRT vs ONNX Runtime)",
        )


# ---------------------------------------------------------------------------- per layer


def mark_outputs(model: Model, names: Sequence[str]) -> Model:
    """A copy of `model` whose graph also outputs the named node outputs, each with its type
    and shape inferred (TensorRT's ONNX parser needs the type of every graph output).

    Raises:
        GraphoptError: a name is not produced by a node of the main graph, or its type cannot
            be inferred.
    """
    from onnx_ir.passes import common as ir_passes

    from graphopt.runtime import _with_outputs

    typed = model.copy()
    try:
        ir_passes.ShapeInferencePass(strict_mode=False)(typed.ir)
    except Exception:  # inference helps; a tensor left untyped is refused below
        pass
    produced = {value.name: value for node in typed.graph for value in node.outputs if value.name}
    missing = [name for name in names if name not in produced]
    if missing:
        raise GraphoptError(
            f"Tensor(s) {', '.join(map(repr, missing))} are not produced by a node of the "
            "model's main graph, so they cannot be marked as engine outputs.",
            hint="Name node outputs (graphopt inspect lists the model's tensors).",
        )
    untyped = [name for name in names if produced[name].dtype is None]
    if untyped:
        raise GraphoptError(
            f"The type of tensor(s) {', '.join(map(repr, untyped))} cannot be inferred, and "
            "TensorRT's ONNX parser needs the type of every output.",
            hint="Run the model through onnx shape inference, or leave these tensors out.",
        )
    return _with_outputs(typed, list(dict.fromkeys(names)), "the model")


def read_sidecar(plan_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON `graphopt build` wrote beside the plan (`<plan>.json`).

    Raises:
        GraphoptError: it is missing or not graphopt's sidecar.
    """
    path = Path(os.fspath(plan_path) + ".json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GraphoptError(
            f"Per-layer comparison of a plan needs its sidecar '{path}' (the source ONNX and "
            "build settings), which does not exist.",
            hint="Build the plan with graphopt build, or give the source with --plan-source "
            "and the same --shapes.",
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GraphoptError(f"Cannot read the plan's sidecar '{path}' ({exc}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("options"), dict):
        raise GraphoptError(f"'{path}' is not a sidecar written by graphopt build.")
    return data


def sidecar_build_request(sidecar: Mapping[str, Any]) -> tuple[BuildOptions, list[str]]:
    """The build options and `--shapes` strings recorded in a sidecar."""
    try:
        options = BuildOptions(**sidecar["options"])
    except TypeError as exc:
        raise GraphoptError(
            f"The sidecar's build options are not ones this graphopt knows ({exc}).",
            hint="Rebuild the plan with this version of graphopt build.",
        ) from None
    specs = []
    for profile in sidecar.get("profiles") or []:
        parts = []
        for name, ranges in profile.items():
            dims = ["x".join(str(d) for d in ranges[key]) for key in ("min", "opt", "max")]
            parts.append(f"{name}:{'/'.join(dims)}")
        specs.append(",".join(parts))
    parse_shape_specs(specs)  # as written by graphopt build; checked again by the build
    return options, specs


def compare_plan_layers(
    reference: Model | str | os.PathLike[str],
    source: Model | str | os.PathLike[str],
    options: BuildOptions,
    shape_specs: Sequence[str],
    dataset: Dataset,
    *,
    workdir: Path,
    batch_size: int = 32,
    device: str = "auto",
    threads: int | None = None,
    tensors: Sequence[str] | None = None,
    profile: int = 0,
) -> Any:
    """Compare every float tensor the reference and the plan's source ONNX share, computed by
    a debug engine built from the source with those tensors marked as outputs.

    Returns:
        A `graphopt.layerwise.LayerReport`.
    """
    from graphopt.engine import build_plan
    from graphopt.engine.run import PlanRunner
    from graphopt.layerwise import LayerFidelity, LayerReport, _shared_tensors
    from graphopt.model import save_model
    from graphopt.runtime import create_session

    ref_model = reference if isinstance(reference, Model) else load_model(reference)
    src_model = source if isinstance(source, Model) else load_model(source)
    matched, unmatched = _shared_tensors(ref_model, src_model, with_outputs=tensors is not None)
    if tensors is not None:
        wanted = set(tensors)
        matched = [item for item in matched if item[0] in wanted]
        unmatched = [name for name in unmatched if name in wanted]
    names = [tensor for tensor, _, _ in matched]
    if not names:
        raise GraphoptError(
            "The reference and the plan's source ONNX share no intermediate float tensor to "
            "compare layer by layer.",
            hint="Compare a Q/DQ model with the model it was made from (tensor names are kept).",
        )
    marked = save_model(mark_outputs(src_model, names), workdir / "marked.onnx")
    debug_plan = workdir / "marked.plan"
    build_plan(marked.path, debug_plan, shape_specs, options)
    ref_session = create_session(
        ref_model,
        device=device,
        threads=threads,
        extra_outputs=names,
        workdir=workdir,
        only_extra=True,
    )
    with PlanRunner(debug_plan, profile=profile) as runner:
        span = runner.signature.batch_range(profile)
        size = min(batch_size, span[2]) if span is not None else batch_size
        report = compare_runs(
            lambda feeds: ref_session.run({n: feeds[n] for n in ref_session.input_names}, names),
            runner.run_batch,
            names,
            dataset,
            batch_size=size,
            description="per-layer (TensorRT debug engine vs ONNX Runtime)",
        )
    by_name = {out.name: out for out in report.outputs}
    layers = [
        LayerFidelity(tensor=tensor, node=node, op_type=op, fidelity=by_name[tensor])
        for tensor, node, op in matched
    ]
    return LayerReport(
        layers=layers, unmatched=unmatched, samples=report.samples, data=dataset.description
    )


__all__ = [
    "compare_plan",
    "compare_plan_layers",
    "compare_runs",
    "mark_outputs",
    "read_sidecar",
    "sidecar_build_request",
]

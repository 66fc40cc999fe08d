"""`graphopt validate`: compare a candidate model with a reference on ONNX Runtime, or a
TensorRT plan (on the GPU) with its reference ONNX (on ONNX Runtime)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from graphopt.cli.options import (
    DataReader,
    data_options,
    gate_option,
    parse_gate_args,
    runtime_options,
)


@click.command()
@click.argument("first_path", metavar="REFERENCE", type=click.Path(path_type=Path))
@click.argument(
    "second_path", metavar="[CANDIDATE]", required=False, type=click.Path(path_type=Path)
)
@click.option(
    "--reference",
    "reference_option",
    type=click.Path(path_type=Path),
    default=None,
    help="The reference ONNX model, when the only argument is the candidate (e.g. "
    "graphopt validate model.plan --reference model.onnx).",
)
@click.option(
    "--profile",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="TensorRT plans: the optimization profile to run.",
)
@click.option(
    "--plan-source",
    type=click.Path(path_type=Path),
    default=None,
    help="TensorRT plans with --per-layer: the ONNX the plan was built from [default: the "
    "one its sidecar names].",
)
@click.option("--data", "data_source", required=True, help="Data: .npz, folder, or 'random'.")
@data_options
@runtime_options
@gate_option
@click.option("--metric", default=None, metavar="MODULE:FUNCTION", help="Your accuracy metric.")
@click.option(
    "--per-layer",
    is_flag=True,
    help="Also compare every intermediate tensor the two models share, to find where the "
    "candidate departs.",
)
@click.option(
    "--per-layer-limit",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="With --per-layer, show only this many worst tensors when there are more.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random data.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def validate(
    first_path: Path,
    second_path: Path | None,
    reference_option: Path | None,
    profile: int,
    plan_source: Path | None,
    data_source: str,
    data_reader: DataReader,
    device: str,
    threads: int | None,
    batch_size: int,
    gates: tuple[str, ...],
    metric: str | None,
    per_layer: bool,
    per_layer_limit: int,
    seed: int,
    as_json: bool,
) -> None:
    """Compare CANDIDATE with REFERENCE output by output (and accuracy, with labels).

    CANDIDATE may be a TensorRT plan (.plan, .engine, .trt): it then runs on the GPU and the
    reference ONNX on ONNX Runtime; --per-layer builds a debug engine with the shared tensors
    marked as outputs. Exits 1 when a --gate does not hold.
    """
    import tempfile

    from graphopt.engine.run import is_plan_path
    from graphopt.errors import GraphoptError
    from graphopt.model import load_model
    from graphopt.usercode import load_callable
    from graphopt.validate import Gates, compare

    reference_path, candidate_path = _paths(first_path, second_path, reference_option)
    if is_plan_path(reference_path):
        raise GraphoptError(
            f"The reference '{reference_path}' is a TensorRT plan; the reference must be an "
            "ONNX model (it runs on ONNX Runtime).",
            hint="Write graphopt validate model.plan --reference model.onnx --data D.",
        )
    gate_values = Gates.from_mapping(parse_gate_args(gates), where="--gate")
    if is_plan_path(candidate_path):
        _validate_plan(
            reference_path, candidate_path, data_source, data_reader, device, threads,
            batch_size, gate_values, metric, per_layer, per_layer_limit, profile, plan_source,
            seed, as_json,
        )  # fmt: skip
        return
    if plan_source is not None or profile:
        from graphopt import console

        console.warn("--profile and --plan-source apply to TensorRT plans only; ignored.")
    reference = load_model(reference_path)
    candidate = load_model(candidate_path)
    dataset = data_reader.open(data_source, reference.input_specs(), seed=seed)
    assert dataset is not None  # --data is required
    metric_fn = load_callable(metric, what="metric") if metric else None
    with tempfile.TemporaryDirectory(prefix="graphopt-") as workdir:
        report = compare(
            reference,
            candidate,
            dataset,
            gates=gate_values,
            batch_size=batch_size,
            device=device,
            threads=threads,
            metric=metric_fn,
            workdir=Path(workdir),
        )
        layers = None
        if per_layer:
            from graphopt.layerwise import compare_layers

            layers = compare_layers(
                reference,
                candidate,
                dataset,
                batch_size=batch_size,
                device=device,
                threads=threads,
                workdir=Path(workdir),
            )
    _show(report, layers, per_layer_limit, as_json)


def _paths(first: Path, second: Path | None, reference: Path | None) -> tuple[Path, Path]:
    """(reference, candidate) from `REFERENCE CANDIDATE` or `CANDIDATE --reference R`."""
    if reference is not None:
        if second is not None:
            raise click.UsageError(
                "Give either REFERENCE CANDIDATE or CANDIDATE --reference REFERENCE, not both."
            )
        return reference, first
    if second is None:
        raise click.UsageError(
            "Missing the candidate: give REFERENCE CANDIDATE, or CANDIDATE --reference REFERENCE."
        )
    return first, second


def _show(report, layers, per_layer_limit: int, as_json: bool) -> None:
    from graphopt import console
    from graphopt.errors import GateFailed

    if as_json:
        data = report.to_dict()
        if layers is not None:
            data["per_layer"] = layers.to_dict()
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        console.out.print(report.table())
        if layers is not None:
            console.out.print(layers.table(limit=per_layer_limit))
            first = layers.first_departure(0.999)
            if first is not None:
                console.out.print(
                    f"first tensor below cosine 0.999 (in graph order): '{first.tensor}' "
                    f"({first.op_type} node '{first.node}')"
                )
    if not report:
        raise GateFailed("Validation failed: " + "; ".join(report.failures) + ".")


def _validate_plan(
    reference_path: Path,
    plan_path: Path,
    data_source: str,
    data_reader: DataReader,
    device: str,
    threads: int | None,
    batch_size: int,
    gates,
    metric: str | None,
    per_layer: bool,
    per_layer_limit: int,
    profile: int,
    plan_source: Path | None,
    seed: int,
    as_json: bool,
) -> None:
    """A TensorRT plan against its reference ONNX (see graphopt.engine.compare). Everything
    that needs no TensorRT is checked first: the plan file, the reference, the data, the
    sidecar and source model for --per-layer."""
    import tempfile

    from graphopt import console
    from graphopt.engine.compare import (
        compare_plan,
        compare_plan_layers,
        read_sidecar,
        sidecar_build_request,
    )
    from graphopt.engine.run import read_plan_bytes
    from graphopt.errors import GraphoptError
    from graphopt.model import load_model
    from graphopt.usercode import load_callable

    read_plan_bytes(plan_path)
    reference = load_model(reference_path)
    dataset = data_reader.open(data_source, reference.input_specs(), seed=seed)
    assert dataset is not None  # --data is required
    metric_fn = load_callable(metric, what="metric") if metric else None
    source = options = specs = None
    if per_layer:
        sidecar = read_sidecar(plan_path)
        options, specs = sidecar_build_request(sidecar)
        source_path = plan_source or Path(str(sidecar.get("source_model") or ""))
        if not source_path.is_file():
            raise GraphoptError(
                f"--per-layer needs the ONNX the plan was built from; its sidecar names "
                f"'{source_path}', which is not a file here.",
                hint="Give it with --plan-source model.onnx.",
            )
        source = load_model(source_path)
        console.warn(
            "--per-layer builds a debug engine with the compared tensors marked as outputs; "
            "TensorRT cannot fuse across them, so its numbers locate a divergence but are not "
            "the plan's own."
        )
    with tempfile.TemporaryDirectory(prefix="graphopt-") as workdir:
        report = compare_plan(
            reference,
            plan_path,
            dataset,
            gates=gates,
            batch_size=batch_size,
            device=device,
            threads=threads,
            metric=metric_fn,
            profile=profile,
            workdir=Path(workdir),
        )
        layers = None
        if per_layer:
            assert source is not None and options is not None and specs is not None
            layers = compare_plan_layers(
                reference,
                source,
                options,
                specs,
                dataset,
                workdir=Path(workdir),
                batch_size=batch_size,
                device=device,
                threads=threads,
                profile=profile,
            )
    _show(report, layers, per_layer_limit, as_json)

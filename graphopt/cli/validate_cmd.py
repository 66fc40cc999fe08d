"""`graphopt validate`: compare a candidate model with a reference on ONNX Runtime."""

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
@click.argument("reference_path", metavar="REFERENCE", type=click.Path(path_type=Path))
@click.argument("candidate_path", metavar="CANDIDATE", type=click.Path(path_type=Path))
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
    reference_path: Path,
    candidate_path: Path,
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

    Exits 1 when a --gate does not hold.
    """
    import tempfile

    from graphopt import console
    from graphopt.errors import GateFailed
    from graphopt.model import load_model
    from graphopt.usercode import load_callable
    from graphopt.validate import Gates, compare

    gate_values = Gates.from_mapping(parse_gate_args(gates), where="--gate")
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

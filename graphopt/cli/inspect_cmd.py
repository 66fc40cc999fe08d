"""`graphopt inspect`: inputs/outputs, op histogram, params, FLOPs, bytes, sparsity."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def inspect(model_path: Path, as_json: bool) -> None:
    """Show what MODEL is made of."""
    from graphopt import console
    from graphopt.analysis import analyze
    from graphopt.model import load_model, model_file_bytes

    model = load_model(model_path)
    stats = analyze(model, file_bytes=model_file_bytes(model))
    if as_json:
        click.echo(json.dumps(stats.to_dict(), indent=2, default=str))
        return
    for renderable in stats.tables():
        console.out.print(renderable)

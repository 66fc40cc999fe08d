"""`graphopt inspect`: inputs/outputs, op histogram, params, FLOPs, bytes, sparsity; with
`--groups`, the channel groups the `channels` pass would prune or refuse."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@click.option(
    "--groups",
    is_flag=True,
    help="List the channel groups (channels, sources, consumers, prunable or refused and why).",
)
def inspect(model_path: Path, as_json: bool, groups: bool) -> None:
    """Show what MODEL is made of."""
    from graphopt import console
    from graphopt.analysis import analyze
    from graphopt.model import load_model, model_file_bytes

    model = load_model(model_path)
    if groups:
        _groups(model, as_json)
        return
    stats = analyze(model, file_bytes=model_file_bytes(model))
    if as_json:
        click.echo(json.dumps(stats.to_dict(), indent=2, default=str))
        return
    for renderable in stats.tables():
        console.out.print(renderable)


def _groups(model, as_json: bool) -> None:
    from rich.table import Table

    from graphopt import console
    from graphopt.passes.channels import analyze_model

    analysis = analyze_model(model)
    if as_json:
        click.echo(json.dumps([g.describe() for g in analysis.groups], indent=2))
        return
    table = Table(title="Channel groups", title_justify="left")
    for column in ("id", "channels", "sources", "consumers", "status"):
        table.add_column(column, justify="right" if column in ("id", "channels") else "left")
    for group in analysis.groups:
        if group.refusals:
            status = "refused: " + "; ".join(group.refusals)
        elif group.lossy:
            status = "prunable (lossy: " + group.lossy[0] + ")"
        else:
            status = "prunable"
        table.add_row(
            str(group.id),
            str(group.channels),
            ", ".join(group.sources) or "-",
            ", ".join(group.consumers) or "-",
            status,
        )
    console.out.print(table)
    prunable = analysis.prunable()
    console.out.print(
        f"{len(prunable)} of {len(analysis.groups)} groups prunable, "
        f"{sum(g.channels for g in prunable)} channels in them."
    )

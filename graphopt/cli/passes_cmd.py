"""`graphopt passes`: every registered pass with its options, generated from the code."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def passes(as_json: bool) -> None:
    """List every pass, its options, their defaults and help."""
    from rich.table import Table

    from graphopt import console
    from graphopt.passes.base import registered_passes

    registry = registered_passes()
    if as_json:
        data = {
            name: {
                "summary": cls.summary,
                "lossless": cls.lossless,
                "command_line_only": cls.runs_user_code,
                "options": [
                    {
                        "name": info.name,
                        "type": info.type_text,
                        "default": info.default,
                        "help": info.help,
                        "choices": list(info.choices) if info.choices else None,
                        "range": list(info.range) if info.range else None,
                    }
                    for info in cls.option_infos()
                ],
            }
            for name, cls in registry.items()
        }
        click.echo(json.dumps(data, indent=2, default=str))
        return
    for name, cls in registry.items():
        notes = []
        if cls.lossless:
            notes.append("lossless")
        if cls.runs_user_code:
            notes.append("command line only")
        suffix = f" [dim]({', '.join(notes)})[/]" if notes else ""
        table = Table(title=f"[bold]{name}[/]: {cls.summary}{suffix}", title_justify="left")
        for column in ("option", "type", "default", "help"):
            table.add_column(column)
        for info in cls.option_infos():
            help_text = info.help
            if info.range is not None:
                low, high = info.range
                help_text += f" [range {low if low is not None else '-inf'}..{high if high is not None else 'inf'}]"
            table.add_row(info.name, info.type_text, repr(info.default), help_text)
        console.out.print(table)

"""The end of a pipeline command (`optimize`, `distill`): save, report, print, gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def save_and_show(
    report: Any, result: Any, out_model: Path, out_report: Path, *, as_json: bool, hint: str
) -> None:
    """Save the model when its gates pass, write the JSON report, print the tables (or the
    JSON), then fail with GateFailed when a gate did not hold (the model is then not written).

    Args:
        report: the RunReport, its `result` already set.
        result: the PipelineResult.
        hint: what to try when a gate fails.
    """
    from graphopt import console
    from graphopt.errors import GateFailed
    from graphopt.model import save_model

    if result.passed:
        saved = save_model(result.model, out_model)
        report.output_path = str(saved.path)
        report.output_bytes = saved.total_bytes()
    report.write_json(out_report)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        for renderable in report.renderables():
            console.out.print(renderable)
    if not result.passed:
        assert result.fidelity is not None  # only a fidelity report can fail
        raise GateFailed(
            f"The model failed its validation gates "
            f"({'; '.join(result.fidelity.failures)}), so it was not written. "
            f"The report is in '{out_report}'.",
            hint=hint,
        )
    console.err.print(f"wrote {out_model} and {out_report}")

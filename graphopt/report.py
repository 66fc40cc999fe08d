"""The run report: one row per pass, as a table for people and JSON for machines."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from graphopt import __version__
from graphopt.pipeline import PipelineResult, StepRecord
from graphopt.runtime import LatencyStats


@dataclass
class RunReport:
    """Everything `graphopt optimize` reports: inputs, steps, fidelity, latency, files."""

    model_path: str
    recipe: dict[str, Any]
    data: dict[str, str | None]
    result: PipelineResult | None = None
    output_path: str | None = None
    latency: dict[str, LatencyStats] = field(default_factory=dict)
    output_bytes: int | None = None
    input_bytes: int | None = None

    def renderables(self) -> list[Table]:
        """What the CLI prints: the per-pass table, latency, the final fidelity."""
        shown = [self.table()]
        shown.extend(self.excluded_tables())
        latency = self.latency_table()
        if latency is not None:
            shown.append(latency)
        if self.result is not None and self.result.fidelity is not None:
            shown.append(self.result.fidelity.table())
        return shown

    def table(self) -> Table:
        assert self.result is not None, "the report has no pipeline result yet"
        table = Table(title="graphopt: per-pass report", title_justify="left")
        for column, justify in [
            ("step", "left"),
            ("time s", "right"),
            ("params", "right"),
            ("GFLOPs", "right"),
            ("weights MB", "right"),
            ("sparsity", "right"),
            ("min cosine", "right"),
            ("min SQNR dB", "right"),
            ("accuracy", "right"),
            ("changed", "left"),
        ]:
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        for step in self.result.steps:
            table.add_row(*_row(step, is_original=step.name == "original"))
        return table

    def excluded_tables(self) -> list[Table]:
        """For each pass that lists candidate ops it left alone (quantize's `excluded`), how
        many and why, with the first few by name; the JSON report has every one."""
        assert self.result is not None, "the report has no pipeline result yet"
        tables = []
        for step in self.result.steps:
            excluded = step.pass_stats.get("excluded")
            if not excluded:
                continue
            by_reason: dict[str, list[str]] = {}
            for item in excluded:
                by_reason.setdefault(item["reason"], []).append(item["node"])
            table = Table(title=f"{step.name}: ops left in float", title_justify="left")
            for column in ("reason", "ops", "which"):
                table.add_column(column, justify="right" if column == "ops" else "left")
            for reason, nodes in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
                shown = ", ".join(nodes[:3]) + (
                    f", ... (+{len(nodes) - 3})" if len(nodes) > 3 else ""
                )
                table.add_row(reason, str(len(nodes)), shown)
            tables.append(table)
        return tables

    def latency_table(self) -> Table | None:
        if not self.latency:
            return None
        table = Table(title="ONNX Runtime latency", title_justify="left")
        for column in ("model", "provider", "threads", "batch", "median ms", "p90 ms", "runs"):
            table.add_column(column, justify="left" if column in ("model", "provider") else "right")
        for name, stats in self.latency.items():
            table.add_row(
                name,
                stats.provider.removesuffix("ExecutionProvider"),
                str(stats.threads),
                str(stats.batch_size),
                f"{stats.median_ms:.3f}",
                f"{stats.p90_ms:.3f}",
                str(stats.runs),
            )
        notes = []
        if {"original", "final"} <= self.latency.keys() and self.latency["final"].median_ms > 0:
            speedup = self.latency["original"].median_ms / self.latency["final"].median_ms
            notes.append(f"speed-up (median, original / final): {speedup:.2f}x")
        if self._quantized_for_tensorrt():
            notes.append(
                "Q/DQ placed for TensorRT runs unfused on ONNX Runtime's CPU provider; "
                "its speed comes from a TensorRT engine, not from this table"
            )
        table.caption = "\n".join(notes) or None
        return table

    def _quantized_for_tensorrt(self) -> bool:
        steps = self.result.steps if self.result is not None else []
        return any(step.modified and step.pass_stats.get("target") == "tensorrt" for step in steps)

    def to_dict(self) -> dict[str, Any]:
        assert self.result is not None, "the report has no pipeline result yet"
        final = self.result.fidelity
        return {
            "graphopt_version": __version__,
            "model": self.model_path,
            "output": self.output_path,
            "passed": self.result.passed,
            "recipe": self.recipe,
            "data": self.data,
            "checker": "full (with shape inference)" if self.result.full_check else "basic",
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "steps": [_step_dict(step) for step in self.result.steps],
            "fidelity": final.to_dict() if final is not None else None,
            "latency": {name: stats.to_dict() for name, stats in self.latency.items()},
        }

    def write_json(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so no half-written report is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, default=_json_default)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _fmt_float(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "inf"
    return format(value, spec)


def _row(step: StepRecord, *, is_original: bool) -> list[str]:
    stats = step.model_stats
    fidelity = step.fidelity
    if is_original:
        accuracy = fidelity.reference_accuracy if fidelity is not None else None
        cosine = sqnr = "-"
    else:
        accuracy = fidelity.candidate_accuracy if fidelity is not None else None
        cosine = _fmt_float(fidelity.worst_cosine if fidelity else None, ".6f")
        sqnr = _fmt_float(fidelity.min_sqnr_db if fidelity else None, ".1f")
    flops = f"{stats.flops / 1e9:.4f}" + ("+" if stats.flops_unknown else "")
    return [
        step.name,
        "-" if is_original else f"{step.seconds:.2f}",
        f"{stats.params:,}",
        flops,
        f"{stats.weight_bytes / 1e6:.3f}",
        f"{stats.sparsity:.1%}",
        cosine,
        sqnr,
        _fmt_float(accuracy, ".2%") if accuracy is not None else "-",
        "-" if is_original else ("yes" if step.modified else "no"),
    ]


def _step_dict(step: StepRecord) -> dict[str, Any]:
    return {
        "name": step.name,
        "seconds": step.seconds,
        "modified": step.modified,
        "model": step.model_stats.to_dict(),
        "pass_stats": step.pass_stats,
        "warnings": step.warnings,
        "fidelity": step.fidelity.to_dict() if step.fidelity is not None else None,
    }

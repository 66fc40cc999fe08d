"""`graphopt optimize`: run a recipe over a model, validate it, save it, report."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import click

from graphopt.cli.options import (
    DataReader,
    data_options,
    gate_option,
    parse_gate_args,
    runtime_options,
    teacher_options,
)
from graphopt.cli.results import save_and_show


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option(
    "--recipe",
    default=None,
    metavar="NAME|FILE",
    help="Built-in recipe name or a YAML/JSON recipe file (default: 'default').",
)
@click.option(
    "--pass",
    "pass_args",
    multiple=True,
    metavar="NAME:KEY=VALUE,...",
    help="Run this pass (repeatable, in order); replaces the recipe's passes.",
)
@gate_option
@click.option(
    "--data", "data_source", default=None, help="Calibration data: .npz, folder, or 'random'."
)
@click.option(
    "--val-data",
    "val_source",
    default=None,
    help="Validation data (.npz with labels for accuracy); the result is compared with the original on it.",
)
@data_options
@teacher_options
@runtime_options
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=Path("out"),
    show_default=True,
    help="Output folder (model + report.json), or an .onnx file path.",
)
@click.option("--metric", default=None, metavar="MODULE:FUNCTION", help="Your accuracy metric.")
@click.option(
    "--latency-runs",
    type=click.IntRange(min=0),
    default=30,
    show_default=True,
    help="ORT latency runs for the original and final model (0 skips the measurement).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random choices.")
@click.option(
    "--engine",
    "engine_path",
    type=click.Path(path_type=Path),
    default=None,
    metavar="OUT.plan",
    help="Also build a TensorRT plan from the optimized model (settings from the recipe's "
    "engine section); needs TensorRT and an NVIDIA GPU.",
)
@click.option("--print-recipe", is_flag=True, help="Print the resolved recipe and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of tables.")
def optimize(
    model_path: Path,
    recipe: str | None,
    pass_args: tuple[str, ...],
    gates: tuple[str, ...],
    data_source: str | None,
    val_source: str | None,
    data_reader: DataReader,
    teacher: Any,
    device: str,
    threads: int | None,
    batch_size: int,
    output: Path,
    metric: str | None,
    latency_runs: int,
    seed: int,
    engine_path: Path | None,
    print_recipe: bool,
    as_json: bool,
) -> None:
    """Optimize MODEL with a recipe, check it on ONNX Runtime and save it.

    \b
    Example:
      graphopt optimize models/digits/model.onnx --data models/digits/calib.npz \\
          --val-data models/digits/val.npz -o out/
    """

    from graphopt import console
    from graphopt.context import Context
    from graphopt.engine.step import (
        prepare_engine_step,
        run_engine_step,
        tensorrt_missing,
        with_command_line_output,
    )
    from graphopt.model import check_output_path, load_model, model_file_bytes
    from graphopt.pipeline import run_pipeline
    from graphopt.report import RunReport
    from graphopt.usercode import load_callable

    if recipe is None and not pass_args and data_source is None:
        console.warn(
            "no --data: the default recipe quantizes, which needs calibration data, so the "
            "'lossless' recipe runs instead."
        )
        recipe = "lossless"
    resolved = _resolve_recipe(recipe, pass_args, gates)
    resolved.engine = with_command_line_output(resolved.engine, engine_path)
    if print_recipe:
        click.echo(resolved.to_yaml(), nl=False)
        return
    out_model, out_report = _output_paths(output, model_path)
    model = load_model(model_path)
    check_output_path(model, out_model)
    engine_step = prepare_engine_step(
        resolved.engine, model, model_path=model_path, optimized_model=out_model, report=out_report
    )
    if engine_step is not None and tensorrt_missing() is not None:
        console.warn(
            "TensorRT is not usable here: the passes run and the optimized model and report are "
            "written, then the engine step fails (its error says how to install TensorRT)."
        )
    metric_fn = load_callable(metric, what="metric") if metric else None
    calib = data_reader.open(data_source, model.input_specs(), seed=seed)
    val = data_reader.open(val_source, model.input_specs(), seed=seed)
    if val is None:
        console.warn(
            "no --val-data: the optimized model is not compared with the original, and the "
            "recipe's validation gates are not checked."
        )
    report = RunReport(
        model_path=str(model_path),
        recipe=resolved.to_dict(),
        data={
            "calibration": calib.description if calib else None,
            "validation": val.description if val else None,
        },
        input_bytes=model_file_bytes(model),
    )
    with tempfile.TemporaryDirectory(prefix="graphopt-") as workdir:
        ctx = Context(
            workdir=Path(workdir),
            calib_data=calib,
            val_data=val,
            device=device,  # type: ignore[arg-type]
            threads=threads,
            batch_size=batch_size,
            seed=seed,
            metric=metric_fn,
            teacher=teacher,
        )
        report.result = result = run_pipeline(model, resolved, ctx, on_step=_show_step)
        if latency_runs > 0:
            report.latency = _latencies(model_path, result.model, val or calib, ctx, latency_runs)
        save_and_show(
            report, result, out_model, out_report, as_json=as_json,
            hint="Relax the recipe's gates, or change the passes' options.",
        )  # fmt: skip
    if engine_step is not None:
        built = run_engine_step(engine_step, out_model, out_report)
        console.err.print(f"wrote {built.plan_path} and {built.sidecar_path}")


def _resolve_recipe(recipe: str | None, pass_args: tuple[str, ...], gates: tuple[str, ...]):
    """The recipe (default: 'default'), its passes replaced by --pass, its gates by --gate."""
    from graphopt import console
    from graphopt.recipe import inline_recipe, load_recipe
    from graphopt.validate import Gates

    resolved = load_recipe(recipe or "default")
    if pass_args:
        if recipe is not None:
            console.warn(
                f"--pass given: the passes of recipe {resolved.source} are ignored "
                "(its validation gates still apply)."
            )
        engine = resolved.engine
        resolved = inline_recipe(pass_args, resolved.gates)
        resolved.engine = engine
    if gates:
        merged = {**resolved.gates.to_dict(), **parse_gate_args(gates)}
        resolved.gates = Gates.from_mapping(merged, where="--gate")
    return resolved


def _output_paths(output: Path, model_path: Path) -> tuple[Path, Path]:
    if output.suffix.lower() == ".onnx":
        return output, output.with_name(output.stem + ".report.json")
    return output / model_path.name, output / "report.json"


def _show_step(step) -> None:
    from graphopt import console

    if step.name == "original":
        return
    state = "changed the model" if step.modified else "left the model unchanged"
    console.err.print(f"[green]✓[/] {step.name}: {state} in {step.seconds:.2f} s")
    for warning in step.warnings:
        console.warn(f"{step.name}: {warning}")


def _latencies(model_path, final_model, dataset, ctx, runs: int):
    """ORT latency of the original file and the final model on one sample of real data."""
    from graphopt import console
    from graphopt.data import open_dataset
    from graphopt.errors import DataError
    from graphopt.runtime import measure_latency

    if dataset is None:
        try:
            dataset = open_dataset(
                "random", final_model.input_specs(), num_samples=1, seed=ctx.seed
            )
        except DataError as exc:
            console.warn(f"latency not measured: {exc.paragraph()}")
            return {}
    batch = next(iter(dataset.batches(1)))
    # Fixed threads, recorded in the report, so the two numbers are comparable.
    threads = ctx.threads or os.cpu_count() or 1
    return {
        name: measure_latency(which, batch.feeds, runs=runs, threads=threads, device=ctx.device)
        for name, which in (("original", model_path), ("final", final_model))
    }

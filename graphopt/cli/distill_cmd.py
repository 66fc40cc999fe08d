"""`graphopt distill` (train a student against a teacher's logits) and `graphopt export-logits`.

`distill` runs the `distill` pass alone through the pipeline, so the result is checked and,
with --val-data, compared with the student as given (accuracy before and after). Its options
are generated from the pass's options dataclass (`--epochs`, `--lr`, ...), so they always
match `--pass distill:...`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import click

from graphopt.cli.options import DataReader, data_options, gate_option, teacher_options
from graphopt.cli.results import save_and_show


def _pass_options(fn: Any) -> Any:
    """One --option per field of DistillOptions, as text validated by the pass's schema."""
    from graphopt.passes.base import describe_options
    from graphopt.passes.distill import DistillOptions

    for info in reversed(describe_options(DistillOptions)):
        flag = "--" + info.name.replace("_", "-")
        fn = click.option(
            flag,
            f"opt_{info.name}",
            default=None,
            metavar="VALUE",
            help=f"{info.help} [default: {_shown(info.default)}]",
        )(fn)
    return fn


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return "|".join(value) or "-"
    return str(value)


@click.command()
@click.argument("student_path", metavar="STUDENT", type=click.Path(path_type=Path))
@click.option("--data", "data_source", required=True, help="Training samples: .npz or folder.")
@teacher_options
@click.option(
    "--val-data",
    "val_source",
    default=None,
    help="Validation data (.npz, labels for accuracy): the result is compared with the student.",
)
@data_options
@_pass_options
@gate_option
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ORT intra-op threads.")
@click.option("--metric", default=None, metavar="MODULE:FUNCTION", help="Your accuracy metric.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (holdout, shuffling).")
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), required=True, help="The .onnx to write."
)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of tables.")
def distill(
    student_path: Path,
    data_source: str,
    teacher: Any,
    val_source: str | None,
    data_reader: DataReader,
    gates: tuple[str, ...],
    device: str,
    threads: int | None,
    metric: str | None,
    seed: int,
    output: Path,
    as_json: bool,
    **pass_values: str | None,
) -> None:
    """Fine-tune STUDENT's weights against a teacher's logits, on ONNX Runtime.

    \b
    Example:
      graphopt export-logits teacher.onnx --data train.npz -o logits.npy
      graphopt distill pruned.onnx --data train.npz --teacher-logits logits.npy \\
          --val-data val.npz --epochs 3 --lr 1e-3 -o distilled.onnx
    """
    from graphopt.cli.options import parse_gate_args
    from graphopt.context import Context
    from graphopt.errors import RecipeError
    from graphopt.model import check_output_path, load_model
    from graphopt.passes import base
    from graphopt.passes.distill import DistillPass
    from graphopt.pipeline import run_pipeline
    from graphopt.recipe import PassSpec, Recipe
    from graphopt.report import RunReport
    from graphopt.usercode import load_callable
    from graphopt.validate import Gates

    if teacher is None:
        raise RecipeError(
            "graphopt distill needs a teacher: --teacher MODEL or --teacher-logits FILE.",
            hint="Export the logits with graphopt export-logits TEACHER --data D -o logits.npy.",
        )
    if output.suffix.lower() != ".onnx":
        raise RecipeError(f"-o '{output}' must name the .onnx file to write.")
    values = {k.removeprefix("opt_"): v for k, v in pass_values.items() if v is not None}
    options = base.build_options(DistillPass, values, from_text=True)
    recipe = Recipe(
        passes=[PassSpec(name="distill", options=options)],
        gates=Gates.from_mapping(parse_gate_args(gates), where="--gate"),
        source="graphopt distill",
    )
    model = load_model(student_path)
    check_output_path(model, output)
    metric_fn = load_callable(metric, what="metric") if metric else None
    data = data_reader.open(data_source, model.input_specs(), seed=seed)
    val = data_reader.open(val_source, model.input_specs(), seed=seed)
    report = RunReport(
        model_path=str(student_path),
        recipe=recipe.to_dict(),
        data={
            "training": data.description if data else None,
            "validation": val.description if val else None,
            "teacher": teacher.describe(),
        },
    )
    out_report = output.with_name(output.stem + ".report.json")
    with tempfile.TemporaryDirectory(prefix="graphopt-") as workdir:
        ctx = Context(
            workdir=Path(workdir),
            calib_data=data,
            val_data=val,
            device=device,  # type: ignore[arg-type]
            threads=threads,
            seed=seed,
            metric=metric_fn,
            teacher=teacher,
        )
        report.result = result = run_pipeline(model, recipe, ctx)
        save_and_show(
            report, result, output, out_report, as_json=as_json,
            hint="Relax --gate, or train longer or with another learning rate.",
        )  # fmt: skip


@click.command("export-logits")
@click.argument("model_path", metavar="TEACHER", type=click.Path(path_type=Path))
@click.option("--data", "data_source", required=True, help="The samples: .npz or folder.")
@data_options
@click.option(
    "--output-name",
    "outputs",
    multiple=True,
    metavar="NAME",
    help="Output to export (repeatable; default: the first output).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ORT intra-op threads.")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="Where to write: .npy for one output, .npz for several.",
)
def export_logits(
    model_path: Path,
    data_source: str,
    data_reader: DataReader,
    outputs: tuple[str, ...],
    batch_size: int,
    device: str,
    threads: int | None,
    output: Path,
) -> None:
    """Run TEACHER over the data and save its logits, one row per sample, for `distill`.

    An output produced by a Softmax or LogSoftmax is exported as that node's input (the
    logits), which is what distillation compares.
    """
    from graphopt import console
    from graphopt.model import load_model
    from graphopt.passes.distill import export_logits as write_logits
    from graphopt.passes.distill import logits_view

    model = load_model(model_path)
    data = data_reader.open(data_source, model.input_specs(), seed=0)
    assert data is not None
    names = list(outputs) or [model.graph.outputs[0].name]
    with tempfile.TemporaryDirectory(prefix="graphopt-") as workdir:
        path = write_logits(
            model, data, output, outputs=names, batch_size=batch_size,
            device=device, threads=threads, workdir=Path(workdir),  # type: ignore[arg-type]
        )  # fmt: skip
    for name in names:
        view = logits_view(model, name)
        source = f"'{view.tensor}' (the input of its softmax)" if view.is_softmax else "itself"
        console.err.print(f"output '{name}': exported {source}")
    console.err.print(f"wrote {path} ({len(data)} samples)")

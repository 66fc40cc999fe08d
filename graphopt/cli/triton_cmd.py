"""`graphopt export-triton`: one model as an entry of a Triton Inference Server repository."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _batch_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...]:
    if value is None:
        return ()
    try:
        sizes = tuple(int(part) for part in value.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(size < 1 for size in sizes):
        raise click.BadParameter(f"'{value}' is not a list of positive integers, e.g. 4,8.")
    return sizes


@click.command(name="export-triton")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option(
    "--repo",
    type=click.Path(path_type=Path),
    required=True,
    help="The Triton model repository folder (created if needed).",
)
@click.option("--name", required=True, help="The model's name in the repository.")
@click.option(
    "--backend",
    type=click.Choice(["onnxruntime", "tensorrt"]),
    default="onnxruntime",
    show_default=True,
    help="Serve the ONNX model on ONNX Runtime, or a TensorRT plan (--plan).",
)
@click.option(
    "--plan",
    type=click.Path(path_type=Path),
    default=None,
    help="The TensorRT plan built from MODEL (tensorrt backend).",
)
@click.option(
    "--max-batch-size",
    type=click.IntRange(min=0),
    default=None,
    help="Triton's max_batch_size [default: 8, or the largest preferred batch, when the model "
    "has a dynamic batch axis; else 0].",
)
@click.option(
    "--preferred-batch",
    default=None,
    callback=_batch_list,
    metavar="B1,B2,...",
    help="Dynamic batching's preferred batch sizes.",
)
@click.option(
    "--preferred-from",
    "bench_path",
    type=click.Path(path_type=Path),
    default=None,
    metavar="BENCH.json",
    help="Take the preferred batch from a `graphopt bench --report` file (its best batch).",
)
@click.option(
    "--max-queue-delay-us",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="How long dynamic batching may wait to fill a batch, in microseconds.",
)
@click.option(
    "--instance-group",
    type=click.Choice(["gpu", "cpu"]),
    default="gpu",
    show_default=True,
    help="Where Triton runs the model's instances.",
)
@click.option(
    "--instances", type=click.IntRange(min=1), default=1, show_default=True, help="Instances."
)
@click.option(
    "--accelerator",
    type=click.Choice(["none", "tensorrt"]),
    default="none",
    show_default=True,
    help="onnxruntime backend: run through ONNX Runtime's TensorRT execution provider.",
)
@click.option(
    "--trt-precision",
    type=click.Choice(["FP32", "FP16", "INT8"]),
    default=None,
    help="The TensorRT accelerator's precision_mode [default: INT8 for a Q/DQ model, else FP32].",
)
@click.option(
    "--trt-workspace-mb",
    type=click.IntRange(min=1),
    default=None,
    help="The TensorRT accelerator's workspace limit in MiB.",
)
@click.option(
    "--version",
    "version",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="The version folder to write.",
)
@click.option("--force", is_flag=True, help="Replace an existing version folder.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def export_triton(
    model_path: Path,
    repo: Path,
    name: str,
    backend: str,
    plan: Path | None,
    max_batch_size: int | None,
    preferred_batch: tuple[int, ...],
    bench_path: Path | None,
    max_queue_delay_us: int,
    instance_group: str,
    instances: int,
    accelerator: str,
    trt_precision: str | None,
    trt_workspace_mb: int | None,
    version: int,
    force: bool,
    as_json: bool,
) -> None:
    """Write REPO/NAME/config.pbtxt and REPO/NAME/VERSION/model.onnx (or model.plan)."""
    from graphopt import console
    from graphopt.errors import GraphoptError
    from graphopt.model import load_model
    from graphopt.triton import TritonOptions, export_triton, preferred_from_bench

    if bench_path is not None and preferred_batch:
        raise GraphoptError(
            "--preferred-batch and --preferred-from both set the preferred batch sizes.",
            hint="Give one.",
        )
    warnings: list[str] = []
    if bench_path is not None:
        preferred_batch, warnings = preferred_from_bench(bench_path, model_path)
    options = TritonOptions(
        backend=backend,  # type: ignore[arg-type]
        max_batch_size=max_batch_size,
        preferred_batch=preferred_batch,
        max_queue_delay_us=max_queue_delay_us,
        instance_group=instance_group,  # type: ignore[arg-type]
        instance_count=instances,
        accelerator=accelerator,  # type: ignore[arg-type]
        trt_precision=trt_precision,  # type: ignore[arg-type]
        trt_workspace_mb=trt_workspace_mb,
        version=version,
        force=force,
    )
    model = load_model(model_path)
    result = export_triton(model, repo, name, options, plan=plan)
    for warning in warnings + result.notes:
        console.warn(warning)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    console.out.print(f"wrote {result.config_path}")
    console.out.print(f"wrote {result.model_file}")
    if result.data_file is not None:
        console.out.print(f"wrote {result.data_file}")
    console.out.print(result.config_text.rstrip(), markup=False)

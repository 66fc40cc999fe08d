"""`graphopt bench`: ONNX Runtime latency percentiles and throughput over batch sizes."""

from __future__ import annotations

import json
from pathlib import Path

import click

from graphopt.cli.options import DataReader, data_options

PLAN_SUFFIXES = (".plan", ".engine", ".trt")


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option(
    "--data",
    "data_source",
    default="random",
    show_default=True,
    help="Inputs: .npz, a folder, or 'random' (dynamic dims from --shape).",
)
@data_options
@click.option(
    "--batch",
    "batch_text",
    default="auto",
    show_default=True,
    metavar="auto|B1,B2,...",
    help="Batch sizes to time; auto doubles from 1 until throughput stops improving.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1, 4096),
    default=256,
    show_default=True,
    help="Largest batch the automatic sweep tries.",
)
@click.option(
    "--min-gain",
    type=click.FloatRange(min=0.0),
    default=0.05,
    show_default=True,
    help="The automatic sweep stops at the first batch that is not this much faster per sample.",
)
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=None,
    help="Timed runs per batch size [default: 50].",
)
@click.option(
    "--time",
    "budget_s",
    type=click.FloatRange(min=0.0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Time each batch size for this long instead of a fixed number of runs.",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Untimed runs per batch size.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="ONNX Runtime intra-op threads (default: ORT's choice).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where ONNX Runtime runs; auto uses CUDA only when it really works.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random data.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the result as JSON to this file (export-triton reads its best batch).",
)
def bench(
    model_path: Path,
    data_source: str,
    data_reader: DataReader,
    batch_text: str,
    max_batch: int,
    min_gain: float,
    runs: int | None,
    budget_s: float | None,
    warmup: int,
    threads: int | None,
    device: str,
    seed: int,
    as_json: bool,
    report_path: Path | None,
) -> None:
    """Time MODEL on ONNX Runtime: p50/p90/p99 latency and throughput per batch size."""
    from graphopt import console
    from graphopt.benchmark import (
        BenchOptions,
        bench,
        largest_batch,
        model_fixed_batch,
        parse_batches,
    )
    from graphopt.data import open_dataset, parse_shapes
    from graphopt.errors import GraphoptError
    from graphopt.model import load_model
    from graphopt.report import write_json_atomic

    if model_path.suffix.lower() in PLAN_SUFFIXES:
        raise GraphoptError(
            f"'{model_path}' looks like a TensorRT engine; graphopt bench times ONNX models on "
            "ONNX Runtime, and does not run TensorRT engines yet.",
            hint=f"Time the engine with TensorRT's trtexec (trtexec --loadEngine={model_path}), "
            "or give the .onnx model.",
        )
    if runs is not None and budget_s is not None:
        raise GraphoptError(
            "--runs and --time both set how long each batch size is timed.", hint="Give one."
        )
    parse_shapes(data_reader.shapes)  # a bad --shape is reported before the model is read
    batches = parse_batches(batch_text)
    options = BenchOptions(
        batches=batches,
        max_batch=max_batch,
        min_gain=min_gain,
        runs=runs if runs is not None else 50,
        budget_s=budget_s,
        warmup=warmup,
        threads=threads,
        device=device,  # type: ignore[arg-type]
    )
    model = load_model(model_path)
    if data_source == "random":
        dataset = open_dataset(
            "random",
            model.input_specs(),
            shapes=parse_shapes(data_reader.shapes),
            num_samples=largest_batch(model, options),
            seed=seed,
        )
    else:
        dataset = data_reader.open(data_source, model.input_specs(), seed=seed)
    assert dataset is not None  # a source was given
    fixed = model_fixed_batch(model)
    if fixed is not None and (batches is None or batches != (fixed,)):
        console.warn(
            f"the model fixes its batch size at {fixed}, so --batch {batch_text} is ignored and "
            f"only batch {fixed} is timed."
        )

    def progress(stats) -> None:
        console.err.print(
            f"batch {stats.batch_size}: p50 {stats.median_ms:.3f} ms, "
            f"{stats.throughput:,.1f} samples/s ({stats.runs} runs)"
        )

    result = bench(model, dataset, options, progress=progress)
    if report_path is not None:
        write_json_atomic(report_path, result.to_dict())
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        console.out.print(result.table())

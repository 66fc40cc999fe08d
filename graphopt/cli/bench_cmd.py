"""`graphopt bench`: ONNX Runtime latency percentiles and throughput over batch sizes."""

from __future__ import annotations

import json
from pathlib import Path

import click

from graphopt.cli.options import DataReader, data_options


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
@click.option(
    "--profile",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="TensorRT plans: the optimization profile to run (its batch range gives the sweep).",
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
    profile: int,
    seed: int,
    as_json: bool,
    report_path: Path | None,
) -> None:
    """Time MODEL on ONNX Runtime, or a TensorRT plan (.plan, .engine, .trt) on the GPU:
    p50/p90/p99 latency and throughput per batch size.

    A plan needs TensorRT, cuda-python and an NVIDIA GPU; its batch sizes come from its
    optimization profile, and its latency is GPU time per inference from CUDA events.
    """
    from graphopt import console
    from graphopt.benchmark import (
        BenchOptions,
        bench,
        largest_batch,
        model_fixed_batch,
        parse_batches,
    )
    from graphopt.data import open_dataset, parse_shapes
    from graphopt.engine.run import is_plan_path
    from graphopt.errors import GraphoptError
    from graphopt.model import load_model
    from graphopt.report import write_json_atomic

    if runs is not None and budget_s is not None:
        raise GraphoptError(
            "--runs and --time both set how long each batch size is timed.", hint="Give one."
        )
    parse_shapes(data_reader.shapes)  # a bad --shape is reported before the model is read
    batches = parse_batches(batch_text)
    if is_plan_path(model_path):
        _bench_plan(
            model_path,
            data_source,
            data_reader,
            batches,
            max_batch,
            min_gain,
            runs if runs is not None else 50,
            budget_s,
            warmup,
            profile,
            seed,
            as_json,
            report_path,
            ignored=[n for n, v in (("--threads", threads), ("--shape", data_reader.shapes)) if v]
            + (["--device"] if device != "auto" else []),
        )
        return
    if profile:
        console.warn("--profile applies to TensorRT plans only; ignored for an ONNX model.")
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


def _bench_plan(
    plan_path: Path,
    data_source: str,
    data_reader: DataReader,
    batches: tuple[int, ...] | None,
    max_batch: int,
    min_gain: float,
    runs: int,
    budget_s: float | None,
    warmup: int,
    profile: int,
    seed: int,
    as_json: bool,
    report_path: Path | None,
    ignored: list[str],
) -> None:
    """`graphopt bench model.plan`: TensorRT on the GPU (see graphopt.engine.run)."""
    from graphopt import console
    from graphopt.benchmark import fill_batch
    from graphopt.data import open_dataset
    from graphopt.engine.run import bench_plan, read_plan_bytes
    from graphopt.errors import DataError
    from graphopt.report import write_json_atomic

    read_plan_bytes(plan_path)  # a missing or empty plan is reported before TensorRT is sought
    if ignored:
        console.warn(
            f"{', '.join(ignored)} apply to ONNX models on ONNX Runtime; ignored for a TensorRT "
            "plan (dynamic dims take the profile's optimum)."
        )
    opened: dict[str, object] = {}

    def feeds_for(signature, size: int):
        if "dataset" not in opened:
            specs = signature.input_specs(profile)
            if data_source == "random":
                count = max(signature.batch_sizes(profile, batches, max_batch))
                opened["dataset"] = open_dataset("random", specs, num_samples=count, seed=seed)
            else:
                opened["dataset"] = data_reader.open(data_source, specs, seed=seed)
        dataset = opened["dataset"]
        for batch in dataset.batches(size):  # type: ignore[attr-defined]
            return fill_batch(batch.feeds, size)
        raise DataError(f"The data ({dataset.description}) holds no samples to benchmark with.")  # type: ignore[attr-defined]

    def progress(stats) -> None:
        console.err.print(
            f"batch {stats.batch_size}: p50 {stats.median_ms:.3f} ms, "
            f"{stats.throughput:,.1f} samples/s ({stats.runs} runs)"
        )

    result = bench_plan(
        plan_path,
        feeds_for,
        batches=batches,
        max_batch=max_batch,
        min_gain=min_gain,
        runs=runs,
        warmup=warmup,
        budget_s=budget_s,
        profile=profile,
        data=data_source,
        random_data=data_source == "random",
        progress=progress,
    )
    if "dataset" in opened:
        result.data = opened["dataset"].description  # type: ignore[attr-defined]
    if report_path is not None:
        write_json_atomic(report_path, result.to_dict())
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        console.out.print(result.table())

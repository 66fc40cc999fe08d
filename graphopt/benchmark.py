"""`graphopt bench`: ONNX Runtime latency and throughput of one model over batch sizes.

Each batch size gets its own warm-up and timed runs through `runtime.measure_latency` (one
ORT session for the whole sweep). The throughput-optimal batch is the one with the most
samples per second; an automatic sweep doubles the batch from 1 until throughput stops
improving by at least `min_gain`, ORT fails (out of memory), or `max_batch` is reached.

A Q/DQ model timed on ORT's CUDA provider runs slower than its FP32 original (the CUDA EP has
no fused int8 kernels for it); its INT8 speed comes from a TensorRT engine, so the result says
so wherever it shows such numbers.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from graphopt.data import Dataset
from graphopt.errors import DataError, GraphoptError, RuntimeFailed
from graphopt.model import Model
from graphopt.runtime import CUDA, Device, LatencyStats, Session, create_session, measure_latency

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
SWEEP_LIMIT = 4096


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """How to time the model.

    Attributes:
        batches: the batch sizes to time, in order; None for the automatic doubling sweep.
        max_batch: the largest batch the automatic sweep tries.
        min_gain: the automatic sweep stops at the first batch that does not beat the best
            throughput so far by this fraction.
        runs: timed runs per batch size (with `budget_s`: the least number of them).
        budget_s: seconds of timed runs per batch size; None for exactly `runs` runs.
        warmup: untimed runs per batch size before timing.
        threads: ORT intra-op threads (None: ORT's default).
        device: where ORT runs ("auto": CUDA only when it really works).
    """

    batches: tuple[int, ...] | None = None
    max_batch: int = 256
    min_gain: float = 0.05
    runs: int = 50
    budget_s: float | None = None
    warmup: int = 5
    threads: int | None = None
    device: Device = "auto"

    def __post_init__(self) -> None:
        if self.batches is not None:
            if not self.batches or any(b < 1 for b in self.batches):
                raise GraphoptError(
                    f"Batch sizes must be positive integers (got {list(self.batches)}).",
                    hint="Write e.g. --batch 1,4,16, or --batch auto.",
                )
            if len(set(self.batches)) != len(self.batches):
                raise GraphoptError(f"Batch sizes {list(self.batches)} repeat a value.")
        if not 1 <= self.max_batch <= SWEEP_LIMIT:
            raise GraphoptError(f"max_batch must be between 1 and {SWEEP_LIMIT}.")
        if self.min_gain < 0:
            raise GraphoptError(f"min_gain must not be negative (got {self.min_gain}).")
        if self.runs < 1 or self.warmup < 0:
            raise GraphoptError(f"Need runs >= 1 and warmup >= 0 (got {self.runs}, {self.warmup}).")
        if self.budget_s is not None and self.budget_s <= 0:
            raise GraphoptError(f"The time budget must be positive (got {self.budget_s} s).")
        if self.threads is not None and self.threads < 1:
            raise GraphoptError(f"threads must be at least 1 (got {self.threads}).")


def parse_batches(text: str) -> tuple[int, ...] | None:
    """Read --batch: 'auto' (None) or a comma-separated list of positive integers."""
    text = text.strip().lower()
    if text == "auto":
        return None
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise GraphoptError(
            f"--batch '{text}' is not 'auto' or a list of positive integers.",
            hint="Write e.g. --batch 1,4,16 or --batch auto.",
        )
    return values


@dataclass
class BenchResult:
    """Latency and throughput of one model, one row per batch size.

    Attributes:
        model: the model file (or a description of an in-memory model).
        model_sha256: SHA-256 of the .onnx file (not of external data), to match a sweep with
            the model it was measured on; None for an in-memory model.
        provider: the ORT execution provider that ran.
        requested_device: what was asked for (auto, cpu, cuda).
        threads: ORT intra-op threads (None: ORT's default).
        data: where the inputs came from.
        random_data: whether the inputs were random.
        qdq_nodes: QuantizeLinear/DequantizeLinear nodes in the model.
        points: one LatencyStats per batch size, in the order they ran.
        fixed_batch: the model's fixed batch size, or None when it is dynamic.
        sweep: "auto" or "list".
        stopped: why the automatic sweep stopped (None for a list).
        repeated: batch sizes whose samples were repeated because the data had fewer.
        machine: platform, CPU count and ORT version.
    """

    model: str
    model_sha256: str | None
    provider: str
    requested_device: str
    threads: int | None
    data: str
    random_data: bool
    qdq_nodes: int
    points: list[LatencyStats]
    fixed_batch: int | None
    sweep: str
    stopped: str | None = None
    repeated: list[int] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> LatencyStats:
        """The batch size with the highest throughput."""
        return max(self.points, key=lambda p: p.throughput)

    def notes(self) -> list[str]:
        """What a reader must know to read the numbers right."""
        notes = [
            f"throughput-optimal batch on this machine: {self.best.batch_size} "
            f"({self.best.throughput:,.1f} samples/s)"
        ]
        if self.qdq_nodes and self.provider == CUDA:
            notes.append(
                f"this model holds {self.qdq_nodes} Q/DQ nodes: ONNX Runtime's CUDA provider "
                "runs them slower than FP32, so this is NOT TensorRT speed; build a TensorRT "
                "engine (graphopt build) for INT8 on a GPU"
            )
        elif self.qdq_nodes:
            notes.append(
                f"this model holds {self.qdq_nodes} Q/DQ nodes: ONNX Runtime's "
                f"{_short(self.provider)} provider fuses only some of them into int8 kernels; "
                "this is not TensorRT speed"
            )
        if self.requested_device == "auto" and self.provider != CUDA:
            notes.append("CUDA does not work here (checked quietly): ran on the CPU")
        if self.random_data:
            notes.append("inputs: random data (pass --data for real samples)")
        if self.repeated:
            sizes = ", ".join(str(b) for b in self.repeated)
            notes.append(f"samples repeated to fill batch {sizes} (the data has fewer)")
        if self.fixed_batch is not None:
            notes.append(f"the model fixes its batch size at {self.fixed_batch}: no sweep")
        if self.stopped:
            notes.append(f"sweep stopped: {self.stopped}")
        return notes

    def table(self) -> Table:
        threads = "ORT default" if self.threads is None else str(self.threads)
        title = (
            f"ONNX Runtime benchmark: {Path(self.model).name} on {_short(self.provider)} "
            f"({threads} threads)"
        )
        return sweep_table(title, self.points, self.best.batch_size, self.notes())

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_sha256": self.model_sha256,
            "runtime": "onnxruntime",
            "provider": self.provider,
            "requested_device": self.requested_device,
            "threads": self.threads,
            "data": self.data,
            "random_data": self.random_data,
            "qdq_nodes": self.qdq_nodes,
            "tensorrt_speed": False,
            "fixed_batch": self.fixed_batch,
            "sweep": self.sweep,
            "stopped": self.stopped,
            "repeated_samples_for_batches": self.repeated,
            "best_batch": self.best.batch_size,
            "best_throughput": self.best.throughput,
            "batches": [p.to_dict() for p in self.points],
            "notes": self.notes(),
            "machine": self.machine,
        }


def bench(
    model: Model,
    dataset: Dataset,
    options: BenchOptions,
    *,
    progress: Callable[[LatencyStats], None] | None = None,
) -> BenchResult:
    """Time `model` at each batch size of `options` (or the automatic sweep).

    Each batch size is fed the first samples of `dataset` (repeated in order when it has
    fewer). A model whose inputs fix the batch size is timed at that size only.

    Args:
        model: the model; its file (if any) is hashed for the result, never modified.
        dataset: the inputs; random data should hold at least the largest batch size.
        options: what to time and how.
        progress: called with each batch size's numbers as they come.

    Raises:
        RuntimeFailed: ORT could not load the model, or a listed batch size failed.
    """
    fixed_batch = model_fixed_batch(model)
    session = create_session(model, device=options.device, threads=options.threads)
    if fixed_batch is not None:
        sizes: Sequence[int] = (fixed_batch,)
        sweep = "list"
    elif options.batches is not None:
        sizes = options.batches
        sweep = "list"
    else:
        sizes = _doubling(options.max_batch)
        sweep = "auto"
    points: list[LatencyStats] = []
    repeated: list[int] = []
    stopped: str | None = None
    for size in sizes:
        feeds, was_repeated = fill_batch(_first_batch(dataset, size), size)
        try:
            stats = _time(session, feeds, options)
        except RuntimeFailed as exc:
            if sweep != "auto" or not points:
                raise
            stopped = f"batch {size} failed on ONNX Runtime ({exc.message})"
            break
        points.append(stats)
        if was_repeated:
            repeated.append(size)
        if progress is not None:
            progress(stats)
        if sweep == "auto" and len(points) > 1:
            best = max(points[:-1], key=lambda p: p.throughput)
            if stats.throughput < best.throughput * (1.0 + options.min_gain):
                stopped = (
                    f"batch {size} gave {stats.throughput:,.1f} samples/s, not "
                    f"{options.min_gain:.0%} more than the best before it "
                    f"({best.throughput:,.1f} at batch {best.batch_size})"
                )
                break
    else:
        if sweep == "auto":
            stopped = f"reached the largest batch tried ({options.max_batch})"
    return BenchResult(
        model=str(model.path) if model.path is not None else "in-memory model",
        model_sha256=_sha256(model.path) if model.path is not None else None,
        provider=session.provider,
        requested_device=options.device,
        threads=options.threads,
        data=dataset.description,
        random_data=dataset.is_random,
        qdq_nodes=count_qdq(model),
        points=points,
        fixed_batch=fixed_batch,
        sweep=sweep,
        stopped=stopped,
        repeated=repeated,
        machine=machine_info(),
    )


def largest_batch(model: Model, options: BenchOptions) -> int:
    """The most samples one run of `bench` feeds (how much random data to draw)."""
    fixed = model_fixed_batch(model)
    if fixed is not None:
        return fixed
    return max(options.batches) if options.batches is not None else options.max_batch


def model_fixed_batch(model: Model) -> int | None:
    """The batch size the model's inputs fix (their first dimension), or None when dynamic."""
    for spec in model.input_specs():
        if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0:
            return spec.shape[0]
    return None


def _first_batch(dataset: Dataset, size: int) -> dict[str, np.ndarray]:
    for batch in dataset.batches(size):
        return batch.feeds
    raise DataError(f"The data ({dataset.description}) holds no samples to benchmark with.")


def _time(session: Session, feeds: Mapping[str, np.ndarray], options: BenchOptions) -> LatencyStats:
    runs = options.runs if options.budget_s is None else min(options.runs, 3)
    return measure_latency(
        session, feeds, runs=runs, warmup=options.warmup, budget_s=options.budget_s
    )


def _doubling(limit: int) -> list[int]:
    sizes = [1]
    while sizes[-1] * 2 <= limit:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != limit:
        sizes.append(limit)
    return sizes


def fill_batch(feeds: Mapping[str, np.ndarray], size: int) -> tuple[dict[str, np.ndarray], bool]:
    """Feeds with exactly `size` samples: the first `size`, or all of them repeated in order.

    Returns the feeds and whether samples had to be repeated.
    """
    out: dict[str, np.ndarray] = {}
    repeated = False
    for name, array in feeds.items():
        have = int(array.shape[0]) if array.ndim else 0
        if have == 0:
            raise DataError(f"The data for input '{name}' holds no samples to benchmark with.")
        if have >= size:
            out[name] = np.ascontiguousarray(array[:size])
        else:
            index = np.arange(size) % have
            out[name] = np.ascontiguousarray(array[index])
            repeated = True
    return out, repeated


def count_qdq(model: Model) -> int:
    """QuantizeLinear/DequantizeLinear nodes in every graph of the model (any domain)."""
    return sum(1 for graph in model.ir.graphs() for node in graph if node.op_type in QDQ_OPS)


def machine_info() -> dict[str, Any]:
    from graphopt.runtime import ort_version

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort_version(),
    }


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str | None:
    """SHA-256 of one file, as `BenchResult.model_sha256` records it (None if unreadable)."""
    return _sha256(Path(path))


def _short(provider: str) -> str:
    return provider.removesuffix("ExecutionProvider")


def sweep_table(title: str, points: Sequence[Any], best: int, notes: Sequence[str]) -> Table:
    """The batch-size sweep as a table (ORT's and TensorRT's benchmarks): percentiles,
    per-sample time, throughput at the median, and the throughput-optimal batch marked."""
    table = Table(title=title, title_justify="left")
    for column in ("batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "ms/sample",
                   "samples/s (p50)", "runs", ""):  # fmt: skip
        table.add_column(column, justify="right" if column else "left")
    for p in points:
        table.add_row(
            str(p.batch_size),
            f"{p.median_ms:.3f}",
            f"{p.p90_ms:.3f}",
            f"{p.p99_ms:.3f}",
            f"{p.mean_ms:.3f}",
            f"{p.median_ms / p.batch_size:.4f}",
            f"{p.throughput:,.1f}",
            str(p.runs),
            "best" if p.batch_size == best else "",
        )
    table.caption = "\n".join(notes)
    table.caption_justify = "left"
    return table

"""Run and time a TensorRT plan: `graphopt bench model.plan`, and the plan side of
`graphopt validate model.plan --reference model.onnx`.

TensorRT is imported lazily (`graphopt.engine.build.tensorrt_module`). Device memory, copies,
the stream and the timing events go through NVIDIA's cuda-python runtime bindings
(`cuda.bindings.runtime`; `cuda.cudart` in cuda-python before 12.6), the route TensorRT's own
Python samples take (`samples/python/common_runtime.py`). It is part of the `tensorrt` extra
(`pip install "graphopt[tensorrt]"`), not a dependency of graphopt: PyTorch would be a large
dependency for six CUDA calls, and pycuda needs a CUDA toolkit to build.

Timing: one CUDA event is recorded on the stream before and one after `execute_async_v3`,
with the inputs already on the device, and the elapsed time between them is the latency of one
inference: the GPU compute time, as trtexec reports it, without host-device copies.

What runs without TensorRT (and is tested on CPU): the plan's signature logic (`PlanSignature`:
batch sizes from a profile, the shapes for a batch, fitting data batches into a profile with
padding), the TensorRT-to-numpy type table, the statistics and the result table/JSON.

NOTHING HERE THAT CALLS TensorRT OR CUDA HAS RUN YET: `PlanRunner` is written against the
documented TensorRT 10.x/11.x Python API (named I/O tensors, `set_input_shape`,
`set_tensor_address`, `execute_async_v3`) and cuda-python's runtime API, and is untested on a
machine with a GPU (see the README, "What ran where").
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from graphopt.engine.build import INSTALL_HINT, _gpu_info, _logger, tensorrt_module
from graphopt.errors import DataError, EngineUnavailable, GraphoptError
from graphopt.model import TensorSpec
from graphopt.runtime import LatencyStats

Shape = tuple[int, ...]
PROVIDER = "TensorRT"
PLAN_SUFFIXES = (".plan", ".engine", ".trt")

# TensorRT DataType member names -> numpy types (ml_dtypes for bfloat16 and float8).
_NUMPY_TYPES: dict[str, str] = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "FP8": "float8_e4m3fn",
}


def is_plan_path(path: str | os.PathLike[str]) -> bool:
    """Whether the file name says TensorRT engine (.plan, .engine, .trt)."""
    return Path(path).suffix.lower() in PLAN_SUFFIXES


def numpy_dtype(trt_type_name: str) -> np.dtype:
    """The numpy type of a TensorRT I/O tensor type (by its DataType member name).

    Raises:
        GraphoptError: a type numpy cannot hold per element (INT4, FP4, ...).
    """
    name = _NUMPY_TYPES.get(trt_type_name.upper().removeprefix("DATATYPE."))
    if name is None:
        raise GraphoptError(
            f"The engine has an input or output of TensorRT type {trt_type_name}, which graphopt "
            "cannot feed or read from numpy.",
            hint="Keep sub-byte types (INT4, FP4) inside the network; its inputs and outputs "
            "should be float, half, int or bool.",
        )
    if name in ("bfloat16", "float8_e4m3fn"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def read_plan_bytes(path: str | os.PathLike[str]) -> bytes:
    """The serialized engine, checked before TensorRT is looked for.

    Raises:
        GraphoptError: the file is missing, a folder, unreadable or empty.
    """
    path = Path(path)
    if path.is_dir():
        raise GraphoptError(f"'{path}' is a folder, not a TensorRT plan file.")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise GraphoptError(
            f"The TensorRT plan '{path}' does not exist.",
            hint="Build one with graphopt build MODEL -o OUT.plan.",
        ) from None
    except OSError as exc:
        raise GraphoptError(f"Cannot read the TensorRT plan '{path}' ({exc}).") from None
    if not data:
        raise GraphoptError(f"The TensorRT plan '{path}' is empty.")
    return data


# ---------------------------------------------------------------------------- signature


@dataclass(frozen=True)
class IOTensor:
    """One input or output of an engine.

    Attributes:
        name: the tensor name (TensorRT keeps the ONNX names).
        is_input: input or output.
        dtype: its numpy type.
        shape: the engine's shape, -1 where dynamic.
        ranges: inputs only: (min, opt, max) shapes per optimization profile.
    """

    name: str
    is_input: bool
    dtype: np.dtype
    shape: Shape
    ranges: tuple[tuple[Shape, Shape, Shape], ...] = ()


@dataclass(frozen=True)
class PlanSignature:
    """The inputs and outputs of an engine and its optimization profiles."""

    tensors: tuple[IOTensor, ...]
    num_profiles: int = 1

    @property
    def inputs(self) -> list[IOTensor]:
        return [t for t in self.tensors if t.is_input]

    @property
    def outputs(self) -> list[IOTensor]:
        return [t for t in self.tensors if not t.is_input]

    def check_profile(self, profile: int) -> None:
        if not 0 <= profile < max(self.num_profiles, 1):
            raise GraphoptError(
                f"The engine has {self.num_profiles} optimization profile(s); there is no "
                f"profile {profile}.",
                hint=f"Use --profile 0 to {max(self.num_profiles, 1) - 1}.",
            )

    def _range(self, tensor: IOTensor, profile: int) -> tuple[Shape, Shape, Shape]:
        if tensor.ranges:
            return tensor.ranges[profile]
        return tensor.shape, tensor.shape, tensor.shape

    def batch_range(self, profile: int = 0) -> tuple[int, int, int] | None:
        """(min, opt, max) of the batch axis (axis 0) in `profile`, None when no input has
        one (a rank-0 input); a fixed batch gives min == opt == max."""
        self.check_profile(profile)
        low, opt, high = 1, 1, 1 << 30
        found = False
        for tensor in self.inputs:
            if not tensor.shape:
                continue
            lo, op, hi = (r[0] for r in self._range(tensor, profile))
            found = True
            low, high = max(low, lo), min(high, hi)
            opt = max(opt, op)
        if not found:
            return None
        if low > high:
            raise GraphoptError(
                f"The inputs of profile {profile} do not share a batch size: their first "
                "dimensions have no common range."
            )
        return low, min(max(opt, low), high), high

    def batch_sizes(
        self, profile: int = 0, requested: Sequence[int] | None = None, max_batch: int = 256
    ) -> list[int]:
        """The batch sizes to time: `requested` (each checked against the profile), or the
        powers of two from the profile's minimum batch to its maximum (capped at `max_batch`),
        with the minimum, the optimum and the cap themselves.

        Raises:
            GraphoptError: a requested batch outside the profile's range.
        """
        span = self.batch_range(profile)
        if span is None:
            return [1]
        low, opt, high = span
        if requested is not None:
            outside = [b for b in requested if not low <= b <= high]
            if outside:
                raise GraphoptError(
                    f"Batch size(s) {', '.join(map(str, outside))} are outside profile "
                    f"{profile} of the engine (batch {low} to {high}).",
                    hint="Choose batch sizes in that range, or build the engine with a wider "
                    "--shapes profile.",
                )
            return list(requested)
        cap = max(low, min(high, max_batch))
        sizes = {low, cap}
        if opt <= cap:
            sizes.add(opt)
        power = 1
        while power <= cap:
            if power >= low:
                sizes.add(power)
            power *= 2
        return sorted(sizes)

    def shapes_for_batch(self, batch: int, profile: int = 0) -> dict[str, Shape]:
        """Input shapes for `batch` samples: the profile's optimum with axis 0 set to `batch`
        (a fixed axis 0 keeps its size)."""
        self.check_profile(profile)
        shapes = {}
        for tensor in self.inputs:
            _, opt, _ = self._range(tensor, profile)
            if opt and (not tensor.shape or tensor.shape[0] < 0):
                opt = (batch, *opt[1:])
            shapes[tensor.name] = tuple(opt)
        return shapes

    def input_specs(self, profile: int = 0) -> list[TensorSpec]:
        """The inputs as graphopt's data loaders see them: a dynamic batch axis is named
        "batch", other dynamic axes take the profile's optimum."""
        specs = []
        for tensor in self.inputs:
            _, opt, _ = self._range(tensor, profile)
            dims: list[int | str | None] = []
            for axis, dim in enumerate(tensor.shape):
                if dim >= 0:
                    dims.append(dim)
                elif axis == 0:
                    dims.append("batch")
                else:
                    dims.append(opt[axis])
            specs.append(TensorSpec(tensor.name, tensor.dtype, tuple(dims)))
        return specs

    def fit(
        self, feeds: Mapping[str, np.ndarray], profile: int = 0
    ) -> tuple[dict[str, np.ndarray], int]:
        """Feeds the engine takes for this batch: converted to the engine's types, and padded
        (samples repeated in order) up to the profile's minimum or the fixed batch size.

        Returns:
            The feeds and the number of real samples (rows after it are padding).

        Raises:
            DataError: an input is missing, a batch is larger than the profile allows, a
                non-batch dimension is outside the profile, or a type cannot be converted.
        """
        self.check_profile(profile)
        missing = [t.name for t in self.inputs if t.name not in feeds]
        if missing:
            raise DataError(
                f"The data has no input(s) {', '.join(map(repr, missing))} for the engine.",
                hint=f"The engine takes {', '.join(repr(t.name) for t in self.inputs)}.",
            )
        span = self.batch_range(profile)
        real = next((int(np.shape(feeds[t.name])[0]) for t in self.inputs if t.shape), 1)
        target = real
        if span is not None:
            low, _, high = span
            if real > high:
                raise DataError(
                    f"A batch of {real} samples is larger than profile {profile} of the engine "
                    f"allows (batch {low} to {high}).",
                    hint=f"Use --batch-size {high} or less.",
                )
            target = max(real, low)
        fitted = {}
        for tensor in self.inputs:
            array = np.asarray(feeds[tensor.name])
            array = _convert(array, tensor)
            if tensor.shape and target != real:
                index = np.arange(target) % real
                array = array[index]
            low_shape, _, high_shape = self._range(tensor, profile)
            if len(array.shape) != len(tensor.shape) or any(
                not lo <= dim <= hi
                for dim, lo, hi in zip(array.shape[1:], low_shape[1:], high_shape[1:], strict=True)
            ):
                raise DataError(
                    f"Input '{tensor.name}' has shape {list(array.shape[1:])} per sample, "
                    f"outside profile {profile} of the engine (per sample from "
                    f"{list(low_shape[1:])} to {list(high_shape[1:])}).",
                    hint="Give data the engine's profile covers, or rebuild it with --shapes "
                    "that cover the data.",
                )
            fitted[tensor.name] = np.ascontiguousarray(array)
        return fitted, real


def _convert(array: np.ndarray, tensor: IOTensor) -> np.ndarray:
    if array.dtype == tensor.dtype:
        return array
    # ml_dtypes' bfloat16/float8 have numpy kind "V".
    floats = array.dtype.kind in "fV" and tensor.dtype.kind in "fV"
    integers = array.dtype.kind in "iub" and tensor.dtype.kind in "iub"
    if not (floats or integers):
        raise DataError(
            f"Input '{tensor.name}' holds {array.dtype} values, but the engine takes "
            f"{tensor.dtype}.",
            hint="Give data of the engine's input types.",
        )
    return array.astype(tensor.dtype)


def trim_outputs(
    outputs: Mapping[str, np.ndarray], padded: int, real: int
) -> dict[str, np.ndarray]:
    """Drop the padding rows that `PlanSignature.fit` added (outputs whose axis 0 is the
    padded batch)."""
    if padded == real:
        return dict(outputs)
    return {
        name: value[:real] if np.ndim(value) and value.shape[0] == padded else value
        for name, value in outputs.items()
    }


# ---------------------------------------------------------------------------- statistics


def latency_stats(times_ms: Sequence[float], *, batch: int, warmup: int) -> LatencyStats:
    """Percentiles of per-inference GPU times, in graphopt's latency record."""
    times = np.asarray(times_ms, dtype=np.float64)
    if times.size == 0:
        raise GraphoptError("No timed runs to summarize.")
    return LatencyStats(
        median_ms=float(np.median(times)),
        p90_ms=float(np.percentile(times, 90)),
        mean_ms=float(times.mean()),
        runs=int(times.size),
        warmup=warmup,
        threads=None,
        provider=PROVIDER,
        batch_size=batch,
        p99_ms=float(np.percentile(times, 99)),
        min_ms=float(times.min()),
        max_ms=float(times.max()),
        total_s=float(times.sum()) / 1000.0,
    )


@dataclass
class PlanBenchResult:
    """GPU latency and throughput of one engine, one row per batch size."""

    plan: str
    plan_sha256: str | None
    tensorrt_version: str
    gpu: dict[str, str] | None
    profile: int
    data: str
    random_data: bool
    points: list[LatencyStats]
    sweep: str
    stopped: str | None = None
    repeated: list[int] = field(default_factory=list)

    @property
    def best(self) -> LatencyStats:
        return max(self.points, key=lambda p: p.throughput)

    def notes(self) -> list[str]:
        notes = [
            f"throughput-optimal batch: {self.best.batch_size} "
            f"({self.best.throughput:,.1f} samples/s)",
            "GPU time per inference from CUDA events around execute_async_v3; host-device "
            "copies are not included",
        ]
        if self.random_data:
            notes.append("inputs: random data (pass --data for real samples)")
        if self.repeated:
            sizes = ", ".join(str(b) for b in self.repeated)
            notes.append(f"samples repeated to fill batch {sizes} (the data has fewer)")
        if self.stopped:
            notes.append(f"sweep stopped: {self.stopped}")
        return notes

    def table(self) -> Table:
        gpu = self.gpu["name"] if self.gpu else "unknown GPU"
        title = (
            f"TensorRT benchmark: {Path(self.plan).name} (TensorRT {self.tensorrt_version}, "
            f"{gpu}, profile {self.profile})"
        )
        from graphopt.benchmark import sweep_table

        return sweep_table(title, self.points, self.best.batch_size, self.notes())

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.plan,
            "model_sha256": self.plan_sha256,
            "runtime": "tensorrt",
            "provider": PROVIDER,
            "tensorrt_version": self.tensorrt_version,
            "gpu": self.gpu,
            "profile": self.profile,
            "timing": "GPU compute time per inference (CUDA events), host-device copies excluded",
            "tensorrt_speed": True,
            "data": self.data,
            "random_data": self.random_data,
            "sweep": self.sweep,
            "stopped": self.stopped,
            "repeated_samples_for_batches": self.repeated,
            "best_batch": self.best.batch_size,
            "best_throughput": self.best.throughput,
            "batches": [p.to_dict() for p in self.points],
            "notes": self.notes(),
        }


def sweep_points(
    sizes: Sequence[int],
    measure: Callable[[int], LatencyStats],
    *,
    auto: bool,
    min_gain: float,
    progress: Callable[[LatencyStats], None] | None = None,
) -> tuple[list[LatencyStats], str | None]:
    """Time each batch size; an automatic sweep stops at the first size that is not
    `min_gain` faster per sample than the best before it (as `graphopt bench` on ORT)."""
    points: list[LatencyStats] = []
    for size in sizes:
        stats = measure(size)
        points.append(stats)
        if progress is not None:
            progress(stats)
        if auto and len(points) > 1:
            best = max(points[:-1], key=lambda p: p.throughput)
            if stats.throughput < best.throughput * (1.0 + min_gain):
                return points, (
                    f"batch {size} gave {stats.throughput:,.1f} samples/s, not {min_gain:.0%} "
                    f"more than the best before it ({best.throughput:,.1f} at batch "
                    f"{best.batch_size})"
                )
    return points, None


# ---------------------------------------------------------------------------- CUDA


def cuda_runtime() -> Any:
    """cuda-python's runtime API module, or EngineUnavailable saying how to install it."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError:
            raise EngineUnavailable(
                "Running a TensorRT engine needs NVIDIA's cuda-python (module 'cuda.bindings'), "
                "which is not installed here.",
                hint="Install it with pip install cuda-python (it comes with pip install "
                '"graphopt[tensorrt]").',
            ) from None
    return runtime


class _Cuda:
    """The few cuda-python runtime calls graphopt needs, with errors turned into GraphoptError.

    Every cuda-python runtime function returns a tuple whose first item is a cudaError_t.
    """

    def __init__(self) -> None:
        self.rt = cuda_runtime()

    def check(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            name = self.rt.cudaGetErrorName(err)[1]
            raise GraphoptError(
                f"CUDA failed in {what}: {name.decode() if isinstance(name, bytes) else name}.",
                hint="Check that the NVIDIA driver works (nvidia-smi) and that the GPU has "
                "enough free memory.",
            )
        return rest[0] if len(rest) == 1 else rest

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

    def free(self, pointer: int) -> None:
        self.rt.cudaFree(pointer)

    def to_device(self, pointer: int, array: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(
            self.rt.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, kind, stream),
            "cudaMemcpyAsync (to the GPU)",
        )

    def to_host(self, array: np.ndarray, pointer: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(
            self.rt.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes, kind, stream),
            "cudaMemcpyAsync (from the GPU)",
        )


# ---------------------------------------------------------------------------- runner


class PlanRunner:
    """A deserialized engine with one execution context, a stream and device buffers.

    Use as a context manager; `close()` frees the device memory.
    """

    def __init__(self, plan_path: str | os.PathLike[str], *, profile: int = 0) -> None:
        data = read_plan_bytes(plan_path)
        self.trt = trt = tensorrt_module()
        self.cuda = _Cuda()
        self.path = Path(plan_path)
        self._logger = _logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            detail = "; ".join(self._logger.errors[-3:]) or "no error was logged"
            raise GraphoptError(
                f"TensorRT {trt.__version__} could not load the plan '{plan_path}': {detail}.",
                hint="A plan runs only with the TensorRT version (and, unless built "
                "hardware-compatible, the GPU model) that built it; rebuild it here with "
                "graphopt build.",
            )
        self.signature = read_signature(self.engine, trt)
        self.signature.check_profile(profile)
        self.profile = profile
        self.context = self.engine.create_execution_context()
        self.stream = self.cuda.check(self.cuda.rt.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, capacity in bytes)
        if profile:
            if not self.context.set_optimization_profile_async(profile, self._stream_handle):
                raise GraphoptError(f"TensorRT refused optimization profile {profile}.")

    @property
    def _stream_handle(self) -> int:
        return int(self.stream)

    def __enter__(self) -> PlanRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for pointer, _ in self._buffers.values():
            self.cuda.free(pointer)
        self._buffers.clear()
        if getattr(self, "stream", None) is not None:
            self.cuda.rt.cudaStreamDestroy(self.stream)
            self.stream = None

    def _buffer(self, name: str, nbytes: int) -> int:
        pointer, capacity = self._buffers.get(name, (0, 0))
        if capacity < nbytes:
            if pointer:
                self.cuda.free(pointer)
            pointer = self.cuda.malloc(nbytes)
            self._buffers[name] = (pointer, max(nbytes, 1))
        return pointer

    def prepare(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Set the input shapes, copy the inputs to the GPU and bind every tensor; returns the
        host arrays the outputs will be copied into."""
        for tensor in self.signature.inputs:
            array = feeds[tensor.name]
            if not self.context.set_input_shape(tensor.name, tuple(array.shape)):
                raise DataError(
                    f"TensorRT refused shape {list(array.shape)} for input '{tensor.name}'.",
                    hint="The shape must lie inside the engine's optimization profile.",
                )
            pointer = self._buffer(tensor.name, array.nbytes)
            self.cuda.to_device(pointer, array, self.stream)
            self.context.set_tensor_address(tensor.name, pointer)
        outputs = {}
        for tensor in self.signature.outputs:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(tensor.name))
            if any(d < 0 for d in shape):
                raise GraphoptError(
                    f"Output '{tensor.name}' has a data-dependent shape ({list(shape)}), which "
                    "graphopt's engine runner does not support yet.",
                    hint="Compare such a model with Polygraphy (polygraphy run --trt --onnxrt).",
                )
            host = np.empty(shape, dtype=tensor.dtype)
            self.context.set_tensor_address(tensor.name, self._buffer(tensor.name, host.nbytes))
            outputs[tensor.name] = host
        return outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self._stream_handle):
            detail = "; ".join(self._logger.errors[-3:]) or "no error was logged"
            raise GraphoptError(f"TensorRT failed to run the engine '{self.path}': {detail}.")

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One inference on feeds that fit the profile (see `PlanSignature.fit`)."""
        outputs = self.prepare(feeds)
        self._execute()
        for name, host in outputs.items():
            self.cuda.to_host(host, self._buffers[name][0], self.stream)
        self.cuda.check(self.cuda.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return outputs

    def run_batch(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One inference on a data batch of any size the profile allows (padded and trimmed)."""
        fitted, real = self.signature.fit(feeds, self.profile)
        padded = next((int(a.shape[0]) for a in fitted.values() if a.ndim), real)
        return trim_outputs(self.run(fitted), padded, real)

    def time(
        self,
        feeds: Mapping[str, np.ndarray],
        *,
        runs: int,
        warmup: int,
        budget_s: float | None = None,
        max_runs: int = 100_000,
    ) -> list[float]:
        """GPU milliseconds of `runs` inferences (or as many as `budget_s` allows) after
        `warmup` untimed ones, the inputs copied to the GPU once."""
        rt = self.cuda.rt
        self.prepare(feeds)
        for _ in range(warmup):
            self._execute()
        self.cuda.check(rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        start = self.cuda.check(rt.cudaEventCreate(), "cudaEventCreate")
        end = self.cuda.check(rt.cudaEventCreate(), "cudaEventCreate")
        times: list[float] = []
        began = time.perf_counter()
        limit = max(runs, max_runs) if budget_s is not None else runs
        try:
            while len(times) < limit:
                self.cuda.check(rt.cudaEventRecord(start, self.stream), "cudaEventRecord")
                self._execute()
                self.cuda.check(rt.cudaEventRecord(end, self.stream), "cudaEventRecord")
                self.cuda.check(rt.cudaEventSynchronize(end), "cudaEventSynchronize")
                times.append(float(self.cuda.check(rt.cudaEventElapsedTime(start, end), "timing")))
                spent = time.perf_counter() - began
                if len(times) >= runs and (budget_s is None or spent >= budget_s):
                    break
        finally:
            rt.cudaEventDestroy(start)
            rt.cudaEventDestroy(end)
        return times


def read_signature(engine: Any, trt: Any) -> PlanSignature:
    """The engine's named I/O tensors and their profile ranges (TensorRT 10.x/11.x API)."""
    tensors = []
    profiles = int(engine.num_optimization_profiles)
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        if is_input and engine.is_shape_inference_io(name):
            raise GraphoptError(
                f"Input '{name}' of the engine is a shape tensor, which graphopt's engine runner "
                "does not feed yet.",
                hint="Use trtexec or Polygraphy for engines with shape-tensor inputs.",
            )
        dtype = numpy_dtype(engine.get_tensor_dtype(name).name)
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        ranges: tuple[tuple[Shape, Shape, Shape], ...] = ()
        if is_input:
            ranges = tuple(
                tuple(
                    tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(name, p)
                )  # type: ignore[misc]
                for p in range(profiles)
            )
        tensors.append(IOTensor(name, is_input, dtype, shape, ranges))
    return PlanSignature(tuple(tensors), num_profiles=profiles)


def bench_plan(
    plan_path: str | os.PathLike[str],
    feeds_for: Callable[[PlanSignature, int], tuple[dict[str, np.ndarray], bool]],
    *,
    batches: Sequence[int] | None,
    max_batch: int,
    min_gain: float,
    runs: int,
    warmup: int,
    budget_s: float | None,
    profile: int = 0,
    data: str,
    random_data: bool,
    progress: Callable[[LatencyStats], None] | None = None,
) -> PlanBenchResult:
    """Time the engine at each batch size of `batches`, or over the profile's batch range.

    Args:
        feeds_for: (signature, batch) -> (feeds for that batch, whether samples repeat).

    Raises:
        EngineUnavailable: TensorRT or cuda-python is missing (after the plan file is read).
        GraphoptError: a batch outside the profile, or TensorRT/CUDA failed.
    """
    from graphopt.benchmark import file_sha256

    read_plan_bytes(plan_path)  # a bad file is reported before TensorRT is looked for
    with PlanRunner(plan_path, profile=profile) as runner:
        signature = runner.signature
        sizes = signature.batch_sizes(profile, batches, max_batch)
        repeated: list[int] = []

        def measure(size: int) -> LatencyStats:
            feeds, was_repeated = feeds_for(signature, size)
            fitted, _ = signature.fit(feeds, profile)
            if was_repeated:
                repeated.append(size)
            times = runner.time(fitted, runs=runs, warmup=warmup, budget_s=budget_s)
            return latency_stats(times, batch=size, warmup=warmup)

        auto = batches is None and len(sizes) > 1
        points, stopped = sweep_points(
            sizes, measure, auto=auto, min_gain=min_gain, progress=progress
        )
        return PlanBenchResult(
            plan=os.fspath(plan_path),
            plan_sha256=file_sha256(plan_path),
            tensorrt_version=str(runner.trt.__version__),
            gpu=_gpu_info(),
            profile=profile,
            data=data,
            random_data=random_data,
            points=points,
            sweep="auto" if auto else "list",
            stopped=stopped,
            repeated=repeated,
        )


__all__ = [
    "INSTALL_HINT",
    "IOTensor",
    "PlanBenchResult",
    "PlanRunner",
    "PlanSignature",
    "bench_plan",
    "cuda_runtime",
    "is_plan_path",
    "latency_stats",
    "numpy_dtype",
    "read_plan_bytes",
    "read_signature",
    "sweep_points",
    "trim_outputs",
]

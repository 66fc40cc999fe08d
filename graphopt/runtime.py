"""ONNX Runtime behind one small boundary: sessions, streaming runs, captures, latency.

This is the only module that imports `onnxruntime`, and it does so inside functions, so
importing graphopt stays fast and works where ORT is missing.

CUDA is used only when it really works: `onnxruntime-gpu` lists CUDAExecutionProvider on
machines without a GPU or without the CUDA libraries, and then prints library-load errors
and silently falls back to the CPU. So `resolve_providers` probes once, quietly, by running a
tiny model on CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from graphopt.console import track
from graphopt.errors import GraphoptError, RuntimeFailed
from graphopt.model import EXTERNAL_DATA_THRESHOLD_BYTES, Model, load_model, save_model

if TYPE_CHECKING:
    from graphopt.data import Batch, Dataset

Device = Literal["auto", "cpu", "cuda"]
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
ORT_LOG_ERROR = 3  # ORT severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal
ORT_LOG_FATAL = 4

ModelSource = Model | str | os.PathLike[str] | bytes


# ---------------------------------------------------------------------------- providers


def resolve_providers(device: Device = "auto") -> list[str]:
    """The execution providers to ask ORT for, most preferred first.

    Args:
        device: "cpu"; "cuda" (fails unless CUDA really works); "auto" (CUDA when it really
            works, else CPU).

    Raises:
        RuntimeFailed: "cuda" was asked for and CUDA does not work here, or `device` is not
            one of the three names.
    """
    if device == "cpu":
        return [CPU]
    if device not in ("auto", "cuda"):
        raise RuntimeFailed(f"Unknown device '{device}'.", hint="Use one of: auto, cpu, cuda.")
    if cuda_works():
        return [CUDA, CPU]
    if device == "cuda":
        raise RuntimeFailed(
            "CUDA was requested, but ONNX Runtime cannot run a model on CUDA on this machine "
            "(no GPU, no onnxruntime-gpu, or missing CUDA/cuDNN libraries).",
            hint="Use --device cpu (or auto), or install onnxruntime-gpu with a CUDA and cuDNN "
            "version that matches it (https://onnxruntime.ai/docs/install/).",
        )
    return [CPU]


@functools.cache
def cuda_works() -> bool:
    """Whether a tiny model really runs on CUDAExecutionProvider (probed once, silently)."""
    ort = _ort()
    if CUDA not in ort.get_available_providers():
        return False
    with _silenced():
        ort.set_default_logger_severity(ORT_LOG_FATAL)
        try:
            preload = getattr(ort, "preload_dlls", None)
            if preload is not None:
                with contextlib.suppress(Exception):
                    preload()
            session = ort.InferenceSession(
                _probe_model(), _session_options(None), providers=[CUDA, CPU]
            )
            if session.get_providers()[0] != CUDA:
                return False
            x = np.arange(4, dtype=np.float32)
            (y,) = session.run(None, {"x": x})
            return bool(np.array_equal(y, x + x))
        except Exception:  # any failure to load or run on CUDA means: no CUDA
            return False
        finally:
            ort.set_default_logger_severity(ORT_LOG_ERROR)


def _probe_model() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "graphopt_cuda_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Send everything written to stdout/stderr (Python and C level) to /dev/null."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved: list[tuple[int, int]] = []
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        devnull = -1
    try:
        if devnull >= 0:
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                    os.dup2(devnull, fd)
                except OSError:
                    pass
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        if devnull >= 0:
            os.close(devnull)


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise GraphoptError(
            "ONNX Runtime is not installed, and graphopt needs it to run models.",
            hint="Install onnxruntime-gpu (or onnxruntime on macOS).",
        ) from None
    return onnxruntime


# ---------------------------------------------------------------------------- sessions


class Session:
    """A model loaded into ONNX Runtime.

    Attributes:
        provider: the provider that runs the model ("CPUExecutionProvider", ...).
        input_names: the model's inputs, in order.
        output_names: the model's outputs (with any extra outputs), in order.
        name: how errors refer to the model.
        threads: the intra-op thread count asked for (None: ORT's default).
    """

    def __init__(self, session: Any, *, name: str, threads: int | None) -> None:
        self._session = session
        self.name = name
        self.threads = threads
        self.provider: str = session.get_providers()[0]
        self.input_names: list[str] = [i.name for i in session.get_inputs()]
        self.output_names: list[str] = [o.name for o in session.get_outputs()]

    def run(
        self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run once; return {output name: array} for `outputs` (all outputs when None).

        Raises:
            RuntimeFailed: an unknown output name, or ORT failed (wrong feeds, a kernel error).
        """
        names = list(self.output_names if outputs is None else outputs)
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise RuntimeFailed(
                f"{_cap(self.name)} has no output(s) {_names(unknown)}.",
                hint=f"Its outputs are {_names(self.output_names)}; intermediate tensors must "
                "be exposed with extra_outputs when the session is created.",
            )
        try:
            values = self._session.run(names, dict(feeds))
        except Exception as exc:  # ORT raises its own exception types for every failure
            raise RuntimeFailed(
                f"ONNX Runtime failed to run {self.name}: {_first_line(exc)}",
                hint=f"Check the inputs: the model takes {self._describe_inputs()}.",
            ) from None
        return dict(zip(names, values, strict=True))

    @property
    def device_type(self) -> str:
        """Where the session's tensors live: "cuda" or "cpu" (OrtValue device names)."""
        return "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"

    def io_binding(self) -> Any:
        """A fresh ONNX Runtime IOBinding of this session (inputs and outputs bound as
        OrtValues on the device, see `run_bound`)."""
        return self._session.io_binding()

    def to_device(self, array: np.ndarray) -> Any:
        """A copy of `array` as an OrtValue on the session's device (for `io_binding`).

        A copy on the CPU too: there ORT would otherwise share the array's memory, and a
        bound output written into it would change the caller's array."""
        copy = np.array(array, copy=True, order="C")
        return _ort().OrtValue.ortvalue_from_numpy(copy, self.device_type, 0)

    def device_buffer(self, shape: Sequence[int], dtype: np.dtype) -> Any:
        """An uninitialised OrtValue on the session's device, for a bound output."""
        return _ort().OrtValue.ortvalue_from_shape_and_type(
            list(shape), np.dtype(dtype).type, self.device_type, 0
        )

    def run_bound(self, binding: Any) -> None:
        """Run once with `binding` (from `io_binding`); outputs land where they are bound.

        Raises:
            RuntimeFailed: ORT failed (a wrong binding, a kernel error).
        """
        try:
            self._session.run_with_iobinding(binding)
        except Exception as exc:  # ORT raises its own exception types for every failure
            raise RuntimeFailed(
                f"ONNX Runtime failed to run {self.name}: {_first_line(exc)}",
                hint=f"Check the inputs: the model takes {self._describe_inputs()}.",
            ) from None

    def end_profiling(self) -> str:
        """Stop the profiler (see `create_session(profile=)`); return the trace's path."""
        return str(self._session.end_profiling())

    def _describe_inputs(self) -> str:
        parts = []
        for arg in self._session.get_inputs():
            shape = "x".join("?" if not isinstance(d, int) else str(d) for d in arg.shape)
            parts.append(f"'{arg.name}' {arg.type} {shape or 'scalar'}")
        return ", ".join(parts)


def create_session(
    model: ModelSource,
    *,
    device: Device = "auto",
    threads: int | None = None,
    extra_outputs: Sequence[str] = (),
    workdir: Path | None = None,
    only_extra: bool = False,
    profile: str | None = None,
) -> Session:
    """Load a model into ONNX Runtime.

    A model under 1.8 GB is handed over as bytes; a bigger one is saved with external data
    into a fresh folder under `workdir` (which it then needs), removed with the session.

    Args:
        model: a Model, a path to an .onnx file, or serialized bytes. Never modified.
        device: see `resolve_providers`.
        threads: ORT intra-op threads (None: ORT's default).
        extra_outputs: intermediate tensors of the main graph to expose as extra outputs.
        only_extra: expose only `extra_outputs` and drop the nodes they do not need (ONNX
            Runtime runs every node of a graph whatever outputs are fetched).
        workdir: a scratch folder, needed for models too big to pass as bytes.
        profile: turn on ONNX Runtime's per-node profiler, writing a Chrome-trace JSON whose
            path starts with this prefix (`Session.end_profiling` returns the path).

    Raises:
        RuntimeFailed: ORT refused the model, a tensor in `extra_outputs` does not exist,
            or a big model came without a workdir.
    """
    providers = resolve_providers(device)
    if threads is not None and threads < 1:
        raise RuntimeFailed(f"threads={threads} must be at least 1.")
    name = _model_name(model)
    if extra_outputs:
        model = _with_outputs(_as_model(model, name), extra_outputs, name, only=only_extra)
    cleanup: Path | None = None
    source: bytes | str
    if isinstance(model, Model):
        if model.initializer_bytes() < EXTERNAL_DATA_THRESHOLD_BYTES:
            source = model.to_proto().SerializeToString()
        else:
            if workdir is None:
                raise RuntimeFailed(
                    f"{_cap(name)} is too large to hand to ONNX Runtime in memory and no working "
                    "folder was given to save it in.",
                    hint="Pass workdir= (the pipeline's scratch folder).",
                )
            Path(workdir).mkdir(parents=True, exist_ok=True)
            cleanup = Path(tempfile.mkdtemp(prefix="session-", dir=workdir))
            source = os.fspath(save_model(model, cleanup / "model.onnx", external_data=True).path)
    elif isinstance(model, bytes):
        source = model
    else:
        # A model file is untrusted: load_model refuses external data outside its folder
        # (without reading the weights) before ORT opens anything.
        load_model(model)
        source = os.fspath(model)
    ort = _ort()
    ort.set_default_logger_severity(ORT_LOG_ERROR)
    options = _session_options(threads)
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    if isinstance(model, Model) and _has_float8(model):
        # ORT 1.31's QDQ fusions take float8 Q/DQ for int8 ones (QLinearConv then refuses
        # the model) and, with those off, an extended-level rewrite changes the results;
        # basic optimizations run the float8 Q/DQ as written.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        session = ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types for every failure
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise RuntimeFailed(
            f"ONNX Runtime could not load {name}: {_first_line(exc)}",
            hint="Check the model with `onnx.checker.check_model`; an unsupported operator or "
            "opset needs a newer onnxruntime.",
        ) from None
    wrapped = Session(session, name=name, threads=threads)
    if cleanup is not None:
        weakref.finalize(wrapped, shutil.rmtree, cleanup, ignore_errors=True)
    return wrapped


def _has_float8(model: Model) -> bool:
    """Whether the main graph holds a float8 initializer (fp8 weights or zero points)."""
    return any(
        value.dtype is not None and value.dtype.name.startswith("FLOAT8")
        for value in model.ir.graph.initializers.values()
    )


def _session_options(threads: int | None) -> Any:
    options = _ort().SessionOptions()
    options.log_severity_level = ORT_LOG_ERROR
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def _model_name(model: ModelSource) -> str:
    if isinstance(model, Model):
        return f"model '{model.path.name}'" if model.path is not None else "the in-memory model"
    if isinstance(model, bytes):
        return "the serialized model"
    return f"model '{os.fspath(model)}'"


def _as_model(model: ModelSource, name: str) -> Model:
    if isinstance(model, Model):
        return model
    if isinstance(model, bytes):
        import onnx_ir as ir

        try:
            return Model(ir=ir.from_proto(_parse_proto(model)))
        except GraphoptError:
            raise
        except Exception as exc:
            raise RuntimeFailed(
                f"{_cap(name)} could not be read as ONNX ({_first_line(exc)})."
            ) from None
    return load_model(model)


def _parse_proto(data: bytes) -> Any:
    import onnx

    try:
        return onnx.load_from_string(data)
    except Exception as exc:
        raise RuntimeFailed(
            f"The serialized model is not a readable ONNX model ({_first_line(exc)})."
        ) from None


def _with_outputs(model: Model, names: Sequence[str], name: str, *, only: bool = False) -> Model:
    """A copy of the model whose graph also outputs the named intermediate tensors (with
    `only`, outputs just those, without the nodes they do not need).

    The exposed values keep whatever type and shape onnx-ir knows; ORT infers the rest.
    """
    copy = model.copy()
    graph = copy.graph
    values = {v.name: v for v in graph.inputs}
    values.update(graph.initializers)
    for node in graph:
        for output in node.outputs:
            if output.name:
                values[output.name] = output
    existing = {v.name for v in graph.outputs}
    missing = [n for n in names if n not in values]
    if missing:
        raise RuntimeFailed(
            f"{_cap(name)} has no tensor(s) {_names(missing)} in its main graph to expose as outputs.",
            hint="Use names of node outputs, graph inputs or initializers "
            "(`graphopt inspect` lists them).",
        )
    if only:
        graph.outputs.clear()
        existing = set()
    for tensor in names:
        if tensor not in existing:
            graph.outputs.append(values[tensor])
            existing.add(tensor)
    if only:
        from onnx_ir.passes import common as ir_passes

        ir_passes.RemoveUnusedNodesPass()(copy.ir)
    return copy


# ---------------------------------------------------------------------------- streaming


def run_dataset(
    session: Session,
    dataset: Dataset,
    *,
    batch_size: int = 32,
    outputs: Sequence[str] | None = None,
    description: str = "running",
) -> Iterator[tuple[Batch, dict[str, np.ndarray]]]:
    """Stream the dataset through the session, one batch at a time, with progress on stderr.

    Yields:
        (batch, {output name: array}) for every batch, in the dataset's order.
    """
    batches = dataset.batches(batch_size)
    for batch in track(batches, total=dataset.num_batches(batch_size), description=description):
        yield batch, session.run(batch.feeds, outputs)


def capture(
    model: Model,
    dataset: Dataset,
    tensor_names: Sequence[str],
    callback: Callable[[Batch, dict[str, np.ndarray]], None],
    *,
    batch_size: int = 32,
    device: Device = "auto",
    threads: int | None = None,
    workdir: Path | None = None,
) -> None:
    """Run the model over the dataset and hand each batch's named tensors to `callback`
    (see `captured`)."""
    for batch, values in captured(
        model,
        dataset,
        tensor_names,
        batch_size=batch_size,
        device=device,
        threads=threads,
        workdir=workdir,
    ):
        callback(batch, values)


def captured(
    model: Model,
    dataset: Dataset,
    tensor_names: Sequence[str],
    *,
    batch_size: int = 32,
    device: Device = "auto",
    threads: int | None = None,
    workdir: Path | None = None,
) -> Iterator[tuple[Batch, dict[str, np.ndarray]]]:
    """Run the model over the dataset, yielding each batch with its named tensors.

    Intermediate tensors are exposed as extra outputs on a copy of the model; only the
    requested tensors are computed and fetched, and nothing is kept once the consumer moves
    on to the next batch, so memory stays at one batch of activations.
    """
    names = list(dict.fromkeys(tensor_names))
    session = create_session(
        model,
        device=device,
        threads=threads,
        extra_outputs=names,
        workdir=workdir,
        only_extra=True,
    )
    yield from run_dataset(
        session, dataset, batch_size=batch_size, outputs=names, description="capturing"
    )


# ---------------------------------------------------------------------------- latency


@dataclass
class LatencyStats:
    """Wall-clock time of `session.run` (host-to-device copies included on a GPU).

    `throughput` (samples per second) is taken at the median latency, which a few slow runs
    on a busy machine do not move; `total_s` (the sum of the timed runs) gives the mean.
    """

    median_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    warmup: int
    threads: int | None
    provider: str
    batch_size: int
    p99_ms: float = 0.0
    min_ms: float = 0.0
    max_ms: float = 0.0
    total_s: float = 0.0

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency (0 when the median is 0)."""
        return self.batch_size * 1000.0 / self.median_ms if self.median_ms > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["throughput"] = self.throughput
        return data


def measure_latency(
    model: ModelSource | Session,
    feeds: Mapping[str, np.ndarray],
    *,
    runs: int = 50,
    warmup: int = 5,
    threads: int | None = None,
    device: Device = "auto",
    budget_s: float | None = None,
    max_runs: int = 100_000,
) -> LatencyStats:
    """Time `runs` runs on the same feeds after `warmup` untimed ones.

    With `budget_s`, runs go on until that many seconds of timed runs have passed (at least
    `runs` of them, at most `max_runs`), so a slow model is not timed for ever and a fast one
    gets enough runs for its p99.

    A given Session is used as is (its own threads and provider; `threads` and `device` are
    then not used).
    """
    if runs < 1 or warmup < 0:
        raise RuntimeFailed(f"Latency needs runs >= 1 and warmup >= 0 (got {runs}, {warmup}).")
    if budget_s is not None and budget_s <= 0:
        raise RuntimeFailed(f"A time budget must be positive (got {budget_s} s).")
    session = (
        model
        if isinstance(model, Session)
        else create_session(model, device=device, threads=threads)
    )
    feeds = dict(feeds)
    for _ in range(warmup):
        session.run(feeds)
    limit = max(runs, max_runs) if budget_s is not None else runs
    times = np.empty(limit, dtype=np.float64)
    spent = 0.0
    count = 0
    while count < limit:
        start = time.perf_counter()
        session.run(feeds)
        elapsed = time.perf_counter() - start
        times[count] = elapsed * 1000.0
        spent += elapsed
        count += 1
        if count >= runs and (budget_s is None or spent >= budget_s):
            break
    times = times[:count]
    first = next(iter(feeds.values()), None)
    batch = int(first.shape[0]) if first is not None and first.ndim else 1
    return LatencyStats(
        median_ms=float(np.median(times)),
        p90_ms=float(np.percentile(times, 90)),
        mean_ms=float(times.mean()),
        runs=count,
        warmup=warmup,
        threads=session.threads,
        provider=session.provider,
        batch_size=batch,
        p99_ms=float(np.percentile(times, 99)),
        min_ms=float(times.min()),
        max_ms=float(times.max()),
        total_s=spent,
    )


def ort_version() -> str:
    """The installed ONNX Runtime's version string."""
    return str(_ort().__version__)


def _names(names: Sequence[str]) -> str:
    return ", ".join(f"'{n}'" for n in names) if names else "(none)"


def _first_line(exc: BaseException) -> str:
    """ORT's first line, plus the next when the first only announces it ("...indices.")."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and lines[0].rstrip(".").endswith(("indices", ":")):
        return f"{lines[0]} {lines[1]}"
    return lines[0]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]

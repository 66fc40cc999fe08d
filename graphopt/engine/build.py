"""Build a TensorRT plan from an ONNX file (TensorRT 10.x and 11.x Python API).

This is the only module that imports `tensorrt`, inside `tensorrt_module()`, so every other
module imports where TensorRT is absent. Everything that can be checked without TensorRT
(options, shape profiles against the model, output paths) is checked first by the caller
(`graphopt.engine.prepare_build`), so a bad request is reported as such on any machine.

Version differences handled here (from NVIDIA's 10.x -> 11.x migration guide):

- 10.x: networks are weakly typed unless created with `NetworkDefinitionCreationFlag.
  STRONGLY_TYPED`; the FP16/BF16 builder flags exist (and are refused by strongly typed
  networks). graphopt makes Q/DQ models strongly typed, so TensorRT follows their Q/DQ.
- 11.x: every network is strongly typed; the precision flags are gone (FP16 comes from the
  ONNX model's own types, e.g. after ModelOpt AutoCast).
- The engine inspector's JSON splits "Format/Datatype" into "Format" and "DataType" in 11.x;
  `graphopt.engine.layers` reads both.

NOTHING IN THIS MODULE HAS RUN YET: it is written against the documented Python API and is
untested on a machine with TensorRT (see the README, "What ran where").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphopt.engine.layers import layer_precisions, precision_counts
from graphopt.engine.options import BuildOptions
from graphopt.engine.shapes import ShapeProfile
from graphopt.errors import EngineUnavailable, GraphoptError

INSTALL_HINT = (
    'Install it with pip install "graphopt[tensorrt]" on a Linux or Windows machine with an '
    "NVIDIA GPU and its driver. PyPI alone does not suffice: the tensorrt-cu12/cu13 library "
    "packages on PyPI only download the real wheels from NVIDIA's package index "
    "(pypi.nvidia.com) at install time, so that index must be reachable (or install "
    "TensorRT from NVIDIA's tar/deb packages). TensorRT-RTX is a different product and does "
    "not support Hopper GPUs."
)


class EngineBuildFailed(GraphoptError):
    """TensorRT refused the model (parser errors) or could not build an engine."""


@dataclass
class BuildResult:
    """What `build_engine` wrote and what the sidecar says."""

    plan_path: Path
    sidecar_path: Path
    sidecar: dict[str, Any]


def tensorrt_module() -> Any:
    """Import TensorRT (10.x or newer), or raise EngineUnavailable saying how to install it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineUnavailable(
            "TensorRT is not installed here (the Python module 'tensorrt' cannot be "
            f"imported: {exc}), so graphopt cannot build an engine.",
            hint=INSTALL_HINT,
        ) from None
    except OSError as exc:  # the bindings load libnvinfer at import time
        raise EngineUnavailable(
            f"TensorRT's Python module is installed but its libraries do not load ({exc}).",
            hint=INSTALL_HINT,
        ) from None
    if tensorrt_major(trt) < 10:
        raise EngineUnavailable(
            f"TensorRT {trt.__version__} is too old: graphopt builds with TensorRT 10 or 11.",
            hint=INSTALL_HINT,
        )
    return trt


def tensorrt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    options: BuildOptions,
    profiles: list[ShapeProfile],
    *,
    has_qdq: bool,
) -> BuildResult:
    """Parse `onnx_path` with TensorRT's ONNX parser, build, and write the plan and sidecar.

    Args:
        onnx_path: the ONNX file (external data beside it is read by the parser).
        plan_path: where the serialized engine goes; `<plan>.json` gets the sidecar.
        options: builder settings, already checked.
        profiles: optimization profiles, already checked against the model's inputs.
        has_qdq: whether the model holds Q/DQ nodes (strongly typed on 10.x by default).

    Raises:
        EngineUnavailable: TensorRT is not installed or too old.
        EngineBuildFailed: the parser rejected nodes (all of them are listed), a profile does
            not fit the parsed network, or the build failed.
        GraphoptError: an option this TensorRT version does not have.
    """
    trt = tensorrt_module()
    major = tensorrt_major(trt)
    logger = _logger(trt)
    strongly_typed = _strongly_typed(options, has_qdq, major)
    if major >= 11 and (options.fp16 or options.bf16):
        raise GraphoptError(
            f"TensorRT {trt.__version__} removed the FP16/BF16 builder flags: networks are "
            "strongly typed and run in the ONNX model's own types.",
            hint="Drop --fp16/--bf16 and convert the model to mixed precision first (e.g. "
            "NVIDIA ModelOpt AutoCast), or build with TensorRT 10.",
        )

    builder = trt.Builder(logger)
    flags = 0
    if major == 10 and strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        raise EngineBuildFailed(_parser_errors(parser, onnx_path))
    _check_network_inputs(network, profiles)

    config = builder.create_builder_config()
    if options.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb * 2**20)
    if options.opt_level is not None:
        config.builder_optimization_level = options.opt_level
    if options.sparsity:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if options.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if options.bf16:
        config.set_flag(trt.BuilderFlag.BF16)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if options.hardware_compat == "ampere+":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    elif options.hardware_compat == "same-cc":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY
    # DETAILED lets the engine inspector report each layer's types for the sidecar.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    cache_in = _read_timing_cache(options.timing_cache_path)
    if options.timing_cache_path is not None:
        cache = config.create_timing_cache(cache_in)
        config.set_timing_cache(cache, ignore_mismatch=False)
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for r in profile.inputs:
            trt_profile.set_shape(r.name, r.min, r.opt, r.max)
        config.add_optimization_profile(trt_profile)

    print(f"building a TensorRT {trt.__version__} engine (this can take minutes)", file=sys.stderr)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        detail = "; ".join(logger.errors[-5:]) or "no error was logged"
        raise EngineBuildFailed(
            f"TensorRT could not build an engine from '{onnx_path}': {detail}.",
            hint="Check the shapes (--shapes), the workspace (--workspace) and TensorRT's log "
            "above.",
        )
    plan_bytes = bytes(memoryview(serialized))
    if options.timing_cache_path is not None:
        written = bytes(memoryview(config.get_timing_cache().serialize()))
        _write_atomic(options.timing_cache_path, written)

    engine = trt.Runtime(logger).deserialize_cuda_engine(plan_bytes)
    info: dict[str, Any] = {}
    if engine is not None:
        inspector = engine.create_engine_inspector()
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = layer_precisions(info)
    sidecar = {
        "tensorrt_version": str(trt.__version__),
        "gpu": _gpu_info(),
        "source_model": os.fspath(onnx_path),
        "strongly_typed": strongly_typed,
        "options": options.to_dict(),
        "profiles": [p.to_dict() for p in profiles],
        "build_seconds": round(seconds, 3),
        "plan_bytes": len(plan_bytes),
        "timing_cache": {
            "path": options.timing_cache,
            "bytes_read": len(cache_in),
        },
        "precision_counts": precision_counts(layers),
        "layers": [layer.to_dict() for layer in layers],
    }
    sidecar_path = plan_path.with_name(plan_path.name + ".json")
    _write_atomic(plan_path, plan_bytes)
    _write_atomic(sidecar_path, (json.dumps(sidecar, indent=2) + "\n").encode("utf-8"))
    return BuildResult(plan_path=plan_path, sidecar_path=sidecar_path, sidecar=sidecar)


def _strongly_typed(options: BuildOptions, has_qdq: bool, major: int) -> bool:
    if major >= 11:
        return True
    if options.strongly_typed is not None:
        return options.strongly_typed
    return has_qdq and not (options.fp16 or options.bf16)


def _logger(trt: Any) -> Any:
    """A TensorRT logger that prints warnings and errors and keeps the errors."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(str(msg))
            if severity <= trt.ILogger.Severity.WARNING:
                print(f"tensorrt: {msg}", file=sys.stderr)

    return _Logger()


def _parser_errors(parser: Any, onnx_path: Path) -> str:
    """Every error the ONNX parser recorded, one per node, not just the first."""
    lines = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = error.node()
        where = f"node {node}" if node >= 0 else "the graph"
        name = _call(error, "node_name")
        op = _call(error, "node_operator")
        if name or op:
            where += f" ('{name}', {op})" if op else f" ('{name}')"
        lines.append(f"{where}: {error.desc()} [{error.code()}]")
    listing = "; ".join(lines) or "no error detail was recorded"
    return (
        f"TensorRT's ONNX parser rejected '{onnx_path}' ({parser.num_errors} error(s)): {listing}."
    )


def _call(error: Any, method: str) -> str:
    """ParserError.node_name()/node_operator() exist from TensorRT 10.0 on."""
    fn = getattr(error, method, None)
    return str(fn()) if callable(fn) else ""


def _check_network_inputs(network: Any, profiles: list[ShapeProfile]) -> None:
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    for index, profile in enumerate(profiles):
        unknown = [r.name for r in profile.inputs if r.name not in names]
        if unknown:
            raise EngineBuildFailed(
                f"--shapes profile {index} names {', '.join(unknown)}, which TensorRT's parsed "
                f"network does not take as input (it takes {', '.join(sorted(names))})."
            )


def _read_timing_cache(path: Path | None) -> bytes:
    if path is None or not path.exists():
        return b""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise GraphoptError(f"Cannot read the timing cache '{path}' ({exc}).") from None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _gpu_info() -> dict[str, str] | None:
    """Name and compute capability of GPU 0 from nvidia-smi (None when it cannot tell)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()[0] if out.strip() else ""
    parts = [p.strip() for p in first.split(",")]
    if len(parts) < 3:
        return None
    return {"name": parts[0], "compute_capability": parts[1], "driver": parts[2]}

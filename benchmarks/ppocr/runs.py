"""What one child process of the benchmark does: one job, its result as a dict.

Each function runs in its own process (the driver measures that process's wall time and peak
RSS with os.wait4), imports only what its job needs, and returns plain JSON-able data.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ppocr.model import INPUT_NAME, CTCDecoder, read_characters

ORT_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


# ----------------------------------------------------------------------------- data


def read_rows(npz: Path, count: int | None = None, key: str = "x") -> np.ndarray:
    """The first `count` rows of one array of an uncompressed or compressed .npz, read from
    the stream (np.load would read the whole array)."""
    with zipfile.ZipFile(npz) as archive, archive.open(f"{key}.npy") as stream:
        version = np.lib.format.read_magic(stream)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(stream)
        if fortran:
            raise ValueError(f"{npz}:{key} is stored in Fortran order")
        rows = shape[0] if count is None else min(count, shape[0])
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        data = stream.read(rows * row_items * dtype.itemsize)
    return np.frombuffer(data, dtype=dtype).reshape((rows, *shape[1:])).copy()


def batches(x: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    for start in range(0, len(x), batch):
        yield x[start : start + batch]


def _session(model: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(
        os.fspath(model), sess_options=options, providers=["CPUExecutionProvider"]
    )


# ----------------------------------------------------------------------------- calibration runs


def fp32_forward(model: Path, calib: Path, samples: int, batch: int) -> dict[str, Any]:
    """The floor: one FP32 forward pass over the calibration samples, as calibration does."""
    start = time.perf_counter()
    x = read_rows(calib, samples)
    session = _session(model)
    mark = time.perf_counter()
    for chunk in batches(x, batch):
        session.run(None, {INPUT_NAME: chunk})
    end = time.perf_counter()
    return {"work_s": end - start, "forward_s": end - mark, "samples": len(x)}


def ort_prepare(model: Path, out: Path) -> dict[str, Any]:
    """What ORT's documentation asks for before quantize_static, made to work on this model.

    quant_pre_process (ONNX shape inference, ORT's basic graph optimisations: it folds the
    Constant nodes that hold this model's weights into initializers and fuses BatchNorm into
    Conv; without it ORT quantizes those weights as if they were activations, per tensor, with
    the activation type). Two changes were needed: the model is converted to opset 13 first
    (at opset 12, quantize_static writes per-channel DequantizeLinear nodes with an `axis`
    that opset 12 does not have, and ORT refuses the model), and symbolic shape inference is
    skipped (it stops with "Incomplete symbolic shape inference" on this model).
    """
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    upgraded = out.with_name(out.stem + ".opset13.onnx")
    proto = version_converter.convert_version(onnx.load(os.fspath(model)), 13)
    onnx.save(proto, os.fspath(upgraded))
    quant_pre_process(os.fspath(upgraded), os.fspath(out), skip_symbolic_shape=True)
    upgraded.unlink()
    return {"work_s": time.perf_counter() - start, "output_bytes": out.stat().st_size}


def ort_quantize(
    model: Path, calib: Path, samples: int, batch: int, method: str, activations: str, out: Path
) -> dict[str, Any]:
    """onnxruntime.quantization.quantize_static: QDQ, per-channel int8 weights; activations
    uint8 (ORT's default) or int8 with ActivationSymmetric (what TensorRT takes)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.x = read_rows(calib, samples)
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = ({INPUT_NAME: chunk} for chunk in batches(self.x, batch))

    extra = {"ActivationSymmetric": True} if activations == "int8" else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    quantize_static(
        os.fspath(model),
        os.fspath(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QInt8 if activations == "int8" else QuantType.QUInt8,
        calibrate_method=getattr(CalibrationMethod, ORT_METHODS[method]),
        extra_options=extra,
    )
    return {"work_s": time.perf_counter() - start, "output_bytes": out.stat().st_size}


def graphopt_quantize(
    model: Path,
    calib: Path,
    samples: int,
    batch: int,
    method: str,
    target: str,
    ort_kernels: str,
    out: Path,
    workdir: Path,
) -> dict[str, Any]:
    """graphopt's Python API: load, the cleanup pass, the quantize pass, save. `ort_kernels`
    goes to the pass with target=ort-cpu (the kernels it chose are in the result)."""
    from graphopt.context import Context
    from graphopt.data import open_dataset
    from graphopt.model import load_model, save_model
    from graphopt.pipeline import run_pipeline
    from graphopt.recipe import recipe_from_mapping

    options = {"precision": "int8", "target": target, "calibrator": method, "samples": samples}
    if target == "ort-cpu":
        options["ort_kernels"] = ort_kernels
    recipe = recipe_from_mapping(
        {"passes": ["cleanup", {"quantize": options}]}, source="bench_quantize_ppocr"
    )
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    loaded = load_model(model)
    dataset = open_dataset(calib, loaded.input_specs())
    ctx = Context(workdir=workdir, calib_data=dataset, device="cpu", batch_size=batch)
    result = run_pipeline(loaded, recipe, ctx)
    saved = save_model(result.model, out)
    work = time.perf_counter() - start
    steps = {s.name: s.seconds for s in result.steps if s.name != "original"}
    quantize = next(s for s in result.steps if s.name == "quantize")
    return {
        "work_s": work,
        "graphopt_tree": graphopt_tree(),
        "steps_s": steps,
        "options": options,
        "pass_stats": json.loads(json.dumps(quantize.pass_stats, default=str)),
        "ort_kernels": quantize.pass_stats.get("ort_kernels"),
        "warnings": quantize.warnings,
        "output_bytes": saved.total_bytes(),
    }


def graphopt_cleanup(model: Path, out: Path, workdir: Path) -> dict[str, Any]:
    """graphopt's lossless cleanup pass alone (the first step of every graphopt quantize run):
    load, cleanup, save; the FP32 model it leaves."""
    from graphopt.context import Context
    from graphopt.model import load_model, save_model
    from graphopt.pipeline import run_pipeline
    from graphopt.recipe import recipe_from_mapping

    recipe = recipe_from_mapping({"passes": ["cleanup"]}, source="bench_quantize_ppocr")
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = run_pipeline(load_model(model), recipe, Context(workdir=workdir, device="cpu"))
    saved = save_model(result.model, out)
    cleanup = next(s for s in result.steps if s.name == "cleanup")
    return {
        "work_s": time.perf_counter() - start,
        "graphopt_tree": graphopt_tree(),
        "pass_stats": json.loads(json.dumps(cleanup.pass_stats, default=str)),
        "warnings": cleanup.warnings,
        "output_bytes": saved.total_bytes(),
    }


def graphopt_tree() -> dict[str, Any]:
    """The commit graphopt ran from, and its files that differ from it (others may be editing
    graphopt while the benchmark runs)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return ""
        return done.stdout.strip()

    changed = git("status", "--porcelain", "--", "graphopt", "passes", "calibration")
    return {"commit": git("rev-parse", "HEAD"), "uncommitted": changed.splitlines()}


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    model: Path, test: Path, batch: int, reference: Path, write_reference: bool
) -> dict[str, Any]:
    """CER on the test lines; with write_reference, store the probabilities [N, T, C] as the
    FP32 reference (a .npy beside `reference`'s texts), else compare with them."""
    from ppocr.lines import read_labels
    from ppocr.metrics import Accuracy, Fidelity

    truths = read_labels(test)
    decoder = CTCDecoder(read_characters(model))
    x = read_rows(test)
    session = _session(model)
    accuracy, accuracy_nospace = Accuracy(), Accuracy()
    fidelity = Fidelity()
    texts_path = reference.with_suffix(".texts.json")
    ref_probs = None if write_reference else np.load(reference, mmap_mode="r")
    ref_texts = None if write_reference else json.loads(texts_path.read_text())
    writer = None
    predictions: list[str] = []
    start = time.perf_counter()
    for i, chunk in enumerate(batches(x, batch)):
        probs = session.run(None, {INPUT_NAME: chunk})[0]
        lo, hi = i * batch, i * batch + len(chunk)
        if write_reference:
            if writer is None:
                writer = np.lib.format.open_memmap(
                    reference, mode="w+", dtype=np.float32, shape=(len(x), *probs.shape[1:])
                )
            writer[lo:hi] = probs
        else:
            fidelity.add(ref_probs[lo:hi], probs)
        texts = [t.strip() for t in decoder(probs)]
        predictions.extend(texts)
        accuracy.add(texts, truths[lo:hi])
        accuracy_nospace.add(
            [t.replace(" ", "") for t in texts], [t.replace(" ", "") for t in truths[lo:hi]]
        )
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        **accuracy.to_dict(),
        "cer_no_spaces": accuracy_nospace.to_dict()["cer"],
        "eval_s": seconds,
    }
    if write_reference:
        writer.flush()
        texts_path.write_text(json.dumps(predictions, ensure_ascii=False))
    else:
        fidelity.add_texts(ref_texts, predictions)
        result.update(fidelity.to_dict())
    return result


def latency(
    model: Path, test: Path, threads: list[int], sizes: list[int], runs: int, warmup: int
) -> dict[str, Any]:
    """ORT CPU latency: median and p90 of `runs` timed runs after `warmup`, per threads and
    batch size; batch 16 runs get max(3, runs // 4) timed runs."""
    x = read_rows(test, max(sizes))
    rows = []
    for count in threads:
        session = _session(model, threads=count)
        for size in sizes:
            feed = {INPUT_NAME: np.ascontiguousarray(x[:size])}
            timed = runs if size == 1 else max(3, runs // 4)
            for _ in range(warmup):
                session.run(None, feed)
            times = []
            for _ in range(timed):
                mark = time.perf_counter()
                session.run(None, feed)
                times.append((time.perf_counter() - mark) * 1000.0)
            rows.append(
                {
                    "threads": count,
                    "batch": size,
                    "median_ms": float(np.median(times)),
                    "p90_ms": float(np.percentile(times, 90)),
                    "runs": timed,
                    "warmup": warmup,
                }
            )
        del session
    return {"rows": rows}

"""Benchmark: quantize a 2.4 GB model (external data), graphopt against ONNX Runtime's tool.

The model is bench_large_model.py's (x[N,7168] -> (MatMul -> Relu) x 12 -> y, one float32
weight of about 196 MiB per layer, all in one external data file), generated into the cache
folder once. Each run is its own child process under a memory limit (RLIMIT_AS) and a timeout,
so one that blows up is recorded as OOM or timeout; wall time and peak RSS are that child's
(os.wait4), heap and mapped pages are sampled every 10 ms:

    graphopt int8     load_model -> quantize(target=tensorrt, calibrator=minmax|mse) ->
                      save_model (external data), 64 calibration samples
    graphopt int4     load_model -> quantize(precision=int4, weight_method=rtn) -> save_model
    ort int8          onnxruntime.quantization.quantize_static (QDQ, per-channel, symmetric
                      int8 activations and weights, MinMax, use_external_data_format=True),
                      the same 64 samples through a CalibrationDataReader

then every output model runs on ONNX Runtime against the FP32 model on 16 held-out samples
(cosine and SQNR of y). Prints a table and writes a JSON report. Not run by CI; needs about
8 GB of free disk and 16 GB of memory.

    python benchmarks/bench_large_quantize.py [--dir .cache/bench_large_quantize]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
import machine_info  # noqa: E402
from bench_large_model import DATA_NAME, MODEL_NAME, _MemorySampler, generate  # noqa: E402

DEFAULT_DIR = Path(".cache/bench_large_quantize")
SAMPLES = 64
CHECK_SAMPLES = 16
RUNS = {
    "graphopt-int8-minmax": "graphopt int8 (tensorrt, minmax)",
    "graphopt-int8-mse": "graphopt int8 (tensorrt, mse)",
    "graphopt-int4-rtn": "graphopt int4 weights (rtn, block 128)",
    "ort-int8-minmax": "ORT quantize_static int8 (minmax)",
}


# ----------------------------------------------------------------------------- children


def run_graphopt(kind: str, source: Path, calib: Path, out: Path, workdir: Path) -> dict:
    from graphopt.context import Context
    from graphopt.data import open_dataset
    from graphopt.model import load_model, save_model
    from graphopt.passes.quantize import QuantizeOptions, QuantizePass

    options = (
        QuantizeOptions(precision="int4", weight_method="rtn")
        if kind == "graphopt-int4-rtn"
        else QuantizeOptions(target="tensorrt", calibrator=kind.rsplit("-", 1)[1], samples=SAMPLES)
    )
    start = time.perf_counter()
    model = load_model(source)
    dataset = open_dataset(os.fspath(calib), model.input_specs())
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(workdir=workdir, calib_data=dataset, device="cpu", batch_size=16)
    result = QuantizePass(options).run(model, ctx)
    saved = save_model(model, out, external_data=True)
    return {
        "work_s": time.perf_counter() - start,
        "output_bytes": saved.total_bytes(),
        "quantized_nodes": result.stats.get("quantized_nodes"),
    }


def run_ort(source: Path, calib: Path, out: Path) -> dict:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    x = np.load(calib, allow_pickle=False)["x"]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(range(0, len(x), 16))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.rows, None)
            return None if start is None else {"x": x[start : start + 16]}

    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(
        os.fspath(source),
        os.fspath(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=True,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    size = sum(p.stat().st_size for p in out.parent.iterdir() if p.is_file())
    return {"work_s": time.perf_counter() - start, "output_bytes": size}


def run_check(source: Path, candidate: Path, check: Path) -> dict:
    """y of both models on the held-out samples, one session at a time."""
    import onnxruntime as ort

    x = np.load(check, allow_pickle=False)["x"]
    outputs = []
    for path in (source, candidate):
        session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
        outputs.append(session.run(["y"], {"x": x})[0].astype(np.float64))
        del session
    want, got = outputs
    noise = float(np.sum((want - got) ** 2))
    cosine = float(np.sum(want * got) / np.sqrt(np.sum(want**2) * np.sum(got**2)))
    sqnr = float(10 * np.log10(np.sum(want**2) / noise)) if noise > 0 else float("inf")
    return {"cosine": cosine, "sqnr_db": sqnr}


def child_main(args: argparse.Namespace) -> None:
    sampler = _MemorySampler()
    sampler.start()
    folder = args.dir
    source, calib = folder / "input" / MODEL_NAME, folder / "calib.npz"
    out = folder / f"out_{args.child}" / MODEL_NAME
    if args.child.startswith("check:"):
        kind = args.child.split(":", 1)[1]
        result = run_check(source, folder / f"out_{kind}" / MODEL_NAME, folder / "check.npz")
    elif args.child.startswith("graphopt"):
        result = run_graphopt(args.child, source, calib, out, folder / "work")
    else:
        result = run_ort(source, calib, out)
    result["sampled_peak_mib"] = sampler.stop()
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- driver


def measure(kind: str, folder: Path, mem_limit_gb: float, timeout_s: float) -> dict[str, Any]:
    command = [sys.executable, os.fspath(Path(__file__).resolve()), "--child", kind]
    command += ["--dir", os.fspath(folder)]
    limit = int(mem_limit_gb * 2**30)

    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    with tempfile.TemporaryFile("w+") as captured:
        start = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=captured, stderr=subprocess.STDOUT, text=True, preexec_fn=set_limit
        )
        status = usage = None
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout_s:
                process.kill()
                _, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - start
        captured.seek(0)
        text = captured.read()
    record: dict[str, Any] = {"process_wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}
    line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
    if line is not None:
        record.update(json.loads(line[len("RESULT ") :]), status="ok")
    elif wall > timeout_s:
        record["status"] = "timeout"
    else:
        oom = "MemoryError" in text or "bad_alloc" in text or os.WIFSIGNALED(status)
        record["status"] = "OOM" if oom else "error"
        record["error"] = text.strip().splitlines()[-1] if text.strip() else ""
    return record


def _table(runs: dict[str, dict[str, Any]], checks: dict[str, dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Quantizing a 2.4 GB model (external data), 64 calibration samples")
    header = ["run", "work (s)", "process (s)", "peak RSS (MiB)", "peak heap (MiB)"]
    header += ["output (MB)", "cosine", "SQNR dB", "status"]
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for kind, run in runs.items():
        check = checks.get(kind, {})
        heap = run.get("sampled_peak_mib", {}).get("RssAnon")
        ok = run.get("status") == "ok"
        table.add_row(
            RUNS[kind],
            f"{run['work_s']:.1f}" if ok else "-",
            f"{run['process_wall_s']:.1f}",
            f"{run['peak_rss_mib']:,.0f}",
            f"{heap:,.0f}" if heap else "-",
            f"{run['output_bytes'] / 1e6:,.0f}" if ok else "-",
            f"{check['cosine']:.5f}" if "cosine" in check else "-",
            f"{check['sqnr_db']:.1f}" if "sqnr_db" in check else "-",
            run["status"] if ok else f"{run['status']}: {run.get('error', '')[:60]}",
        )
    Console(width=140).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="cache folder")
    parser.add_argument(
        "--mem-limit-gb",
        type=float,
        default=40.0,
        help="address-space limit per child (ORT and the mapped weights reserve far more address space than they touch)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
    parser.add_argument("--runs", default=",".join(RUNS), help="which runs, comma-separated")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dir = args.dir.resolve()
    if args.child:
        child_main(args)
        return
    folder = args.dir
    source = folder / "input" / MODEL_NAME
    if not (source.exists() and (source.parent / DATA_NAME).exists()):
        print(f"generating the 2.4 GB model into {source.parent} ...", flush=True)
        generate(source.parent, 12, 7168, 0)
    rng = np.random.default_rng(1)
    np.savez(folder / "calib.npz", x=rng.standard_normal((SAMPLES, 7168), dtype=np.float32))
    np.savez(folder / "check.npz", x=rng.standard_normal((CHECK_SAMPLES, 7168), dtype=np.float32))
    runs: dict[str, dict[str, Any]] = {}
    checks: dict[str, dict[str, Any]] = {}
    for kind in [k.strip() for k in args.runs.split(",") if k.strip()]:
        os.sync()
        print(f"running {kind} ...", flush=True)
        runs[kind] = measure(kind, folder, args.mem_limit_gb, args.timeout)
        print(f"  {runs[kind]['status']}, {runs[kind]['process_wall_s']:.1f} s", flush=True)
        if runs[kind]["status"] == "ok":
            checks[kind] = measure(f"check:{kind}", folder, args.mem_limit_gb, args.timeout)
    _table(runs, checks)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info.machine(),
        "versions": machine_info.versions(),
        "runs": runs,
        "checks": checks,
    }
    path = folder / "report.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

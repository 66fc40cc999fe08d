"""Benchmark: load, clean up, sort and save a 2.4 GB model with external data.

Generates a synthetic model (x[N,dim] -> (MatMul -> Relu) x 12 -> y, one float32 weight of
about 200 MB per layer, all in one external data file) into a cache folder, then measures in
separate subprocesses, so that each peak RSS belongs to one run:

    graphopt   graphopt.model.load_model -> CleanupPass -> TopologicalSortPass
               -> graphopt.model.save_model(external_data=True)
    onnx       onnx.load (loads the external data) -> onnx.save_model(save_as_external_data=True)

and checks on ONNX Runtime that graphopt's output gives the same result as the input.
Prints a table and writes a JSON report. Not run by CI. Needs about 8 GB of free disk.

    python benchmarks/bench_large_model.py [--dir .cache/bench_large] [--clean]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
import machine_info  # noqa: E402

DEFAULT_DIR = Path(".cache/bench_large")
MODEL_NAME = "model.onnx"
DATA_NAME = "weights.bin"
ROWS_PER_CHUNK = 512  # weights are generated and written this many rows at a time
RUNS = {
    "graphopt": "graphopt: load, cleanup, sort, save",
    "graphopt-nodedup": "graphopt, cleanup without deduplicate",
    "onnx": "onnx: load, save",
}


# ----------------------------------------------------------------------------- the model


def generate(folder: Path, layers: int, dim: int, seed: int) -> Path:
    """Write the model tensor by tensor (chunk by chunk), never holding more than a chunk."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scale = np.float32(np.sqrt(2.0 / dim))  # He init: activations keep their size through Relu
    initializers, nodes = [], []
    offset = 0
    current = "x"
    with open(folder / DATA_NAME, "wb") as data:
        for layer in range(layers):
            start = time.perf_counter()
            for row in range(0, dim, ROWS_PER_CHUNK):
                rows = min(ROWS_PER_CHUNK, dim - row)
                chunk = rng.standard_normal((rows, dim), dtype=np.float32)
                chunk *= scale
                data.write(chunk.tobytes())
            length = dim * dim * 4
            tensor = TensorProto(name=f"w{layer}", data_type=TensorProto.FLOAT, dims=[dim, dim])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", DATA_NAME), ("offset", offset), ("length", length)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            initializers.append(tensor)
            offset += length
            out = "y" if layer == layers - 1 else f"r{layer}"
            nodes.append(helper.make_node("MatMul", [current, f"w{layer}"], [f"h{layer}"]))
            nodes.append(helper.make_node("Relu", [f"h{layer}"], [out]))
            current = out
            print(
                f"  generated w{layer} ({length / 2**20:.0f} MiB) "
                f"[{layer + 1}/{layers}] in {time.perf_counter() - start:.1f} s",
                flush=True,
            )
    graph = helper.make_graph(
        nodes,
        "large_matmul_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])],
        initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = folder / MODEL_NAME
    # The proto holds only references; onnx.save writes no tensor data for it.
    onnx.save_model(proto, path)
    return path


# ----------------------------------------------------------------------------- one run (child)


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _MemorySampler(threading.Thread):
    """Samples RssAnon (heap) and RssFile (mapped file pages) every 10 ms.

    Peak RSS alone cannot tell weights copied into the heap from weights memory-mapped from
    the data file; the mapped pages are page cache the kernel can drop under pressure.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mib: dict[str, float] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.01):
            self._sample()

    def stop(self) -> dict[str, float]:
        self._done.set()
        self.join()
        self._sample()
        return self.peak_mib

    def _sample(self) -> None:
        try:
            lines = Path("/proc/self/status").read_text().splitlines()
        except OSError:  # not Linux: only ru_maxrss is reported
            return
        for line in lines:
            key = line.split(":", 1)[0]
            if key in ("RssAnon", "RssFile"):
                value = int(line.split()[1]) / 1024
                self.peak_mib[key] = max(value, self.peak_mib.get(key, 0.0))


def run_graphopt(source: Path, out: Path, workdir: Path, deduplicate: bool) -> dict[str, object]:
    from onnx_ir.passes import common as ir_passes

    from graphopt.context import Context
    from graphopt.model import load_model, save_model
    from graphopt.passes.cleanup import CleanupOptions, CleanupPass

    stages: dict[str, float] = {}
    rss_after_imports = _rss_mib()
    start = time.perf_counter()
    model = load_model(source)
    stages["load"] = time.perf_counter() - start
    mark = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    cleanup = CleanupPass(CleanupOptions(deduplicate=deduplicate))
    result = cleanup.run(model, Context(workdir=workdir))
    stages["cleanup"] = time.perf_counter() - mark
    mark = time.perf_counter()
    ir_passes.TopologicalSortPass()(model.ir)
    stages["sort"] = time.perf_counter() - mark
    mark = time.perf_counter()
    saved = save_model(model, out, external_data=True)
    stages["save"] = time.perf_counter() - mark
    stages["total"] = time.perf_counter() - start
    return {
        "stages_s": stages,
        "rss_after_imports_mib": rss_after_imports,
        "cleanup_modified": result.modified,
        "cleanup_stats": {k: v for k, v in result.stats.items() if v},
        "output_bytes": saved.total_bytes(),
    }


def run_onnx(source: Path, out: Path) -> dict[str, object]:
    import onnx

    stages: dict[str, float] = {}
    rss_after_imports = _rss_mib()
    start = time.perf_counter()
    proto = onnx.load(os.fspath(source))
    stages["load"] = time.perf_counter() - start
    mark = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        proto,
        os.fspath(out),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=out.name + ".data",
    )
    stages["save"] = time.perf_counter() - mark
    stages["total"] = time.perf_counter() - start
    data = out.parent / (out.name + ".data")
    return {
        "stages_s": stages,
        "rss_after_imports_mib": rss_after_imports,
        "output_bytes": out.stat().st_size + data.stat().st_size,
    }


def verify(source: Path, candidate: Path, dim: int, seed: int) -> dict[str, object]:
    """Same random input through ORT on both models; one session at a time."""
    import onnxruntime as ort

    x = np.random.default_rng(seed + 1).standard_normal((2, dim), dtype=np.float32)
    outputs = []
    for path in (source, candidate):
        session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
        outputs.append(session.run(["y"], {"x": x})[0])
        del session
    want, got = outputs
    scale = float(np.abs(want).max())
    max_abs = float(np.abs(want - got).max())
    return {
        "max_abs_diff": max_abs,
        "output_max_abs": scale,
        "equal": bool(np.array_equal(want, got)),
        "ok": bool(np.allclose(got, want, rtol=1e-5, atol=1e-6 * max(scale, 1.0))),
    }


def child_main(args: argparse.Namespace) -> None:
    sampler = _MemorySampler()
    sampler.start()
    if args.child in ("graphopt", "graphopt-nodedup"):
        workdir = args.out.parent / "work"
        result = run_graphopt(args.source, args.out, workdir, args.child == "graphopt")
    elif args.child == "onnx":
        result = run_onnx(args.source, args.out)
    else:
        result = verify(args.source, args.out, args.dim, args.seed)
    result["peak_rss_self_mib"] = _rss_mib()
    result["sampled_peak_mib"] = sampler.stop()
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- driver


def measure(kind: str, source: Path, out: Path, dim: int, seed: int) -> dict[str, object]:
    """Run one child; wall time and peak RSS of that child alone (os.wait4, not
    RUSAGE_CHILDREN, which would report the largest of all children so far)."""
    command = [
        sys.executable,
        os.fspath(Path(__file__).resolve()),
        "--child",
        kind,
        "--source",
        os.fspath(source),
        "--out",
        os.fspath(out),
        "--dim",
        str(dim),
        "--seed",
        str(seed),
    ]
    # stdout goes to a file, not a pipe: nothing reads a pipe while we block in wait4.
    with tempfile.TemporaryFile("w+") as captured:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=captured, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        captured.seek(0)
        stdout = captured.read()
    if process.returncode != 0:
        raise SystemExit(f"{kind} run failed with exit code {process.returncode}:\n{stdout}")
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result["process_wall_s"] = wall
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return result


def _table(runs: dict[str, dict[str, Any]], title: str) -> None:
    def cells(run: dict[str, Any]) -> tuple[str, ...]:
        sampled = run.get("sampled_peak_mib", {})
        return (
            f"{run['stages_s']['total']:.2f}",
            f"{run['process_wall_s']:.2f}",
            f"{run['peak_rss_mib']:.0f}",
            f"{sampled['RssAnon']:.0f}" if "RssAnon" in sampled else "-",
            f"{sampled['RssFile']:.0f}" if "RssFile" in sampled else "-",
        )

    rows = [(RUNS[kind], *cells(run)) for kind, run in runs.items()]
    g, o = runs["graphopt"], runs["onnx"]
    g_anon = g.get("sampled_peak_mib", {}).get("RssAnon")
    o_anon = o.get("sampled_peak_mib", {}).get("RssAnon")
    rows.append(
        (
            "onnx / graphopt",
            f"{o['stages_s']['total'] / g['stages_s']['total']:.1f}x",
            f"{o['process_wall_s'] / g['process_wall_s']:.1f}x",
            f"{o['peak_rss_mib'] / g['peak_rss_mib']:.1f}x",
            f"{o_anon / g_anon:.1f}x" if g_anon and o_anon else "-",
            "",
        )
    )
    header = (
        "run",
        "work time (s)",
        "process wall (s)",
        "peak RSS (MiB)",
        "peak heap (MiB)",
        "peak mapped (MiB)",
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        print(title)
        for row in [header, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        return
    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=120).print(table)
    print(
        "work time: from load to saved, in the child; process wall: the whole child, imports "
        "included. Peak RSS: ru_maxrss of that child (os.wait4). Heap/mapped: RssAnon/RssFile "
        "sampled every 10 ms; mapped pages are the data file's page cache, which the kernel "
        "can drop under memory pressure."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="cache folder")
    parser.add_argument("--layers", type=int, default=12, help="MatMul layers")
    parser.add_argument("--dim", type=int, default=7168, help="weights are dim x dim float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs of each; the fastest is reported"
    )
    parser.add_argument("--report", type=Path, help="JSON report (default: <dir>/report.json)")
    parser.add_argument(
        "--clean", action="store_true", help="delete the models afterwards (keeps the report)"
    )
    parser.add_argument("--child", choices=[*RUNS, "verify"], help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    folder = args.dir.resolve()
    report_path = args.report or folder / "report.json"
    model_bytes = args.layers * args.dim * args.dim * 4
    source = folder / "input" / MODEL_NAME
    need = (len(RUNS) + 1) * model_bytes + 2**30
    folder.mkdir(parents=True, exist_ok=True)
    have_input = source.exists() and (source.parent / DATA_NAME).stat().st_size == model_bytes
    free = shutil.disk_usage(folder).free
    if free < need - (model_bytes if have_input else 0):
        raise SystemExit(
            f"Not enough free disk in '{folder}': {free / 2**30:.1f} GiB free, "
            f"about {need / 2**30:.1f} GiB needed. Pass --dir on a larger disk."
        )
    if have_input:
        print(f"reusing {source} ({model_bytes / 2**30:.2f} GiB of weights)")
    else:
        print(
            f"generating {args.layers} x [{args.dim},{args.dim}] float32 weights "
            f"({model_bytes / 2**30:.2f} GiB) into {source.parent}"
        )
        generate(source.parent, args.layers, args.dim, args.seed)

    runs: dict[str, dict[str, Any]] = {}
    attempts: dict[str, list[dict[str, Any]]] = {kind: [] for kind in RUNS}
    for attempt in range(args.repeat):
        for kind in RUNS:
            out = folder / f"out_{kind}" / MODEL_NAME
            shutil.rmtree(out.parent, ignore_errors=True)
            # Flush dirty pages (the generated model, the previous run's output) so that one
            # run's disk writes are not charged to the next.
            os.sync()
            print(f"running {kind} [{attempt + 1}/{args.repeat}] ...", flush=True)
            attempts[kind].append(measure(kind, source, out, args.dim, args.seed))
    for kind, results in attempts.items():
        runs[kind] = min(results, key=lambda r: r["stages_s"]["total"])
    print("checking graphopt's output against the input on ONNX Runtime ...", flush=True)
    check = measure("verify", source, folder / "out_graphopt" / MODEL_NAME, args.dim, args.seed)

    _table(runs, f"{model_bytes / 1e9:.1f} GB model, {args.layers} MatMul layers: load -> save")
    g = runs["graphopt"]
    print(
        "graphopt stages (s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in g["stages_s"].items())
        + f"; cleanup modified={g['cleanup_modified']} {g['cleanup_stats']}"
    )
    print(
        f"ORT check: {'OK' if check['ok'] else 'MISMATCH'} (max |diff| {check['max_abs_diff']:.3g}"
        f", outputs up to {check['output_max_abs']:.3g}, bit-identical: {check['equal']}; "
        f"peak RSS {check['peak_rss_mib']:.0f} MiB)"
    )
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info.machine(),
        "versions": machine_info.versions(),
        "model": {
            "layers": args.layers,
            "dim": args.dim,
            "weight_bytes": model_bytes,
            "file_bytes": source.stat().st_size + (source.parent / DATA_NAME).stat().st_size,
        },
        "runs": runs,
        "all_attempts": attempts,
        "ratios": {
            "work_time": runs["onnx"]["stages_s"]["total"] / g["stages_s"]["total"],
            "peak_rss": runs["onnx"]["peak_rss_mib"] / g["peak_rss_mib"],
        },
        "ort_check": check,
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {report_path}")
    if args.clean:
        for name in ("input", *(f"out_{kind}" for kind in RUNS)):
            shutil.rmtree(folder / name, ignore_errors=True)
    if not check["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

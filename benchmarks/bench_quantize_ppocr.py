"""Benchmark: INT8 quantization of PP-OCRv4's text recogniser, graphopt against ONNX Runtime.

The model is the real `ch_PP-OCRv4_rec_infer.onnx` from the rapidocr-onnxruntime 1.4.4 wheel
(fetched once with `pip download --no-deps` into the cache folder; a CTC recogniser, input
x[N,3,48,320] normalised as (x/255-0.5)/0.5, output [N,T,6625] probabilities, its character
list in the model's metadata). The data are text lines rendered with Pillow (benchmarks/ppocr/
lines.py): a 512-line calibration split and a separate test split (1000 lines by default),
written to the cache as .npz (key "x") with the strings beside them as JSON.

Every measurement runs in its own child process (wall time and peak RSS of that child alone,
from os.wait4), under a memory limit (RLIMIT_AS) and a timeout, so that a run that blows up is
recorded as OOM or timeout instead of taking the benchmark down:

  fp32        the floor: one FP32 forward pass over the same calibration samples;
  ort         onnxruntime.quantization.quantize_static, QDQ, per-channel int8 weights, with
              uint8 activations (ORT's default) and with symmetric int8 activations
              (ActivationSymmetric, what TensorRT takes), calibrate_method MinMax, Percentile,
              Entropy; on the model prepared as ORT documents (quant_pre_process, after a
              conversion to opset 13 that ORT's per-channel output needs; see
              ppocr/runs.py:ort_prepare), timed once as its own row. `--ort-inputs raw` also
              quantizes the file as shipped (its weights sit in Constant nodes, which ORT then
              quantizes like activations);
  graphopt    load_model -> cleanup -> quantize(target=tensorrt|ort-cpu, calibrator=...,
              samples=N) -> save_model, when the `quantize` pass is registered (otherwise the
              rows say "not available"); target=ort-cpu twice: ort_kernels=auto (the label
              names what it chose for this CPU, u8s7 on x86 without VNNI) and u8u8;
              "graphopt cleanup (FP32)" is load_model -> cleanup -> save_model alone, the
              lossless FP32 model the quantize runs start from;

then, for every model produced: CER on the test split, fidelity against FP32 (cosine of the
probabilities, argmax agreement per time step, identical decoded lines), and ONNX Runtime CPU
latency at batch 1 and 16 with 1 and 2 threads (FP32, FP32 after cleanup, and one model per
tool and activation type / target: latency does not depend on the calibration method or
sample count).

Prints three tables and writes a JSON report (default <cache>/report.json; with --quick,
<cache>/report-quick.json), updated after every run. Not run by CI.

--resume reuses a run's record only when its key (`_job_key`) is unchanged: the job, the
size and modification time of the model file it reads, and for the graphopt runs a digest of
graphopt's code (graphopt/, passes/, calibration/, ppocr/runs.py, committed or not). A
changed graphopt thus measures every graphopt model again, and the evaluation and latency of
every model written again; ORT's unchanged runs are reused. A reused quantization must still
find its model file as it wrote it.

    python benchmarks/bench_quantize_ppocr.py --quick          # smoke run, a few minutes
    python benchmarks/bench_quantize_ppocr.py                  # 64/256/512 samples, all rows
    python benchmarks/bench_quantize_ppocr.py --skip-graphopt  # FP32 and ORT rows only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))

import machine_info  # noqa: E402
from ppocr import runs  # noqa: E402
from ppocr.model import fetch_model, read_characters  # noqa: E402

DEFAULT_CACHE = Path(".cache/ppocr")
CALIB_LINES, CALIB_SEED, TEST_SEED = 512, 1, 2
DATA_VERSION = 1  # bump when ppocr/lines.py renders differently
ORT_VARIANTS = {"uint8": "ORT uint8-act", "int8": "ORT int8-sym-act"}
# tool, label, quantize options besides calibrator and samples. ort_kernels=auto picks u8s7
# on x86 without VNNI (u8s8 elsewhere); the label then names what it chose.
GRAPHOPT_VARIANTS = (
    ("graphopt-tensorrt", "graphopt tensorrt", {"target": "tensorrt", "ort_kernels": "auto"}),
    ("graphopt-ort-cpu", "graphopt ort-cpu", {"target": "ort-cpu", "ort_kernels": "auto"}),
    (
        "graphopt-ort-cpu-u8u8",
        "graphopt ort-cpu u8u8",
        {"target": "ort-cpu", "ort_kernels": "u8u8"},
    ),
)
CLEANUP_LABEL = "graphopt cleanup (FP32)"
ALL_METHODS = ("minmax", "percentile", "entropy", "mse")
# Jobs whose numbers are times (evaluation is accuracy; its time is not reported).
TIMED_JOBS = {
    "fp32_forward",
    "ort_prepare",
    "ort_quantize",
    "graphopt_quantize",
    "graphopt_cleanup",
    "latency",
}
# Jobs that run graphopt: their records hold only for the graphopt code they ran.
GRAPHOPT_JOBS = {"graphopt_quantize", "graphopt_cleanup"}
# What those jobs run: graphopt's packages, and the benchmark's recipe for them.
GRAPHOPT_SOURCES = ("graphopt", "passes", "calibration", "benchmarks/ppocr/runs.py")
OTHERS_NOTE = (
    "others' cores: CPU time used by other processes during the run (the machine's busy time "
    "minus the child's), in cores; timings taken with values well above 0 are inflated."
)
OOM_PATTERN = re.compile(
    r"MemoryError|bad_alloc|bad allocation|Unable to allocate|Failed to allocate|"
    r"Cannot allocate memory|out of memory",
    re.IGNORECASE,
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- children


def _child_main(spec_text: str) -> None:
    job = json.loads(spec_text)
    function = getattr(runs, job.pop("job"))
    kwargs = {
        key: Path(value) if key in _PATH_KEYS and value is not None else value
        for key, value in job.items()
    }
    result = function(**kwargs)
    result["peak_rss_self_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


_PATH_KEYS = {"model", "calib", "test", "out", "workdir", "reference"}


def run_child(job: dict[str, Any], *, mem_limit_gb: float, timeout_s: float) -> dict[str, Any]:
    """Run one job in a fresh process; its wall time, peak RSS and status.

    status: "ok", "OOM" (a failed allocation under the RLIMIT_AS limit, or killed by the
    kernel), "timeout", or "error".
    """
    command = [sys.executable, os.fspath(Path(__file__).resolve()), "--child", json.dumps(job)]
    limit = int(mem_limit_gb * 2**30)

    def set_limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        before = _cpu_times()
        start = time.perf_counter()
        # Output goes to files, not pipes: nothing reads a pipe while we wait.
        process = subprocess.Popen(
            command, stdout=out, stderr=err, text=True, preexec_fn=set_limits
        )
        timed_out = False
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout_s:
                process.kill()
                _, status, usage = os.wait4(process.pid, 0)
                timed_out = True
                break
            time.sleep(0.05)
        wall = time.perf_counter() - start
        after = _cpu_times()
        busy, steal = (
            (after[0] - before[0], after[1] - before[1]) if before and after else (None, None)
        )
        process.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    record: dict[str, Any] = {
        "process_wall_s": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux: KiB
        "exit_code": code,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        # Busy CPU time of the whole machine during the run minus the child's own: other
        # processes competing for the cores, in cores (0 on a quiet machine).
        "others_cores": max(0.0, busy - usage.ru_utime - usage.ru_stime) / wall
        if busy is not None and wall > 0
        else None,
        # Of which stolen by the hypervisor for other virtual machines.
        "steal_cores": steal / wall if steal is not None and wall > 0 else None,
    }
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    if timed_out:
        record["status"] = "timeout"
    elif code == 0 and line is not None:
        record["status"] = "ok"
        record.update(json.loads(line[len("RESULT ") :]))
        return record
    elif code == -signal.SIGKILL or OOM_PATTERN.search(stderr):
        record["status"] = "OOM"
    else:
        record["status"] = "error"
    tail = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    record["error"] = tail[-1][:300] if tail else f"exit code {code}"
    record["stderr_tail"] = stderr[-3000:]
    return record


def _cpu_times() -> tuple[float, float] | None:
    """Busy and stolen CPU seconds of the whole machine since boot (all cores), from
    /proc/stat; busy includes steal (time the hypervisor gave to other virtual machines)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, IndexError, ValueError):
        return None
    ticks += [0] * (8 - len(ticks))
    per_s = os.sysconf("SC_CLK_TCK")
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    return busy / per_s, ticks[7] / per_s


def _job_key(job: dict[str, Any]) -> str:
    """What a result depends on, so that --resume reuses a record only for the same work:
    the job; the model file it reads, by size and modification time (a model written again,
    by a new quantization, is a new file: its evaluation and latency runs are redone); and
    for the jobs that run graphopt, the digest of graphopt's code (`graphopt_code`)."""
    digest = hashlib.sha256(json.dumps(job, sort_keys=True).encode())
    stat = _file_stat(job.get("model"))
    if stat is not None:
        digest.update(f"{stat[0]}:{stat[1]}".encode())
    if job["job"] in GRAPHOPT_JOBS:
        digest.update(graphopt_code()["digest"].encode())
    return digest.hexdigest()[:16]


def _file_stat(path: str | None) -> tuple[int, int] | None:
    """Size and modification time (ns) of a file, None when there is none."""
    if not path or not Path(path).is_file():
        return None
    info = Path(path).stat()
    return info.st_size, info.st_mtime_ns


def graphopt_code() -> dict[str, Any]:
    """The code a graphopt job runs: a digest of every .py file's path and bytes under
    GRAPHOPT_SOURCES as they are now (committed or not; a commit that leaves them alone
    keeps the digest), with the commit of HEAD and the files that differ from it, for
    the record."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for name in GRAPHOPT_SOURCES:
        top = root / name
        for source in sorted(top.rglob("*.py")) if top.is_dir() else [top]:
            digest.update(os.fspath(source.relative_to(root)).encode() + b"\0")
            digest.update(source.read_bytes() + b"\0")
    return {"digest": digest.hexdigest()[:16], **runs.graphopt_tree()}


def _wait_for_quiet(max_wait_s: float, tag: str) -> float | None:
    """Wait (at most max_wait_s) until other processes use under 0.25 cores, measured over
    2 s; timings taken while others compete for the cores are not worth much. Returns the
    last measurement, in cores."""
    deadline = time.monotonic() + max_wait_s
    told = False
    while True:
        first = _cpu_times()
        time.sleep(2.0)
        second = _cpu_times()
        if first is None or second is None:
            return None
        busy = (second[0] - first[0]) / 2.0
        if busy < 0.25 or time.monotonic() >= deadline:
            return busy
        if not told:
            log(f"[{tag}] other processes use {busy:.1f} cores; waiting up to {max_wait_s:.0f} s")
            told = True


def _sha256(path: str) -> str | None:
    if not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _outputs_intact(job: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether the model a finished job wrote is still there, unchanged since (a reused
    quantization whose model was deleted or overwritten would describe another file).
    Records from before out_stat was kept are only checked for the file's presence."""
    if record.get("status") != "ok" or not job.get("out"):
        return True
    stat = _file_stat(job["out"])
    if stat is None:
        return False
    kept = record.get("out_stat")
    return kept is None or tuple(kept) == stat


class Runner:
    """Runs jobs, keeps their records by tag, and (with --resume) reuses finished ones."""

    def __init__(
        self,
        folder: Path,
        resume: bool,
        mem_limit_gb: float,
        timeout_s: float,
        wait_s: float,
        rerun_busy: float,
    ) -> None:
        self.folder = folder
        self.rerun_busy = rerun_busy
        self.wait_s = wait_s
        self.resume = resume
        self.mem_limit_gb = mem_limit_gb
        self.timeout_s = timeout_s
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, tag: str, job: dict[str, Any], what: str) -> dict[str, Any]:
        key = _job_key(job)
        saved = self.folder / f"{tag}.json"
        if self.resume and saved.exists():
            record = json.loads(saved.read_text())
            busy = record.get("others_cores") or 0.0
            if record.get("job_key") != key or record.get("status") not in (
                "ok",
                "OOM",
                "timeout",
            ):
                pass
            elif job["job"] in TIMED_JOBS and busy > self.rerun_busy:
                log(f"[{tag}] was measured while others used {busy:.2f} cores; measuring again")
            elif not _outputs_intact(job, record):
                log(f"[{tag}] its output {job['out']} is gone or was rewritten; running again")
            else:
                log(f"[{tag}] reused from {saved}")
                return record
        # Only timings are worth waiting for; an evaluation's time is not reported.
        others_before = _wait_for_quiet(self.wait_s, tag) if job["job"] in TIMED_JOBS else None
        log(f"[{tag}] {what} ...")
        record = run_child(job, mem_limit_gb=self.mem_limit_gb, timeout_s=self.timeout_s)
        record["job_key"] = key
        record["others_cores_before"] = others_before
        if job["job"] in GRAPHOPT_JOBS:
            record["graphopt_code"] = graphopt_code()
        if job.get("model"):
            # Which file this record measured (the key has its size and time, not its bytes).
            record["model_sha256"] = _sha256(job["model"])
        if job.get("out"):
            record["out_stat"] = _file_stat(job["out"])
        note = f"{record['process_wall_s']:.1f} s, peak RSS {record['peak_rss_mib']:.0f} MiB"
        if record.get("others_cores") is not None and record["others_cores"] > 0.25:
            note += f", other processes busy: {record['others_cores']:.1f} cores"
        if record["status"] != "ok":
            note += f" -- {record['status']}: {record.get('error', '')}"
        log(f"[{tag}] {record['status']} ({note})")
        saved.write_text(json.dumps(record, indent=1) + "\n")
        return record


# ----------------------------------------------------------------------------- data


def prepare_data(cache: Path, calib_lines: int, test_lines: int, model: Path) -> tuple[Path, Path]:
    """Render (once) the calibration and test splits into <cache>/data."""
    from ppocr.lines import find_fonts, make_lines, write_split

    folder = cache / "data"
    characters = set(read_characters(model)[1:])
    fonts = find_fonts()
    paths = []
    for name, count, seed in (
        ("calib", calib_lines, CALIB_SEED),
        ("test", test_lines, TEST_SEED),
    ):
        stem = f"{name}_{count}_seed{seed}_v{DATA_VERSION}"
        npz = folder / f"{stem}.npz"
        if not (npz.exists() and npz.with_name(f"{stem}.labels.json").exists()):
            log(
                f"rendering {count} {name} lines (seed {seed}, "
                f"{len(fonts) or 'no TrueType'} fonts{'' if fonts else ', Pillow default'}) ..."
            )
            x, labels = make_lines(count, seed, characters, fonts)
            write_split(folder, stem, x, labels)
        paths.append(npz)
    return paths[0], paths[1]


def graphopt_quantize_status() -> str | None:
    """None when graphopt's `quantize` pass is registered, else why not."""
    try:
        from graphopt.passes.base import get_pass

        get_pass("quantize")
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return None


# ----------------------------------------------------------------------------- report


def _latency_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (threads, batch): the median over rounds of each round's median and p90,
    with every round's median and the others' CPU use during the rounds."""
    done = [r for r in records if r["status"] == "ok"]
    if not done:
        return [{"status": records[0]["status"] if records else "not run"}]
    rows = []
    for first in done[0]["rows"]:
        key = (first["threads"], first["batch"])
        same = [x for r in done for x in r["rows"] if (x["threads"], x["batch"]) == key]
        medians = [x["median_ms"] for x in same]
        rows.append(
            {
                "status": "ok",
                "threads": key[0],
                "batch": key[1],
                "median_ms": statistics.median(medians),
                "p90_ms": statistics.median(x["p90_ms"] for x in same),
                "round_medians_ms": medians,
                "runs_per_round": first["runs"],
                "others_cores": max((r.get("others_cores") or 0.0) for r in done),
                "steal_cores": max((r.get("steal_cores") or 0.0) for r in done),
            }
        )
    return rows


def _spread(values: list[float] | None) -> str:
    return f"{min(values):.1f}-{max(values):.1f}" if values else "-"


def _fmt(value: Any, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _print_table(title: str, header: list[str], rows: list[list[str]], note: str = "") -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        print(title)
        for row in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    else:
        table = Table(title=title)
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i < 2 else "right")
        for row in rows:
            table.add_row(*row)
        Console(width=160).print(table)
    if note:
        print(note)


def print_tables(report: dict[str, Any]) -> None:
    calib, accuracy, latency = report["calibration"], report["accuracy"], report["latency"]
    floor = {r["samples"]: r for r in calib if r["tool"] == "fp32"}
    rows = []
    for r in calib:
        base = floor.get(r["samples"], {})
        ok = r["status"] == "ok"
        ratio = (
            f"{r['work_s'] / base['work_s']:.1f}x"
            if ok and base.get("status") == "ok" and r["tool"] != "fp32"
            else ("1.0x" if r["tool"] == "fp32" and ok else "-")
        )
        rows.append(
            [
                r["label"],
                r["method"],
                str(r["samples"] or "-"),
                r["status"] if r["status"] != "error" else f"error: {r.get('error', '')[:40]}",
                _fmt(r.get("work_s"), ".1f") if ok else "-",
                _fmt(r.get("process_wall_s"), ".1f") if "process_wall_s" in r else "-",
                ratio,
                _fmt(r.get("peak_rss_mib"), ",.0f") if "peak_rss_mib" in r else "-",
                _fmt(r.get("others_cores"), ".2f"),
            ]
        )
    _print_table(
        "Calibration + quantization: time and peak memory",
        [
            "run",
            "method",
            "samples",
            "status",
            "work s",
            "process s",
            "x FP32 fwd",
            "peak RSS MiB",
            "others' cores",
        ],
        rows,
        "work s: from reading the model to the saved quantized model (ORT: quantize_static on "
        "the prepared model; its preparation, once, is its own row; FP32: reading the samples "
        "and one forward pass), in the child; process s: the whole child, imports included; "
        "x FP32 fwd: work s over the FP32 row's work s at the same samples; peak RSS: ru_maxrss "
        f"of that child. Batches: {report['settings']['batch']} samples for the FP32 floor and "
        f"graphopt, {report['settings']['ort_batch']} per get_next() of ORT's reader. Memory "
        f"limit {report['settings']['mem_limit_gb']} GB (RLIMIT_AS), timeout "
        f"{report['settings']['timeout_s']:.0f} s. " + OTHERS_NOTE,
    )
    fp32_cer = next((r["cer"] for r in accuracy if r["tool"] == "fp32" and "cer" in r), None)
    rows = []
    for r in accuracy:
        if "cer" not in r:
            rows.append([r["label"], r["method"], str(r["samples"]), r["status"], *["-"] * 7])
            continue
        delta = (
            "-"
            if fp32_cer is None or r["tool"] == "fp32"
            else f"{100 * (r['cer'] - fp32_cer):+.2f}"
        )
        rows.append(
            [
                r["label"],
                r["method"],
                str(r["samples"] or "-"),
                f"{100 * r['cer']:.2f}",
                delta,
                f"{100 * r['cer_no_spaces']:.2f}",
                f"{100 * r['line_accuracy']:.1f}",
                _fmt(r.get("cosine_mean"), ".4f"),
                _fmt(r.get("cosine_min"), ".4f"),
                _fmt(r.get("argmax_agreement") and 100 * r["argmax_agreement"], ".2f"),
                _fmt(r.get("text_agreement") and 100 * r["text_agreement"], ".1f"),
            ]
        )
    _print_table(
        f"Accuracy on {report['data']['test_lines']} rendered test lines",
        [
            "model",
            "method",
            "samples",
            "CER %",
            "vs FP32 pts",
            "CER no spaces %",
            "lines exact %",
            "cosine mean",
            "cosine min",
            "argmax agree %",
            "same text %",
        ],
        rows,
        "CER: edit distance / ground-truth characters (predictions stripped of leading and "
        "trailing spaces); cosine: per line over the [T, C] probabilities, against FP32; "
        "argmax agree: time steps with FP32's most likely class; same text: lines decoded "
        "exactly as FP32 decodes them.",
    )
    fp32, cleaned = (
        {(r["threads"], r["batch"]): r["median_ms"] for r in latency if r["tool"] == tool}
        for tool in ("fp32", "graphopt-cleanup")
    )
    rows = []
    for r in latency:
        if "median_ms" not in r:
            rows.append([r["label"], r["method"], "-", "-", r["status"], "-", "-", "-", "-", "-"])
            continue
        base = fp32.get((r["threads"], r["batch"]))
        clean = cleaned.get((r["threads"], r["batch"]))
        rows.append(
            [
                r["label"],
                f"{r['method']} @{r['samples']}" if r["tool"] != "fp32" else "",
                str(r["threads"]),
                str(r["batch"]),
                f"{r['median_ms']:.2f}",
                _spread(r.get("round_medians_ms")),
                f"{r['p90_ms']:.2f}",
                f"{base / r['median_ms']:.2f}x" if base else "-",
                f"{clean / r['median_ms']:.2f}x" if clean else "-",
                _fmt(r.get("others_cores"), ".2f"),
            ]
        )
    _print_table(
        "ONNX Runtime CPU latency",
        [
            "model",
            "from",
            "threads",
            "batch",
            "median ms",
            "rounds' medians",
            "p90 ms",
            "speed-up vs FP32",
            "vs FP32 after cleanup",
            "others' cores",
        ],
        rows,
        "FP32: the file as shipped; FP32 after cleanup: graphopt's lossless cleanup pass "
        "alone, the model graphopt quantizes. One session per thread count (intra-op threads, sequential execution); median and p90 "
        "of timed runs after warm-up, in rounds over all models (the median over rounds, and "
        "the lowest-highest of the rounds' medians); the quantized models' latency does not "
        "depend on the "
        "calibration method or samples, so one model per tool and activation type is timed. "
        + OTHERS_NOTE,
    )


# ----------------------------------------------------------------------------- driver


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache folder")
    parser.add_argument("--samples", default="64,256,512", help="calibration sample counts")
    parser.add_argument(
        "--methods",
        default=",".join(ALL_METHODS),
        help=f"calibration methods, any of {','.join(ALL_METHODS)} (ORT has no mse)",
    )
    parser.add_argument("--test-lines", type=int, default=1000, help="lines in the test split")
    parser.add_argument(
        "--batch",
        type=int,
        default=16,
        help="batch size of the FP32 floor, graphopt's calibration and the evaluation",
    )
    parser.add_argument(
        "--ort-batch",
        type=int,
        default=1,
        help="samples per get_next() of ORT's CalibrationDataReader (1: ORT's own examples; "
        "less memory and faster than 16 for this model)",
    )
    parser.add_argument("--skip-ort", action="store_true", help="no ORT quantize_static rows")
    parser.add_argument(
        "--ort-inputs",
        default="prepared",
        help="what ORT quantizes: 'prepared' (opset 13 + quant_pre_process, as ORT documents), "
        "'raw' (the file as shipped), or both, comma-separated",
    )
    parser.add_argument("--skip-graphopt", action="store_true", help="no graphopt rows")
    parser.add_argument("--skip-latency", action="store_true", help="no latency table")
    parser.add_argument("--latency-runs", type=int, default=40, help="timed runs at batch 1")
    parser.add_argument(
        "--latency-rounds",
        type=int,
        default=3,
        help="latency runs of every model, in rounds over all models; the median is reported",
    )
    parser.add_argument(
        "--mem-limit-gb", type=float, default=16.0, help="address-space limit of each child"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=120.0,
        help="before each run, wait up to this many seconds for other processes to leave the "
        "cores alone (0: do not wait); how busy they were is recorded either way",
    )
    parser.add_argument(
        "--resume", action="store_true", help="reuse the finished runs of an earlier invocation"
    )
    parser.add_argument(
        "--rerun-busy",
        type=float,
        default=0.25,
        help="with --resume, measure again the timed runs during which other processes used "
        "more than this many cores",
    )
    parser.add_argument(
        "--report",
        type=Path,
        help="JSON report (default <cache>/report.json; report-quick.json with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 16,32 samples, 64 test lines, few latency runs",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        if args.samples == parser.get_default("samples"):
            args.samples = "16,32"
        if args.test_lines == parser.get_default("test_lines"):
            args.test_lines = 64
        if args.latency_runs == parser.get_default("latency_runs"):
            args.latency_runs = 8
    try:
        args.sample_counts = sorted({int(s) for s in args.samples.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--samples takes comma-separated integers, not {args.samples!r}")
    args.ort_input_list = [m.strip() for m in args.ort_inputs.split(",") if m.strip()]
    if not set(args.ort_input_list) <= {"prepared", "raw"}:
        parser.error(f"--ort-inputs takes prepared, raw or both; got {args.ort_inputs!r}")
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.method_list) - set(ALL_METHODS)
    if unknown or not args.method_list or not args.sample_counts:
        parser.error(f"--methods takes some of {','.join(ALL_METHODS)}; got {args.methods!r}")
    if min(args.sample_counts) < 1 or args.test_lines < 16:
        parser.error("--samples must be positive and --test-lines at least 16")
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        _child_main(args.child)
        return
    cache = args.cache.resolve()
    report_path = args.report or cache / ("report-quick.json" if args.quick else "report.json")
    model = fetch_model(cache)
    calib_lines = CALIB_LINES if not args.quick else max(args.sample_counts)
    calib_lines = max(calib_lines, max(args.sample_counts))
    calib, test = prepare_data(cache, calib_lines, args.test_lines, model)
    run = Runner(
        cache / "runs" / test.stem,
        args.resume,
        args.mem_limit_gb,
        args.timeout,
        args.wait_idle,
        args.rerun_busy,
    )
    # Per calibration split: a --quick run (a smaller split) must not touch the full run's files.
    models = cache / "models" / calib.stem
    reference = cache / "work" / f"fp32_probs_{test.stem}.npy"
    reference.parent.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info.machine(),
        "versions": machine_info.versions(("pillow",)),
        "graphopt_tree": runs.graphopt_tree(),
        "settings": {
            "samples": args.sample_counts,
            "methods": args.method_list,
            "batch": args.batch,
            "ort_batch": args.ort_batch,
            "ort_inputs": args.ort_input_list,
            "mem_limit_gb": args.mem_limit_gb,
            "timeout_s": args.timeout,
            "latency_runs_batch1": args.latency_runs,
        },
        "model": {"file": os.fspath(model), "bytes": model.stat().st_size},
        "data": {
            "calib": os.fspath(calib),
            "test": os.fspath(test),
            "calib_lines": calib_lines,
            "test_lines": args.test_lines,
        },
        "calibration": [],
        "accuracy": [],
        "latency": [],
        "graphopt_quantize": None,
    }

    def save() -> None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        partial = report_path.with_suffix(".part")
        partial.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        partial.replace(report_path)

    def row(tool: str, label: str, method: str, samples: int, record: dict[str, Any]) -> dict:
        return {"tool": tool, "label": label, "method": method, "samples": samples, **record}

    # The FP32 reference on the test split (its probabilities are what fidelity compares to).
    evaluation = {"job": "evaluate", "test": os.fspath(test), "batch": args.batch}
    record = run(
        "eval-fp32",
        {
            **evaluation,
            "model": os.fspath(model),
            "reference": os.fspath(reference),
            "write_reference": True,
        },
        f"FP32 on {args.test_lines} test lines",
    )
    if record["status"] != "ok":
        raise SystemExit(f"The FP32 model failed on the test lines: {record.get('error')}")
    report["accuracy"].append(row("fp32", "FP32", "", 0, record))
    log(f"FP32 CER {100 * record['cer']:.2f} % on {args.test_lines} lines")
    save()

    # The floor: FP32 forward over the calibration samples.
    for n in args.sample_counts:
        job = {
            "job": "fp32_forward",
            "model": os.fspath(model),
            "calib": os.fspath(calib),
            "samples": n,
            "batch": args.batch,
        }
        report["calibration"].append(
            row(
                "fp32",
                "FP32 forward (floor)",
                "",
                n,
                run(f"fp32-fwd-{n}", job, f"FP32 forward over {n} samples"),
            )
        )
    save()

    # Quantized models: (tool, variant, method, samples) -> path, for evaluation and latency.
    produced: list[tuple[str, str, str, str, int, Path]] = []

    def evaluate(tool: str, label: str, tag: str, method: str, n: int, path: Path) -> None:
        job = {
            **evaluation,
            "model": os.fspath(path),
            "reference": os.fspath(reference),
            "write_reference": False,
        }
        record = run(f"eval-{tag}", job, f"CER and fidelity of {tag}")
        report["accuracy"].append(row(tool, label, method, n, record))
        if "cer" in record:
            log(
                f"[eval-{tag}] CER {100 * record['cer']:.2f} %, argmax agreement "
                f"{100 * record['argmax_agreement']:.2f} %"
            )
        save()

    if not args.skip_graphopt:
        # The FP32 model graphopt quantizes: the file after the lossless cleanup pass alone.
        path = models / "graphopt-cleanup.onnx"
        job = {
            "job": "graphopt_cleanup",
            "model": os.fspath(model),
            "out": os.fspath(path),
            "workdir": os.fspath(cache / "work" / "graphopt-cleanup"),
        }
        record = run("graphopt-cleanup", job, "graphopt's cleanup pass alone")
        report["calibration"].append(row("graphopt-cleanup", CLEANUP_LABEL, "", 0, record))
        save()
        if record["status"] == "ok":
            produced.append(("graphopt-cleanup", CLEANUP_LABEL, "graphopt-cleanup", "", 0, path))
            evaluate("graphopt-cleanup", CLEANUP_LABEL, "graphopt-cleanup", "", 0, path)
            cleaned = report["accuracy"][-1].get("cer")
            if cleaned is not None and cleaned != report["accuracy"][0]["cer"]:
                log(f"graphopt cleanup changed the CER: {100 * cleaned:.2f} % (not lossless)")
        else:
            report["accuracy"].append(
                row("graphopt-cleanup", CLEANUP_LABEL, "", 0, {"status": record["status"]})
            )

    if not args.skip_ort:
        for prep in args.ort_input_list:
            source = model
            if prep == "prepared":
                source = models / "ort-prepared.onnx"
                job = {"job": "ort_prepare", "model": os.fspath(model), "out": os.fspath(source)}
                record = run("ort-prepare", job, "opset 13 + ORT's quant_pre_process")
                report["calibration"].append(
                    row("ort-prepare", "ORT prep: opset 13 + quant_pre_process", "", 0, record)
                )
                save()
                if record["status"] != "ok":
                    log(f"ORT preparation failed, no ORT rows on the prepared model: {record}")
                    continue
            for variant, label in ORT_VARIANTS.items():
                tool = f"ort-{variant}" if prep == "prepared" else f"ort-raw-{variant}"
                label = label if prep == "prepared" else f"{label}, raw file"
                for method in (m for m in args.method_list if m in runs.ORT_METHODS):
                    for n in args.sample_counts:
                        tag = f"{tool}-{method}-{n}"
                        path = models / f"{tag}.onnx"
                        job = {
                            "job": "ort_quantize",
                            "model": os.fspath(source),
                            "calib": os.fspath(calib),
                            "samples": n,
                            "batch": args.ort_batch,
                            "method": method,
                            "activations": variant,
                            "out": os.fspath(path),
                        }
                        what = f"quantize_static {method}, {variant} activations, {n} samples"
                        record = run(tag, job, f"{what} ({prep} model)")
                        report["calibration"].append(row(tool, label, method, n, record))
                        save()
                        if record["status"] == "ok":
                            produced.append((tool, label, tag, method, n, path))
                            evaluate(tool, label, tag, method, n, path)
                        else:
                            status = {"status": record["status"]}
                            report["accuracy"].append(row(tool, label, method, n, status))

    if not args.skip_graphopt:
        missing = graphopt_quantize_status()
        report["graphopt_quantize"] = (
            "available" if missing is None else f"not available: {missing}"
        )
        for tool, base_label, variant in GRAPHOPT_VARIANTS:
            for method in args.method_list:
                for n in args.sample_counts:
                    tag = f"{tool}-{method}-{n}"
                    if missing is not None:
                        unavailable = {"status": "not available", "error": missing}
                        report["calibration"].append(row(tool, base_label, method, n, unavailable))
                        continue
                    path = models / f"{tag}.onnx"
                    job = {
                        "job": "graphopt_quantize",
                        "model": os.fspath(model),
                        "calib": os.fspath(calib),
                        "samples": n,
                        "batch": args.batch,
                        "method": method,
                        **variant,
                        "out": os.fspath(path),
                        "workdir": os.fspath(cache / "work" / tag),
                    }
                    what = f"graphopt quantize {variant['target']} {method}, {n} samples"
                    if variant["target"] == "ort-cpu":
                        what += f", ort_kernels={variant['ort_kernels']}"
                    record = run(tag, job, what)
                    label = base_label
                    if variant["target"] == "ort-cpu" and variant["ort_kernels"] == "auto":
                        chosen = record.get("ort_kernels")
                        label = f"{base_label} {chosen} (auto)" if chosen else base_label
                    report["calibration"].append(row(tool, label, method, n, record))
                    save()
                    if record["status"] == "ok":
                        produced.append((tool, label, tag, method, n, path))
                        evaluate(tool, label, tag, method, n, path)
                    else:
                        status = {"status": record["status"]}
                        report["accuracy"].append(row(tool, label, method, n, status))
        if missing is not None:
            log(f"graphopt rows: not available ({missing})")

    if not args.skip_latency:
        timed: list[tuple[str, str, str, str, int, Path]] = [("fp32", "FP32", "fp32", "", 0, model)]
        order = {m: i for i, m in enumerate(ALL_METHODS)}
        for tool in dict.fromkeys(p[0] for p in produced):
            mine = [p for p in produced if p[0] == tool]
            timed.append(max(mine, key=lambda p: (p[4], -order.get(p[3], 0))))
        # Rounds over all models, so that a slow spell of the machine hits every model alike.
        records: dict[str, list[dict[str, Any]]] = {entry[2]: [] for entry in timed}
        for round_ in range(args.latency_rounds):
            for _tool, _label, tag, _method, _n, path in timed:
                job = {
                    "job": "latency",
                    "model": os.fspath(path),
                    "test": os.fspath(test),
                    "threads": [1, 2],
                    "sizes": [1, 16],
                    "runs": args.latency_runs,
                    "warmup": 5 if not args.quick else 2,
                }
                records[tag].append(
                    run(
                        f"latency-{tag}-r{round_ + 1}",
                        job,
                        f"latency of {tag}, round {round_ + 1}/{args.latency_rounds}",
                    )
                )
        for tool, label, tag, method, n, _path in timed:
            report["latency"].extend(
                row(tool, label, method, n, r) for r in _latency_rows(records[tag])
            )
        save()

    save()
    print_tables(report)
    print(f"report: {report_path}")


if __name__ == "__main__":
    main()

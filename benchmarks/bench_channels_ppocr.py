"""Benchmark: channel removal on real models, PP-OCRv4 text detection and recognition.

The models are `ch_PP-OCRv4_det_infer.onnx` and `ch_PP-OCRv4_rec_infer.onnx` from the
rapidocr-onnxruntime 1.4.4 wheel (fetched once with `pip download --no-deps` into the cache
folder and unzipped there; never committed). For each:

  original   the file as shipped;
  cleanup    graphopt `cleanup` (what users run first: BatchNorm and affine folds, HardSwish);
  channels   `cleanup`, then `channels` at ratio 0.25 and 0.5 (l2 importance, round_to=8
             unless --round-to says otherwise), through graphopt's pipeline (so the model is
             sorted and checked after every pass).

Reported: parameters and FLOPs (graphopt.analysis, at the benchmark's input size), the groups
the pass found, refused (with their reasons, as `graphopt inspect --groups` gives them) and
pruned, the output shapes, and ONNX Runtime CPU latency: median over interleaved rounds (every
model timed once per round, so a neighbour's load spreads over all of them), batch 1, with 1
and 2 intra-op threads. Inputs: det 1x3x640x640, rec 1x3x48x320 (rapidocr's sizes).

The pruned models are not fine-tuned: their outputs are not meant to be right, only their
cost is measured here.

Prints tables and writes JSON (default <cache>/channels_ppocr.json). Not run by CI.

    python benchmarks/bench_channels_ppocr.py
    python benchmarks/bench_channels_ppocr.py --rounds 5 --runs 5    # quicker, noisier
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(ROOT / "benchmarks"))

import machine_info  # noqa: E402
from ppocr.model import WHEEL_NAME, WHEEL_REQUIREMENT  # noqa: E402

MODELS = {
    "det": ("ch_PP-OCRv4_det_infer.onnx", (1, 3, 640, 640)),
    "rec": ("ch_PP-OCRv4_rec_infer.onnx", (1, 3, 48, 320)),
}
RATIOS = (0.25, 0.5)
THREADS = (1, 2)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fetch(cache: Path, file_name: str) -> Path:
    """The model file from the wheel, downloaded (no dependencies) and unzipped once."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / file_name
    if path.exists():
        return path
    wheel = cache / WHEEL_NAME
    if not wheel.exists():
        log(f"downloading {WHEEL_REQUIREMENT} into {cache} ...")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
             WHEEL_REQUIREMENT, "-d", os.fspath(cache)],
            check=True,
        )  # fmt: skip
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(f"rapidocr_onnxruntime/models/{file_name}")
    partial = path.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(path)
    return path


def _dims(model, shape: tuple[int, ...]) -> dict[str, int]:
    """Values for the symbolic input dimensions, from the benchmark's input shape."""
    spec = model.input_specs()[0]
    return {d: v for d, v in zip(spec.shape, shape, strict=True) if isinstance(d, str)}


def _reason(text: str) -> str:
    """A refusal without its tensor and node names, so equal reasons count together."""
    return re.sub(r"'[^']*'", "'…'", text)


def _weight_coverage(model, analysis) -> float:
    """Share of Conv/ConvTranspose/Gemm/MatMul weight parameters in prunable groups (on
    their output or input channel axis), as the tests' `channels_check.weight_coverage`."""
    from graphopt.passes.cleanup.common import constant

    prunable = {id(s.value) for g in analysis.prunable() for s in g.members}
    total = covered = 0
    for node in model.graph:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        tensor = constant(node.inputs[1]) if node.inputs[1] is not None else None
        if tensor is None:
            continue
        size = int(np.prod(tensor.shape))
        total += size
        covered += size * (id(node.inputs[1]) in prunable)
    return covered / total if total else 0.0


def build(name: str, source: Path, shape: tuple[int, ...], out: Path, round_to: int) -> dict:
    """Write original/cleanup/channels models under `out`; their stats and the pass's."""
    from graphopt.analysis import analyze
    from graphopt.context import Context
    from graphopt.model import load_model, save_model
    from graphopt.passes.channels import analyze_model
    from graphopt.pipeline import run_pipeline
    from graphopt.recipe import inline_recipe

    variants: dict[str, dict[str, Any]] = {}
    original = load_model(source)
    dims = _dims(original, shape)
    variants["original"] = {"path": source, "stats": analyze(original, dims=dims)}

    cleaned = load_model(source)
    start = time.perf_counter()
    run_pipeline(cleaned, inline_recipe(["cleanup"]), Context(workdir=out))
    cleanup_s = time.perf_counter() - start
    path = save_model(cleaned, out / f"{name}-cleanup.onnx").path
    variants["cleanup"] = {"path": path, "stats": analyze(cleaned, dims=dims), "s": cleanup_s}
    analysis = analyze_model(cleaned)
    refused = Counter(_reason(g.refusals[0]) for g in analysis.groups if g.refusals)
    groups = {
        "groups": len(analysis.groups),
        "prunable": len(analysis.prunable()),
        "channels": sum(g.channels for g in analysis.groups),
        "channels_prunable": sum(g.channels for g in analysis.prunable()),
        "weight_coverage": _weight_coverage(cleaned, analysis),
        "refused_by_reason": dict(refused.most_common()),
        "refused": [g.describe() for g in analysis.groups if g.refusals],
    }

    for ratio in RATIOS:
        model = load_model(source)
        recipe = inline_recipe(["cleanup", f"channels:ratio={ratio},round_to={round_to}"])
        start = time.perf_counter()
        result = run_pipeline(model, recipe, Context(workdir=out))
        seconds = time.perf_counter() - start
        path = save_model(model, out / f"{name}-channels-{ratio}.onnx").path
        variants[f"channels {ratio}"] = {
            "path": path,
            "stats": analyze(model, dims=dims),
            "s": seconds,
            "pass_stats": result.steps[-1].pass_stats,
            "warnings": result.steps[-1].warnings,
        }
    return {"variants": variants, "groups": groups, "dims": dims}


def time_models(
    paths: dict[str, Path], feeds: dict[str, np.ndarray], threads: int, rounds: int, runs: int
) -> dict[str, dict[str, Any]]:
    """Median latency of each model: `rounds` rounds, each timing every model `runs` times
    (after one warm-up round), so that background load is shared out fairly."""
    from graphopt.runtime import create_session

    sessions = {k: create_session(p, device="cpu", threads=threads) for k, p in paths.items()}
    shapes = {}
    for key, session in sessions.items():
        for _ in range(3):
            outputs = session.run(feeds)
        shapes[key] = [list(v.shape) for v in outputs.values()]
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for key, session in sessions.items():
            for _ in range(runs):
                start = time.perf_counter()
                session.run(feeds)
                times[key].append((time.perf_counter() - start) * 1000.0)
    return {
        key: {
            "median_ms": float(np.median(t)),
            "p10_ms": float(np.percentile(t, 10)),
            "p90_ms": float(np.percentile(t, 90)),
            "samples": len(t),
            "output_shapes": shapes[key],
        }
        for key, t in times.items()
    }


def _git_state() -> dict[str, Any]:
    """The commit, and the files under passes/ that differ from it (handlers being written)."""

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    changed = git("status", "--porcelain", "--", "passes")
    return {"commit": git("rev-parse", "HEAD"), "passes_changed": changed.splitlines()}


def _row(values: list[str]) -> str:
    return "| " + " | ".join(values) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache/ppocr")
    parser.add_argument("--out", type=Path, default=None, help="JSON report path")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per model per round")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    out_path = args.out or args.cache / "channels_ppocr.json"

    report: dict[str, Any] = {
        "machine": machine_info.machine(),
        "versions": machine_info.versions(),
        "git": _git_state(),
        "settings": {
            "rounds": args.rounds,
            "runs": args.runs,
            "round_to": args.round_to,
            "ratios": RATIOS,
            "threads": THREADS,
        },  # fmt: skip
        "models": {},
    }
    tables: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            file_name, shape = MODELS[name]
            source = fetch(args.cache, file_name)
            log(f"{name}: cleanup and channels ...")
            built = build(name, source, shape, Path(tmp), args.round_to)
            variants = built["variants"]
            feeds = {"x": np.random.default_rng(0).random(shape, dtype=np.float32)}
            latency = {}
            for threads in THREADS:
                log(f"{name}: timing with {threads} thread(s) ...")
                load_before = os.getloadavg()[0]
                latency[threads] = time_models(
                    {k: v["path"] for k, v in variants.items()}, feeds, threads,
                    args.rounds, args.runs,
                )  # fmt: skip
                latency[threads]["load_avg_1min"] = [load_before, os.getloadavg()[0]]
            entry = {
                "input_shape": list(shape),
                "groups": built["groups"],
                "variants": {},
            }
            base = variants["original"]["stats"]
            clean = variants["cleanup"]["stats"]
            lines = [
                f"\n{name} ({'x'.join(map(str, shape))}): {built['groups']['prunable']} of "
                f"{built['groups']['groups']} groups prunable, "
                f"{built['groups']['weight_coverage']:.0%} of Conv/Gemm/MatMul weights; refused: "
                f"{built['groups']['refused_by_reason'] or 'none'}",
                _row(
                    [
                        "model",
                        "params",
                        "GFLOPs",
                        "FLOPs vs orig",
                        "groups pruned",
                        "channels removed",
                        *[f"{t}T ms" for t in THREADS],
                        *[f"{t}T vs orig" for t in THREADS],
                        *[f"{t}T vs cleanup" for t in THREADS],
                    ]
                ),  # fmt: skip
                "|---|" + "---:|" * (5 + 3 * len(THREADS)),
            ]
            for key, variant in variants.items():
                stats = variant["stats"]
                ms = [latency[t][key]["median_ms"] for t in THREADS]
                orig_ms = [latency[t]["original"]["median_ms"] for t in THREADS]
                clean_ms = [latency[t]["cleanup"]["median_ms"] for t in THREADS]
                pass_stats = variant.get("pass_stats", {})
                entry["variants"][key] = {
                    "params": stats.params,
                    "flops": stats.flops,
                    "flops_unknown": stats.flops_unknown,
                    "params_ratio": stats.params / base.params,
                    "flops_ratio": stats.flops / base.flops,
                    "flops_ratio_vs_cleanup": stats.flops / clean.flops,
                    "pass_stats": pass_stats,
                    "warnings": variant.get("warnings", []),
                    "seconds": variant.get("s"),
                    "latency": {str(t): latency[t][key] for t in THREADS},
                    "latency_ratio": {
                        str(t): m / o for t, m, o in zip(THREADS, ms, orig_ms, strict=True)
                    },
                    "latency_ratio_vs_cleanup": {
                        str(t): m / c for t, m, c in zip(THREADS, ms, clean_ms, strict=True)
                    },
                }
                lines.append(
                    _row(
                        [
                            key,
                            f"{stats.params:,}",
                            f"{stats.flops / 1e9:.3f}",
                            f"{stats.flops / base.flops:.2f}×",
                            str(pass_stats.get("groups_pruned", "-")),
                            str(pass_stats.get("channels_removed", "-")),
                            *[f"{m:.1f}" for m in ms],
                            *[f"{m / o:.2f}×" for m, o in zip(ms, orig_ms, strict=True)],
                            *[f"{m / c:.2f}×" for m, c in zip(ms, clean_ms, strict=True)],
                        ]
                    )  # fmt: skip
                )
            entry["load_avg_1min"] = {str(t): latency[t]["load_avg_1min"] for t in THREADS}
            report["models"][name] = entry
            tables.append("\n".join(lines))
            print(tables[-1], flush=True)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(report, indent=2, default=str))
    log(f"wrote {out_path}")


if __name__ == "__main__":
    main()

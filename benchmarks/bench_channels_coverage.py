"""Benchmark: which share of a model channel removal can reach, graphopt against Torch-Pruning.

For every architecture of tests/channels_corpus.py (PyTorch modules, small widths):

  ours    torch.onnx.export (opset 17, TorchScript exporter) -> graphopt `cleanup` -> the
          channel groups of `graphopt inspect --groups`; then `channels` at ratio 0.3 and
          0.5 with round_to=1 (and 8): full ONNX checker, ONNX Runtime run, output shapes.
  theirs  Torch-Pruning's DependencyGraph on the same module (output layers ignored, as its
          examples ignore the classifier; attention head counts declared with num_heads and
          written back after pruning, as its ViT example does); then MagnitudePruner (L2)
          at ratio 0.3 and 0.5: does the pruned module still run with the same output shapes.

"share" is the same for both: parameters of the weight tensors of Conv/ConvTranspose/
Gemm/Linear/MatMul-with-constant-weight layers that sit in at least one prunable group (on
their output or their input channels), over the parameters of all those weight tensors.
"removed" is the fraction of those parameters gone after pruning at the ratio.

Prints a table and writes JSON (default .cache/channels/coverage.json). Not run by CI.

    python benchmarks/bench_channels_coverage.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(ROOT))
sys.path.insert(0, os.fspath(ROOT / "benchmarks"))

import machine_info  # noqa: E402

RATIOS = (0.3, 0.5)


def _ours(name: str, workdir: Path) -> dict[str, Any]:
    import numpy as np
    import onnx
    import onnx_ir as ir

    from graphopt.context import Context
    from graphopt.model import Model
    from graphopt.passes.channels import analyze_model
    from graphopt.pipeline import run_pipeline
    from graphopt.recipe import inline_recipe
    from graphopt.runtime import create_session
    from tests import channels_corpus as corpus

    arch = corpus.CORPUS[name]
    start = time.perf_counter()
    proto = corpus.export(arch)
    export_s = time.perf_counter() - start
    feeds = {"x": arch.example().numpy()}
    original = Model(ir=ir.serde.deserialize_model(proto))
    want = [v.shape for v in create_session(original, device="cpu").run(feeds).values()]

    model = Model(ir=ir.serde.deserialize_model(proto))
    start = time.perf_counter()
    run_pipeline(model, inline_recipe(["cleanup"]), Context(workdir=workdir))
    coverage = corpus.graphopt_coverage(model)
    analysis = analyze_model(model)
    analyze_s = time.perf_counter() - start
    refused = [
        {"channels": g.channels, "sources": g.sources, "refusals": g.refusals}
        for g in analysis.groups
        if not g.prunable
    ]
    pruned: dict[str, Any] = {}
    for ratio in RATIOS:
        for round_to in (1, 8):
            model = Model(ir=ir.serde.deserialize_model(proto))
            recipe = inline_recipe(["cleanup", f"channels:ratio={ratio},round_to={round_to}"])
            row: dict[str, Any] = {}
            try:
                result = run_pipeline(model, recipe, Context(workdir=workdir))
                out = model.to_proto()
                onnx.checker.check_model(out, full_check=True)
                outputs = list(create_session(model, device="cpu").run(feeds).values())
                after = corpus.graphopt_coverage(model)
                row = {
                    "ok": [v.shape for v in outputs] == want
                    and all(np.isfinite(v).all() for v in outputs),
                    "removed": 1 - after.total / coverage.total,
                    "flops_ratio": result.steps[2].model_stats.flops
                    / result.steps[1].model_stats.flops,
                    "stats": result.steps[2].pass_stats,
                }
            except Exception as exc:  # noqa: BLE001 - a failure is a finding to report
                row = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
            pruned[f"{ratio}/round_to={round_to}"] = row
    return {
        "weight_params": coverage.total,
        "share": coverage.share,
        "uncovered": coverage.uncovered(),
        "refused_groups": refused,
        "pruned": pruned,
        "export_s": export_s,
        "cleanup_and_analysis_s": analyze_s,
    }


def _theirs(name: str) -> dict[str, Any]:
    from tests import channels_corpus as corpus

    arch = corpus.CORPUS[name]
    start = time.perf_counter()
    coverage = corpus.torch_pruning_coverage(arch)
    graph_s = time.perf_counter() - start
    if isinstance(coverage, str):
        return {"share": None, "error": coverage, "pruned": {}, "graph_s": graph_s}
    want = None
    pruned: dict[str, Any] = {}
    for ratio in RATIOS:
        _, shapes, before, after = corpus.torch_pruning_prune(arch, ratio)
        if want is None:
            import torch

            with torch.no_grad():
                out = arch.module()(arch.example())
            want = [tuple(o.shape) for o in (out if isinstance(out, tuple) else (out,))]
        ok = shapes == want
        pruned[str(ratio)] = {
            "ok": ok,
            "removed": 1 - after / before,
            **({} if ok else {"error": shapes}),
        }
    return {
        "weight_params": coverage.total,
        "share": coverage.share,
        "uncovered": coverage.uncovered(),
        "pruned": pruned,
        "graph_s": graph_s,
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".cache/channels/coverage.json")
    parser.add_argument("--only", nargs="*", help="architecture names (default: all)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from tests import channels_corpus as corpus

    names = args.only or list(corpus.CORPUS)
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows[name] = {"graphopt": _ours(name, Path(tmp)), "torch_pruning": _theirs(name)}
            print(f"done {name}", file=sys.stderr, flush=True)

    header = (
        "| architecture | weight params | graphopt share | Torch-Pruning share | "
        "graphopt removed at 0.3 / 0.5 | Torch-Pruning removed at 0.3 / 0.5 | "
        "Torch-Pruning's pruned module |"
    )
    print(header)
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, row in rows.items():
        ours, theirs = row["graphopt"], row["torch_pruning"]
        our_removed = " / ".join(
            _pct(ours["pruned"][f"{r}/round_to=1"].get("removed"))
            if ours["pruned"][f"{r}/round_to=1"]["ok"]
            else "fails"
            for r in RATIOS
        )
        if theirs["share"] is None:
            their_removed, status = "-", f"DependencyGraph fails: {theirs['error']}"
        else:
            their_removed = " / ".join(_pct(theirs["pruned"][str(r)]["removed"]) for r in RATIOS)
            bad = [f"{r}: {p['error']}" for r, p in theirs["pruned"].items() if not p["ok"]]
            status = "runs, shapes kept" if not bad else "; ".join(bad)
        print(
            f"| {name} | {ours['weight_params']:,} | {_pct(ours['share'])} | "
            f"{_pct(theirs['share'])} | {our_removed} | {their_removed} | {status} |"
        )
    failures = [
        f"{name} {key}: {p.get('error', 'shapes changed')}"
        for name, row in rows.items()
        for key, p in row["graphopt"]["pruned"].items()
        if not p["ok"]
    ]
    print("\ngraphopt pruned models failing: " + ("; ".join(failures) if failures else "none"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine_info.machine(),
        "versions": machine_info.versions(("torch", "torch-pruning")),
        "ratios": RATIOS,
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

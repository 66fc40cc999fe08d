"""Benchmark: win back a pruned or quantized PP-OCRv4 recogniser's accuracy by distillation.

The model is `ch_PP-OCRv4_rec_infer.onnx` from the rapidocr-onnxruntime 1.4.4 wheel (fetched
once with `pip download --no-deps` into the cache; see ppocr/model.py). The data are text
lines rendered with Pillow (ppocr/lines.py): a training split (seed 3, `--train-lines`) and the
test split of bench_quantize_ppocr.py (seed 2, `--test-lines`), disjoint by construction.

  original    the file as shipped; its logits on the training lines are the teacher's
              (graphopt's export_logits);
  pruned      graphopt cleanup, then channel removal at `--ratio`. With `--max-group-cer 1`
              every prunable group goes, through the channels pass as a user runs it
              (l2 importance, round_to=8, regression compensation in 8 stages on the
              training lines). Below 1, a sensitivity scan first removes each prunable
              group alone (l2, round_to=8, one-shot regression compensation) and scores
              the decoded lines against the original's on the first `--scan-lines`
              training lines (no labels used); the groups up to `--max-group-cer` are then
              removed together. The share of the model's output channels removed is
              reported;
  distilled   the pruned model after graphopt's distill pass against the teacher logits
              (KL at temperature `--temperature`, AdamW, warm-up and cosine, the best
              epoch on a 10 % holdout of the training lines);
  int8        (with --qat) graphopt cleanup + quantize (target=ort-cpu, minmax, 512 lines of
              the quantize benchmark's calibration split), then distill on the same Q/DQ
              graph: its int8 weights train as float shadows and go back as int8 (QAT).

Reported: CER and exact-line accuracy on the test split (rapidocr's greedy CTC decoding),
parameters and FLOPs, training time and steps. Prints a table and writes
<cache>/distill_report.json. Not run by CI.

    python benchmarks/bench_distill_ppocr.py --ratio 0.4 --max-group-cer 1 --epochs 4 --lr 5e-4
    python benchmarks/bench_distill_ppocr.py                       # scan, ratio 0.5, 3 epochs
    python benchmarks/bench_distill_ppocr.py --train-lines 256 --epochs 1 --test-lines 200
    python benchmarks/bench_distill_ppocr.py --qat
"""

from __future__ import annotations

import argparse
import json
import os
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
TRAIN_SEED, TEST_SEED, CALIB_SEED = 3, 2, 1
DATA_VERSION = 1  # as bench_quantize_ppocr.py: bump when ppocr/lines.py renders differently


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def split(cache: Path, name: str, count: int, seed: int, model: Path) -> Path:
    """Render (once) `count` lines with `seed` into <cache>/data."""
    from ppocr.lines import find_fonts, make_lines, write_split

    stem = f"{name}_{count}_seed{seed}_v{DATA_VERSION}"
    folder = cache / "data"
    npz = folder / f"{stem}.npz"
    if not (npz.exists() and npz.with_name(f"{stem}.labels.json").exists()):
        log(f"rendering {count} {name} lines (seed {seed}) ...")
        characters = set(read_characters(model)[1:])
        x, labels = make_lines(count, seed, characters, find_fonts())
        write_split(folder, stem, x, labels)
    return npz


def output_channels(model: Any) -> int:
    """Output channels of every Conv, Gemm and MatMul with a constant weight."""
    total = 0
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if weight is None or weight.const_value is None:
            continue
        shape = weight.const_value.shape
        if node.op_type == "Conv":
            total += int(shape[0])
        elif node.op_type == "Gemm" and any(
            a.name == "transB" and a.as_int() for a in node.attributes.values()
        ):
            total += int(shape[0])
        else:
            total += int(shape[-1])
    return total


def _plan(model: Any, ratio: float, only: list[int]) -> tuple[Any, dict[int, Any]]:
    from graphopt.passes.channels import analyze_model, plan, scorers

    analysis = analyze_model(model)
    groups = [g for g in analysis.prunable() if g.id in only]
    scores = {g.id: scorers.weight_norm(g, analysis, 2) for g in groups}
    removal = plan(groups, scores, ratio=ratio, round_to=8, global_ratio=False, max_ratio=0.8)
    return analysis, removal


def remove_groups(
    model: Any, ctx: Any, groups: list[int], ratio: float, method: str = "regression"
) -> int:
    """Remove `ratio` of the channels of these groups (l2, round_to=8), with one-shot
    compensation (`method`); the number of channels removed."""
    from graphopt.passes.channels import METADATA_KEY
    from graphopt.passes.channels.compensate import compensate
    from graphopt.passes.channels.rewrite import compose, remove

    analysis, removal = _plan(model, ratio, groups)
    compensate(model, analysis, removal, ctx, 128, method)
    kept = remove(model.ir, analysis, removal)
    model.metadata[METADATA_KEY] = compose(model.metadata.get(METADATA_KEY, {}), kept)
    return int(sum(len(r) for r in removal.values()))


def scan_groups(cleaned: Any, ctx: Any, train: Path, model_path: Path, args: Any) -> list[dict]:
    """Each prunable group removed alone at `args.ratio`: the CER of the decoded lines
    against the original model's on the first `args.scan_lines` training lines."""
    import onnxruntime as ort
    from ppocr.metrics import Accuracy
    from ppocr.model import CTCDecoder

    from graphopt.passes.channels import analyze_model

    x = runs.read_rows(train, args.scan_lines)
    decoder = CTCDecoder(read_characters(model_path))

    def texts(model: Any) -> list[str]:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(model.to_proto().SerializeToString(), options)
        lines: list[str] = []
        for chunk in runs.batches(x, 16):
            lines += decoder(session.run(None, {"x": chunk})[0])
        return lines

    reference = texts(cleaned)
    rows = []
    groups = analyze_model(cleaned).prunable()
    for i, group in enumerate(groups):
        trial = cleaned.copy()
        removed = remove_groups(trial, ctx, [group.id], args.ratio)
        accuracy = Accuracy()
        accuracy.add(texts(trial), reference)
        cer = accuracy.to_dict()["cer"]
        rows.append(
            {"group": group.id, "sources": group.sources[:2], "channels": group.channels,
             "removed": removed, "cer": round(float(cer), 4)}
        )  # fmt: skip
        log(f"  scan {i + 1}/{len(groups)}: group {group.id} {group.sources[0]}: CER {cer:.2%}")
    return rows


def run_passes(model: Any, passes: list[str], ctx: Any) -> Any:
    from graphopt.pipeline import run_pipeline
    from graphopt.recipe import inline_recipe

    return run_pipeline(model, inline_recipe(passes), ctx)


def evaluate(path: Path, test: Path, reference: Path, first: bool) -> dict[str, Any]:
    result = runs.evaluate(path, test, 16, reference, write_reference=first)
    log(f"  {path.name}: CER {result['cer']:.2%}, exact lines {result.get('line_accuracy', 0):.2%}")
    return result


def main() -> None:
    args = parse_args()
    from graphopt.context import Context
    from graphopt.data import open_dataset
    from graphopt.model import load_model, save_model
    from graphopt.passes.distill import TeacherSpec, export_logits

    cache = args.cache
    model_path = fetch_model(cache)
    train = split(cache, "train", args.train_lines, TRAIN_SEED, model_path)
    test = split(cache, "test", args.test_lines, TEST_SEED, model_path)
    out = cache / "distill"
    out.mkdir(parents=True, exist_ok=True)
    reference = out / f"reference_{args.test_lines}.npy"
    distill = (
        f"distill:epochs={args.epochs},lr={args.lr},temperature={args.temperature},"
        f"batch_size={args.batch},holdout=0.1"
    )
    report: dict[str, Any] = {
        "machine": machine_info.machine(),
        "packages": machine_info.versions(),
        "settings": vars(args) | {"cache": str(cache), "distill": distill},
        "rows": [],
    }

    last = cache / "distill_report.json"
    previous = json.loads(last.read_text()) if last.exists() else None

    def save() -> None:
        (cache / "distill_report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="bench-distill-") as workdir:
        original = load_model(model_path)
        data = open_dataset(train, original.input_specs())
        ctx = Context(workdir=Path(workdir), calib_data=data, device="cpu", threads=args.threads)
        logits = out / f"teacher_{args.train_lines}.npy"
        if not logits.exists():
            log("teacher logits of the original model on the training lines ...")
            start = time.perf_counter()
            export_logits(original, data, logits, batch_size=16, device="cpu", threads=args.threads)
            report["teacher_logits_s"] = round(time.perf_counter() - start, 1)
        ctx.teacher = TeacherSpec(logits=logits)
        base = evaluate(model_path, test, reference, first=True)
        cleaned = load_model(model_path)  # the file keeps its weights in Constant nodes
        run_passes(cleaned, ["cleanup"], ctx)
        total_channels = output_channels(cleaned)
        report["rows"].append(
            {"model": "original", **_cost(original), "channels": total_channels, **_acc(base)}
        )
        save()

        if args.skip_prune and previous is not None:
            report["rows"] += [r for r in previous["rows"] if r["model"].startswith("pruned")]
            report["scan"] = previous.get("scan")
            log("pruning and its distillation: rows reused from the last report (--skip-prune)")
        else:
            pruned = cleaned.copy()
            if args.max_group_cer >= 1:  # every group: the channels pass as a user runs it
                channels = f"channels:ratio={args.ratio},round_to=8,importance=l2,samples=128"
                log(f"pruning: cleanup, {channels} (every group) ...")
                stats = run_passes(pruned, [channels], ctx).steps[-1].pass_stats
                chosen_count, scanned = stats["groups_pruned"], stats["groups_prunable"]
                removed = stats["channels_removed"]
                report["settings"]["channels"] = channels
            else:
                log(f"pruning: cleanup, sensitivity scan, channels ratio={args.ratio} ...")
                scan_file = out / f"scan_{args.ratio}_{args.scan_lines}_{train.stem}.json"
                if scan_file.exists():  # the scan depends only on the model, ratio and lines
                    scan = json.loads(scan_file.read_text())
                else:
                    scan = scan_groups(cleaned, ctx, train, model_path, args)
                    scan_file.write_text(json.dumps(scan, indent=1) + "\n")
                report["scan"] = scan
                chosen = [row["group"] for row in scan if row["cer"] <= args.max_group_cer]
                removed = remove_groups(pruned, ctx, chosen, args.ratio)
                chosen_count, scanned = len(chosen), len(scan)
            pruned_path = save_model(pruned, out / f"pruned_{args.ratio}.onnx").path
            kept = output_channels(pruned)
            removed_share = 1 - kept / total_channels
            row = {"model": f"pruned ({chosen_count} groups at {args.ratio})", **_cost(pruned)}
            row |= {"channels": kept, "channels_removed_share": round(removed_share, 4)}
            row |= {"groups_pruned": chosen_count, "groups_scanned": scanned}
            row |= {"channels_removed_in_groups": removed}
            row |= _acc(evaluate(pruned_path, test, reference, first=False))
            report["rows"].append(row)
            save()

            log(f"distilling the pruned model: {distill} ...")
            start = time.perf_counter()
            result = run_passes(pruned, [distill], ctx)
            seconds = time.perf_counter() - start
            distilled_path = save_model(pruned, out / f"distilled_{args.ratio}.onnx").path
            row = {"model": "pruned + distill", **_cost(pruned), "channels": kept}
            row |= _training(result.steps[-1].pass_stats, seconds)
            row |= _acc(evaluate(distilled_path, test, reference, first=False))
            report["rows"].append(row)
            save()

        if args.qat:
            calib = split(cache, "calib", 512, CALIB_SEED, model_path)
            log("quantizing: cleanup, quantize target=ort-cpu minmax ...")
            quantized = load_model(model_path)
            qctx = Context(
                workdir=Path(workdir),
                calib_data=open_dataset(calib, quantized.input_specs()),
                device="cpu",
                threads=args.threads,
            )
            run_passes(quantized, ["cleanup", "quantize:target=ort-cpu,calibrator=minmax"], qctx)
            q_path = save_model(quantized, out / "int8.onnx").path
            row = {"model": "int8 (ort-cpu, minmax)", **_cost(quantized)}
            row |= _acc(evaluate(q_path, test, reference, first=False))
            report["rows"].append(row)
            save()
            qat = (
                f"distill:epochs={args.qat_epochs},lr={args.qat_lr},temperature={args.temperature},"
                f"batch_size={args.batch},holdout=0.1"
            )
            report["settings"]["qat"] = qat
            log(f"QAT: distilling the int8 model: {qat} ...")
            start = time.perf_counter()
            result = run_passes(quantized, [qat], ctx)
            seconds = time.perf_counter() - start
            qat_path = save_model(quantized, out / "int8_distilled.onnx").path
            row = {"model": "int8 + distill (QAT)", **_cost(quantized)}
            row |= _training(result.steps[-1].pass_stats, seconds)
            row |= _acc(evaluate(qat_path, test, reference, first=False))
            report["rows"].append(row)
            save()
    print_table(report)


def _cost(model: Any) -> dict[str, Any]:
    """Parameters and GFLOPs at batch 1 of 3x48x320 lines."""
    from graphopt.analysis import analyze

    spec = model.input_specs()[0]
    dims = {d: v for d, v in zip(spec.shape, (1, 3, 48, 320), strict=True) if isinstance(d, str)}
    stats = analyze(model, dims=dims)
    return {"params": stats.params, "gflops": round(stats.flops / 1e9, 4)}


def _acc(result: dict[str, Any]) -> dict[str, Any]:
    keep = ("cer", "line_accuracy", "cer_no_spaces", "lines")
    return {k: result[k] for k in keep if k in result}


def _training(stats: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {
        "train_s": round(seconds, 1),
        "steps": stats.get("steps"),
        "epochs": stats.get("epochs"),
        "best_epoch": stats.get("best_epoch"),
        "holdout": stats.get("holdout"),
        "train_samples": stats.get("train_samples"),
    }


def print_table(report: dict[str, Any]) -> None:
    header = ["model", "params", "GFLOPs", "channels", "CER", "exact lines", "train s", "steps"]
    rows = []
    for row in report["rows"]:
        rows.append(
            [
                row["model"],
                f"{row['params']:,}",
                f"{row['gflops']:.3f}",
                str(row.get("channels", "-")),
                f"{row['cer']:.2%}",
                f"{row.get('line_accuracy', float('nan')):.2%}",
                str(row.get("train_s", "-")),
                str(row.get("steps", "-")),
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    for row in report["rows"]:
        if "channels_removed_share" in row:
            print(
                f"\n{row['model']}: {row['channels_removed_share']:.1%} of output channels removed"
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--train-lines", type=int, default=2000)
    parser.add_argument("--test-lines", type=int, default=1000)
    parser.add_argument("--ratio", type=float, default=0.5, help="channels ratio per group")
    parser.add_argument(
        "--max-group-cer", type=float, default=0.05, help="prune the groups whose removal alone "
        "keeps the CER against the original at most this (1: every group)",
    )  # fmt: skip
    parser.add_argument("--scan-lines", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--qat", action="store_true", help="also distill the int8 model")
    parser.add_argument(
        "--skip-prune", action="store_true", help="reuse the last report's pruning rows"
    )
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--qat-lr", type=float, default=5e-5)
    return parser.parse_args()


if __name__ == "__main__":
    main()

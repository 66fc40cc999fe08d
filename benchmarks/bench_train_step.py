"""Benchmark: time per training step of graphopt.train (ONNX Runtime) against PyTorch.

The same two nets, built in PyTorch and exported to ONNX (frozen BatchNorm, cross-entropy,
batch 32, 3x32x32, SGD with momentum), step on both sides with the same number of threads
(intra-op; 2 by default). The nets' initial weights are seeded. For each net: a gradient
check against torch autograd, then `--reps` repetitions of `--steps` steps on each side,
interleaved (graphopt, torch, graphopt, ...) so a busy machine slows both alike, each block
after one untimed step; the medians of the per-repetition ms/step are compared. Then a
breakdown of graphopt's step, interleaved the same way on its own (the forward graph alone;
forward + backward with a numpy optimizer), says where the time goes.

Prints a table and writes JSON (default .cache/bench_train_step/report.json). Needs torch
(test/bench-only); not run by CI; timings need quiet cores.

    python benchmarks/bench_train_step.py [--threads 2] [--reps 5] [--steps 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn as nn

from graphopt.model import Model
from graphopt.runtime import create_session
from graphopt.train import SGD, Loss, Trainer

sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
import machine_info  # noqa: E402

DEFAULT_OUT = Path(".cache/bench_train_step")


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.sc = (
            None
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x):
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(y + (x if self.sc is None else self.sc(x)))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.layers = nn.Sequential(
            Block(32, 32, 1), Block(32, 64, 2), Block(64, 64, 1), Block(64, 128, 2)
        )
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(
            torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)
        )


class MBNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish()
        )
        self.exp = nn.Sequential(
            nn.Conv2d(16, 64, 1, bias=False), nn.BatchNorm2d(64), nn.Hardswish()
        )
        self.dw = nn.Sequential(
            nn.Conv2d(64, 64, 3, 1, 1, groups=64, bias=False), nn.BatchNorm2d(64), nn.Hardswish()
        )
        self.se1 = nn.Conv2d(64, 16, 1)
        self.se2 = nn.Conv2d(16, 64, 1)
        self.proj = nn.Sequential(nn.Conv2d(64, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.dw2 = nn.Sequential(
            nn.Conv2d(16, 16, 3, 2, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6()
        )
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(self.exp(x))
        w = nn.functional.hardsigmoid(
            self.se2(torch.relu(self.se1(nn.functional.adaptive_avg_pool2d(y, 1))))
        )
        x = x + self.proj(y * w)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.dw2(x), 1), 1))


def export(net: nn.Module, x: torch.Tensor) -> Model:
    """The net in eval mode (frozen BN statistics) as an opset-18 ONNX model. BN weights and
    statistics are randomized first, as trained ones would be (fresh ones and zeros are
    deduplicated by the exporter; graphopt unties them anyway)."""
    torch.manual_seed(0)
    net.eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    buf = io.BytesIO()
    torch.onnx.export(
        net, (x,), buf, input_names=["x"], output_names=["logits"], opset_version=18,
        dynamo=False, training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
    )  # fmt: skip
    return Model(ir=ir.from_proto(onnx.load_from_string(buf.getvalue())))


def _per_step(fn, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps * 1000.0


def bench(net: nn.Module, *, threads: int, reps: int, steps: int, batch: int = 32,
          size: int = 32) -> dict[str, Any]:  # fmt: skip
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 10, (batch,))
    model = export(net, x)
    feeds = {"x": x.numpy(), "logits.labels": labels.numpy()}
    loss = [Loss.cross_entropy("logits")]

    # Gradients against torch autograd (float32).
    check = Trainer(model, loss, SGD(lr=0.0, momentum=0.0), threads=threads)
    ort_loss, grads, _ = check.gradients(feeds)
    net.zero_grad()
    ref_loss = nn.functional.cross_entropy(net(x), labels)
    ref_loss.backward()
    named = dict(net.named_parameters())
    # Worst max-abs difference relative to the max (per trainable): one activation that
    # rounds to the other side of a ReLU's zero in float32 moves it to ~1e-3. The relative
    # L2 difference over all trainables is the robust one.
    worst = max(
        float(np.abs(grads[k] - p.grad.numpy()).max() / (np.abs(p.grad.numpy()).max() + 1e-12))
        for k, p in named.items()
    )
    diff2 = sum(float(((grads[k] - p.grad.numpy()) ** 2).sum()) for k, p in named.items())
    norm2 = sum(float((p.grad.numpy() ** 2).sum()) for p in named.values())
    l2 = (diff2 / norm2) ** 0.5

    trainer = Trainer(model, loss, SGD(lr=1e-4, momentum=0.9), threads=threads)
    numpy_trainer = Trainer(
        model, loss, SGD(lr=1e-4, momentum=0.9), threads=threads, optimizer_in_graph=False
    )
    forward = create_session(model, device="cpu", threads=threads)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)

    def torch_step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), labels).backward()
        opt.step()

    # The headline pair, interleaved; then the breakdown pair, so that neither breakdown
    # session runs between a graphopt block and a torch block. Each block starts with one
    # untimed step, which absorbs the switch from the other runtime's threads.
    pairs = [
        {"graphopt": lambda: trainer.step(feeds), "torch": torch_step},
        {
            "graphopt_numpy_optimizer": lambda: numpy_trainer.step(feeds),
            "ort_forward_only": lambda: forward.run({"x": feeds["x"]}),
        },
    ]
    times: dict[str, list[float]] = {}
    for pair in pairs:
        for fn in pair.values():  # warm-up
            for _ in range(3):
                fn()
        for _ in range(reps):
            for name, fn in pair.items():
                fn()
                times.setdefault(name, []).append(_per_step(fn, steps))
    ms = {k: statistics.median(t) for k, t in times.items()}
    return {
        "net": type(net).__name__,
        "parameters": int(sum(p.numel() for p in net.parameters())),
        "trainables": len(trainer.params),
        "training_graph_nodes": len(trainer.update.proto.graph.node) if trainer.update else None,
        "loss_ort": ort_loss,
        "loss_torch": ref_loss.item(),
        "worst_max_rel_grad_diff": worst,
        "rel_l2_grad_diff": l2,
        "ms_per_step": ms,
        "all_ms_per_step": times,
        "ratio": ms["graphopt"] / ms["torch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for make in (ResNet, MBNet):
        torch.manual_seed(0)  # the same initial weights every run
        results.append(bench(make(), threads=args.threads, reps=args.reps, steps=args.steps))
    print(f"batch 32, 3x32x32, SGD momentum, {args.threads} threads, median of {args.reps} x "
          f"{args.steps} steps")  # fmt: skip
    print(f"{'net':<8} {'graphopt ms':>12} {'torch ms':>9} {'ratio':>6} | {'numpy-opt ms':>12} "
          f"{'fwd-only ms':>11} {'grad diff max / L2':>18}")  # fmt: skip
    for r in results:
        ms = r["ms_per_step"]
        print(f"{r['net']:<8} {ms['graphopt']:>12.1f} {ms['torch']:>9.1f} {r['ratio']:>6.2f} | "
              f"{ms['graphopt_numpy_optimizer']:>12.1f} {ms['ort_forward_only']:>11.1f} "
              f"{r['worst_max_rel_grad_diff']:>10.1e} / {r['rel_l2_grad_diff']:.1e}")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "threads": args.threads,
        "reps": args.reps,
        "steps": args.steps,
        "load_average": os.getloadavg(),
        "machine": machine_info.machine(),
        "versions": machine_info.versions(("torch",)),
        "results": results,
    }
    path = args.out / "report.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

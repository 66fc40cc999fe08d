"""Gradients and step time of graphopt.train against PyTorch on the same two nets exported
from PyTorch (frozen BatchNorm, cross-entropy, batch 32, 32x32, 2 threads).

    python -m tests.train.step_time

Not a test (needs torch; timings need quiet cores). BatchNorm weights are randomized before
export: torch.onnx deduplicates identical initializers (fresh BN ones/zeros) behind Identity
nodes, which ties them in the ONNX graph (see README, Training).
"""

import io
import time

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn as nn

from graphopt.model import Model
from graphopt.train import SGD, Loss, Trainer

torch.set_num_threads(2)


class Block(nn.Module):
    def __init__(s, cin, cout, stride):
        super().__init__()
        s.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        s.b1 = nn.BatchNorm2d(cout)
        s.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        s.b2 = nn.BatchNorm2d(cout)
        s.sc = (
            None
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(s, x):
        y = s.b2(s.c2(torch.relu(s.b1(s.c1(x)))))
        return torch.relu(y + (x if s.sc is None else s.sc(x)))


class ResNet(nn.Module):
    def __init__(s):
        super().__init__()
        s.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        s.layers = nn.Sequential(
            Block(32, 32, 1), Block(32, 64, 2), Block(64, 64, 1), Block(64, 128, 2)
        )
        s.fc = nn.Linear(128, 10)

    def forward(s, x):
        return s.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(s.layers(s.stem(x)), 1), 1))


class MBNet(nn.Module):
    def __init__(s):
        super().__init__()
        s.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish()
        )
        s.exp = nn.Sequential(nn.Conv2d(16, 64, 1, bias=False), nn.BatchNorm2d(64), nn.Hardswish())
        s.dw = nn.Sequential(
            nn.Conv2d(64, 64, 3, 1, 1, groups=64, bias=False), nn.BatchNorm2d(64), nn.Hardswish()
        )
        s.se1 = nn.Conv2d(64, 16, 1)
        s.se2 = nn.Conv2d(16, 64, 1)
        s.proj = nn.Sequential(nn.Conv2d(64, 16, 1, bias=False), nn.BatchNorm2d(16))
        s.dw2 = nn.Sequential(
            nn.Conv2d(16, 16, 3, 2, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6()
        )
        s.fc = nn.Linear(16, 10)

    def forward(s, x):
        x = s.stem(x)
        y = s.dw(s.exp(x))
        w = nn.functional.hardsigmoid(
            s.se2(torch.relu(s.se1(nn.functional.adaptive_avg_pool2d(y, 1))))
        )
        x = x + s.proj(y * w)
        return s.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(s.dw2(x), 1), 1))


def run(net, batch=32, size=32, steps=10):
    torch.manual_seed(0)
    net.eval()  # frozen BN statistics on both sides
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    x = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 10, (batch,))
    buf = io.BytesIO()
    torch.onnx.export(
        net,
        (x,),
        buf,
        input_names=["x"],
        output_names=["logits"],
        opset_version=18,
        dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
    )
    model = Model(ir=ir.from_proto(onnx.load_from_string(buf.getvalue())))
    # gradient agreement with torch autograd (float32)
    trainer = Trainer(model, [Loss.cross_entropy("logits")], SGD(lr=0.0, momentum=0.0), threads=2)
    feeds = {"x": x.numpy(), "logits.labels": labels.numpy()}
    loss, grads, _ = trainer.gradients(feeds)
    net.zero_grad()
    ref_loss = nn.functional.cross_entropy(net(x), labels)
    ref_loss.backward()
    named = dict(net.named_parameters())
    worst = 0.0
    matched = 0
    for name, g in grads.items():
        if name in named:
            ref = named[name].grad.numpy()
            matched += 1
            worst = max(worst, float(np.abs(g - ref).max() / (np.abs(ref).max() + 1e-12)))
    print(
        f"{type(net).__name__}: {len(grads)} trainables ({matched} matched by name), loss ort {loss:.6f} torch {ref_loss.item():.6f}, worst max-rel grad diff {worst:.2e}"
    )
    # step time
    for _ in range(3):
        trainer.step(feeds)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step(feeds)
    ort_t = (time.perf_counter() - t0) / steps
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), labels).backward()
        opt.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), labels).backward()
        opt.step()
    th_t = (time.perf_counter() - t0) / steps
    print(
        f"  step (batch {batch}, {size}x{size}, 2 threads): graphopt/ORT {ort_t * 1000:.1f} ms, torch {th_t * 1000:.1f} ms, ratio {ort_t / th_t:.2f}"
    )


if __name__ == "__main__":
    run(ResNet())
    run(MBNet())

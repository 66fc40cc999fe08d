"""Architectures for the channel-removal coverage tests and benchmark, as PyTorch modules.

Each entry of `CORPUS` is a small `torch.nn.Module` (widths of 8 to 64 so that export, ONNX
Runtime and Torch-Pruning take milliseconds), the input it is exported with, the layers that
produce the model's outputs (a user keeps those whole; Torch-Pruning is told to ignore
them, graphopt refuses them because they write graph outputs) and, for attention, the head
count of each projection (what Torch-Pruning's `num_heads` needs).

`export(arch)` exports with `torch.onnx.export` (TorchScript exporter, `dynamo=False`: the
dynamo exporter needs onnxscript's torchlib and takes seconds per model), opset 17, static
shapes, eval mode, and returns the ModelProto at IR version 9 (ONNX Runtime 1.31 reads up to
IR 10 or 11 depending on the build; 9 is what opset 17 needs and what the other test models
use).

The modules use torch only; this file is imported by tests and benchmarks that first check
that torch is installed.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

OPSET = 17
IR_VERSION = 9


# ---------------------------------------------------------------------------- building blocks


def cbr(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act=nn.ReLU
) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> activation (None: none)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class ClassifierHead(nn.Module):
    """Global average pool -> flatten -> Linear."""

    def __init__(self, cin: int, classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.c1 = cbr(cin, cout, 3, stride)
        self.c2 = cbr(cout, cout, 3, act=None)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = cbr(cin, cout, 1, stride, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = x if self.down is None else self.down(x)
        return F.relu(self.c2(self.c1(x)) + short)


class ResNetBasic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16, 3)
        self.layers = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.head = ClassifierHead(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (optionally grouped, ResNeXt) -> 1x1 expand, projection shortcut."""

    def __init__(self, cin: int, width: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.c1 = cbr(cin, width, 1)
        self.c2 = cbr(width, width, 3, stride, groups=groups)
        self.c3 = cbr(width, cout, 1, act=None)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = cbr(cin, cout, 1, stride, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = x if self.down is None else self.down(x)
        return F.relu(self.c3(self.c2(self.c1(x))) + short)


class ResNetBottleneck(nn.Module):
    def __init__(self, groups: int = 1, width: int = 16) -> None:
        super().__init__()
        self.stem = cbr(3, 16, 3)
        self.layers = nn.Sequential(
            Bottleneck(16, width, 64, groups=groups),
            Bottleneck(64, width, 64, groups=groups),
            Bottleneck(64, 2 * width, 128, stride=2, groups=groups),
        )
        self.head = ClassifierHead(128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


# ---------------------------------------------------------------------------- MobileNet


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """1x1 expand -> depthwise kxk -> (SE) -> 1x1 project (linear), residual when shapes match."""

    def __init__(self, cin: int, hidden: int, cout: int, stride: int = 1, k: int = 3,
                 act=nn.ReLU6, se: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.expand = cbr(cin, hidden, 1, act=act) if hidden != cin else nn.Identity()
        self.dw = cbr(hidden, hidden, k, stride, groups=hidden, act=act)
        self.se = SqueezeExcite(hidden, max(hidden // 4, 8)) if se else nn.Identity()
        self.project = cbr(hidden, cout, 1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16, 3, 2, act=nn.ReLU6)
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 8),  # expansion 1: depthwise straight on the stem
            InvertedResidual(8, 48, 16, stride=2),
            InvertedResidual(16, 96, 16),
            InvertedResidual(16, 96, 24, stride=2),
            InvertedResidual(24, 144, 24),
        )
        self.last = cbr(24, 64, 1, act=nn.ReLU6)
        self.head = ClassifierHead(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.last(self.blocks(self.stem(x))))


class MobileNetV3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16, 3, 2, act=nn.Hardswish)
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 16, act=nn.ReLU, se=True),
            InvertedResidual(16, 64, 24, stride=2, act=nn.ReLU),
            InvertedResidual(24, 72, 24, act=nn.ReLU),
            InvertedResidual(24, 96, 40, stride=2, k=5, act=nn.Hardswish, se=True),
            InvertedResidual(40, 120, 40, k=5, act=nn.Hardswish, se=True),
        )
        self.last = cbr(40, 96, 1, act=nn.Hardswish)
        self.pre = nn.Linear(96, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.flatten(F.adaptive_avg_pool2d(self.last(self.blocks(self.stem(x))), 1), 1)
        return self.head(F.hardswish(self.pre(h)))


# ---------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    """BN -> ReLU -> 1x1 -> BN -> ReLU -> 3x3 growth (DenseNet-BC), concatenated to its input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.bn1(x)))
        return torch.cat([x, self.conv2(F.relu(self.bn2(h)))], 1)


class DenseNet(nn.Module):
    def __init__(self, growth: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        c = 16
        block1 = []
        for _ in range(3):
            block1.append(DenseLayer(c, growth))
            c += growth
        self.block1 = nn.Sequential(*block1)
        self.trans = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                                   nn.AvgPool2d(2))  # fmt: skip
        c //= 2
        block2 = []
        for _ in range(3):
            block2.append(DenseLayer(c, growth))
            c += growth
        self.block2 = nn.Sequential(*block2)
        self.norm = nn.BatchNorm2d(c)
        self.head = ClassifierHead(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.trans(self.block1(self.stem(x))))
        return self.head(F.relu(self.norm(h)))


# ---------------------------------------------------------------------------- Inception


class InceptionBlock(nn.Module):
    """1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 | maxpool -> 1x1, concatenated."""

    def __init__(
        self, cin: int, b1: int, b3: tuple[int, int], b5: tuple[int, int], bp: int
    ) -> None:
        super().__init__()
        self.b1 = cbr(cin, b1, 1)
        self.b3 = nn.Sequential(cbr(cin, b3[0], 1), cbr(b3[0], b3[1], 3))
        self.b5 = nn.Sequential(cbr(cin, b5[0], 1), cbr(b5[0], b5[1], 3), cbr(b5[1], b5[1], 3))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), cbr(cin, bp, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


class Inception(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(cbr(3, 32, 3, 2), cbr(32, 32, 3))
        self.i1 = InceptionBlock(32, 16, (16, 24), (8, 16), 8)  # -> 64
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.i2 = InceptionBlock(64, 24, (24, 32), (8, 16), 16)  # -> 88
        self.head = ClassifierHead(88)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.i2(self.pool(self.i1(self.stem(x)))))


# ---------------------------------------------------------------------------- YOLO-style neck


class C2f(nn.Module):
    """YOLOv8's C2f: 1x1 conv, split in two halves, bottlenecks on the second, concat all."""

    def __init__(self, cin: int, cout: int, n: int = 1) -> None:
        super().__init__()
        self.c = cout // 2
        self.cv1 = cbr(cin, 2 * self.c, 1, act=nn.SiLU)
        self.m = nn.ModuleList(
            nn.Sequential(cbr(self.c, self.c, 3, act=nn.SiLU), cbr(self.c, self.c, 3, act=nn.SiLU))
            for _ in range(n)
        )
        self.cv2 = cbr((2 + n) * self.c, cout, 1, act=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).split((self.c, self.c), 1))
        for m in self.m:
            y.append(y[-1] + m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class YoloNeck(nn.Module):
    """Backbone P3/P4/P5 -> FPN top-down (Upsample, Concat, C2f) -> PAN bottom-up (strided
    conv, Concat, C2f) -> one 1x1 detection conv per scale (three outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Sequential(cbr(3, 16, 3, 2, act=nn.SiLU), cbr(16, 32, 3, 2, act=nn.SiLU),
                                C2f(32, 32))  # fmt: skip
        self.b2 = nn.Sequential(cbr(32, 64, 3, 2, act=nn.SiLU), C2f(64, 64))  # P4
        self.b3 = nn.Sequential(cbr(64, 64, 3, 2, act=nn.SiLU), C2f(64, 64))  # P5
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td4 = C2f(128, 64)
        self.td3 = C2f(96, 32)
        self.down3 = cbr(32, 32, 3, 2, act=nn.SiLU)
        self.bu4 = C2f(96, 64)
        self.down4 = cbr(64, 64, 3, 2, act=nn.SiLU)
        self.bu5 = C2f(128, 64)
        self.heads = nn.ModuleList(
            [nn.Conv2d(32, 18, 1), nn.Conv2d(64, 18, 1), nn.Conv2d(64, 18, 1)]
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p3 = self.b1(x)
        p4 = self.b2(p3)
        p5 = self.b3(p4)
        t4 = self.td4(torch.cat([self.up(p5), p4], 1))
        t3 = self.td3(torch.cat([self.up(t4), p3], 1))
        o4 = self.bu4(torch.cat([self.down3(t3), t4], 1))
        o5 = self.bu5(torch.cat([self.down4(o4), p5], 1))
        return tuple(head(f) for head, f in zip(self.heads, (t3, o4, o5), strict=True))


# ---------------------------------------------------------------------------- UNet


class UNet(nn.Module):
    """Two levels down (double conv, maxpool), a bottleneck, two up (ConvTranspose 2x2,
    concat with the skip, double conv), a 1x1 output conv."""

    def __init__(self) -> None:
        super().__init__()
        self.d1 = nn.Sequential(cbr(3, 16), cbr(16, 16))
        self.d2 = nn.Sequential(cbr(16, 32), cbr(32, 32))
        self.mid = nn.Sequential(cbr(32, 64), cbr(64, 64))
        self.up2 = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.u2 = nn.Sequential(cbr(64, 32), cbr(32, 32))
        self.up1 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.u1 = nn.Sequential(cbr(32, 16), cbr(16, 16))
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.d1(x)
        s2 = self.d2(F.max_pool2d(s1, 2))
        m = self.mid(F.max_pool2d(s2, 2))
        h = self.u2(torch.cat([self.up2(m), s2], 1))
        h = self.u1(torch.cat([self.up1(h), s1], 1))
        return self.head(h)


# ---------------------------------------------------------------------------- transformers


class Attention(nn.Module):
    """Multi-head (or grouped-query, kv_heads < heads) attention with separate q/k/v/out
    projections; head counts are read at run time so a pruner can update them."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, causal: bool = False,
                 tokens: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads or heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, heads * self.head_dim)
        self.k = nn.Linear(dim, self.kv_heads * self.head_dim)
        self.v = nn.Linear(dim, self.kv_heads * self.head_dim)
        self.out = nn.Linear(heads * self.head_dim, dim)
        self.causal = causal
        if causal:
            mask = torch.full((tokens, tokens), float("-inf")).triu(1)
            self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.kv_heads != self.heads:
            repeat = self.heads // self.kv_heads
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        scores = q @ k.transpose(-1, -2) * self.head_dim**-0.5
        if self.causal:
            scores = scores + self.mask
        h = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return self.out(h)


class EncoderLayer(nn.Module):
    """Pre-norm ViT block: x + attn(LN(x)); x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    """Patch embedding (4x4 conv), learned position embedding, two encoder layers with 4
    heads, final LayerNorm, mean pooling, classifier."""

    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(1, 64, dim) * 0.02)
        self.layers = nn.Sequential(*(EncoderLayer(dim, heads, 2 * dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.layers(tokens)).mean(1))


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class GQADecoder(nn.Module):
    """A Llama-style decoder block on embeddings [N, T, C]: RMSNorm, causal grouped-query
    attention (8 query heads, 2 key/value heads), RMSNorm, SwiGLU MLP, final norm, LM head."""

    def __init__(self, dim: int = 64, heads: int = 8, kv_heads: int = 2, tokens: int = 16) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads, kv_heads, causal=True, tokens=tokens)
        self.norm2 = RMSNorm(dim)
        self.gate = nn.Linear(dim, 4 * dim, bias=False)
        self.up = nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, 100, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.head(self.norm(x))


# ---------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Arch:
    """One architecture: how to build it, its input, its output layers, its attention heads."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    outputs: Callable[[nn.Module], list[nn.Module]]
    heads: Callable[[nn.Module], dict[nn.Module, int]] = field(default=lambda m: {})

    def module(self) -> nn.Module:
        """A fresh module in eval mode with fixed random weights and BatchNorm statistics."""
        torch.manual_seed(0)
        model = self.build()
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.weight.uniform_(0.5, 1.5, generator=generator)
                    m.bias.normal_(0.0, 0.1, generator=generator)
                    m.running_mean.normal_(0.0, 0.1, generator=generator)
                    m.running_var.uniform_(0.5, 1.5, generator=generator)
        return model.eval()

    def example(self) -> torch.Tensor:
        return torch.randn(self.input_shape, generator=torch.Generator().manual_seed(2))


def _attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    out: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, Attention):
            out.update({m.q: m.heads, m.k: m.kv_heads, m.v: m.kv_heads})
    return out


CORPUS: dict[str, Arch] = {
    a.name: a
    for a in [
        Arch("resnet-basic", ResNetBasic, (1, 3, 32, 32), lambda m: [m.head.fc]),
        Arch("resnet-bottleneck", ResNetBottleneck, (1, 3, 32, 32), lambda m: [m.head.fc]),
        Arch(
            "resnext",
            lambda: ResNetBottleneck(groups=4, width=32),
            (1, 3, 32, 32),
            lambda m: [m.head.fc],
        ),
        Arch("mobilenet-v2", MobileNetV2, (1, 3, 32, 32), lambda m: [m.head.fc]),
        Arch("mobilenet-v3", MobileNetV3, (1, 3, 32, 32), lambda m: [m.head]),
        Arch("densenet", DenseNet, (1, 3, 32, 32), lambda m: [m.head.fc]),
        Arch("inception", Inception, (1, 3, 32, 32), lambda m: [m.head.fc]),
        Arch("yolo-neck", YoloNeck, (1, 3, 64, 64), lambda m: list(m.heads)),
        Arch("unet", UNet, (1, 3, 32, 32), lambda m: [m.head]),
        Arch("vit", ViT, (1, 3, 32, 32), lambda m: [m.head], _attention_heads),
        Arch("gqa-decoder", GQADecoder, (1, 16, 64), lambda m: [m.head], _attention_heads),
    ]
}


def export(arch: Arch, module: nn.Module | None = None) -> onnx.ModelProto:
    """`arch`'s module (or the given one) exported to ONNX: opset 17, static shapes, IR 9."""
    module = arch.module() if module is None else module
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            module, (arch.example(),), buffer, opset_version=OPSET, dynamo=False,
            input_names=["x"], do_constant_folding=True,
        )  # fmt: skip
    proto = onnx.load_from_string(buffer.getvalue())
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    return proto


# ---------------------------------------------------------------------------- coverage
#
# "Share" means the same on both sides: the parameters of the weight tensors of Conv,
# ConvTranspose, Gemm/Linear and MatMul-with-a-constant-weight layers (biases, norms and
# embeddings not counted) that sit in at least one prunable group, on either axis (their
# output channels can be removed, or their input channels are removed with a producer's),
# divided by the parameters of all such weight tensors. The layers that write the model's
# outputs count in the denominator; their input channels may be covered.

_WEIGHT_OPS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (1, 0), "MatMul": (1, 0)}


@dataclass
class Coverage:
    """Parameters of weight layers, in total and in prunable groups; per layer too."""

    total: int
    covered: int
    layers: dict[str, tuple[int, bool]]  # layer name -> (weight params, covered)

    @property
    def share(self) -> float:
        return self.covered / self.total if self.total else 0.0

    def uncovered(self) -> list[str]:
        return [name for name, (_, hit) in self.layers.items() if not hit]


def graphopt_coverage(model) -> Coverage:
    """Coverage of graphopt's channel groups on a `graphopt.model.Model`."""
    from graphopt.passes.channels import analyze_model
    from graphopt.passes.cleanup.common import constant

    weights: dict[int, tuple[str, int]] = {}  # id(weight value) -> (layer, params)
    for node in model.graph:
        for index in _WEIGHT_OPS.get(node.op_type, ()):
            value = node.inputs[index] if index < len(node.inputs) else None
            array = None if value is None else constant(value)
            if array is not None:
                weights[id(value)] = (node.name or value.name or "?", int(np.prod(array.shape)))
                break
    covered: set[int] = set()
    for group in analyze_model(model).prunable():
        covered.update(id(slot.value) for slot in group.members if id(slot.value) in weights)
    layers = {name: (size, key in covered) for key, (name, size) in weights.items()}
    total = sum(size for _, size in weights.values())
    hit = sum(weights[key][1] for key in covered)
    return Coverage(total, hit, layers)


_TORCH_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def _named_layers(model: nn.Module) -> dict[nn.Module, str]:
    return {m: name for name, m in model.named_modules() if isinstance(m, _TORCH_LAYERS)}


def torch_pruning_coverage(arch: Arch) -> Coverage | str:
    """Coverage of Torch-Pruning's DependencyGraph groups on `arch`'s module, the output
    layers ignored (as its examples ignore the classifier); the error it raised, if it did."""
    import torch_pruning as tp

    model = arch.module()
    named = _named_layers(model)
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=arch.example(),
                                                      verbose=False)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - Torch-Pruning's failure is the finding
        return _error(exc)
    covered: set[nn.Module] = set()
    for group in graph.get_all_groups(ignored_layers=arch.outputs(model),
                                      root_module_types=_TORCH_LAYERS):  # fmt: skip
        for dep, _ in group:
            if dep.target.module in named:
                covered.add(dep.target.module)
    layers = {name: (m.weight.numel(), m in covered) for m, name in named.items()}
    return Coverage(
        sum(m.weight.numel() for m in named), sum(m.weight.numel() for m in covered), layers
    )


def torch_pruning_prune(arch: Arch, ratio: float, round_to: int | None = None):
    """Prune `arch`'s module with Torch-Pruning's MagnitudePruner (L2, per layer ratio), the
    output layers ignored and attention heads declared; head counts are written back into
    the modules afterwards, as its ViT example does. Returns (module, output shapes or the
    error the pruned module raised, weight parameters before and after)."""
    import torch_pruning as tp

    model = arch.module()
    x = arch.example()
    named = _named_layers(model)
    before = sum(m.weight.numel() for m in named)
    heads = arch.heads(model)
    try:
        pruner = tp.pruner.MagnitudePruner(
            model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
            ignored_layers=arch.outputs(model), num_heads=heads, round_to=round_to,
        )  # fmt: skip
        pruner.step()
    except Exception as exc:  # noqa: BLE001 - Torch-Pruning's failure is the finding
        return model, _error(exc), before, before
    for m in model.modules():
        if isinstance(m, Attention):
            m.heads = pruner.num_heads.get(m.q, m.heads)
            m.kv_heads = pruner.num_heads.get(m.k, m.kv_heads)
            m.head_dim = m.q.out_features // m.heads
    after = sum(m.weight.numel() for m in named)
    try:
        with torch.no_grad():
            out = model(x)
        outs = out if isinstance(out, tuple) else (out,)
        result: list[tuple[int, ...]] | str = [tuple(o.shape) for o in outs]
    except Exception as exc:  # noqa: BLE001 - the pruned module's failure is the finding
        result = _error(exc)
    return model, result, before, after


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160] if lines else ''}"

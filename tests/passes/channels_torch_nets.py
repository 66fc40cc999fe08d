"""Small PyTorch architectures exported to ONNX for the channels tests (test-only code; torch
is imported by the caller's `pytest.importorskip`): a ResNet-18-like CNN, a MobileNetV3-like
CNN with squeeze-excitation and hard-swish, a ViT encoder, and a grouped-query-attention
decoder block. Each is exported with a dynamic batch axis, as users export, so the graphs hold
the Shape -> Gather -> Concat -> Reshape chains the exporter writes for `x.shape[0]`."""

from __future__ import annotations

import io
import math

import onnx
import torch
from torch import nn
from torch.nn import functional as F

OPSET = 17


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet18Like(nn.Module):
    """ResNet-18's layout (stem, 4 stages of 2 basic blocks, projection shortcuts, global
    pool, flatten, fc) at a quarter of its widths."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [_Basic(cin, w, 1 if i == 0 else 2), _Basic(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _SE(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, k: int, stride: int, se: bool) -> None:
        super().__init__()
        self.expand = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish()
        )
        self.dw = nn.Sequential(
            nn.Conv2d(hidden, hidden, k, stride, k // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.Hardswish(),
        )
        self.se = _SE(hidden) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.dw(self.expand(x))))
        return x + out if self.residual else out


class MobileNetV3Like(nn.Module):
    """MobileNetV3-small's pieces: hard-swish stem, inverted residuals with depthwise convs
    and squeeze-excitation (hard-sigmoid gates), a 1x1 head, a Linear-Hardswish-Dropout-Linear
    classifier."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish()
        )
        self.blocks = nn.Sequential(
            _InvertedResidual(16, 32, 16, 3, 1, True),
            _InvertedResidual(16, 64, 24, 3, 2, False),
            _InvertedResidual(24, 72, 24, 5, 1, True),
            _InvertedResidual(24, 96, 40, 5, 2, True),
        )
        self.head = nn.Sequential(
            nn.Conv2d(40, 96, 1, bias=False), nn.BatchNorm2d(96), nn.Hardswish()
        )
        self.classifier = nn.Sequential(
            nn.Linear(96, 128), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(128, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class _EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTLike(nn.Module):
    """A ViT encoder: patch-embedding conv, class token, position embedding, pre-norm blocks
    with multi-head attention (timm's qkv reshape/permute) and a GELU MLP, a head on the class
    token."""

    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*(_EncoderBlock(dim, heads, dim * 2) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class GQADecoderBlock(nn.Module):
    """A Llama-style decoder block: RMSNorm, grouped-query attention (8 query heads sharing 2
    K/V heads, repeated as Hugging Face's `repeat_kv` does: expand then reshape), a causal
    mask, and a SwiGLU MLP."""

    def __init__(
        self, dim: int = 64, heads: int = 8, kv_heads: int = 2, hidden: int = 128, vocab: int = 32
    ) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = nn.Embedding(vocab, dim)
        self.norm1 = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.Parameter(torch.ones(dim))
        self.q = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    @staticmethod
    def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        b, kv, s, d = x.shape
        rep = self.heads // self.kv_heads
        return x[:, :, None, :, :].expand(b, kv, rep, s, d).reshape(b, kv * rep, s, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        b, s, _ = x.shape
        h = self._rms(x, self.norm1)
        q = self.q(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        mask = torch.triu(torch.full((s, s), float("-inf")), 1)
        attn = torch.softmax(scores + mask, dim=-1) @ v
        x = x + self.o(attn.transpose(1, 2).reshape(b, s, -1))
        h = self._rms(x, self.norm2)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.lm_head(x)


def export(module: nn.Module, example: torch.Tensor, *, seed: int = 0) -> onnx.ModelProto:
    """Export in eval mode with a dynamic batch axis (TorchScript exporter, opset 17), BatchNorm
    statistics randomized so folded scales differ per channel."""
    torch.manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    module.eval()
    buffer = io.BytesIO()
    name = "ids" if example.dtype == torch.int64 else "x"
    with torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            buffer,
            input_names=[name],
            output_names=["y"],
            dynamic_axes={name: {0: "batch"}, "y": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


def resnet18_like() -> onnx.ModelProto:
    torch.manual_seed(0)
    return export(ResNet18Like(), torch.randn(1, 3, 32, 32))


def mobilenet_v3_like() -> onnx.ModelProto:
    torch.manual_seed(1)
    return export(MobileNetV3Like(), torch.randn(1, 3, 32, 32))


def vit_like() -> onnx.ModelProto:
    torch.manual_seed(2)
    return export(ViTLike(), torch.randn(1, 3, 16, 16))


def gqa_decoder() -> onnx.ModelProto:
    torch.manual_seed(3)
    return export(GQADecoderBlock(), torch.randint(0, 32, (1, 12)))


ARCHITECTURES = {
    "resnet18": resnet18_like,
    "mobilenetv3": mobilenet_v3_like,
    "vit": vit_like,
    "gqa": gqa_decoder,
}

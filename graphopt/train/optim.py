"""Optimizers that update numpy weights from the training graph's gradients.

They run in numpy between ONNX Runtime steps; an in-graph optimizer (the update written as
ONNX nodes, so weights and state can stay on the GPU with IO binding) is a later step.
Both keep a weight whose gradient is always zero and whose value is zero exactly at zero
(momentum, Adam moments and decoupled weight decay all stay zero), which is what keeps
pruned weights pruned when the gradients are masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from graphopt.errors import GraphoptError


def _check_lr(lr: float) -> None:
    if not (math.isfinite(lr) and lr >= 0):
        raise GraphoptError(f"The learning rate must be a non-negative number (got {lr}).")


@dataclass
class SGD:
    """Stochastic gradient descent with momentum (PyTorch's formulation).

    buf = momentum * buf + (g + weight_decay * w); w -= lr * buf (nesterov: g + momentum * buf).
    """

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    _buffers: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise GraphoptError(f"SGD momentum must be in [0, 1) (got {self.momentum}).")

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        for name, g in grads.items():
            w = params[name]
            if self.weight_decay:
                g = g + self.weight_decay * w
            if self.momentum:
                buf = self._buffers.get(name)
                if buf is None:
                    buf = self._buffers[name] = np.array(g, dtype=w.dtype, copy=True)
                else:
                    buf *= self.momentum
                    buf += g
                g = g + self.momentum * buf if self.nesterov else buf
            w -= (self.lr * g).astype(w.dtype, copy=False)


@dataclass
class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter; PyTorch's AdamW)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    _m: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _v: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _t: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise GraphoptError(f"AdamW betas must be in [0, 1) (got {self.betas}).")

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self._t += 1
        b1, b2 = self.betas
        c1 = 1.0 - b1**self._t
        c2 = 1.0 - b2**self._t
        for name, g in grads.items():
            w = params[name]
            m = self._m.setdefault(name, np.zeros_like(w))
            v = self._v.setdefault(name, np.zeros_like(w))
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            if self.weight_decay:
                w *= 1.0 - self.lr * self.weight_decay
            w -= ((self.lr / c1) * m / (np.sqrt(v / c2) + self.eps)).astype(w.dtype, copy=False)


Optimizer = SGD | AdamW

"""The learning rate over the run: linear warm-up, then cosine decay (or constant)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ScheduleKind = Literal["cosine", "constant"]


@dataclass(frozen=True)
class LearningRate:
    """`at(step)` is the rate of 0-based optimizer step `step` of `total`.

    Warm-up rises linearly from lr/warmup_steps to lr over the first `warmup_steps` steps
    (so the first step already moves); cosine then falls from lr to `lr * final_ratio` at
    the last step.
    """

    lr: float
    total: int
    warmup_steps: int = 0
    kind: ScheduleKind = "cosine"
    final_ratio: float = 0.0

    def at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        span = self.total - self.warmup_steps
        if span <= 1:
            return self.lr
        progress = min(max((step - self.warmup_steps) / (span - 1), 0.0), 1.0)
        low = self.lr * self.final_ratio
        return low + 0.5 * (self.lr - low) * (1.0 + math.cos(math.pi * progress))

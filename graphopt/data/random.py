"""Random arrays shaped like the model's inputs, the same for any batch size.

The caller (`open_dataset`) warns that numbers measured on them mean nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import numpy as np

from graphopt.data.base import Dataset
from graphopt.data.checks import dtype_kind
from graphopt.data.rules import Input, fixed_batch
from graphopt.data.stream import Chunk, Column, StreamingDataset
from graphopt.errors import DataError

RANDOM_INT_HIGH = 10  # random integer inputs are drawn from [0, RANDOM_INT_HIGH)


def open_random(rules: Sequence[Input], num_samples: int, seed: int) -> Dataset:
    if num_samples < 1:
        raise DataError(f"Random data needs at least one sample (got {num_samples}).")
    sample_shapes = {rule.name: _random_sample_shape(rule) for rule in rules}
    for rule in rules:
        if rule.dtype is not None and dtype_kind(rule.dtype) not in ("int", "float", "bool"):
            raise DataError(
                f"Input '{rule.name}' takes {rule.dtype.name} values, which graphopt cannot "
                "draw at random.",
                hint="Give real data with --data.",
            )
    fixed = fixed_batch(rules)
    if fixed is not None and num_samples % fixed:
        num_samples += fixed - num_samples % fixed

    def open_columns(stack: ExitStack) -> dict[str, Column]:
        return {
            rule.name: _RandomColumn(rule, sample_shapes[rule.name], seed, index)
            for index, rule in enumerate(rules)
        }

    chunk = Chunk("random data", num_samples, sample_shapes, open_columns)
    return StreamingDataset(
        description="random", rules=rules, chunks=[chunk], has_labels=False, is_random=True
    )


def _random_sample_shape(rule: Input) -> tuple[int, ...]:
    if rule.dims is None:
        raise DataError(
            f"Input '{rule.name}' has no declared shape, so random data cannot be drawn for it.",
            hint=f"Give its shape with --shape {rule.name}:1x3x224x224 (your model's sizes).",
        )
    missing = [
        (axis, dim) for axis, dim in enumerate(rule.dims) if axis and not isinstance(dim, int)
    ]
    if missing:
        named = ", ".join(
            f"axis {axis}" + (f" ('{dim}')" if isinstance(dim, str) else "")
            for axis, dim in missing
        )
        example = "x".join(
            str(d) if isinstance(d, int) else ("1" if axis == 0 else (d or "?"))
            for axis, d in enumerate(rule.dims)
        )
        raise DataError(
            f"Input '{rule.name}' ({rule.expected_text()}) has dynamic dimension(s) {named}, "
            "so random data cannot be drawn for it.",
            hint=f"Give the sizes with --shape {rule.name}:{example}, replacing the names by "
            "numbers (e.g. --shape input:1x3x224x224).",
        )
    return tuple(int(d) for d in rule.dims[1:])  # type: ignore[arg-type]


class _RandomColumn(Column):
    """Sample i of input k comes from its own seeded generator: same data for any batch size."""

    def __init__(self, rule: Input, shape: tuple[int, ...], seed: int, index: int) -> None:
        self.rule = rule
        self.shape = shape
        self.seed = seed
        self.index = index
        self.pos = 0

    def read(self, n: int) -> np.ndarray:
        dtype = self.rule.dtype if self.rule.dtype is not None else np.dtype(np.float32)
        kind = dtype_kind(dtype)
        out = np.empty((n, *self.shape), dtype=dtype)
        for row in range(n):
            rng = np.random.default_rng([self.seed, self.index, self.pos + row])
            if kind == "bool":
                out[row] = rng.integers(0, 2, size=self.shape).astype(bool)
            elif kind == "int":
                out[row] = rng.integers(0, RANDOM_INT_HIGH, size=self.shape).astype(dtype)
            else:
                out[row] = rng.standard_normal(size=self.shape, dtype=np.float32).astype(dtype)
        self.pos += n
        return out

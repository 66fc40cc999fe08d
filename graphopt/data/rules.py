"""What the data for each model input must look like: the model's specs plus ``--shape``."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from graphopt.data.checks import names, shape_text
from graphopt.errors import DataError
from graphopt.model import TensorSpec


def parse_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Read ``--shape`` values like ``input:1x3x224x224`` into {name: shape}.

    The name is everything before the last colon, so TensorFlow-style names such as
    ``input_1:0:1x3x224x224`` work.

    Raises:
        DataError: a value is not ``name:DIMxDIM...`` with positive integers, or a name
            appears twice.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims_text = spec.strip().rpartition(":")
        dims: list[int] = []
        ok = bool(sep and name and dims_text)
        if ok:
            for part in re.split(r"[xX,]", dims_text):
                if not part.strip().isdigit() or int(part) < 1:
                    ok = False
                    break
                dims.append(int(part))
        if not ok:
            raise DataError(
                f"--shape '{spec}' is not of the form name:DIMxDIM... with positive integers.",
                hint="Write it like --shape input:1x3x224x224.",
            )
        if name in shapes:
            raise DataError(f"--shape gives input '{name}' twice.", hint="Give each input once.")
        shapes[name] = tuple(dims)
    return shapes


@dataclass
class Input:
    """What the data for one model input must look like."""

    name: str
    dtype: np.dtype | None
    dims: tuple[int | str | None, ...] | None  # model dims, dynamic ones filled from --shape

    @property
    def rank(self) -> int | None:
        return None if self.dims is None else len(self.dims)

    def expected_text(self) -> str:
        if self.dims is None:
            return "any shape"
        return shape_text(tuple(d if isinstance(d, int) else None for d in self.dims))

    def fixed_batch(self) -> int | None:
        if self.dims and isinstance(self.dims[0], int) and self.dims[0] > 0:
            return self.dims[0]
        return None


def input_rules(inputs: Sequence[TensorSpec], shapes: Mapping[str, tuple[int, ...]]) -> list[Input]:
    """One `Input` per model input, with the dynamic dims after the batch axis set by --shape."""
    input_names = [spec.name for spec in inputs]
    unknown = sorted(set(shapes) - set(input_names))
    if unknown:
        raise DataError(
            f"--shape names {names(unknown)}, which the model does not have as input(s).",
            hint=f"The model's inputs are {names(input_names)}.",
        )
    # A named dynamic dim set for one input (e.g. 'seq') holds for every input that has it.
    symbols: dict[str, int] = {}
    for spec in inputs:
        given = shapes.get(spec.name)
        if given is not None and spec.shape is not None and len(spec.shape) == len(given):
            for dim, size in zip(spec.shape[1:], given[1:], strict=True):
                if isinstance(dim, str):
                    symbols.setdefault(dim, size)
    rules = []
    for spec in inputs:
        dims = spec.shape
        given = shapes.get(spec.name)
        if given is not None:
            dims = _merge_shape(spec, given)
        elif dims:
            dims = (dims[0], *(symbols.get(d, d) if isinstance(d, str) else d for d in dims[1:]))
        if dims is not None and len(dims) == 0:
            raise DataError(
                f"Input '{spec.name}' is a scalar, so it has no axis to count samples along.",
                hint="graphopt feeds data with a leading batch axis; export the model with "
                "a batch axis on every input.",
            )
        rules.append(Input(spec.name, spec.dtype, dims))
    return rules


def _merge_shape(spec: TensorSpec, given: tuple[int, ...]) -> tuple[int | str | None, ...]:
    """The model's dims with the dynamic ones after the batch axis set from --shape."""
    dims = spec.shape
    if dims is not None and len(dims) != len(given):
        raise DataError(
            f"--shape gives input '{spec.name}' the shape {shape_text(given)}, but the "
            f"model declares {spec.shape_text()} (rank {len(dims)}).",
            hint=f"Give {len(dims)} dimensions.",
        )
    if dims is None:
        return (None, *given[1:]) if given else ()
    for axis, (dim, size) in enumerate(zip(dims, given, strict=True)):
        if isinstance(dim, int) and dim != size:
            what = "its batch axis" if axis == 0 else f"axis {axis}"
            raise DataError(
                f"--shape gives input '{spec.name}' the shape {shape_text(given)}, but the "
                f"model fixes {what} to {dim} ({spec.shape_text()}).",
                hint="Only dynamic dimensions can be set with --shape.",
            )
    return (dims[0], *given[1:]) if dims else ()


def fixed_batch(rules: Sequence[Input]) -> int | None:
    """The batch size the model's inputs fix, or None when the batch axis is dynamic."""
    fixed = {rule.name: rule.fixed_batch() for rule in rules if rule.fixed_batch() is not None}
    sizes = set(fixed.values())
    if len(sizes) > 1:
        listing = ", ".join(f"'{name}' {size}" for name, size in fixed.items())
        raise DataError(
            f"The model's inputs fix different batch sizes ({listing}), so graphopt cannot "
            "tell which axis counts samples.",
            hint="Export the model with one batch axis shared by all inputs.",
        )
    return sizes.pop() if sizes else None

"""Optimization-profile shapes from `--shapes`, checked against the model without TensorRT.

One `--shapes` value is one optimization profile: comma-separated `name:MIN/OPT/MAX` entries,
each shape written `DIMxDIMx...` (`name:DIMS` alone means MIN = OPT = MAX). Repeat `--shapes`
for more profiles, e.g.

    --shapes x:1x3x48x320/8x3x48x320/32x3x48x320 --shapes x:1x3x48x640/4x3x48x960/8x3x48x1280
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from graphopt.errors import GraphoptError
from graphopt.model import TensorSpec

Shape = tuple[int, ...]


class ShapeSpecError(GraphoptError):
    """A `--shapes` value is malformed or does not fit the model's inputs."""


@dataclass(frozen=True)
class InputRange:
    """The min/opt/max shape of one input in one profile."""

    name: str
    min: Shape
    opt: Shape
    max: Shape

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class ShapeProfile:
    """One optimization profile: a range for each input named in it."""

    inputs: tuple[InputRange, ...]

    def get(self, name: str) -> InputRange | None:
        return next((r for r in self.inputs if r.name == name), None)

    def to_dict(self) -> dict[str, dict[str, list[int]]]:
        return {r.name: r.to_dict() for r in self.inputs}


_EXAMPLE = "--shapes x:1x3x224x224/8x3x224x224/32x3x224x224"


def parse_shape_specs(specs: Sequence[str]) -> list[ShapeProfile]:
    """Read `--shapes` values (one per profile) into profiles.

    Raises:
        ShapeSpecError: a value is not `name:MIN/OPT/MAX[,name:...]` with positive integer
            dims of one rank, MIN <= OPT <= MAX does not hold, or a name repeats in a profile.
    """
    profiles = []
    for index, spec in enumerate(specs):
        where = f"--shapes '{spec}'" + (f" (profile {index})" if len(specs) > 1 else "")
        entries = [part.strip() for part in spec.split(",") if part.strip()]
        if not entries:
            raise ShapeSpecError(f"{where} is empty.", hint=f"Write it like {_EXAMPLE}.")
        ranges: list[InputRange] = []
        for entry in entries:
            ranges.append(_parse_entry(entry, where))
        names = [r.name for r in ranges]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ShapeSpecError(
                f"{where} gives input(s) {', '.join(repeated)} more than once.",
                hint="Give each input once per profile; repeat --shapes for another profile.",
            )
        profiles.append(ShapeProfile(tuple(ranges)))
    return profiles


def _parse_entry(entry: str, where: str) -> InputRange:
    name, sep, dims = entry.rpartition(":")
    if not sep or not name or not dims:
        raise ShapeSpecError(
            f"{where}: '{entry}' is not name:MIN/OPT/MAX.", hint=f"Write it like {_EXAMPLE}."
        )
    parts = dims.split("/")
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise ShapeSpecError(
            f"{where}: '{entry}' has {len(parts)} shapes; give MIN/OPT/MAX (three) or one.",
            hint=f"Write it like {_EXAMPLE}.",
        )
    shapes = [_parse_shape(part, entry, where) for part in parts]
    if len({len(s) for s in shapes}) != 1:
        raise ShapeSpecError(
            f"{where}: the shapes of '{name}' differ in rank ({', '.join(parts)})."
        )
    low, opt, high = shapes
    if not all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
        raise ShapeSpecError(
            f"{where}: '{name}' needs MIN <= OPT <= MAX in every dimension "
            f"(got {parts[0]} / {parts[1]} / {parts[2]}).",
        )
    return InputRange(name, low, opt, high)


def _parse_shape(text: str, entry: str, where: str) -> Shape:
    dims = re.split(r"[xX]", text.strip())
    if not dims or not all(d.strip().isdigit() and int(d) > 0 for d in dims):
        raise ShapeSpecError(
            f"{where}: '{text}' in '{entry}' is not a shape of positive integers.",
            hint=f"Write shapes like 8x3x224x224, e.g. {_EXAMPLE}.",
        )
    return tuple(int(d) for d in dims)


def check_profiles(profiles: Sequence[ShapeProfile], inputs: Sequence[TensorSpec]) -> None:
    """Check the profiles against the model's inputs, as TensorRT would, but before it runs.

    Every input with a dynamic dimension needs a range in every profile; ranks and fixed
    dimensions must match the model.

    Raises:
        ShapeSpecError: an unknown input, a rank or fixed-dim mismatch, or a dynamic input
            without a range.
    """
    by_name = {spec.name: spec for spec in inputs}
    dynamic = [
        spec.name
        for spec in inputs
        if spec.shape is None or any(not isinstance(d, int) for d in spec.shape)
    ]
    if dynamic and not profiles:
        example = ", ".join(f"{n}:MIN/OPT/MAX" for n in dynamic)
        raise ShapeSpecError(
            f"The model's input(s) {', '.join(repr(n) for n in dynamic)} have dynamic "
            "dimensions, and a TensorRT engine needs a min/opt/max shape for each.",
            hint=f"Give them with --shapes {example} (e.g. {_EXAMPLE}).",
        )
    for index, profile in enumerate(profiles):
        where = f"--shapes profile {index}"
        for r in profile.inputs:
            spec = by_name.get(r.name)
            if spec is None:
                raise ShapeSpecError(
                    f"{where} names '{r.name}', which is not an input of the model.",
                    hint=f"Its inputs are {', '.join(repr(n) for n in by_name)}.",
                )
            if spec.shape is None:
                continue
            if len(spec.shape) != len(r.min):
                raise ShapeSpecError(
                    f"{where}: '{r.name}' has rank {len(spec.shape)} "
                    f"({spec.shape_text()}), but the shapes given have rank {len(r.min)}."
                )
            for axis, dim in enumerate(spec.shape):
                if isinstance(dim, int) and not (r.min[axis] == r.opt[axis] == r.max[axis] == dim):
                    raise ShapeSpecError(
                        f"{where}: axis {axis} of '{r.name}' is fixed at {dim} in the model "
                        f"({spec.shape_text()}), but the shapes given vary it or set another "
                        "size.",
                    )
        missing = [n for n in dynamic if profile.get(n) is None]
        if missing:
            raise ShapeSpecError(
                f"{where} has no range for dynamic input(s) "
                f"{', '.join(repr(n) for n in missing)}; every profile needs all of them.",
                hint=f"Add e.g. {missing[0]}:MIN/OPT/MAX to that --shapes value.",
            )

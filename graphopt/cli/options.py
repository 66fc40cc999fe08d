"""Option bundles shared by several commands."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import click

from graphopt.errors import RecipeError

F = Callable[..., Any]


def runtime_options(fn: F) -> F:
    """--device, --threads, --batch-size."""
    fn = click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=32,
        show_default=True,
        help="Samples per ONNX Runtime run (models with a fixed batch dimension use theirs).",
    )(fn)
    fn = click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=None,
        help="ONNX Runtime intra-op threads (default: ORT's choice).",
    )(fn)
    fn = click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
        help="Where ONNX Runtime runs; auto uses CUDA only when it really works.",
    )(fn)
    return fn


def data_options(fn: F) -> F:
    """--shape, --labels-key, --preprocess: how data sources are read."""
    fn = click.option(
        "--preprocess",
        default=None,
        metavar="SPEC",
        help="Image preprocessing for image folders, e.g. "
        "'resize=256,crop=224,mean=0.485|0.456|0.406,std=0.229|0.224|0.225,layout=NCHW'.",
    )(fn)
    fn = click.option(
        "--labels-key",
        default="labels",
        show_default=True,
        help="Name of the labels array in .npz data.",
    )(fn)
    fn = click.option(
        "--shape",
        "shapes",
        multiple=True,
        metavar="NAME:DIMS",
        help="Shape for an input with dynamic dims, e.g. image:1x3x224x224 (repeatable).",
    )(fn)
    return fn


def gate_option(fn: F) -> F:
    return click.option(
        "--gate",
        "gates",
        multiple=True,
        metavar="KEY=VALUE",
        help="Validation gate, e.g. min_cosine=0.999 or max_accuracy_drop=0.01 (repeatable; "
        "overrides the recipe's).",
    )(fn)


def parse_gate_args(items: Sequence[str]) -> dict[str, float]:
    values: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            values[key.strip()] = float(value)
        except ValueError:
            raise RecipeError(
                f"'--gate {item}' is not KEY=NUMBER.", hint="Write e.g. --gate min_cosine=0.999."
            ) from None
    return values

"""Option bundles shared by several commands."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from graphopt.errors import RecipeError

if TYPE_CHECKING:
    from graphopt.data import Dataset
    from graphopt.model import TensorSpec

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


@dataclass(frozen=True)
class DataReader:
    """How the command line asked for data sources to be read (--shape, --labels-key,
    --preprocess); opens any number of sources against one model's inputs."""

    shapes: tuple[str, ...]
    labels_key: str
    preprocess: str | None

    def open(
        self, source: str | None, inputs: Sequence[TensorSpec], *, seed: int
    ) -> Dataset | None:
        if source is None:
            return None
        from graphopt.data import ImagePreprocess, open_dataset, parse_shapes

        return open_dataset(
            source,
            inputs,
            shapes=parse_shapes(self.shapes),
            labels_key=self.labels_key,
            preprocess=ImagePreprocess.parse(self.preprocess) if self.preprocess else None,
            seed=seed,
        )


def data_options(fn: F) -> F:
    """--shape, --labels-key, --preprocess, handed to the command as one `data_reader`."""

    @functools.wraps(fn)
    def command(
        *args: Any, shapes: tuple[str, ...], labels_key: str, preprocess: str | None, **kwargs: Any
    ) -> Any:
        reader = DataReader(shapes=shapes, labels_key=labels_key, preprocess=preprocess)
        return fn(*args, data_reader=reader, **kwargs)

    options = [
        click.option(
            "--shape",
            "shapes",
            multiple=True,
            metavar="NAME:DIMS",
            help="Shape for an input with dynamic dims, e.g. image:1x3x224x224 (repeatable).",
        ),
        click.option(
            "--labels-key",
            default="labels",
            show_default=True,
            help="Name of the labels array in .npz data.",
        ),
        click.option(
            "--preprocess",
            default=None,
            metavar="SPEC",
            help="Image preprocessing for image folders, e.g. "
            "'resize=256,crop=224,mean=0.485,0.456,0.406,std=0.229,0.224,0.225'.",
        ),
    ]
    decorated: Any = command
    for add_option in reversed(options):
        decorated = add_option(decorated)
    return decorated


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


def teacher_options(fn: F) -> F:
    """--teacher, --teacher-logits, handed to the command as one `teacher` (or None)."""

    @functools.wraps(fn)
    def command(
        *args: Any, teacher_model: Path | None, teacher_logits: Path | None, **kwargs: Any
    ) -> Any:
        from graphopt.passes.distill import TeacherSpec

        if teacher_model is not None and teacher_logits is not None:
            raise RecipeError(
                "Give --teacher or --teacher-logits, not both.",
                hint="--teacher runs a teacher model on the data; --teacher-logits reads "
                "logits you exported.",
            )
        teacher = None
        if teacher_model is not None or teacher_logits is not None:
            teacher = TeacherSpec(logits=teacher_logits, model=teacher_model)
        return fn(*args, teacher=teacher, **kwargs)

    decorated: Any = click.option(
        "--teacher-logits",
        type=click.Path(path_type=Path),
        default=None,
        metavar="FILE",
        help="The teacher's logits for the --data samples, in order (.npy, or .npz by output "
        "name), for the distill pass.",
    )(command)
    decorated = click.option(
        "--teacher",
        "teacher_model",
        type=click.Path(path_type=Path),
        default=None,
        metavar="MODEL",
        help="A teacher ONNX model for the distill pass (default: the original model).",
    )(decorated)
    return decorated

"""TensorRT engines: the only package that imports `tensorrt` (lazily, in `build`).

`build_plan` checks everything it can without TensorRT first (the model file, the options,
the `--shapes` profiles against the model's inputs, the output path), and only then looks for
TensorRT, so a bad request is reported as such on a machine without it. Without TensorRT it
raises `EngineUnavailable` saying how to install it.

Modules: `shapes` (profile specs), `options` (build settings and a recipe's `engine:`
section), `layers` (the engine inspector's per-layer types), `build` (the TensorRT build
calls), `step` (the engine step of `graphopt optimize`), `run` (running and timing a plan:
`graphopt bench model.plan`), `compare` (a plan against ONNX Runtime: `graphopt validate
model.plan --reference model.onnx`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from graphopt.engine.build import (
    INSTALL_HINT,
    BuildResult,
    EngineBuildFailed,
    build_engine,
    tensorrt_module,
)
from graphopt.engine.layers import LayerPrecision, layer_precisions, precision_counts
from graphopt.engine.options import BuildOptions, EngineSection, engine_section_from_mapping
from graphopt.engine.shapes import (
    InputRange,
    ShapeProfile,
    ShapeSpecError,
    check_profiles,
    parse_shape_specs,
)
from graphopt.errors import GraphoptError

__all__ = [
    "INSTALL_HINT",
    "BuildOptions",
    "BuildResult",
    "EngineSection",
    "EngineBuildFailed",
    "InputRange",
    "LayerPrecision",
    "ShapeProfile",
    "ShapeSpecError",
    "build_plan",
    "check_plan_output",
    "check_profiles",
    "engine_section_from_mapping",
    "layer_precisions",
    "parse_shape_specs",
    "precision_counts",
    "prepare_build",
    "tensorrt_module",
]


def prepare_build(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    shape_specs: Sequence[str],
    options: BuildOptions,
) -> tuple[list[ShapeProfile], bool]:
    """Every check that needs no TensorRT: returns the profiles and whether the model has Q/DQ.

    Raises:
        ModelLoadError: the model is missing, corrupt or unsafe.
        ShapeSpecError: a `--shapes` value is malformed or does not fit the model.
        GraphoptError: the output path is the model itself or a folder.
    """
    from graphopt.benchmark import count_qdq
    from graphopt.model import load_model

    profiles = parse_shape_specs(shape_specs)
    model = load_model(model_path)
    check_profiles(profiles, model.input_specs())
    check_plan_output(output, {"the input model": model_path})
    return profiles, count_qdq(model) > 0


def check_plan_output(
    output: str | os.PathLike[str], protected: Mapping[str, str | os.PathLike[str]]
) -> None:
    """The plan may go to `output`: not a folder, and none of the `protected` files (by what
    they are, e.g. {"the input model": path}), and its `.json` sidecar not one either.

    Raises:
        GraphoptError: it is a folder or one of the protected files.
    """
    output = Path(output)
    if output.is_dir():
        raise GraphoptError(
            f"'{output}' is a folder; give the plan file to write, e.g. model.plan."
        )
    target = Path(os.path.realpath(output))
    sidecar = target.with_name(target.name + ".json")
    for what, path in protected.items():
        real = Path(os.path.realpath(path))
        if real in (target, sidecar):
            which = "the plan" if real == target else f"the plan's sidecar '{sidecar.name}'"
            raise GraphoptError(
                f"Refusing to write {which} over {what} '{path}'.",
                hint="Choose another plan path, e.g. model.plan.",
            )


def build_plan(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    shape_specs: Sequence[str] = (),
    options: BuildOptions | None = None,
) -> BuildResult:
    """Check the request, then build `output` (and `output.json`) with TensorRT.

    Raises:
        ShapeSpecError, ModelLoadError, GraphoptError: see `prepare_build` (before TensorRT).
        EngineUnavailable: TensorRT is not installed (after the checks).
        EngineBuildFailed: TensorRT refused the model or could not build it.
    """
    options = options or BuildOptions()
    profiles, has_qdq = prepare_build(model_path, output, shape_specs, options)
    return build_engine(Path(model_path), Path(output), options, profiles, has_qdq=has_qdq)

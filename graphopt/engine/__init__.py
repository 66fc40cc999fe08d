"""TensorRT engines: the only package that imports `tensorrt` (lazily, in `build`).

`build_plan` checks everything it can without TensorRT first (the model file, the options,
the `--shapes` profiles against the model's inputs, the output path), and only then looks for
TensorRT, so a bad request is reported as such on a machine without it. Without TensorRT it
raises `EngineUnavailable` saying how to install it.

Modules: `shapes` (profile specs), `options` (build settings), `layers` (the engine
inspector's per-layer types), `build` (the TensorRT calls).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from graphopt.engine.build import (
    INSTALL_HINT,
    BuildResult,
    EngineBuildFailed,
    build_engine,
    tensorrt_module,
)
from graphopt.engine.layers import LayerPrecision, layer_precisions, precision_counts
from graphopt.engine.options import BuildOptions
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
    "EngineBuildFailed",
    "InputRange",
    "LayerPrecision",
    "ShapeProfile",
    "ShapeSpecError",
    "build_plan",
    "check_profiles",
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
    output = Path(output)
    if output.is_dir():
        raise GraphoptError(f"'{output}' is a folder; -o takes the plan file to write.")
    if Path(os.path.realpath(output)) == Path(os.path.realpath(model_path)):
        raise GraphoptError(
            f"Refusing to write the plan over the input model '{model_path}'.",
            hint="Choose another -o, e.g. model.plan.",
        )
    return profiles, count_qdq(model) > 0


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

"""The engine step of `graphopt optimize`: `--engine PATH` or a recipe's `engine:` section.

The order, decided so that a machine without TensorRT still gets the optimized ONNX:

1. Before any pass runs, everything that needs no TensorRT is checked: the section's profiles
   against the input model's inputs (passes keep graph input names and shapes), and the plan
   path against the input model, the optimized model and the report (the plan never goes over
   any of them). A bad request fails here, before minutes of calibration.
2. Whether TensorRT imports is probed; without it a warning says the engine step will fail.
3. The passes run; the optimized model and the report are written as usual.
4. The plan is built from the optimized model file. Any failure here (no TensorRT, a parser
   error, a failed build) is re-raised with a message saying the optimized model and the
   report were written, and the command exits 1. The plan and its sidecar are written
   atomically, so a failed build leaves neither behind.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from graphopt.engine.build import BuildResult, EngineBuildFailed, tensorrt_module
from graphopt.engine.options import EngineSection
from graphopt.engine.shapes import ShapeProfile, ShapeSpecError, check_profiles, parse_shape_specs
from graphopt.errors import EngineUnavailable, GraphoptError
from graphopt.model import Model

_SHAPES_HINT = (
    "Give the profiles in the recipe's engine section, one string per profile, e.g. "
    "engine: {shapes: ['image:1x3x224x224/8x3x224x224/32x3x224x224']}."
)


@dataclass(frozen=True)
class EngineStep:
    """A checked request to build a plan after the passes."""

    plan: Path
    section: EngineSection
    profiles: list[ShapeProfile]


def with_command_line_output(
    section: EngineSection | None, engine: Path | None
) -> EngineSection | None:
    """The recipe's section with `--engine PATH` as its output (absolute: a command-line path
    is relative to the current folder); a section of defaults when only `--engine` is given."""
    if engine is None:
        return section
    return dataclasses.replace(section or EngineSection(), output=os.path.abspath(engine))


def plan_path(section: EngineSection, optimized_model: Path) -> Path:
    """Where the plan goes: the section's output (relative to the optimized model's folder),
    or `<optimized model stem>.plan` beside it."""
    if section.output is None:
        return optimized_model.with_suffix(".plan")
    output = Path(section.output)
    return output if output.is_absolute() else optimized_model.parent / output


def prepare_engine_step(
    section: EngineSection | None,
    model: Model,
    *,
    model_path: Path,
    optimized_model: Path,
    report: Path,
) -> EngineStep | None:
    """Check the engine request before any pass runs (None when there is none).

    Raises:
        ShapeSpecError: the section's profiles do not fit the model's inputs.
        GraphoptError: the plan would go over the input model, the optimized model, the report
            or a folder.
    """
    from graphopt.engine import check_plan_output

    if section is None:
        return None
    try:
        profiles = parse_shape_specs(section.shapes)
        check_profiles(profiles, model.input_specs())
    except ShapeSpecError as exc:
        raise ShapeSpecError(
            "The engine step cannot build from this model: "
            + exc.message.replace("--shapes", "engine shapes"),
            hint=exc.hint if exc.hint and "--shapes" not in exc.hint else _SHAPES_HINT,
        ) from None
    plan = plan_path(section, optimized_model)
    check_plan_output(
        plan,
        {
            "the input model": model_path,
            "the optimized model": optimized_model,
            "the report": report,
        },
    )
    return EngineStep(plan=plan, section=section, profiles=profiles)


def tensorrt_missing() -> str | None:
    """Why TensorRT cannot be used here (one paragraph), or None when it imports."""
    try:
        tensorrt_module()
    except EngineUnavailable as exc:
        return exc.paragraph()
    return None


def run_engine_step(step: EngineStep, optimized_model: Path, report: Path) -> BuildResult:
    """Build the plan from the saved optimized model.

    Raises:
        EngineUnavailable, EngineBuildFailed, GraphoptError: as `build_plan`, with a message
            that says the optimized model and the report were written.
    """
    from graphopt.engine import build_plan

    try:
        return build_plan(optimized_model, step.plan, step.section.shapes, step.section.options)
    except GraphoptError as exc:
        known = (EngineUnavailable, EngineBuildFailed, ShapeSpecError)
        cls = type(exc) if type(exc) in (*known, GraphoptError) else GraphoptError
        raise cls(
            f"The optimized model '{optimized_model}' and the report '{report}' were written, "
            f"but the engine '{step.plan}' was not built: {exc.message}",
            hint=exc.hint,
        ) from None

"""TensorRT build settings and a recipe's `engine:` section, checked without TensorRT.

`BuildOptions` is the single source of truth for the build settings: `graphopt build`'s flags
map onto it, and a recipe's `engine:` section is its fields plus `shapes` and `output`,
validated by the same code that validates pass options (`graphopt.passes.base.build_options`)
when the recipe is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from graphopt.errors import GraphoptError, RecipeError
from graphopt.passes.base import build_options, option, options_as_dict

HardwareCompat = Literal["none", "ampere+", "same-cc"]


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    """What trtexec users know as build flags.

    Attributes:
        fp16: allow FP16 kernels (TensorRT 10.x weakly typed networks only).
        bf16: allow BF16 kernels (TensorRT 10.x weakly typed networks only).
        strongly_typed: None: strongly typed for a Q/DQ model without fp16/bf16 on 10.x (always
            on 11.x); True/False to force it on 10.x.
        sparsity: let TensorRT use 2:4 sparse kernels where the weights allow it.
        workspace_mb: the workspace memory pool limit in MiB (None: TensorRT's default).
        opt_level: builder optimization level 0-5 (None: TensorRT's default, 3).
        timing_cache: a timing cache file, read if present and written after the build.
        hardware_compat: "ampere+" or "same-cc" engines run on other GPUs than the build's.
        version_compatible: an engine later TensorRT versions can run (lean runtime).
    """

    fp16: bool = option(False, "allow FP16 kernels (TensorRT 10 weakly typed networks only)")
    bf16: bool = option(False, "allow BF16 kernels (TensorRT 10 weakly typed networks only)")
    strongly_typed: bool | None = option(
        None, "TensorRT 10: force the typing (null: strongly typed for Q/DQ models)"
    )
    sparsity: bool = option(False, "allow 2:4 sparse kernels (SPARSE_WEIGHTS)")
    workspace_mb: int | None = option(
        None, "workspace memory pool limit in MiB (null: TensorRT's default)", range=(1, None)
    )
    opt_level: int | None = option(
        None, "builder optimization level (null: TensorRT's default, 3)", range=(0, 5)
    )
    timing_cache: str | None = option(
        None, "timing cache file: read if it exists, written after the build"
    )
    hardware_compat: HardwareCompat = option("none", "build an engine that also runs on other GPUs")
    version_compatible: bool = option(False, "an engine later TensorRT versions can run")

    def __post_init__(self) -> None:
        if self.strongly_typed and (self.fp16 or self.bf16):
            raise GraphoptError(
                "A strongly typed network runs in the model's own types, so --fp16/--bf16 "
                "cannot apply to it.",
                hint="Drop --fp16/--bf16, or build weakly typed (--weakly-typed, TensorRT 10).",
            )
        if self.workspace_mb is not None and self.workspace_mb < 1:
            raise GraphoptError(f"--workspace must be at least 1 MiB (got {self.workspace_mb}).")
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            raise GraphoptError(
                f"--opt-level must be between 0 and 5 (got {self.opt_level}).",
                hint="TensorRT's default is 3; higher levels build longer for faster engines.",
            )
        if self.hardware_compat not in ("none", "ampere+", "same-cc"):
            raise GraphoptError(
                f"Unknown hardware compatibility '{self.hardware_compat}'.",
                hint="Use none, ampere+ or same-cc.",
            )
        if self.timing_cache is not None:
            # Accept a Path from callers; the field is text so a recipe can hold it.
            object.__setattr__(self, "timing_cache", str(self.timing_cache))
            if Path(self.timing_cache).is_dir():
                raise GraphoptError(
                    f"The timing cache '{self.timing_cache}' is a folder, not a file."
                )

    @property
    def timing_cache_path(self) -> Path | None:
        return Path(self.timing_cache) if self.timing_cache is not None else None

    def to_dict(self) -> dict[str, Any]:
        return options_as_dict(self)


# ---------------------------------------------------------------------------- recipes

#: Keys of a recipe's `engine:` section besides the BuildOptions fields.
_SECTION_KEYS = ("output", "shapes")


@dataclass(frozen=True)
class EngineSection:
    """A recipe's `engine:` section: build a TensorRT plan from the optimized model.

    Attributes:
        options: the build settings.
        shapes: one `name:MIN/OPT/MAX[,...]` string per optimization profile (syntax checked
            when the recipe is read; checked against the model before any pass runs).
        output: where the plan goes; a relative path is taken from the folder of the
            optimized model; None: `<optimized model stem>.plan` beside it.
    """

    options: BuildOptions = dataclasses.field(default_factory=BuildOptions)
    shapes: tuple[str, ...] = ()
    output: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.output is not None:
            data["output"] = self.output
        data["shapes"] = list(self.shapes)
        data.update(self.options.to_dict())
        return data


class _EngineSectionOptions:
    """What `build_options` needs to validate the section like a pass's options."""

    name = "engine"
    options_type = BuildOptions


def known_engine_keys() -> list[str]:
    return [*_SECTION_KEYS, *(f.name for f in dataclasses.fields(BuildOptions))]


def engine_section_from_mapping(values: Any, *, where: str) -> EngineSection:
    """Validate a recipe's `engine:` section (a mapping; null or {} means all defaults).

    Raises:
        RecipeError: not a mapping, an unknown key (the message lists the known ones), a value
            of the wrong type or out of range, a malformed `shapes` value, or options that do
            not go together (e.g. fp16 with strongly_typed).
    """
    from graphopt.engine.shapes import parse_shape_specs

    values = values or {}
    known = known_engine_keys()
    if not isinstance(values, Mapping):
        raise RecipeError(
            f"The 'engine' section of {where} must be a mapping, not {type(values).__name__}.",
            hint=f"Its keys are: {', '.join(known)}.",
        )
    names = {str(key).replace("-", "_"): key for key in values}
    unknown = [str(values_key) for name, values_key in names.items() if name not in known]
    if unknown:
        raise RecipeError(
            f"The 'engine' section of {where} has unknown key(s): {', '.join(unknown)}.",
            hint=f"Its keys are: {', '.join(known)}.",
        )
    output = values.get(names["output"]) if "output" in names else None
    if output is not None and (not isinstance(output, str) or not output.strip()):
        raise RecipeError(
            f"'output' in the 'engine' section of {where} must be a file path, not {output!r}."
        )
    shapes = values.get(names["shapes"]) if "shapes" in names else None
    shapes = [shapes] if isinstance(shapes, str) else (shapes or [])
    if not isinstance(shapes, list) or not all(isinstance(s, str) for s in shapes):
        raise RecipeError(
            f"'shapes' in the 'engine' section of {where} must be a list of profile strings.",
            hint="Write e.g. shapes: ['image:1x3x224x224/8x3x224x224/32x3x224x224'].",
        )
    build_values = {key: values[key] for name, key in names.items() if name not in _SECTION_KEYS}
    try:
        parse_shape_specs(shapes)
        options = build_options(_EngineSectionOptions, build_values)  # type: ignore[arg-type]
    except GraphoptError as exc:
        message = exc.message.replace("of pass 'engine'", "of the 'engine' section")
        message = message.replace("--shapes", "engine shapes")
        raise RecipeError(f"In {where}: {message}", hint=exc.hint) from None
    return EngineSection(options=options, shapes=tuple(shapes), output=output)

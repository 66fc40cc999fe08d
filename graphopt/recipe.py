"""Recipes: the list of passes with their options, the validation gates, and the engine.

A recipe is a YAML or JSON file, a built-in name, or built inline from `--pass` arguments:

    passes:
      - cleanup                      # a pass with its default options
      - cleanup: {fold_constants: false}
    validation:
      min_cosine: 0.999
      max_accuracy_drop: 0.01
    engine:                          # optional: build a TensorRT plan from the result
      output: model.plan             # relative to the optimized model's folder
      shapes: ["image:1x3x224x224/8x3x224x224/32x3x224x224"]   # one string per profile
      workspace_mb: 1024             # and any other BuildOptions field

Everything is checked when the recipe is read, before any work starts: an unknown pass, an
unknown option, a value of the wrong type or outside its range is a `RecipeError` that names
the pass, the option and what is allowed. Files are read with YAML's safe loader and nothing
in a recipe file is executed: passes that run user code may only be named on the command line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from graphopt.engine.options import EngineSection, engine_section_from_mapping
from graphopt.errors import RecipeError
from graphopt.passes import base
from graphopt.validate import Gates

#: Built-in recipes by name. Each starts with the lossless cleanup; the default grows as
#: passes land, so `graphopt optimize` on the sample always shows the whole pipeline.
BUILTIN_RECIPES: dict[str, dict[str, Any]] = {
    "default": {
        "description": "lossless cleanup, then int8 quantization placed for TensorRT "
        "(needs --data; without it graphopt runs 'lossless')",
        "passes": ["cleanup", "quantize"],
        "validation": {"min_cosine": 0.99},
    },
    "lossless": {
        "description": "only passes that keep outputs equal within float rounding",
        "passes": ["cleanup"],
        "validation": {"min_cosine": 0.99999},
    },
    "trt-int8": {
        "description": "int8 Q/DQ placed for TensorRT (symmetric, zero points 0), after cleanup",
        "passes": ["cleanup", {"quantize": {"target": "tensorrt"}}],
        "validation": {"min_cosine": 0.99},
    },
    "ort-int8": {
        "description": "int8 Q/DQ that ONNX Runtime's CPU provider fuses into integer kernels",
        "passes": ["cleanup", {"quantize": {"target": "ort-cpu"}}],
        "validation": {"min_cosine": 0.99},
    },
    "trt-fp8": {
        "description": "fp8 (float8 e4m3fn) Q/DQ placed for TensorRT on Hopper and later "
        "(scales amax/448, zero points 0, opset 19), after cleanup",
        "passes": ["cleanup", {"quantize": {"precision": "fp8", "target": "tensorrt"}}],
        "validation": {"min_cosine": 0.99},
    },
    "int4-weights": {
        "description": "weight-only int4 for MatMul/Gemm (blockwise, 128 rows per scale, "
        "opset 21; round to nearest, no data needed), after cleanup",
        "passes": ["cleanup", {"quantize": {"precision": "int4", "weight_method": "rtn"}}],
        "validation": {"min_cosine": 0.98},
    },
    "int4-awq": {
        "description": "weight-only int4 for MatMul/Gemm with AWQ scales searched on --data, "
        "after cleanup",
        "passes": ["cleanup", {"quantize": {"precision": "int4", "weight_method": "awq"}}],
        "validation": {"min_cosine": 0.98},
    },
}

_TOP_LEVEL_KEYS = {"description", "passes", "validation", "engine"}


@dataclass(frozen=True)
class PassSpec:
    """One step of a recipe: a registered pass and its validated options."""

    name: str
    options: Any

    def instantiate(self) -> base.Pass[Any]:
        return base.get_pass(self.name)(self.options)

    def to_dict(self) -> dict[str, Any]:
        return {self.name: base.options_as_dict(self.options)}


@dataclass
class Recipe:
    """The passes to run, in order, the gates the result must pass, and the engine to build
    from it (None: no engine)."""

    passes: list[PassSpec]
    gates: Gates = field(default_factory=Gates)
    source: str = "inline"
    description: str = ""
    engine: EngineSection | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.description:
            data["description"] = self.description
        data["passes"] = [spec.to_dict() for spec in self.passes]
        gates = self.gates.to_dict()
        if gates:
            data["validation"] = gates
        if self.engine is not None:
            data["engine"] = self.engine.to_dict()
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name, or a YAML/JSON recipe file."""
    text = str(name_or_path)
    if text in BUILTIN_RECIPES:
        return recipe_from_mapping(BUILTIN_RECIPES[text], source=f"built-in '{text}'")
    path = Path(name_or_path)
    if not path.exists():
        raise RecipeError(
            f"No built-in recipe or recipe file called '{text}'.",
            hint=f"Built-in recipes: {', '.join(BUILTIN_RECIPES)}; or give a .yaml/.json file.",
        )
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"Cannot read recipe file '{path}' ({exc}).") from None
    try:
        data = json.loads(raw) if path.suffix.lower() == ".json" else yaml.safe_load(raw)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        detail = " ".join(str(exc).split())
        raise RecipeError(f"Recipe file '{path}' is not valid YAML/JSON: {detail}.") from None
    if not isinstance(data, Mapping):
        raise RecipeError(
            f"Recipe file '{path}' must hold a mapping with a 'passes' list.",
            hint="See 'graphopt optimize --print-recipe' for an example.",
        )
    return recipe_from_mapping(data, source=str(path))


def recipe_from_mapping(
    data: Mapping[str, Any], *, source: str, allow_code: bool = False
) -> Recipe:
    """Build and validate a recipe from parsed YAML/JSON."""
    unknown = set(data) - _TOP_LEVEL_KEYS
    if unknown:
        raise RecipeError(
            f"Recipe {source} has unknown section(s): {', '.join(sorted(map(str, unknown)))}.",
            hint=f"Allowed sections: {', '.join(sorted(_TOP_LEVEL_KEYS))}.",
        )
    steps = data.get("passes")
    if not isinstance(steps, list) or not steps:
        raise RecipeError(f"Recipe {source} needs a non-empty 'passes' list.")
    passes = [_pass_spec(step, i, source, allow_code) for i, step in enumerate(steps, start=1)]
    validation = data.get("validation") or {}
    if not isinstance(validation, Mapping):
        raise RecipeError(f"The 'validation' section of recipe {source} must be a mapping.")
    gates = Gates.from_mapping(validation, where=f"recipe {source}")
    description = data.get("description") or ""
    engine = None
    if "engine" in data:
        engine = engine_section_from_mapping(data["engine"], where=f"recipe {source}")
    return Recipe(
        passes=passes, gates=gates, source=source, description=str(description), engine=engine
    )


def _pass_spec(step: Any, index: int, source: str, allow_code: bool) -> PassSpec:
    where = f"step {index} of recipe {source}"
    if isinstance(step, str):
        name, values = step, {}
    elif isinstance(step, Mapping) and "name" in step:
        name = step["name"]
        values = step.get("options") or {}
        extra = set(step) - {"name", "options"}
        if extra:
            raise RecipeError(f"{where} has unknown key(s) {sorted(extra)}; use 'options'.")
    elif isinstance(step, Mapping) and len(step) == 1:
        ((name, values),) = step.items()
        values = values or {}
    else:
        raise RecipeError(
            f"{where} must be a pass name or a mapping '{{name: {{option: value}}}}', not {step!r}."
        )
    if not isinstance(name, str) or not isinstance(values, Mapping):
        raise RecipeError(f"{where}: pass name must be text and its options a mapping.")
    pass_cls = base.get_pass(name)
    if pass_cls.runs_user_code and not allow_code:
        raise RecipeError(
            f"Pass '{name}' ({where}) runs Python code, and recipe files are never allowed to "
            "run code.",
            hint=f"Name it on the command line instead: --pass {name}:function=module:function.",
        )
    return PassSpec(name=name, options=base.build_options(pass_cls, values))


def parse_pass_arg(text: str) -> PassSpec:
    """`--pass name:key=value,key=value` → a validated step (command line: code allowed)."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise RecipeError(f"'--pass {text}' names no pass; write --pass name:key=value,...")
    values: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(
                f"'--pass {text}': '{item}' is not key=value.",
                hint="Write --pass name:key=value,key=value; list values as a|b|c.",
            )
        values[key.strip()] = value.strip()
    pass_cls = base.get_pass(name)
    return PassSpec(name=name, options=base.build_options(pass_cls, values, from_text=True))


def inline_recipe(pass_args: Sequence[str], gates: Gates | None = None) -> Recipe:
    return Recipe(
        passes=[parse_pass_arg(arg) for arg in pass_args],
        gates=gates or Gates(),
        source="command line",
    )

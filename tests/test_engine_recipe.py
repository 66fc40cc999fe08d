"""A recipe's `engine:` section and `graphopt optimize --engine`, on a machine without
TensorRT: the section is validated when the recipe is read, the request is checked against
the model before any pass runs, and the engine step fails cleanly after the optimized model
and the report are written."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from graphopt.cli import main
from graphopt.engine import BuildOptions, EngineSection, engine_section_from_mapping
from graphopt.engine.step import plan_path, with_command_line_output
from graphopt.errors import RecipeError
from graphopt.recipe import load_recipe, recipe_from_mapping

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "models" / "digits" / "model.onnx"
SAMPLE_SHAPES = "image:1x1x8x8/8x1x8x8/32x1x8x8"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make `import tensorrt` fail, as on a machine without it (also where it is installed)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def write_recipe(tmp_path: Path, engine: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"passes": ["cleanup"], "engine": engine}))
    return path


# ---------------------------------------------------------------------------- the section


def test_engine_section_round_trips_through_yaml(tmp_path):
    path = write_recipe(
        tmp_path,
        {
            "output": "digits.plan",
            "shapes": [SAMPLE_SHAPES, "image:64x1x8x8"],
            "workspace-mb": 512,
            "opt_level": 2,
            "timing_cache": "trt.cache",
            "hardware_compat": "ampere+",
            "sparsity": True,
        },
    )
    recipe = load_recipe(path)
    engine = recipe.engine
    assert engine is not None
    assert engine.output == "digits.plan"
    assert engine.shapes == (SAMPLE_SHAPES, "image:64x1x8x8")
    assert engine.options == BuildOptions(
        workspace_mb=512,
        opt_level=2,
        timing_cache="trt.cache",
        hardware_compat="ampere+",
        sparsity=True,
    )
    text = recipe.to_yaml()
    again = recipe_from_mapping(yaml.safe_load(text), source="round trip")
    assert again.engine == engine
    assert again.to_dict() == recipe.to_dict()
    # A recipe without the section has no engine, and prints none.
    assert load_recipe("lossless").engine is None
    assert "engine" not in load_recipe("lossless").to_dict()


def test_an_empty_section_means_defaults_and_one_shape_string_is_one_profile():
    assert engine_section_from_mapping(None, where="r") == EngineSection()
    assert engine_section_from_mapping({}, where="r") == EngineSection()
    one = engine_section_from_mapping({"shapes": SAMPLE_SHAPES}, where="r")
    assert one.shapes == (SAMPLE_SHAPES,)


@pytest.mark.parametrize(
    ("engine", "words"),
    [
        ({"fp32": True}, ["unknown key(s): fp32", "output, shapes, fp16", "version_compatible"]),
        ({"opt_level": 9}, ["opt_level", "'engine' section", "range [0, 5]"]),
        ({"workspace_mb": 0}, ["workspace_mb", "range [1, inf]"]),
        ({"workspace_mb": "lots"}, ["workspace_mb", "int | null", "'lots'"]),
        ({"hardware_compat": "turing"}, ["hardware_compat", "'ampere+'"]),
        ({"fp16": True, "strongly_typed": True}, ["strongly typed"]),
        ({"shapes": ["image:8x1x8x8/1x1x8x8/32x1x8x8"]}, ["MIN <= OPT <= MAX", "engine shapes"]),
        ({"shapes": [3]}, ["list of profile strings"]),
        ({"output": ""}, ["'output'", "file path"]),
        ("fast", ["must be a mapping", "Its keys are"]),
    ],
)
def test_bad_engine_sections_are_refused_when_the_recipe_is_read(tmp_path, engine, words):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"passes": ["cleanup"], "engine": engine}))
    with pytest.raises(RecipeError) as refused:
        load_recipe(path)
    paragraph = refused.value.paragraph()
    assert "recipe.yaml" in paragraph
    for word in words:
        assert word in paragraph, paragraph
    assert "pass 'engine'" not in paragraph  # the section is not a pass


def test_plan_paths_follow_the_optimized_model(tmp_path):
    out_model = tmp_path / "out" / "model.onnx"
    assert plan_path(EngineSection(), out_model) == tmp_path / "out" / "model.plan"
    assert plan_path(EngineSection(output="m.plan"), out_model) == tmp_path / "out" / "m.plan"
    absolute = tmp_path / "elsewhere.plan"
    assert plan_path(EngineSection(output=str(absolute)), out_model) == absolute
    # --engine is a command-line path (relative to the current folder) and wins.
    section = with_command_line_output(EngineSection(output="m.plan"), Path("x.plan"))
    assert section is not None and Path(section.output).is_absolute()
    assert with_command_line_output(None, None) is None


# ---------------------------------------------------------------------------- optimize


def test_print_recipe_shows_the_engine_section(tmp_path):
    path = write_recipe(tmp_path, {"shapes": [SAMPLE_SHAPES], "workspace_mb": 256})
    result = invoke("optimize", SAMPLE, "--recipe", path, "--print-recipe")
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed["engine"]["shapes"] == [SAMPLE_SHAPES]
    assert printed["engine"]["workspace_mb"] == 256
    # --engine adds (or overrides) the output; --pass keeps the recipe's engine section.
    result = invoke(
        "optimize", SAMPLE, "--recipe", path, "--pass", "cleanup", "--engine", tmp_path / "e.plan",
        "--print-recipe",
    )  # fmt: skip
    printed = yaml.safe_load(result.stdout)
    assert printed["engine"]["output"] == str(tmp_path / "e.plan")
    assert printed["engine"]["workspace_mb"] == 256


def test_optimize_writes_the_model_and_report_then_fails_at_the_engine_step(no_tensorrt, tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copy(SAMPLE, model)
    before = model.read_bytes()
    recipe = write_recipe(tmp_path, {"shapes": [SAMPLE_SHAPES]})
    out = tmp_path / "out"
    result = invoke(
        "optimize", model, "--recipe", recipe, "-o", out, "--latency-runs", "0",
        "--engine", out / "digits.plan",
    )  # fmt: skip
    paragraph = error_line(result)
    assert "were written, but the engine" in paragraph
    assert "TensorRT is not installed" in paragraph
    assert 'pip install "graphopt[tensorrt]"' in paragraph and "NVIDIA GPU" in paragraph
    assert "TensorRT is not usable here" in result.stderr  # warned before the passes ran
    assert (out / "model.onnx").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["engine"]["shapes"] == [SAMPLE_SHAPES]
    assert not (out / "digits.plan").exists() and not (out / "digits.plan.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json"]
    assert model.read_bytes() == before


def test_the_recipe_section_alone_asks_for_the_engine(no_tensorrt, tmp_path):
    recipe = write_recipe(tmp_path, {"shapes": [SAMPLE_SHAPES], "output": "d.plan"})
    out = tmp_path / "out"
    result = invoke("optimize", SAMPLE, "--recipe", recipe, "-o", out, "--latency-runs", "0")
    assert "'" + str(out / "d.plan") + "' was not built" in error_line(result)
    assert (out / "model.onnx").exists() and not (out / "d.plan").exists()


def test_engine_requests_are_checked_before_any_pass_runs(no_tensorrt, tmp_path):
    out = tmp_path / "out"
    cases = [
        # The sample's batch axis is dynamic: a profile is needed.
        (["--recipe", "lossless", "--engine", out / "m.plan"], ["dynamic dimensions", "engine:"]),
        (
            ["--recipe", write_recipe(tmp_path, {"shapes": ["images:1x1x8x8"]}, "a.yaml")],
            ["not an input", "engine shapes", "Its inputs are 'image'"],
        ),
        (
            ["--recipe", write_recipe(tmp_path, {"shapes": ["image:1x3x8x8"]}, "b.yaml")],
            ["fixed at 1"],
        ),
    ]
    for args, words in cases:
        paragraph = error_line(invoke("optimize", SAMPLE, *args, "-o", out))
        assert "TensorRT is not installed" not in paragraph
        for word in words:
            assert word in paragraph, paragraph
        assert not out.exists(), "nothing may be written when the request is bad"


def test_the_plan_never_goes_over_the_input_the_model_or_the_report(no_tensorrt, tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copy(SAMPLE, model)
    recipe = write_recipe(tmp_path, {"shapes": [SAMPLE_SHAPES]})
    out = tmp_path / "out"
    for target, words in [
        (model, "over the input model"),
        (out / "model.onnx", "over the optimized model"),
        (out / "report", "sidecar 'report.json' over the report"),
        (tmp_path, "is a folder"),
    ]:
        result = invoke("optimize", model, "--recipe", recipe, "-o", out, "--engine", target)
        assert words in error_line(result)
        assert not out.exists()
    assert model.read_bytes() == SAMPLE.read_bytes()

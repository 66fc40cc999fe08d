"""graphopt.engine and `graphopt build`.

Without TensorRT (every CPU machine this project runs on so far): shape specs and options are
checked first and reported as such; then `build` fails with EngineUnavailable saying how to
install TensorRT. The tests that build real engines need TensorRT and a GPU, and are skipped
with that reason where either is missing.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import onnx
import onnx.parser
import pytest
from click.testing import CliRunner

from graphopt.cli import main
from graphopt.engine import (
    BuildOptions,
    EngineBuildFailed,
    ShapeSpecError,
    build_plan,
    check_profiles,
    layer_precisions,
    parse_shape_specs,
    precision_counts,
    prepare_build,
)
from graphopt.engine.build import _strongly_typed, tensorrt_module
from graphopt.errors import EngineUnavailable, GraphoptError
from graphopt.model import TensorSpec

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "models" / "digits" / "model.onnx"
SAMPLE_SHAPES = "image:1x1x8x8/8x1x8x8/32x1x8x8"

INPUTS = [
    TensorSpec("x", None, ("N", 3, "H", "W")),
    TensorSpec("mask", None, ("N", 4)),
    TensorSpec("scale", None, (1,)),
]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_clean_failure(result, *words: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make `import tensorrt` fail, as on a machine without it (also where it is installed)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


# ---------------------------------------------------------------------------- shapes


def test_shape_specs_parse_into_profiles():
    profiles = parse_shape_specs(
        ["x:1x3x48x320/8x3x48x320/32x3x48x320, mask:1x4/8x4/32x4", "x:2X3x48x640"]
    )
    assert len(profiles) == 2
    x = profiles[0].get("x")
    assert (x.min, x.opt, x.max) == ((1, 3, 48, 320), (8, 3, 48, 320), (32, 3, 48, 320))
    assert profiles[0].get("mask").max == (32, 4)
    single = profiles[1].get("x")
    assert single.min == single.opt == single.max == (2, 3, 48, 640)
    assert profiles[0].to_dict()["mask"] == {"min": [1, 4], "opt": [8, 4], "max": [32, 4]}
    # TensorFlow-style names keep their colons: the shapes follow the last one.
    assert parse_shape_specs(["input:0:1x2"])[0].get("input:0").max == (1, 2)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("x", "name:MIN/OPT/MAX"),
        ("x:", "name:MIN/OPT/MAX"),
        ("x:1x3/2x3", "three"),
        ("x:1x3/2x3/4x3/8x3", "three"),
        ("x:1xAx3", "positive integers"),
        ("x:0x3/1x3/2x3", "positive integers"),
        ("x:1x3/2x3/4x3x1", "rank"),
        ("x:4x3/2x3/8x3", "MIN <= OPT <= MAX"),
        ("x:1x3,x:2x3", "more than once"),
        (" , ", "empty"),
    ],
)
def test_bad_shape_specs_say_what_is_wrong(spec, words):
    with pytest.raises(ShapeSpecError, match=words):
        parse_shape_specs([spec])


def test_profiles_are_checked_against_the_model_inputs():
    good = parse_shape_specs(["x:1x3x8x8/2x3x16x16/4x3x32x32,mask:1x4/2x4/4x4"])
    check_profiles(good, INPUTS)
    cases = [
        ([], "dynamic dimensions"),
        (["x:1x3x8x8"], "no range for dynamic input(s) 'mask'"),
        (["x:1x3x8x8,mask:1x4,nope:1"], "not an input"),
        (["x:1x3x8,mask:1x4"], "rank 4"),
        (["x:1x4x8x8,mask:1x4"], "axis 1 of 'x' is fixed at 3"),
        (["x:1x3x8x8,mask:1x4/2x5/2x5"], "axis 1 of 'mask' is fixed at 4"),
        (["x:1x3x8x8,mask:1x4", "x:1x3x8x8"], "profile 1 has no range"),
    ]
    for specs, words in cases:
        with pytest.raises(ShapeSpecError) as refused:
            check_profiles(parse_shape_specs(specs), INPUTS)
        assert words in refused.value.paragraph(), (specs, refused.value.paragraph())
    # A model without dynamic inputs needs no profile.
    check_profiles([], [TensorSpec("x", None, (1, 3))])


# ---------------------------------------------------------------------------- options


def test_build_options_are_checked_before_tensorrt():
    with pytest.raises(GraphoptError, match="strongly typed"):
        BuildOptions(strongly_typed=True, fp16=True)
    with pytest.raises(GraphoptError, match="between 0 and 5"):
        BuildOptions(opt_level=6)
    with pytest.raises(GraphoptError, match="1 MiB"):
        BuildOptions(workspace_mb=0)
    with pytest.raises(GraphoptError, match="hardware"):
        BuildOptions(hardware_compat="turing")  # type: ignore[arg-type]


def test_typing_is_chosen_by_version_and_model():
    plain = BuildOptions()
    assert _strongly_typed(plain, has_qdq=True, major=10)  # Q/DQ: follow the model's Q/DQ
    assert not _strongly_typed(plain, has_qdq=False, major=10)
    assert not _strongly_typed(BuildOptions(fp16=True), has_qdq=True, major=10)
    assert not _strongly_typed(BuildOptions(strongly_typed=False), has_qdq=True, major=10)
    assert _strongly_typed(plain, has_qdq=False, major=11)  # 11.x: always strongly typed


# ---------------------------------------------------------------------------- inspector


def test_layer_types_from_the_10x_inspector_schema():
    info = {
        "Layers": [
            {
                "Name": "conv1 + relu",
                "LayerType": "CaskConvolution",
                "Inputs": [{"Name": "x", "Format/Datatype": "Row major linear FP32 format"}],
                "Outputs": [
                    {
                        "Name": "r",
                        "Format/Datatype": "Channel major FP16 format where channel % 8 == 0",
                    }
                ],
            },
            {
                "Name": "qconv",
                "LayerType": "CaskConvolution",
                "Outputs": [
                    {
                        "Name": "q",
                        "Format/Datatype": "Four wide channel vectorized row major Int8 format",
                    }
                ],
            },
            "reformat_only_named",
        ],
        "Bindings": ["x", "y"],
    }
    layers = layer_precisions(info)
    assert [(layer.name, layer.output_types) for layer in layers] == [
        ("conv1 + relu", ("FP16",)),
        ("qconv", ("INT8",)),
        ("reformat_only_named", ()),
    ]
    assert precision_counts(layers) == {"FP16": 1, "INT8": 1, "unknown": 1}


def test_layer_types_from_the_11x_inspector_schema():
    info = {
        "Layers": [
            {
                "Name": "gemm",
                "LayerType": "gemm",
                "Outputs": [{"Name": "y", "Format": "kLINEAR", "DataType": "Float"}],
            },
            {
                "Name": "attn",
                "LayerType": "Myelin",
                "Outputs": [
                    {"Name": "a", "Format": "kLINEAR", "DataType": "Half"},
                    {"Name": "b", "Format": "kLINEAR", "DataType": "Int8"},
                ],
            },
        ],
        "I/O Tensors": [{"Name": "x", "IOMode": "Input", "DataType": "Float"}],
    }
    layers = layer_precisions(info)
    assert [layer.output_types for layer in layers] == [("FP32",), ("FP16", "INT8")]
    assert layers[1].to_dict() == {"name": "attn", "type": "Myelin", "outputs": ["FP16", "INT8"]}
    assert layer_precisions({}) == []


# ---------------------------------------------------------------------------- without TensorRT


def test_build_without_tensorrt_says_how_to_install_it(no_tensorrt, tmp_path):
    out = tmp_path / "digits.plan"
    result = invoke("build", SAMPLE, "-o", out, "--shapes", SAMPLE_SHAPES)
    paragraph = assert_clean_failure(
        result, 'pip install "graphopt[tensorrt]"', "NVIDIA GPU", "driver", "PyPI alone"
    )
    assert "TensorRT is not installed" in paragraph
    assert not out.exists() and not (tmp_path / "digits.plan.json").exists()
    with pytest.raises(EngineUnavailable):
        tensorrt_module()


def test_bad_shapes_are_reported_before_tensorrt_is_looked_for(no_tensorrt, tmp_path):
    out = tmp_path / "m.plan"
    result = invoke("build", SAMPLE, "-o", out, "--shapes", "image:8x1x8x8/1x1x8x8/32x1x8x8")
    paragraph = assert_clean_failure(result, "MIN <= OPT <= MAX")
    assert "TensorRT" not in paragraph
    assert_clean_failure(invoke("build", SAMPLE, "-o", out), "image", "--shapes")
    assert_clean_failure(
        invoke("build", SAMPLE, "-o", out, "--shapes", "images:1x1x8x8"), "not an input"
    )
    assert_clean_failure(
        invoke("build", SAMPLE, "-o", out, "--shapes", "image:1x3x8x8"), "fixed at 1"
    )
    assert_clean_failure(
        invoke("build", SAMPLE, "-o", out, "--shapes", SAMPLE_SHAPES, "--opt-level", "9"),
        "between 0 and 5",
    )
    assert_clean_failure(
        invoke("build", SAMPLE, "-o", out, "--shapes", SAMPLE_SHAPES, "--fp16", "--strongly-typed"),
        "strongly typed",
    )
    assert_clean_failure(invoke("build", tmp_path / "missing.onnx", "-o", out), "missing.onnx")
    assert not out.exists()


def test_the_plan_never_overwrites_the_model(no_tensorrt, tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(SAMPLE, model)
    with pytest.raises(GraphoptError, match="over the input model"):
        prepare_build(model, model, [SAMPLE_SHAPES], BuildOptions())
    with pytest.raises(GraphoptError, match="folder"):
        prepare_build(model, tmp_path, [SAMPLE_SHAPES], BuildOptions())
    profiles, has_qdq = prepare_build(model, tmp_path / "m.plan", [SAMPLE_SHAPES], BuildOptions())
    assert len(profiles) == 1 and not has_qdq
    assert model.read_bytes() == SAMPLE.read_bytes()


# ---------------------------------------------------------------------------- with TensorRT


def _tensorrt_with_gpu():
    trt = pytest.importorskip(
        "tensorrt",
        reason='TensorRT is not installed (pip install "graphopt[tensorrt]" on a machine with '
        "an NVIDIA GPU and driver; PyPI alone does not suffice)",
    )
    if shutil.which("nvidia-smi") is None:
        pytest.skip("TensorRT is installed but no NVIDIA GPU is visible (nvidia-smi missing)")
    return trt


def test_build_the_sample_with_a_profile_and_a_timing_cache(tmp_path):
    _tensorrt_with_gpu()
    plan = tmp_path / "digits.plan"
    cache = tmp_path / "timing.cache"
    options = BuildOptions(timing_cache=cache, workspace_mb=256, opt_level=1)
    result = build_plan(SAMPLE, plan, [SAMPLE_SHAPES], options)
    assert plan.stat().st_size > 0 and cache.stat().st_size > 0
    sidecar = json.loads(result.sidecar_path.read_text())
    assert sidecar["profiles"] == [
        {"image": {"min": [1, 1, 8, 8], "opt": [8, 1, 8, 8], "max": [32, 1, 8, 8]}}
    ]
    assert sidecar["layers"] and sidecar["tensorrt_version"]
    assert sidecar["gpu"]["compute_capability"]
    assert sidecar["timing_cache"]["bytes_read"] == 0
    again = build_plan(SAMPLE, tmp_path / "again.plan", [SAMPLE_SHAPES], options)
    assert again.sidecar["timing_cache"]["bytes_read"] > 0  # reused across builds


def test_every_parser_error_is_listed(tmp_path):
    _tensorrt_with_gpu()
    text = """
    <ir_version: 9, opset_import: ["" : 17, "acme" : 1]>
    bad (float[1,4] x) => (float[1,4] y)
    {
        a = acme.Frobnicate(x)
        y = acme.Frobnicate(a)
    }
    """
    path = tmp_path / "bad.onnx"
    onnx.save(onnx.parser.parse_model(text), path)
    with pytest.raises(EngineBuildFailed) as failed:
        build_plan(path, tmp_path / "bad.plan")
    message = failed.value.paragraph()
    assert "Frobnicate" in message and "error(s)" in message
    assert not (tmp_path / "bad.plan").exists()

"""precision=int4 through the quantize pass, the recipes and the command line (the numbers
themselves are tested in test_quantize_int4.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from graphopt.cli import main
from graphopt.context import Context
from graphopt.data import open_dataset
from graphopt.errors import RecipeError
from graphopt.model import Model
from graphopt.passes.base import build_options
from graphopt.passes.quantize import QuantizeOptions, QuantizePass
from tests import models


def _block(tmp_path: Path) -> tuple[onnx.ModelProto, Path]:
    proto = models.transformer_block(dim=64, hidden=128, heads=4)
    model_path = tmp_path / "block.onnx"
    onnx.save(proto, model_path)
    data = tmp_path / "calib.npz"
    np.savez(data, **models.feeds(proto, batch=32))
    return proto, data


def test_pass_quantizes_weights_without_data_for_rtn(tmp_path: Path) -> None:
    proto, _ = _block(tmp_path)
    model = Model(ir=ir.from_proto(proto))
    result = QuantizePass(QuantizeOptions(precision="int4", block_size=32)).run(
        model, Context(workdir=tmp_path)
    )
    assert result.modified
    assert result.stats["precision"] == "int4" and result.stats["weight_method"] == "rtn"
    assert result.stats["quantized_nodes"] >= 4  # q, k, v, out, fc1, fc2 (dims >= 16)
    assert model.ir.opset_imports[""] == 21
    kinds = {n.op_type for n in model.graph}
    assert "DequantizeLinear" in kinds and "QuantizeLinear" not in kinds
    onnx.checker.check_model(model.to_proto(), full_check=True)


def test_awq_reads_the_calibration_data(tmp_path: Path) -> None:
    proto, data = _block(tmp_path)
    model = Model(ir=ir.from_proto(proto))
    dataset = open_dataset(os.fspath(data), model.input_specs())
    ctx = Context(workdir=tmp_path, calib_data=dataset, device="cpu", batch_size=8)
    options = QuantizeOptions(precision="int4", block_size=32, weight_method="awq", samples=16)
    result = QuantizePass(options).run(model, ctx)
    assert result.stats["weight_method"] == "awq"
    assert result.stats["awq_samples"] == 16


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"precision": "int4", "block_size": 48}, "block"),
        ({"precision": "int4", "min_cosine": 0.99}, "accuracy budget"),
    ],
)
def test_bad_int4_options_are_recipe_errors(options: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        build_options(QuantizePass, options)


def test_int4_weights_recipe_on_the_command_line(tmp_path: Path) -> None:
    _, data = _block(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "optimize",
            str(tmp_path / "block.onnx"),
            "--recipe",
            "int4-weights",
            "--gate",
            "min_cosine=0.9",  # int4 on this small random-weight block: about 0.96
            "--val-data",
            str(data),
            "--latency-runs",
            "0",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    steps = {step["name"]: step for step in report["steps"]}
    assert steps["quantize"]["pass_stats"]["precision"] == "int4"
    saved = onnx.load(out / "block.onnx")
    assert any(init.data_type == onnx.TensorProto.INT4 for init in saved.graph.initializer)

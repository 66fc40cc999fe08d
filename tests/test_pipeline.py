"""The pipeline: checks after every pass, blames the right pass, validates against the original."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import pytest

from graphopt.context import Context
from graphopt.data import open_dataset
from graphopt.errors import PassFailed
from graphopt.model import load_model
from graphopt.passes import base
from graphopt.pipeline import run_pipeline
from graphopt.recipe import PassSpec, Recipe
from graphopt.validate import Gates
from tests.tiny import data_file, tiny_model


@dataclass(frozen=True, kw_only=True)
class NoOptions:
    pass


class BreakingPass(base.Pass[NoOptions]):
    """Leaves a node whose input does not exist (a broken graph)."""

    name = "test-break"
    options_type = NoOptions
    summary = "breaks the graph"

    def run(self, model, ctx):
        relu = next(n for n in model.graph if n.op_type == "Relu")
        ghost = ir.Value(name="ghost", type=ir.TensorType(ir.DataType.FLOAT))
        relu.replace_input_with(0, ghost)
        return base.PassResult(modified=True)


class RaisingPass(base.Pass[NoOptions]):
    """Raises a plain bug."""

    name = "test-raise"
    options_type = NoOptions
    summary = "raises"

    def run(self, model, ctx):
        raise ZeroDivisionError("oops")


class ScalePass(base.Pass[NoOptions]):
    """Doubles the Gemm bias: a lossy change validation must notice."""

    name = "test-scale"
    options_type = NoOptions
    summary = "scales"

    def run(self, model, ctx):
        bias = model.graph.initializers["b"]
        bias.const_value = ir.tensor(np.asarray(bias.const_value.numpy()) * 2)
        return base.PassResult(modified=True, stats={"scaled": 1}, warnings=["lossy on purpose"])


@pytest.fixture(autouse=True)
def test_passes():
    for cls in (BreakingPass, RaisingPass, ScalePass):
        base.register_pass(cls)
    yield
    for cls in (BreakingPass, RaisingPass, ScalePass):
        base._REGISTRY.pop(cls.name)


def recipe(*names: str, gates: Gates | None = None) -> Recipe:
    specs = [PassSpec(name, base.get_pass(name).options_type()) for name in names]
    return Recipe(passes=specs, gates=gates or Gates())


def test_broken_graph_names_the_pass_the_previous_passes_and_the_node(tmp_path):
    model = load_model(tiny_model(tmp_path / "m.onnx"))
    with pytest.raises(PassFailed) as info:
        run_pipeline(model, recipe("cleanup", "test-break"), Context(workdir=tmp_path))
    error = info.value
    assert error.pass_name == "test-break"
    assert error.previous == ["cleanup"]
    assert "test-break" in error.paragraph() and "after cleanup" in error.paragraph()
    assert error.node == "relu" and "'relu'" in error.paragraph()


def test_exception_in_a_pass_is_reported_with_its_name(tmp_path):
    model = load_model(tiny_model(tmp_path / "m.onnx"))
    with pytest.raises(PassFailed, match="test-raise.*ZeroDivisionError.*first pass"):
        run_pipeline(model, recipe("test-raise"), Context(workdir=tmp_path))


def test_validation_after_every_pass_against_the_original(tmp_path):
    path = tiny_model(tmp_path / "m.onnx")
    model = load_model(path)
    val = open_dataset(data_file(tmp_path / "d.npz"), model.input_specs())
    result = run_pipeline(
        model,
        recipe("cleanup", "test-scale", gates=Gates(min_cosine=0.9999)),
        Context(workdir=tmp_path, val_data=val),
    )
    original, cleaned, scaled = result.steps
    assert cleaned.fidelity.worst_cosine == pytest.approx(1.0, abs=1e-6)
    assert scaled.fidelity.worst_cosine < 0.9999
    assert scaled.pass_stats == {"scaled": 1} and scaled.warnings == ["lossy on purpose"]
    assert original.fidelity.reference_accuracy is not None
    assert not result.passed and "min_cosine" in result.fidelity.failures[0]
    assert original.model_stats.op_histogram["Identity"] == 1
    assert "Identity" not in cleaned.model_stats.op_histogram


def test_pipeline_without_validation_data_records_no_fidelity(tmp_path):
    model = load_model(tiny_model(tmp_path / "m.onnx"))
    result = run_pipeline(model, recipe("cleanup"), Context(workdir=tmp_path))
    assert result.passed and result.fidelity is None
    assert [s.name for s in result.steps] == ["original", "cleanup"]

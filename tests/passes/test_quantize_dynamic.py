"""Quantizing a model with dynamic batch and sequence axes from ragged calibration samples
(an ONNX Runtime-style CalibrationDataReader yielding several sequence lengths), then running
it at lengths calibration never saw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphopt.calibration import dataset_from_reader
from graphopt.context import Context
from graphopt.model import Model
from graphopt.passes.quantize import QuantizeOptions, QuantizePass
from tests import models
from tests.passes.test_quantize import cosine, run_ort

DIM = 32


class RaggedReader:
    """Samples of sequence lengths 5, 8 and 11, in batches of 1 to 3, then None."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.feeds = [
            {"x": rng.standard_normal((1 + i % 3, (5, 8, 11)[i % 3], DIM)).astype(np.float32)}
            for i in range(24)
        ]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position == len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


@pytest.mark.parametrize("target", ["tensorrt", "ort-cpu"])
def test_ragged_calibration_and_unseen_lengths(tmp_path: Path, target: str) -> None:
    proto = models.transformer_block(seq="S", dim=DIM, hidden=64, heads=4)
    model = Model(ir=ir.from_proto(proto))
    dataset = dataset_from_reader(RaggedReader(), model.input_specs(), workdir=tmp_path)
    ctx = Context(workdir=tmp_path, calib_data=dataset, device="cpu", batch_size=8)
    result = QuantizePass(QuantizeOptions(target=target, min_channels=1)).run(model, ctx)
    onnx.checker.check_model(model.to_proto(), full_check=True)
    assert result.stats["quantized_nodes"] >= 6  # q, k, v, out, fc1, fc2
    assert [d for d in model.graph.inputs[0].shape] == [
        ir.SymbolicDim("N"),
        ir.SymbolicDim("S"),
        DIM,
    ]
    rng = np.random.default_rng(5)
    for batch, length in ((1, 3), (4, 13)):
        feeds = {"x": rng.standard_normal((batch, length, DIM)).astype(np.float32)}
        (want,) = run_ort(proto, feeds)
        (got,) = run_ort(model, feeds)
        assert got.shape == (batch, length, DIM)
        assert cosine(want, got) > 0.99

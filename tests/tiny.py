"""A tiny Gemm model and matching data, for CLI and pipeline tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_model(path: Path, *, batch: int | str = "N") -> Path:
    """x[N,4] -> Gemm -> Relu -> Identity -> y[N,3], with an unused initializer to clean up."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    unused = numpy_helper.from_array(np.ones(5, np.float32), "unused")
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1, name="fc"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Identity", ["r"], ["y"], name="id"),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [w, b, unused],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def data_file(path: Path, *, name: str = "x", shape=(20, 4), labels: bool = True) -> Path:
    rng = np.random.default_rng(1)
    arrays = {name: rng.standard_normal(shape).astype(np.float32)}
    if labels:
        arrays["labels"] = rng.integers(0, 3, shape[0])
    np.savez(path, **arrays)
    return path

"""Test models for calibration, built in code, and small in-memory datasets.

- `conv_net`: a residual CNN (opset 17: ReduceMin/ReduceMax take `axes` as an attribute),
  with an integer output (ArgMax) and tensors without value_info.
- `matmul_net`: a two-layer MLP of MatMuls (opset 18: `axes` is an input).
- `ArrayDataset`: a `Dataset` over in-memory arrays; `GeneratedDataset` makes each sample
  from its index, so any number of samples costs no memory up front.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graphopt.data import Batch, Dataset
from graphopt.model import Model

IR_VERSION = 10
CONV_TENSORS = ["x", "c1", "r1", "c2", "sum", "r2", "pool", "logits"]
MATMUL_TENSORS = ["x", "h", "hb", "t", "o"]


def _model(graph: onnx.GraphProto, opset: int) -> Model:
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    return Model(ir=ir.from_proto(proto))


def conv_net(seed: int = 0, *, batch: int | str = "N") -> Model:
    """x[N,3,8,8] -> Conv -> Relu -> Conv -> Add(residual) -> Relu -> GAP -> Flatten ->
    Gemm -> logits[N,5], and ArgMax -> pred[N] (int64)."""
    rng = np.random.default_rng(seed)

    def weight(name: str, shape: tuple[int, ...], scale: float = 0.4) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name
        )

    inits = [
        weight("w1", (8, 3, 3, 3)),
        weight("b1", (8,), 0.1),
        weight("w2", (8, 8, 3, 3), 0.2),
        weight("b2", (8,), 0.1),
        weight("wf", (5, 8)),
        weight("bf", (5,), 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "r1"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pool"], name="gap"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1, name="fc"),
        helper.make_node("ArgMax", ["logits"], ["pred"], axis=1, keepdims=0, name="argmax"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 5]),
            helper.make_tensor_value_info("pred", TensorProto.INT64, [batch]),
        ],
        inits,
    )
    return _model(graph, 17)


def matmul_net(seed: int = 0) -> Model:
    """x[N,16] -> MatMul -> Add -> Tanh -> MatMul -> o[N,10], at opset 18."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, 32)) * 0.5).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(32) * 0.2).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((32, 10)) * 0.5).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias"),
        helper.make_node("Tanh", ["hb"], ["t"], name="tanh"),
        helper.make_node("MatMul", ["t", "w2"], ["o"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "matmul_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return _model(graph, 18)


class ArrayDataset(Dataset):
    """Batches sliced from in-memory arrays {input name: array with samples on axis 0}."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays
        self.description = "arrays"

    def __len__(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(self), batch_size):
            yield Batch({k: v[start : start + batch_size] for k, v in self.arrays.items()})


class GeneratedDataset(Dataset):
    """`count` samples of `shape` for input `name`, each made from its index on demand."""

    def __init__(self, count: int, shape: tuple[int, ...], name: str = "x") -> None:
        self.count, self.shape, self.name = count, shape, name
        self.description = f"{count} generated samples"

    def __len__(self) -> int:
        return self.count

    def sample(self, index: int) -> np.ndarray:
        rng = np.random.default_rng(index)
        return rng.standard_normal(self.shape).astype(np.float32)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, self.count, batch_size):
            stop = min(start + batch_size, self.count)
            yield Batch({self.name: np.stack([self.sample(i) for i in range(start, stop)])})


def conv_data(count: int = 48, seed: int = 1) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    return ArrayDataset({"x": rng.standard_normal((count, 3, 8, 8)).astype(np.float32)})


def matmul_data(count: int = 64, seed: int = 2) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    # Heavy tails, so that the methods disagree.
    x = rng.standard_t(3, (count, 16)).astype(np.float32)
    return ArrayDataset({"x": x})

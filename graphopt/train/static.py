"""Fixed input shapes for training: shape subgraphs become constants.

Exporters compute Reshape targets from `Shape` of a tensor (PaddlePaddle's paddle2onnx writes
Shape -> Slice -> Concat with Constant nodes). ONNX shape inference often loses the shape
there, even with data propagation, and the gradient rules need every shape. With the inputs'
shapes fixed (the batch included), such a subgraph computes the same values whatever the
data, so `freeze_shape_subgraphs` runs it once on ONNX Runtime and puts its results in as
initializers. Only the training copy changes: trained weights keep their names, so they are
written back into the unchanged model by name.

A tensor is *shape-derived* when it comes out of Shape or Size, or out of a node whose
inputs are all constants or shape-derived (and one at least is shape-derived). The
shape-derived tensors that other nodes (or the graph outputs) read are replaced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_passes

from graphopt.model import Model
from graphopt.runtime import Device, create_session

_SHAPE_OPS = ("Shape", "Size")


def freeze_shape_subgraphs(
    model: Model,
    input_shapes: Mapping[str, Sequence[int]],
    *,
    device: Device = "cpu",
    threads: int | None = None,
) -> tuple[Model, int]:
    """A copy of `model` with these fixed input shapes and its shape subgraphs folded.

    Returns:
        (the copy, how many tensors became constants).
    """
    frozen = model.copy()
    graph = frozen.graph
    for value in graph.inputs:
        if value.name in input_shapes:
            value.shape = ir.Shape([int(d) for d in input_shapes[value.name]])
    derived: set[ir.Value] = set()
    readers_outside: set[ir.Value] = set()
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.graph is not graph:
            continue
        inputs = [v for v in node.inputs if v is not None]
        if node.op_type in _SHAPE_OPS:
            derived.update(node.outputs)
        elif (
            inputs
            and all(v in derived or _is_constant(v) for v in inputs)
            and any(v in derived for v in inputs)
        ):
            derived.update(node.outputs)
            continue
        for v in inputs:
            if v in derived and node.op_type not in _SHAPE_OPS:
                readers_outside.add(v)
    for value in graph.outputs:
        if value in derived:
            readers_outside.add(value)
    # Shape outputs read by other shape-derived nodes only are folded with them.
    frontier = sorted((v for v in readers_outside if v.name), key=lambda v: v.name or "")
    if not frontier:
        return frozen, 0
    session = create_session(
        frozen, device=device, threads=threads, extra_outputs=[v.name for v in frontier],
        only_extra=True,
    )  # fmt: skip
    feeds = {
        v.name: np.zeros([int(d) for d in input_shapes[v.name]], dtype=_dtype(v))
        for v in graph.inputs
        if v.name in input_shapes and v.name not in graph.initializers
    }
    values = session.run(feeds, [v.name for v in frontier])
    for value in frontier:
        array = values[value.name]
        name = value.name
        assert name is not None
        value.name = f"{name}.shape_source"
        constant = ir.Value(
            name=name,
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            shape=ir.Shape(array.shape),
            const_value=ir.tensor(array, name=name),
        )
        ir.convenience.replace_all_uses_with(value, constant, replace_graph_outputs=True)
        graph.register_initializer(constant)
    ir_passes.RemoveUnusedNodesPass()(frozen.ir)
    return frozen, len(frontier)


def _is_constant(value: ir.Value) -> bool:
    if value.const_value is not None or value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and not producer.inputs


def _dtype(value: ir.Value) -> np.dtype:
    dtype = value.dtype
    return np.dtype(dtype.numpy()) if dtype is not None else np.dtype(np.float32)

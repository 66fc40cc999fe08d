"""Constant folding: Constant nodes become initializers, then onnxscript's folder evaluates
what it can, bounded in size so it never loads a huge external tensor or grows the model, and
its results are tidied: no provenance notes, contiguous buffers, Constant nodes an old opset
can read."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
from onnxscript.optimizer import FOLDED_FROM_KEY

from graphopt.passes.cleanup.common import constant, is_onnx_op

# Sampling ops: folding one would freeze a single draw. onnxscript skips most of them itself.
_RANDOM_OPS = frozenset(
    {
        "Bernoulli",
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
    }
)


def fold_constants(m: ir.Model, size_limit: int) -> bool:
    """Fold every node whose inputs are constants no larger than `size_limit` elements."""
    lifted = ir_passes.LiftConstantsToInitializersPass()(m).modified
    # Imported here: the folder rests on onnxscript's private API, and if that is gone only
    # this rule should fail (with a GraphoptError saying so), not the whole pass registry.
    from graphopt.passes.cleanup.bounded_folder import BoundedFolder

    def should_fold(node: ir.Node) -> bool | None:
        if node.op_type in _RANDOM_OPS:
            return False
        for value in node.inputs:
            tensor = None if value is None else value.const_value
            if tensor is not None and tensor.size > size_limit:
                # onnxscript would still fold a Transpose of a huge weight; reading it into
                # memory is what this bound is for.
                return False
        return None

    folder = BoundedFolder(
        shape_inference=False,
        input_size_limit=size_limit,
        output_size_limit=size_limit,
        should_fold=should_fold,
    )
    with np.errstate(all="ignore"):  # folding NaN or inf is fine; numpy's warnings are noise
        modified = folder(m).modified
    if modified:
        _forget_provenance(m)
        _contiguous_initializers(m)
        if m.opset_imports.get("", 1) < 12:
            _constants_as_tensors(m)
    return lifted or modified


def _forget_provenance(m: ir.Model) -> None:
    """Drop the "folded from" notes onnxscript writes into every folded value's metadata: a
    cleanup should not leave new text in the model file."""
    for graph in m.graphs():
        values = [*graph.initializers.values(), *(out for node in graph for out in node.outputs)]
        for value in values:
            value.metadata_props.pop(FOLDED_FROM_KEY, None)


def _contiguous_initializers(m: ir.Model) -> None:
    """Folded results can be numpy views (a Transpose); onnx-ir's hashing deduplication needs
    C-contiguous buffers."""
    for graph in m.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.Tensor) and isinstance(tensor.raw, np.ndarray):
                if not tensor.raw.flags.c_contiguous:
                    value.const_value = ir.Tensor(
                        np.ascontiguousarray(tensor.raw), dtype=tensor.dtype, name=tensor.name
                    )


def _constants_as_tensors(m: ir.Model) -> None:
    """Rewrite Constant(value_ints=...) and friends, which the folder emits for shapes, as
    Constant(value=tensor): before opset 12 `value` is the only attribute Constant has."""
    for node in ir.traversal.RecursiveGraphIterator(m.graph):
        if not is_onnx_op(node, "Constant"):
            continue
        if set(node.attributes) <= {"value", "sparse_value"}:
            continue
        tensor = constant(node.outputs[0])
        if tensor is not None:
            node.attributes.clear()
            node.attributes["value"] = ir.AttrTensor("value", tensor)

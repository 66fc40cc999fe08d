"""Model statistics: parameters, MACs/FLOPs, bytes, sparsity, op histogram.

Everything here reads the model without changing it and without pulling external weights
into memory, except `sparsity`, which must look at values and does so one tensor at a time
(through a private memory map that is closed again right after).

MACs are counted for the ops that dominate compute (Conv, ConvTranspose, Gemm, MatMul, their
integer/QLinear forms, and two-operand Einsum), from shapes that ONNX shape inference finds on
a clone of the graph. A symbolic leading (batch) dimension of a graph input is taken as 1 and
recorded in `ModelStats.assumed_dims`; any other unknown dimension leaves the node's MACs
uncounted and its name in `flops_unknown`, so `flops` is then a lower bound. One FLOP is
counted per multiply and per add: FLOPs = 2 x MACs. Bias additions, activations and
normalisations are not counted.
"""

from __future__ import annotations

import math
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass
from rich.console import RenderableType
from rich.table import Table

from graphopt.model import Model, TensorSpec

# Ops whose weights count towards `sparsity` (input indices that hold weights).
_WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gemm": (0, 1),
    "MatMul": (0, 1),
}

# Ops that do heavy compute we do not model yet: listed in flops_unknown, never silently 0.
_UNMODELLED = frozenset(
    {"Attention", "MultiHeadAttention", "GroupQueryAttention", "LSTM", "GRU", "RNN"}
)

# Elements per chunk when counting zeros, to bound the temporary boolean array.
_CHUNK = 1 << 24


@dataclass
class ModelStats:
    """What `graphopt inspect` shows and each pipeline report row is built from.

    Attributes:
        params: elements of all initializers and Constant tensors, in all graphs.
        macs: multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul-like nodes whose
            shapes are known (see `flops_unknown`), at the dims in `assumed_dims`.
        flops: 2 x macs.
        flops_unknown: names of compute-heavy nodes whose MACs could not be counted, so
            `macs`/`flops` are lower bounds when this is not empty.
        weight_bytes: bytes of all initializers and Constant tensors.
        file_bytes: size on disk, when the caller knows it.
        op_histogram: node count per op type ("domain.Op" outside the default domain),
            most common first.
        sparsity: fraction of exact zeros among the floating-point weights of Conv,
            ConvTranspose, Gemm and MatMul.
        zero_params: the number of those zeros.
        assumed_dims: symbolic dimensions given a value to count MACs, e.g. {"N": 1}.
    """

    params: int
    macs: int
    flops: int
    flops_unknown: list[str]
    weight_bytes: int
    file_bytes: int | None
    op_histogram: dict[str, int]
    sparsity: float
    zero_params: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    ir_version: int
    nodes: int
    assumed_dims: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: plain ints, floats, strings, lists and dicts only."""
        return {
            "params": int(self.params),
            "macs": int(self.macs),
            "flops": int(self.flops),
            "flops_unknown": list(self.flops_unknown),
            "weight_bytes": int(self.weight_bytes),
            "file_bytes": None if self.file_bytes is None else int(self.file_bytes),
            "op_histogram": {k: int(v) for k, v in self.op_histogram.items()},
            "sparsity": float(self.sparsity),
            "zero_params": int(self.zero_params),
            "inputs": [_spec_dict(s) for s in self.inputs],
            "outputs": [_spec_dict(s) for s in self.outputs],
            "opset": int(self.opset),
            "ir_version": int(self.ir_version),
            "nodes": int(self.nodes),
            "assumed_dims": {k: int(v) for k, v in self.assumed_dims.items()},
        }

    def tables(self) -> list[RenderableType]:
        """Summary, inputs/outputs and op histogram, as rich tables."""
        summary = Table(title="Model", show_header=False, title_justify="left")
        summary.add_column("", style="bold")
        summary.add_column("", justify="right")
        summary.add_row("parameters", f"{_si(self.params)} ({self.params:,})")
        flops_text = f"{_si(self.flops)}"
        if self.flops_unknown:
            flops_text = f"≥ {flops_text}"
        summary.add_row("MACs", f"{'≥ ' if self.flops_unknown else ''}{_si(self.macs)}")
        summary.add_row("FLOPs", flops_text)
        if self.assumed_dims:
            dims = ", ".join(f"{k}={v}" for k, v in self.assumed_dims.items())
            summary.add_row("counted at", dims)
        if self.flops_unknown:
            shown = ", ".join(self.flops_unknown[:5])
            more = len(self.flops_unknown) - 5
            summary.add_row("not counted", shown + (f" (+{more} more)" if more > 0 else ""))
        summary.add_row("weights", _bytes(self.weight_bytes))
        if self.file_bytes is not None:
            summary.add_row("file size", _bytes(self.file_bytes))
        summary.add_row("sparsity", f"{self.sparsity:.2%} ({self.zero_params:,} zeros)")
        summary.add_row("nodes", f"{self.nodes:,}")
        summary.add_row("opset / IR", f"{self.opset} / {self.ir_version}")

        io = Table(title="Inputs and outputs", title_justify="left")
        io.add_column("kind")
        io.add_column("name")
        io.add_column("dtype")
        io.add_column("shape")
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            for spec in specs:
                dtype = "?" if spec.dtype is None else str(spec.dtype)
                io.add_row(kind, spec.name, dtype, spec.shape_text())

        ops = Table(title="Operators", title_justify="left")
        ops.add_column("op")
        ops.add_column("count", justify="right")
        for op, count in self.op_histogram.items():
            ops.add_row(op, str(count))
        return [summary, io, ops]


def analyze(
    model: Model, *, file_bytes: int | None = None, dims: Mapping[str, int] | None = None
) -> ModelStats:
    """Count parameters, MACs, bytes and zeros of a model; the model is not changed.

    Args:
        model: the model to measure.
        file_bytes: its size on disk (model file plus external data), if known.
        dims: values for named symbolic dimensions (e.g. {"seq": 128}); a symbolic leading
            dimension of a graph input that is not named here is taken as 1.
    """
    params = 0
    weight_bytes = 0
    histogram: Counter[str] = Counter()
    nodes = 0
    for graph in model.ir.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is not None:
                params += tensor.size
                weight_bytes += tensor.nbytes
        for node in graph:
            nodes += 1
            histogram[_op_key(node)] += 1
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                count, nbytes = _constant_size(node)
                params += count
                weight_bytes += nbytes

    zero_params, float_weights = _count_zeros(model.ir)
    macs, unknown, assumed = _count_macs(model.ir, dict(dims or {}))
    opset = model.ir.opset_imports.get("", model.ir.opset_imports.get("ai.onnx", 0))
    return ModelStats(
        params=params,
        macs=macs,
        flops=2 * macs,
        flops_unknown=unknown,
        weight_bytes=weight_bytes,
        file_bytes=file_bytes,
        op_histogram=dict(histogram.most_common()),
        sparsity=zero_params / float_weights if float_weights else 0.0,
        zero_params=zero_params,
        inputs=model.input_specs(),
        outputs=model.output_specs(),
        opset=int(opset),
        ir_version=int(model.ir.ir_version),
        nodes=nodes,
        assumed_dims=assumed,
    )


# ---------------------------------------------------------------------------- params, bytes


def _op_key(node: ir.Node) -> str:
    if node.domain in ("", "ai.onnx"):
        return node.op_type
    return f"{node.domain}.{node.op_type}"


def _constant_size(node: ir.Node) -> tuple[int, int]:
    """(elements, bytes) of a Constant node's value, without loading anything."""
    for name, attr in node.attributes.items():
        value = attr.value
        if name == "value" and value is not None:
            return value.size, value.nbytes
        if name in ("value_float", "value_int"):
            return 1, 4 if name == "value_float" else 8
        if name in ("value_floats", "value_ints"):
            return len(value), len(value) * (4 if name == "value_floats" else 8)
        if name == "value_strings":
            return len(value), sum(len(s) for s in value)
        if name == "value_string":
            return 1, len(value)
    return 0, 0


# ---------------------------------------------------------------------------- sparsity


def _weight_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Each floating-point weight of Conv/ConvTranspose/Gemm/MatMul, once."""
    seen: set[int] = set()
    for graph in model.graphs():
        for node in graph:
            indices = _WEIGHT_INPUTS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if not indices:
                continue
            for index in indices:
                if index >= len(node.inputs) or node.inputs[index] is None:
                    continue
                tensor = _constant_tensor(node.inputs[index])
                if tensor is None or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                if tensor.dtype.is_floating_point():
                    yield tensor


def _constant_tensor(value: ir.Value) -> ir.TensorProtocol | None:
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].value
    return None


def _count_zeros(model: ir.Model) -> tuple[int, int]:
    """(exact zeros, elements) over the floating-point weights, one tensor at a time."""
    zeros = 0
    total = 0
    for tensor in _weight_tensors(model):
        total += tensor.size
        zeros += _zeros_in(tensor)
    return zeros, total


# Zero counts of external tensors, which are immutable: the pipeline analyses the model after
# every pass, and re-reading gigabytes of untouched weights each time would dominate.
_EXTERNAL_ZEROS: weakref.WeakKeyDictionary[ir.ExternalTensor, int] = weakref.WeakKeyDictionary()


def _zeros_in(tensor: ir.TensorProtocol) -> int:
    if isinstance(tensor, ir.ExternalTensor):
        cached = _EXTERNAL_ZEROS.get(tensor)
        if cached is None:
            cached = _EXTERNAL_ZEROS[tensor] = _external_zeros(tensor)
        return cached
    return _count_zero_elements(tensor.numpy())


def _external_zeros(tensor: ir.ExternalTensor) -> int:
    # A private mapping we can close afterwards, leaving the model's own tensor (which a
    # pass may be holding arrays of) untouched.
    private = ir.ExternalTensor(
        tensor.location,
        offset=tensor.offset,
        length=tensor.length,
        dtype=tensor.dtype,
        shape=tensor.shape,
        name=tensor.name,
        base_dir=tensor.base_dir,
    )
    try:
        return _count_zero_elements(private.numpy())
    finally:
        private.release()


def _count_zero_elements(array: np.ndarray) -> int:
    flat = array.reshape(-1)
    count = 0
    for start in range(0, flat.size, _CHUNK):
        count += int(np.count_nonzero(flat[start : start + _CHUNK] == 0))
    return count


# ---------------------------------------------------------------------------- MACs


def _count_macs(model: ir.Model, dims: dict[str, int]) -> tuple[int, list[str], dict[str, int]]:
    """MACs of the compute-heavy nodes, the names of those not counted, and assumed dims."""
    clone = model.clone()
    assumed = _fix_symbolic_dims(clone.graph, dims)
    ShapeInferencePass(strict_mode=False)(clone)
    macs = 0
    unknown: list[str] = []
    for graph in clone.graphs():
        for index, node in enumerate(graph):
            if node.op_type in _UNMODELLED:  # in any domain (com.microsoft has several)
                unknown.append(_node_name(node, index))
                continue
            counter = _MAC_RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if counter is None:
                continue
            count = counter(node)
            if count is None:
                unknown.append(_node_name(node, index))
            else:
                macs += count
    return macs, unknown, assumed


def _node_name(node: ir.Node, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def _fix_symbolic_dims(graph: ir.Graph, dims: dict[str, int]) -> dict[str, int]:
    """Give symbolic input dims a value: those named in `dims`, and a leading (batch) dim 1."""
    assumed: dict[str, int] = {}
    # A name used for the leading dim of any input is the batch wherever it appears.
    batch_names: set[str] = set()
    for value in graph.inputs:
        if value.shape is not None and value.shape.rank() > 0:
            first = value.shape[0]
            if isinstance(first, ir.SymbolicDim) and first.value is not None:
                batch_names.add(first.value)
    for value in graph.inputs:
        if value.name in graph.initializers or value.shape is None:
            continue
        new_dims: list[int | ir.SymbolicDim] = []
        changed = False
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int):
                new_dims.append(dim)
                continue
            name = dim.value
            if name is not None and name in dims:
                new_dims.append(int(dims[name]))
                assumed[name] = int(dims[name])
                changed = True
            elif axis == 0 or (name is not None and name in batch_names):
                key = name if name is not None else f"{value.name}[0]"
                new_dims.append(1)
                assumed[key] = 1
                changed = True
            else:
                new_dims.append(dim)
        if changed:
            value.shape = ir.Shape(new_dims)
    return assumed


def _static(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None:
        return None
    dims = tuple(value.shape)
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        return None
    return dims  # type: ignore[return-value]


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _conv_macs(x_index: int, w_index: int):
    def count(node: ir.Node) -> int | None:
        # Each output element is a dot product over (C_in / group) x kernel: W.shape[1:].
        w = _static(_input(node, w_index))
        if w is None or len(w) < 3:
            return None
        y = _conv_output_shape(node, _static(_input(node, x_index)), w)
        if y is None:
            y = _static(node.outputs[0])
        if y is None:
            return None
        return math.prod(y) * math.prod(w[1:])

    return count


def _conv_output_shape(
    node: ir.Node, x: tuple[int, ...] | None, w: tuple[int, ...]
) -> tuple[int, ...] | None:
    """Y's shape from X, W and the attributes (not trusting a declared output shape)."""
    if x is None or len(x) != len(w):
        return None
    spatial = len(x) - 2
    attrs = node.attributes
    strides = list(attrs.get_ints("strides", [1] * spatial))
    dilations = list(attrs.get_ints("dilations", [1] * spatial))
    pads = list(attrs.get_ints("pads", [0] * (2 * spatial)))
    auto_pad = attrs.get_string("auto_pad", "NOTSET")
    if len(strides) != spatial or len(dilations) != spatial or len(pads) != 2 * spatial:
        return None
    out = [x[0], w[0]]
    for i in range(spatial):
        size, stride = x[2 + i], strides[i]
        extent = dilations[i] * (w[2 + i] - 1) + 1
        if stride <= 0:
            return None
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-size // stride))
        elif auto_pad == "VALID":
            out.append(max(0, (size - extent) // stride + 1))
        else:
            out.append(max(0, (size + pads[i] + pads[i + spatial] - extent) // stride + 1))
    return tuple(out)


def _conv_transpose_macs(node: ir.Node) -> int | None:
    # Each input element is scattered into (C_out / group) x kernel outputs: W.shape[1:].
    x = _static(_input(node, 0))
    w = _static(_input(node, 1))
    if x is None or w is None or len(w) < 2:
        return None
    return math.prod(x) * math.prod(w[1:])


def _gemm_macs(node: ir.Node) -> int | None:
    a = _static(_input(node, 0))
    b = _static(_input(node, 1))
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    trans_a = node.attributes.get_int("transA", 0)
    trans_b = node.attributes.get_int("transB", 0)
    m, k = (a[1], a[0]) if trans_a else a
    n = b[0] if trans_b else b[1]
    return m * k * n


def _matmul_macs(a_index: int, b_index: int):
    def count(node: ir.Node) -> int | None:
        a = _static(_input(node, a_index))
        b = _static(_input(node, b_index))
        if a is None or b is None or not a or not b:
            return None
        # numpy.matmul semantics: a 1-D operand is a row (a) or column (b) vector.
        a2 = (1, *a) if len(a) == 1 else a
        b2 = (*b, 1) if len(b) == 1 else b
        m, k = a2[-2], a2[-1]
        n = b2[-1]
        batch = _broadcast(a2[:-2], b2[:-2])
        if batch is None:
            return None
        return math.prod(batch) * m * k * n

    return count


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    rank = max(len(a), len(b))
    a = (1,) * (rank - len(a)) + a
    b = (1,) * (rank - len(b)) + b
    out = []
    for x, y in zip(a, b, strict=True):
        if x != y and 1 not in (x, y):
            return None
        out.append(max(x, y) if 0 not in (x, y) else 0)
    return tuple(out)


def _einsum_macs(node: ir.Node) -> int | None:
    # Two operands: the naive contraction visits every combination of all indices once.
    equation = node.attributes.get_string("equation", "")
    operands = [_static(v) for v in node.inputs]
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    if len(operands) == 1:
        return 0
    if len(operands) != 2 or len(lhs) != 2 or "." in equation:
        return None
    sizes: dict[str, int] = {}
    for term, shape in zip(lhs, operands, strict=True):
        if shape is None or len(term) != len(shape):
            return None
        for letter, size in zip(term, shape, strict=True):
            sizes[letter] = max(sizes.get(letter, 1), size)
    return math.prod(sizes.values())


_MAC_RULES = {
    "Conv": _conv_macs(0, 1),
    "ConvInteger": _conv_macs(0, 1),
    "QLinearConv": _conv_macs(0, 3),
    "ConvTranspose": _conv_transpose_macs,
    "Gemm": _gemm_macs,
    "MatMul": _matmul_macs(0, 1),
    "MatMulInteger": _matmul_macs(0, 1),
    "QLinearMatMul": _matmul_macs(0, 3),
    "Einsum": _einsum_macs,
}


# ---------------------------------------------------------------------------- formatting


def _spec_dict(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "dtype": None if spec.dtype is None else str(spec.dtype),
        "shape": None if spec.shape is None else list(spec.shape),
    }


def _si(number: float) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(number) >= factor:
            return f"{number / factor:.2f} {suffix}"
    return f"{number:g}"


def _bytes(number: int) -> str:
    value = float(number)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"

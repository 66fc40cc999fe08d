"""Affine folding: a per-channel `x * c + d` next to a Conv goes into the Conv's weights.

Exporters leave such affines wherever a framework layer scales and shifts outside the conv:
PP-LCNetV3's learnable affine blocks (two per unit in PP-OCRv4), a BatchNormalization already
split into Mul and Add, a constant rescaling of the input. Each is a full pass over the tensor
that the Conv can do for free.

- **After a Conv** (`Conv -> Mul(c) [-> Add(d)]`, or `Conv -> Add(d)`): `W' = W * c` per output
  channel, `b' = b * c + d` (a bias is added when the Conv has none).
- **Before a Conv** (`Mul(c) [-> Add(d)] -> Conv`): `W' = W * c` per input channel. The shift
  goes into the bias, `b' = b + sum(W * d)`, when the Conv pads nothing; with padding the
  padded zeros would be wrong there, so `x * c + d` becomes `(x + d/c) * c` and only the Add of
  `d/c` stays (exact in real numbers, and the padding still sees zero), when no c is 0.

c and d are constants that broadcast per channel (one number, or one per channel on axis 1).
Every intermediate value must have the one reader in the pattern and be no graph output, and
x must be known to have at least the constant's rank, so the output keeps its shape. Lossless
up to float rounding; a fold that would overflow the weight's type is declined.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.passes.cleanup.common import (
    FLOAT_TYPES,
    all_value_names,
    constant,
    is_onnx_op,
    min_rank,
    new_initializer,
    onnx_nodes,
    plain_attr,
    remove_node,
)


@dataclass
class _Affine:
    """`x * scale + shift` spelled by the nodes `mul` and/or `add` (per channel)."""

    x: ir.Value
    scale: np.ndarray  # [C], float64
    shift: np.ndarray  # [C], float64
    mul: ir.Node | None
    add: ir.Node | None

    @property
    def output(self) -> ir.Value:
        last = self.add if self.add is not None else self.mul
        assert last is not None
        return last.outputs[0]


def fold_all(m: ir.Model) -> int:
    """Fold every affine next to a Conv that passes the checks; the number folded."""
    names = all_value_names(m)
    count = 0
    for conv, _ in onnx_nodes(m, "Conv", functions=False):
        if conv.graph is None or _conv_parts(conv) is None:
            continue
        count += _fold_after(conv, names)
        count += _fold_before(conv, names)
    return count


# ---------------------------------------------------------------------------- patterns


def _conv_parts(conv: ir.Node) -> tuple[np.ndarray, np.ndarray | None, int] | None:
    """(weight, bias or None, group) of a Conv with constant float weights, else None."""
    if len(conv.inputs) < 2:
        return None
    weight = constant(conv.inputs[1])
    if weight is None or weight.dtype not in FLOAT_TYPES or len(weight.shape) < 3:
        return None
    bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias = constant(bias_value)
    if bias_value is not None and (bias is None or bias.dtype != weight.dtype):
        return None
    group = plain_attr(conv, "group", 1)
    if group is None or group < 1:
        return None
    w = weight.numpy()
    b = None if bias is None else bias.numpy()
    if b is not None and b.shape != (w.shape[0],):
        return None
    return w, b, group


def _per_channel(value: ir.Value | None, rank: int, channels: int) -> np.ndarray | None:
    """The constant as a [channels] float64 vector, if it broadcasts per channel (axis 1) onto
    a rank-`rank` tensor without changing its shape; else None."""
    tensor = constant(value)
    if tensor is None or tensor.dtype not in FLOAT_TYPES:
        return None
    array = np.asarray(tensor.numpy(), np.float64)
    if array.ndim > rank or not np.isfinite(array).all():
        return None
    shape = (1,) * (rank - array.ndim) + array.shape
    if any(size != 1 for axis, size in enumerate(shape) if axis != 1):
        return None
    if shape[1] not in (1, channels):
        return None
    return np.broadcast_to(array.reshape(-1), (channels,)).astype(np.float64)


def _single_reader(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0][0]


def _operands(node: ir.Node) -> list[tuple[ir.Value, ir.Value]]:
    """(run-time operand, the other operand) pairs of a binary Mul/Add."""
    if len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None:
        return []
    a, b = node.inputs[0], node.inputs[1]
    return [(a, b), (b, a)]


def _affine_from(
    x: ir.Value, first: ir.Node, rank: int, channels: int, dtype: ir.DataType
) -> _Affine | None:
    """The affine that starts at `first` (a Mul or Add reading `x`), extended by an Add."""
    ones, zeros = np.ones(channels), np.zeros(channels)
    mul = None
    scale, shift = ones, zeros
    node = first
    if is_onnx_op(node, "Mul"):
        const = next((c for v, c in _operands(node) if v is x), None)
        scale = _per_channel(const, rank, channels)
        if scale is None or constant(const).dtype != dtype:  # type: ignore[union-attr]
            return None
        mul = node
        following = _single_reader(node.outputs[0])
        if following is None or not is_onnx_op(following, "Add"):
            return _Affine(x, scale, shift, mul, None)
        node, x_side = following, node.outputs[0]
    else:
        x_side = x
    if not is_onnx_op(node, "Add"):
        return None if mul is None else _Affine(x, scale, shift, mul, None)
    const = next((c for v, c in _operands(node) if v is x_side), None)
    found = _per_channel(const, rank, channels)
    if found is None or constant(const).dtype != dtype:  # type: ignore[union-attr]
        return None if mul is None else _Affine(x, scale, shift, mul, None)
    return _Affine(x, scale, found, mul, node)


# ---------------------------------------------------------------------------- after a Conv


def _fold_after(conv: ir.Node, names: set[str]) -> int:
    parts = _conv_parts(conv)
    assert parts is not None
    w, b, _ = parts
    y = conv.outputs[0]
    reader = _single_reader(y)
    if reader is None or not is_onnx_op(reader, "Mul", "Add") or reader.graph is not conv.graph:
        return 0
    dtype = constant(conv.inputs[1]).dtype  # type: ignore[union-attr]
    affine = _affine_from(y, reader, w.ndim, w.shape[0], dtype)
    if affine is None:
        return 0
    w64 = np.asarray(w, np.float64) * affine.scale.reshape((-1,) + (1,) * (w.ndim - 1))
    b64 = (0.0 if b is None else np.asarray(b, np.float64)) * affine.scale + affine.shift
    if not _set_weights(conv, w64, b64, w.dtype, names):
        return 0
    _bypass(affine, y)
    return 1


# ---------------------------------------------------------------------------- before a Conv


def _fold_before(conv: ir.Node, names: set[str]) -> int:
    parts = _conv_parts(conv)
    assert parts is not None
    w, b, group = parts
    x_in = conv.inputs[0]
    start = None if x_in is None else x_in.producer()
    if start is None or start.graph is not conv.graph or x_in is None:
        return 0
    channels = w.shape[1] * group
    dtype = constant(conv.inputs[1]).dtype  # type: ignore[union-attr]
    # Walk back: Add (optional) <- Mul (optional); the affine must end in x_in.
    first = start
    if is_onnx_op(start, "Add"):
        before = next((v.producer() for v, c in _operands(start) if constant(c) is not None), None)
        if before is not None and is_onnx_op(before, "Mul") and before.graph is conv.graph:
            first = before
    elif not is_onnx_op(start, "Mul"):
        return 0
    for x, _ in _operands(first):
        if constant(x) is not None:
            continue
        affine = _affine_from(x, first, w.ndim, channels, dtype)
        if affine is None or affine.output is not x_in:
            continue
        if min_rank(x) < max(_const_rank(n) for n in (affine.mul, affine.add) if n is not None):
            continue  # the constants would raise x's rank: the Conv must not see x itself
        if affine.add is not None and affine.add is not start:
            continue
        if _single_reader(affine.output) is not conv:
            continue
        if affine.mul is not None and _single_reader(affine.mul.outputs[0]) is None:
            continue
        return _fold_into_input(conv, affine, w, b, group, names)
    return 0


def _const_rank(node: ir.Node) -> int:
    return max((len(t.shape) for v in node.inputs if (t := constant(v)) is not None), default=0)


def _fold_into_input(
    conv: ir.Node,
    affine: _Affine,
    w: np.ndarray,
    b: np.ndarray | None,
    group: int,
    names: set[str],
) -> int:
    out_channels, per_group = w.shape[0], w.shape[1]
    # Input channel read by weight [k, j]: (k // (K / group)) * (C / group) + j.
    k_group = np.arange(out_channels) // (out_channels // group)
    index = k_group[:, None] * per_group + np.arange(per_group)[None, :]  # [K, C/g]
    spatial = (1,) * (w.ndim - 2)
    scale = affine.scale[index].reshape(w.shape[:2] + spatial)
    shift = affine.shift[index].reshape(w.shape[:2] + spatial)
    w64 = np.asarray(w, np.float64)
    b64 = np.zeros(out_channels) if b is None else np.asarray(b, np.float64)
    has_shift = affine.add is not None and bool(np.any(affine.shift))
    keep_add = has_shift and _pads(conv)
    if keep_add and (affine.mul is None or np.any(affine.scale == 0.0)):
        return 0  # padded: the shift cannot move, and there is no scale to fold alone
    new_w = w64 * scale
    if has_shift and not keep_add:
        b64 = b64 + (w64 * shift).reshape(out_channels, -1).sum(axis=1)
    if keep_add:
        # x * c + d == (x + d / c) * c: the Add stays, with d / c, before the folded Conv.
        assert affine.add is not None and affine.mul is not None
        shifted = affine.shift / affine.scale
        if not _replace_constant(affine.add, affine.mul.outputs[0], shifted, w.ndim, names):
            return 0
        if not _set_weights(conv, new_w, b64, w.dtype, names, keep_bias=b is None):
            return 0
        # The Add now reads x directly; the Mul goes.
        affine.add.replace_input_with(_index_of(affine.add, affine.mul.outputs[0]), affine.x)
        graph = affine.mul.graph
        assert graph is not None
        graph.remove(affine.mul, safe=True)
        return 1
    if not _set_weights(conv, new_w, b64, w.dtype, names, keep_bias=b is None and not has_shift):
        return 0
    conv.replace_input_with(0, affine.x)
    graph = conv.graph
    assert graph is not None
    dead = [n for n in (affine.add, affine.mul) if n is not None]
    graph.remove(dead, safe=True)
    return 1


def _pads(conv: ir.Node) -> bool:
    """Whether the Conv may pad its input (explicit pads, or SAME auto_pad)."""
    auto_pad = conv.attributes.get("auto_pad")
    if auto_pad is not None and not auto_pad.is_ref():
        if auto_pad.as_string() in ("SAME_UPPER", "SAME_LOWER"):
            return True
    pads = conv.attributes.get("pads")
    if pads is None:
        return False
    return pads.is_ref() or any(p != 0 for p in pads.as_ints())


# ---------------------------------------------------------------------------- rewriting


def _set_weights(
    conv: ir.Node,
    w: np.ndarray,
    b: np.ndarray,
    dtype: np.dtype,
    names: set[str],
    *,
    keep_bias: bool = False,
) -> bool:
    """Give the Conv new weights (and bias, unless `keep_bias` with no bias to keep); False,
    changing nothing, when they overflow `dtype`."""
    with np.errstate(over="ignore", invalid="ignore"):
        new_w, new_b = w.astype(dtype), b.astype(dtype)
    if not (np.isfinite(new_w).all() and np.isfinite(new_b).all()):
        return False
    graph = conv.graph
    assert isinstance(graph, ir.Graph)
    base = conv.name or "Conv"
    conv.replace_input_with(1, new_initializer(graph, f"{base}_weight_affine", new_w, names))
    if keep_bias:
        return True
    if len(conv.inputs) < 3:
        conv.resize_inputs(3)
    conv.replace_input_with(2, new_initializer(graph, f"{base}_bias_affine", new_b, names))
    return True


def _replace_constant(
    node: ir.Node, runtime: ir.Value, values: np.ndarray, rank: int, names: set[str]
) -> bool:
    """Swap the constant operand of a binary `node` (on a rank-`rank` tensor) for `values`:
    in the old constant's shape when they are all equal, else shaped [1, C, 1, ...]."""
    index = 1 - _index_of(node, runtime)
    old = constant(node.inputs[index])
    assert old is not None
    dtype = old.numpy().dtype
    if np.all(values == values[0]):
        shaped = np.full(old.shape.numpy(), values[0])
    else:
        shaped = values.reshape((1, -1) + (1,) * (rank - 2))
    with np.errstate(over="ignore", invalid="ignore"):
        array = shaped.astype(dtype)
    if not np.isfinite(array).all():
        return False
    graph = node.graph
    assert isinstance(graph, ir.Graph)
    base = node.name or "Add"
    node.replace_input_with(index, new_initializer(graph, f"{base}_shift", array, names))
    return True


def _index_of(node: ir.Node, value: ir.Value) -> int:
    return next(i for i, v in enumerate(node.inputs) if v is value)


def _bypass(affine: _Affine, conv_output: ir.Value) -> None:
    """The Conv now computes the affine's output: remove the Mul/Add after it."""
    output = affine.output
    nodes = [n for n in (affine.add, affine.mul) if n is not None]
    last = nodes[0]
    # Readers of the affine's output read the Conv's output instead (a graph output keeps its
    # name); then the affine's nodes have no readers left.
    remove_node(last, output, conv_output, rename=output.is_graph_output())
    for node in nodes[1:]:
        graph = node.graph
        assert graph is not None
        graph.remove(node, safe=True)

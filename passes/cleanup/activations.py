"""Activation fusion: hard-sigmoid and hard-swish written out as elementwise ops become one
HardSigmoid node.

Exporters (Paddle's, older PyTorch ones, TensorFlow's) often spell these activations as
`Clip(x + 3, 0, 6) / 6` (hard-sigmoid) and `x * Clip(x + 3, 0, 6) / 6` (hard-swish): three or
four passes over the tensor where one would do. They become `HardSigmoid(x)` and
`x * HardSigmoid(x)` (ONNX Runtime rewrites its own HardSwish into the latter too), with
`alpha = 1/6, beta = 0.5` or whatever constants the pattern holds:

    Clip(x + b, 0, M) * f  ==  max(0, min(1, f*x + f*b))   when f*M == 1

which is HardSigmoid(alpha=f, beta=f*b), exact up to float rounding. The scale f can be a
Div by M or a Mul by 1/M, before or after the Mul by x.

A pattern is rewritten only when every intermediate value has one reader and is no graph
output, the constants are single numbers, and the result keeps its shape: a constant of rank
1 would broadcast a rank-0 x to rank 1, so x must be known to have at least the constant's
rank.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.cleanup.common import constant, is_onnx_op, min_rank, onnx_nodes

# f * M must be 1 within this relative tolerance (1/6 is not exact in float32).
_RTOL = 1e-6
# HardSigmoid's types before opset 22 (the pattern's constants have x's type).
_HARD_SIGMOID_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})


def fuse_hard_sigmoid(m: ir.Model) -> int:
    """Rewrite every matching hard-sigmoid / hard-swish pattern; returns how many."""
    count = 0
    # Function bodies are left alone (their nodes' graph is the function's).
    scale_nodes = [n for n, _ in onnx_nodes(m, "Div", functions=False)]
    scale_nodes += [n for n, _ in onnx_nodes(m, "Mul", functions=False)]
    for node in scale_nodes:
        if node.graph is None:  # removed by an earlier rewrite
            continue
        match = _match(node)
        if match is not None:
            _rewrite(node, *match)
            count += 1
    return count


def _match(
    scale_node: ir.Node,
) -> tuple[ir.Value, float, float, ir.Node | None, ir.Node, ir.Node] | None:
    """(x, alpha, beta, the Mul by x or None, the Clip, the Add) when `scale_node` ends a
    hard-sigmoid or hard-swish pattern."""
    scaled = _scale(scale_node)
    if scaled is None:
        return None
    value, factor = scaled
    inner = value.producer()
    times_x: ir.Node | None = None
    if inner is not None and is_onnx_op(inner, "Mul") and _single_use(value):
        times_x = inner
        candidates = [(times_x.inputs[i], times_x.inputs[1 - i]) for i in (0, 1)]
    else:
        candidates = [(value, None)]
    for clipped, x_side in candidates:
        clip = clipped.producer() if clipped is not None else None
        if clip is None or not is_onnx_op(clip, "Clip") or not _single_use(clipped):
            continue
        bounds = _clip_bounds(clip)
        if bounds is None or bounds[0] != 0.0 or not bounds[1] > 0.0:
            continue
        if abs(factor * bounds[1] - 1.0) > _RTOL:
            continue
        shifted = clip.inputs[0]
        add = shifted.producer() if shifted is not None else None
        if add is None or not is_onnx_op(add, "Add") or not _single_use(shifted):
            continue
        for k in (0, 1):
            x, offset = add.inputs[k], _scalar(add.inputs[1 - k])
            if x is None or offset is None or constant(x) is not None:
                continue
            if times_x is not None and x_side is not x:
                continue
            if min_rank(x) < max(offset[1], _scale_rank(scale_node)):
                continue
            return x, factor, factor * offset[0], times_x, clip, add
    return None


def _scale_rank(scale_node: ir.Node) -> int:
    """The rank of the scale constant of `scale_node` (a Div or Mul by a single number)."""
    for value in scale_node.inputs:
        tensor = constant(value)
        if tensor is not None:
            return len(tensor.shape)
    return 0


def _scale(node: ir.Node) -> tuple[ir.Value, float] | None:
    """(the scaled value, the factor f) for `v / M` (f = 1/M) or `v * f`."""
    if len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    if is_onnx_op(node, "Div"):
        divisor = _scalar(node.inputs[1])
        if divisor is None or divisor[0] == 0.0:
            return None
        return node.inputs[0], 1.0 / divisor[0]
    for k in (0, 1):
        factor = _scalar(node.inputs[1 - k])
        if factor is not None and constant(node.inputs[k]) is None:
            return node.inputs[k], factor[0]
    return None


def _clip_bounds(clip: ir.Node) -> tuple[float, float] | None:
    """(min, max) of a Clip with constant bounds (inputs from opset 11, attributes before)."""
    if "min" in clip.attributes or "max" in clip.attributes:
        low = clip.attributes.get("min")
        high = clip.attributes.get("max")
        if low is None or high is None or low.is_ref() or high.is_ref():
            return None
        return float(low.as_float()), float(high.as_float())
    if len(clip.inputs) != 3:
        return None
    low_value, high_value = _scalar(clip.inputs[1]), _scalar(clip.inputs[2])
    if low_value is None or high_value is None:
        return None
    return low_value[0], high_value[0]


def _scalar(value: ir.Value | None) -> tuple[float, int] | None:
    """(the number, its tensor's rank) for a constant holding one float, else None."""
    tensor = constant(value)
    if tensor is None or tensor.dtype not in _HARD_SIGMOID_TYPES:
        return None
    array = np.asarray(tensor.numpy())
    if array.size != 1:
        return None
    number = float(array.reshape(()))
    return (number, array.ndim) if np.isfinite(number) else None


def _single_use(value: ir.Value | None) -> bool:
    return value is not None and len(value.uses()) == 1 and not value.is_graph_output()


def _rewrite(
    scale_node: ir.Node,
    x: ir.Value,
    alpha: float,
    beta: float,
    times_x: ir.Node | None,
    clip: ir.Node,
    add: ir.Node,
) -> None:
    graph = scale_node.graph
    assert graph is not None
    output = scale_node.outputs[0]
    # x's type, known from the Add's constant when x itself is not annotated.
    dtype = x.dtype or next(t.dtype for v in add.inputs if (t := constant(v)) is not None)
    base = clip.name or output.name or "hard_sigmoid"
    sigmoid = ir.node(
        "HardSigmoid",
        [x],
        attributes={"alpha": float(np.float32(alpha)), "beta": float(np.float32(beta))},
        name=f"{base}_hard_sigmoid",
    )
    sigmoid.outputs[0].name = _fresh(graph, f"{base}_hard_sigmoid")
    sigmoid.outputs[0].dtype = dtype
    new_nodes = [sigmoid]
    result = sigmoid.outputs[0]
    if times_x is not None:
        product = ir.node("Mul", [x, result], name=times_x.name or f"{base}_hard_swish")
        product.outputs[0].name = _fresh(graph, f"{base}_hard_swish")
        product.outputs[0].dtype = dtype
        new_nodes.append(product)
        result = product.outputs[0]
    graph.insert_before(scale_node, new_nodes)
    name, type_, shape, is_output = output.name, output.type, output.shape, output.is_graph_output()
    ir.convenience.replace_all_uses_with(output, result, replace_graph_outputs=True)
    dead = [scale_node, *([times_x] if times_x is not None else []), clip, add]
    graph.remove(dead, safe=True)
    if is_output:
        result.name = name
    if type_ is not None:
        result.type = type_
    if shape is not None:
        result.shape = shape


def _fresh(graph: ir.Graph, base: str) -> str:
    taken = {v.name for n in graph for v in n.outputs} | set(graph.initializers)
    taken |= {v.name for v in graph.inputs}
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name

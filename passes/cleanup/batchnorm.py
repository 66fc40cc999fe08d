"""BatchNormalization folding: `BN(op(x, W, b))` becomes `op(x, W', b')` for an op that is
Conv, ConvTranspose or Gemm, where that is exact.

Pattern: every ONNX BatchNormalization outside function bodies (which hold no initializers to
fold into). Check: `_check` returns the parts of the fold, or the reason it is refused. Rewrite:
`_rewrite`, which still declines a fold that would overflow the weight's type.
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
    new_initializer,
    onnx_nodes,
    plain_attr,
    remove_node,
)

_BN_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")
_BN_PARAMS = ("scale", "bias", "mean", "variance")


@dataclass
class _BatchNormMatch:
    bn: ir.Node
    producer: ir.Node
    params: tuple[ir.TensorProtocol, ...]  # scale, bias, mean, variance
    epsilon: float
    weight: ir.TensorProtocol
    bias: ir.TensorProtocol | None  # Conv/ConvTranspose bias or Gemm C


def fold_all(m: ir.Model) -> int:
    """Fold every BatchNormalization that passes the check; the number folded."""
    names = all_value_names(m)
    count = 0
    for node, opset in onnx_nodes(m, "BatchNormalization", functions=False):
        match = _check(node, opset)
        if isinstance(match, _BatchNormMatch) and _rewrite(match, names):
            count += 1
    return count


def refusal(bn: ir.Node, opset: int) -> str | None:
    """Why `bn` is not folded (None when it is, overflow aside)."""
    match = _check(bn, opset)
    return match if isinstance(match, str) else None


def _check(bn: ir.Node, opset: int) -> _BatchNormMatch | str:
    """Check that `bn` can be folded exactly into its producer; a string says why not."""
    if opset < 7:
        return f"BatchNormalization-{opset} (before opset 7) is not folded"
    if plain_attr(bn, "spatial", 1) != 1:
        return "spatial=0 normalizes every element, not every channel"
    if plain_attr(bn, "training_mode", 0) != 0:
        return "it runs in training mode"
    if any(out.name for out in bn.outputs[1:]):
        return "it also returns batch statistics (training mode)"
    epsilon = plain_attr(bn, "epsilon", 1e-5)
    if epsilon is None:
        return "its epsilon is not a plain float"
    x = bn.inputs[0] if bn.inputs else None
    producer = None if x is None else x.producer()
    if x is None or producer is None:
        return "its input is a graph input or a weight"
    if producer.graph is not bn.graph:
        return "its input comes from an enclosing graph"
    if not is_onnx_op(producer, *_BN_PRODUCERS):
        return f"its input comes from {producer.op_type}, not Conv, ConvTranspose or Gemm"
    kind = producer.op_type
    if x.is_graph_output():
        return f"the {kind} output is also a graph output"
    if len(x.uses()) > 1:
        return f"the {kind} output also feeds {len(x.uses()) - 1} other node(s)"
    values = list(bn.inputs[1:5])
    values += [None] * (4 - len(values))
    params = []
    for label, value in zip(_BN_PARAMS, values, strict=True):
        tensor = constant(value)
        if tensor is None:
            where = (
                "a graph input"
                if value is not None and value.is_graph_input()
                else "not a constant"
            )
            return f"its {label} is {where}"
        if tensor.dtype not in FLOAT_TYPES:
            return f"its {label} has type {tensor.dtype}"
        params.append(tensor)
    channels = params[0].shape.numpy()
    if len(channels) != 1 or any(t.shape.numpy() != channels for t in params):
        return "its scale, bias, mean and variance are not vectors of one length"
    refusal = _producer_refusal(producer, opset, channels[0])
    if refusal is not None:
        return refusal
    weight = constant(producer.inputs[1])
    assert weight is not None
    bias = constant(producer.inputs[2]) if len(producer.inputs) > 2 else None
    return _BatchNormMatch(bn, producer, tuple(params), epsilon, weight, bias)


def _producer_refusal(producer: ir.Node, opset: int, channels: int) -> str | None:
    kind = producer.op_type
    if len(producer.inputs) < 2 or (weight := constant(producer.inputs[1])) is None:
        return f"the {kind} weight is not a constant"
    if weight.dtype not in FLOAT_TYPES:
        return f"the {kind} weight has type {weight.dtype}"
    bias_value = producer.inputs[2] if len(producer.inputs) > 2 else None
    bias = constant(bias_value)
    if bias_value is not None and bias is None:
        return f"the {kind} bias is not a constant"
    if bias is not None and bias.dtype != weight.dtype:
        return f"the {kind} bias and weight differ in type"
    shape = weight.shape.numpy()
    if kind == "Conv":
        if len(shape) < 3 or shape[0] != channels:
            return f"the Conv weight {list(shape)} does not have {channels} output channels"
    elif kind == "ConvTranspose":
        group = plain_attr(producer, "group", 1)
        if group is None or group < 1:
            return "the ConvTranspose group is not a plain int"
        if len(shape) < 3 or shape[0] % group or shape[1] * group != channels:
            return (
                f"the ConvTranspose weight {list(shape)} with group={group} does not have "
                f"{channels} output channels"
            )
    else:  # Gemm
        if opset < 7:
            return f"Gemm-{opset} (before opset 7) is not folded"
        trans_b = plain_attr(producer, "transB", 0)
        if trans_b is None or plain_attr(producer, "beta", 1.0) is None:
            return "the Gemm attributes are not plain values"
        if len(shape) != 2 or shape[0 if trans_b else 1] != channels:
            return f"the Gemm weight {list(shape)} does not have {channels} output columns"
        if bias is not None:
            c = bias.shape.numpy()
            if len(c) > 2 or (len(c) >= 1 and c[-1] not in (1, channels)):
                return f"the Gemm C {list(c)} does not broadcast to {channels} columns"
    if bias is not None and kind != "Gemm" and bias.shape.numpy() != (channels,):
        return f"the {kind} bias is not a vector of {channels}"
    return None


def _rewrite(match: _BatchNormMatch, names: set[str]) -> bool:
    """Rewrite `BN(op(x, W, b))` as `op(x, W', b')` with W' = W·f, b' = b·f + shift.

    Returns False, changing nothing, when W' or b' would overflow the weight's type (a float16
    weight times a large 1/sqrt(var + eps)).
    """
    scale, bias, mean, var = (np.asarray(t.numpy(), dtype=np.float64) for t in match.params)
    factor = scale / np.sqrt(var + np.float64(np.float32(match.epsilon)))
    shift = bias - mean * factor
    producer, bn = match.producer, match.bn
    weight = match.weight.numpy()
    dtype = weight.dtype
    w = np.asarray(weight, dtype=np.float64)
    old_bias = 0.0 if match.bias is None else np.asarray(match.bias.numpy(), dtype=np.float64)
    kind = producer.op_type
    beta: float | None = 1.0
    if kind == "Conv":
        w = w * factor.reshape((-1,) + (1,) * (w.ndim - 1))
    elif kind == "ConvTranspose":
        group = plain_attr(producer, "group", 1) or 1
        cin, per_group, *kernel = w.shape
        grouped = w.reshape(group, cin // group, per_group, *kernel)
        w = (grouped * factor.reshape(group, 1, per_group, *[1] * len(kernel))).reshape(w.shape)
    else:  # Gemm: alpha·A·(B·f) + (beta·C·f + shift), with beta set to 1
        beta = plain_attr(producer, "beta", 1.0)
        assert beta is not None
        w = w * (factor[:, None] if plain_attr(producer, "transB", 0) else factor[None, :])
    # beta is 1 (exact in float64) for Conv and ConvTranspose.
    b = (np.float64(np.float32(beta)) * old_bias) * factor + shift
    with np.errstate(over="ignore", invalid="ignore"):
        new_w, new_b = w.astype(dtype), b.astype(dtype)
    was_finite = np.isfinite(w).all() and np.isfinite(b).all()
    if was_finite and not (np.isfinite(new_w).all() and np.isfinite(new_b).all()):
        return False
    if kind == "Gemm":
        producer.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    graph = producer.graph
    assert isinstance(graph, ir.Graph)
    base = producer.name or kind
    producer.replace_input_with(1, new_initializer(graph, f"{base}_weight_bn", new_w, names))
    if len(producer.inputs) < 3:
        producer.resize_inputs(3)
    producer.replace_input_with(2, new_initializer(graph, f"{base}_bias_bn", new_b, names))
    # The producer now computes what the BatchNormalization did: give it the BN's output.
    remove_node(bn, bn.outputs[0], producer.outputs[0], rename=True)
    return True

"""Quantization-aware training of integer weights: unfold them into float shadows and back.

A quantized model stores a weight as integers behind a DequantizeLinear (int8 per output
channel from the quantize pass; uint8, int16, int4 blockwise, float8 e4m3fn likewise). Those
integers cannot be trained directly, so the training graph replaces each one by a float
*shadow* W = DequantizeLinear(Wq), computed in numpy as ONNX Runtime computes it, followed by
a QuantizeLinear with the DequantizeLinear's own scale, zero point, axis and block size:

    Wq --DQ--> ...        becomes        W (float, trainable) --Q--> --DQ--> ...

The forward pass is unchanged (W re-quantizes to exactly Wq) and the gradient reaches W by
the straight-through estimator (graphopt.train.rules.quant). After training,
`QuantizedWeight.quantize` turns the shadow back into integers of the original type, which
the Trainer writes into the original initializer: the inference graph keeps its nodes and
dtypes.

int32 biases behind a DequantizeLinear (ONNX Runtime's QDQ form: scale = input scale x
weight scale) have no QuantizeLinear to fake them (it has no int32 output), so their shadow
feeds the DequantizeLinear's consumers directly through an Identity: unquantized during
training, rounded to the int32 grid (a step far below the activations' one) afterwards.

An integer initializer is left frozen, with the reason, when it feeds anything other than
DequantizeLinear inputs 0, when its scale or zero point is not a constant, when its uses
disagree on them, or when its type has no known saturation range.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt.errors import GraphoptError
from graphopt.train.rules.quant import RANGES

_T = onnx.TensorProto
_SCALE_TYPES = {_T.FLOAT: np.float32, _T.DOUBLE: np.float64}


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """An integer initializer trained as a float shadow, and how to turn it back.

    Attributes:
        name: the initializer (its shadow is the trainable of the same name).
        data_type: the ONNX element type of the stored values (INT8, UINT8, INT32, ...).
        dtype: their numpy dtype (ml_dtypes types for int4 and float8).
        scale: the scale broadcast against the weight's shape.
        zero_point: the zero point broadcast likewise, as float64.
        fake_quantized: False for int32: the shadow goes through unquantized (see module).
        mask_names: names a pruning mask of this weight may be stored under: the initializer
            and the float weight it was quantized from (the quantize pass names the integers
            `<weight>_quantized`).
    """

    name: str
    data_type: int
    dtype: np.dtype
    scale: np.ndarray
    zero_point: np.ndarray
    fake_quantized: bool
    mask_names: tuple[str, ...]

    def dequantize(self, values: np.ndarray) -> np.ndarray:
        """(values - zero point) x scale in the scale's type, as DequantizeLinear computes it."""
        shifted = np.asarray(values).astype(np.float64) - self.zero_point
        return shifted.astype(self.scale.dtype) * self.scale

    def quantize(self, shadow: np.ndarray) -> np.ndarray:
        """The stored values of `shadow`: QuantizeLinear's division, rounding (half to even)
        and saturation, in the original type."""
        scaled = np.asarray(shadow, self.scale.dtype) / self.scale
        if self.data_type == _T.INT32:
            info = np.iinfo(np.int32)
            q = np.rint(np.asarray(shadow, np.float64) / self.scale) + self.zero_point
            return np.clip(q, info.min, info.max).astype(np.int32)
        lowest, highest, integer = RANGES[self.data_type]
        if integer:
            q = np.clip(np.rint(scaled).astype(np.float64) + self.zero_point, lowest, highest)
            return q.astype(np.int64).astype(self.dtype)
        q = np.clip(scaled.astype(np.float64) + self.zero_point, lowest, highest)
        return q.astype(np.float32).astype(self.dtype)


def unfold(
    proto: onnx.ModelProto,
    *,
    requested: Sequence[str] | None,
    qat: bool | None,
    prefix: str,
) -> tuple[dict[str, QuantizedWeight], dict[str, str]]:
    """Rewrite `proto` in place: the integer weights to train become float shadow
    initializers of the same name behind a QuantizeLinear (see module).

    Which: with `qat` False none; otherwise every unfoldable one when `requested` is None,
    else the requested ones. Returns the unfolded weights and the integer weights behind a
    DequantizeLinear left frozen, with the reason.

    Raises:
        GraphoptError: qat=True and nothing to unfold, or a requested integer weight that
            cannot be unfolded.
    """
    graph = proto.graph
    found, frozen = _candidates(graph)
    if qat is False:
        return {}, frozen
    if requested is None:
        chosen = list(found)
    else:
        refused = [n for n in requested if n in frozen]
        if refused:
            reasons = "; ".join(f"'{n}': {frozen[n]}" for n in refused)
            raise GraphoptError(
                f"Cannot train the integer weight(s) {', '.join(refused)} ({reasons}).",
                hint="Leave them out of trainables; they stay as they are.",
            )
        chosen = [n for n in requested if n in found]
    if qat and not chosen:
        raise GraphoptError(
            "qat=True, but the model has no integer weights behind a DequantizeLinear to "
            "train" + (" among the trainables requested" if requested is not None else "")
            + (f" (left frozen: {'; '.join(f'{k}: {v}' for k, v in frozen.items())})"
               if frozen else "") + ".",
            hint="Quantize the model first (the quantize pass), or train it without qat.",
        )  # fmt: skip
    inserted: dict[int, list[onnx.NodeProto]] = {}
    for name in chosen:
        q = _rewrite(graph, found[name], prefix)
        if q is not None:  # before the first DequantizeLinear that reads it
            inserted.setdefault(min(found[name].dqs), []).append(q)
    nodes = []
    for position, node in enumerate(graph.node):
        nodes.extend(inserted.get(position, []))
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return {name: found[name].weight for name in chosen}, frozen


# ---------------------------------------------------------------------------- analysis


@dataclass
class _Use:
    weight: QuantizedWeight
    dqs: list[int]  # positions of its DequantizeLinear nodes
    scale: str
    zero_point: str
    attrs: dict
    scale_shape: tuple[int, ...]


def _candidates(graph: onnx.GraphProto) -> tuple[dict[str, _Use], dict[str, str]]:
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
    uses: dict[str, list[tuple[int, int]]] = {}
    for position, node in enumerate(graph.node):
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append((position, i))
    outputs = {v.name for v in graph.output}
    found: dict[str, _Use] = {}
    frozen: dict[str, str] = {}
    for init in graph.initializer:
        if init.data_type in _SCALE_TYPES:
            continue
        its = uses.get(init.name, [])
        dqs = [p for p, i in its if graph.node[p].op_type == "DequantizeLinear" and i == 0]
        if not dqs:
            continue
        params = [_qparams(graph.node[p]) for p in dqs]
        reason = _refusal(init, len(its) - len(dqs), params, outputs, consts)
        if reason:
            frozen[init.name] = reason
            continue
        scale, zero_point, attrs = params[0]
        found[init.name] = _Use(
            weight=_weight(init, params[0], consts),
            dqs=dqs,
            scale=scale,
            zero_point=zero_point,
            attrs=attrs,
            scale_shape=tuple(int(d) for d in np.shape(consts[scale])),
        )
    return found, frozen


def _qparams(dq: onnx.NodeProto) -> tuple[str, str, dict]:
    names = list(dq.input) + ["", ""]
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    return names[1], names[2], {k: v for k, v in attrs.items() if k in ("axis", "block_size")}


def _refusal(
    init: onnx.TensorProto,
    other_uses: int,
    params: list[tuple[str, str, dict]],
    outputs: set[str],
    consts: dict[str, np.ndarray],
) -> str | None:
    if init.data_type not in RANGES and init.data_type != _T.INT32:
        return f"its type {_T.DataType.Name(init.data_type)} has no known saturation range"
    if other_uses or init.name in outputs:
        return "it is also used other than as the input of a DequantizeLinear"
    if any(p != params[0] for p in params[1:]):
        return "its DequantizeLinear nodes use different scales, zero points or axes"
    scale, zero_point, _ = params[0]
    if scale not in consts or (zero_point and zero_point not in consts):
        return "its scale or zero point is computed in the graph, not a constant"
    if consts[scale].dtype not in (np.float32, np.float64):
        return f"its scale is {consts[scale].dtype}; float32 or float64 shadows only"
    return None


def _weight(
    init: onnx.TensorProto, params: tuple[str, str, dict], consts: dict[str, np.ndarray]
) -> QuantizedWeight:
    values = consts[init.name]
    scale_name, zp_name, attrs = params
    rank = values.ndim
    axis = int(attrs.get("axis", 1)) % rank if rank else 0
    block = int(attrs.get("block_size", 0))
    scale = _expand(consts[scale_name], values.shape, axis, block)
    zp = consts[zp_name] if zp_name else np.zeros(np.shape(consts[scale_name]))
    zero_point = _expand(np.asarray(zp).astype(np.float64), values.shape, axis, block)
    bare = re.sub(r"_quantized(_\d+)?$", "", init.name)
    return QuantizedWeight(
        name=init.name,
        data_type=init.data_type,
        dtype=values.dtype,
        scale=scale,
        zero_point=zero_point,
        fake_quantized=init.data_type != _T.INT32,
        mask_names=tuple(dict.fromkeys([init.name, bare])),
    )


def _expand(value: np.ndarray, shape: tuple[int, ...], axis: int, block: int) -> np.ndarray:
    """A scale or zero point (scalar, per axis, or blocked along `axis`) at `shape`."""
    value = np.asarray(value)
    if block:
        value = np.take(np.repeat(value, block, axis=axis), np.arange(shape[axis]), axis=axis)
    elif value.size == 1:
        value = value.reshape(())
    else:
        dims = [1] * len(shape)
        dims[axis] = -1
        value = value.reshape(dims)
    return np.broadcast_to(value, shape).copy()


# ---------------------------------------------------------------------------- rewrite


def _rewrite(graph: onnx.GraphProto, use: _Use, prefix: str) -> onnx.NodeProto | None:
    """Shadow initializer in place of the integers; the QuantizeLinear to insert (None for
    int32, whose DequantizeLinear nodes become Identity nodes)."""
    weight = use.weight
    index = next(i for i, t in enumerate(graph.initializer) if t.name == weight.name)
    shadow = weight.dequantize(numpy_helper.to_array(graph.initializer[index]))
    graph.initializer[index].CopyFrom(numpy_helper.from_array(shadow, weight.name))
    if not weight.fake_quantized:
        for position in use.dqs:
            dq = graph.node[position]
            identity = helper.make_node(
                "Identity", [weight.name], [dq.output[0]], name=f"{prefix}/{dq.name or weight.name}"
            )
            graph.node[position].CopyFrom(identity)
        return None
    zero_point = use.zero_point
    if not zero_point:  # QuantizeLinear would output uint8: a zero of the stored type
        zero_point = f"{prefix}/{weight.name}.zero_point"
        count = int(np.prod(use.scale_shape, dtype=np.int64))
        graph.initializer.append(
            helper.make_tensor(zero_point, weight.data_type, list(use.scale_shape), [0] * count)
        )
    quantized = f"{prefix}/{weight.name}"
    for position in use.dqs:
        graph.node[position].input[0] = quantized
    return helper.make_node(
        "QuantizeLinear",
        [weight.name, use.scale, zero_point],
        [quantized],
        name=f"{prefix}/{weight.name}/QuantizeLinear",
        **use.attrs,
    )

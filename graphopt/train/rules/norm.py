"""BatchNormalization in inference mode: the running statistics stay frozen."""

from __future__ import annotations

import onnx

from graphopt.train.graph import Emitter, attributes
from graphopt.train.rules import rule

Grads = list[str | None]


@rule("BatchNormalization", inputs=(0, 1, 2))
def _batch_norm(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    attrs = attributes(node)
    if int(attrs.get("training_mode", 0)) or any(name for name in node.output[1:]):
        raise em.error(
            "it runs in training mode (batch statistics); only inference mode is supported",
            hint="Export the model in eval mode, so BatchNormalization uses its running statistics.",
        )
    dy = dys[0]
    x, scale, _bias, mean, var = node.input[:5]
    rank = em.rank(x)
    channel = list(range(1, rank - 1))  # (C,) -> (C, 1, ..., 1) against (N, C, ...)
    reduce_axes = [0, *range(2, rank)]

    def per_channel(v: str) -> str:
        return em.unsqueeze(v, channel) if channel else v

    inv_std = em.op(
        "Reciprocal",
        [em.op("Sqrt", [em.op("Add", [var, em.const(float(attrs.get("epsilon", 1e-5)))])])],
    )
    out: Grads = [None] * len(node.input)
    if needed[0]:
        factor = em.op("Mul", [scale, inv_std])
        out[0] = em.op("Mul", [dy, per_channel(factor)])
        if rank >= 2:  # a Conv before it can take dy and the factor (graph.Emitter)
            em.channel_scaled[out[0]] = (dy, factor)
    if needed[1]:
        # sum(dy * (x - mean) * inv_std) with inv_std applied to the (C,) sum
        centered = em.op("Sub", [x, per_channel(mean)])
        summed = em.reduce("ReduceSum", em.op("Mul", [dy, centered]), reduce_axes, keepdims=False)
        out[1] = em.op("Mul", [summed, inv_std])
    if needed[2]:
        out[2] = em.reduce("ReduceSum", dy, reduce_axes, keepdims=False)
    return out

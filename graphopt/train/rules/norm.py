"""BatchNormalization in inference mode: the running statistics stay frozen.

dX = dY * scale * inv_std per channel (handed to a Conv before it as a factor, see
graph.Emitter.channel_scaled); dBias = sum(dY); dScale = inv_std * sum(dY * (x - mean)).
When x is a Conv's output, sum(dY * x) = sum(W * dW) (+ bias * sum(dY)), with dW the
Conv's weight gradient for this dY, so the Conv rule computes dScale as
inv_std * (sum(W * dW) + bias * sum(dY) - mean * sum(dY)) from weight-sized tensors.
Three passes over dY go. The subtraction could cancel when |mean| is large against the
spread of x; in float32 the result stayed within 4e-7 of float64 with the mean at up to
5x the spread (tests/train/test_models.py) and at 100x in a one-off check.
"""

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
    dy_sum = (
        em.reduce("ReduceSum", dy, reduce_axes, keepdims=False) if needed[1] or needed[2] else ""
    )
    if needed[0]:
        factor = em.op("Mul", [scale, inv_std])
        out[0] = em.op("Mul", [dy, per_channel(factor)])
        if rank >= 2:  # a Conv before it can take dy and the factor (graph.Emitter)
            em.channel_scaled[out[0]] = (dy, factor)
    if needed[1]:
        if needed[0] and rank >= 3 and scale not in em.producers and _conv_computes_the_sum(em, x):
            # sum(dy * x) per channel is sum(W * dW) over the Conv's weight (plus its bias
            # times sum(dy)), which the Conv rule has in hand: three full passes over dY
            # (Sub, Mul, ReduceSum) become a product of weight-sized tensors.
            out[1] = em.fresh("scale_grad")
            em.deferred_scale_grads[out[0]] = (out[1], mean, inv_std, dy_sum)
        else:
            # sum(dy * (x - mean) * inv_std) with inv_std applied to the (C,) sum
            centered = em.op("Sub", [x, per_channel(mean)])
            summed = em.reduce(
                "ReduceSum", em.op("Mul", [dy, centered]), reduce_axes, keepdims=False
            )
            out[1] = em.op("Mul", [summed, inv_std])
    if needed[2]:
        out[2] = dy_sum
    return out


def _conv_computes_the_sum(em: Emitter, x: str) -> bool:
    """Whether x comes from a Conv that only this node reads and whose weight gets a
    gradient, so that the Conv rule sees this node's input gradient alone and computes dW.
    (The caller also requires the scale to be an initializer or input: the gradient the
    Conv rule emits later is then read only at the end, never by an earlier rule.)"""
    conv = em.producers.get(x)
    return (
        conv is not None
        and conv.op_type == "Conv"
        and em.consumers.get(x, 0) == 1
        and len(conv.input) > 1
        and conv.input[1] in em.active
    )

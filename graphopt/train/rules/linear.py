"""Gemm and MatMul (batched, broadcast, 1-D operands)."""

from __future__ import annotations

import onnx

from graphopt.train.graph import Emitter, attributes
from graphopt.train.rules import rule

Grads = list[str | None]


@rule("Gemm")
def _gemm(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    # Y = alpha * A' B' + beta * C with A' = A^T if transA, B' = B^T if transB.
    (dy,) = dys
    attrs = attributes(node)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    ta, tb = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))
    a, b = node.input[0], node.input[1]
    out: Grads = [None] * len(node.input)
    if needed[0]:
        if not ta:  # dA = alpha * dY B'^T
            out[0] = em.op("Gemm", [dy, b], alpha=alpha, transB=1 - tb)
        else:  # dA = alpha * B' dY^T
            out[0] = em.op("Gemm", [b, dy], alpha=alpha, transA=tb, transB=1)
    if needed[1]:
        if not tb:  # dB = alpha * A'^T dY
            out[1] = em.op("Gemm", [a, dy], alpha=alpha, transA=1 - ta)
        else:  # dB = alpha * dY^T A'
            out[1] = em.op("Gemm", [dy, a], alpha=alpha, transA=1, transB=ta)
    if len(needed) > 2 and needed[2]:
        grad = dy if beta == 1.0 else em.op("Mul", [dy, em.const(beta)])
        out[2] = em.unbroadcast(grad, em.shape(node.output[0]), node.input[2])
    return out


def _swap_last(em: Emitter, x: str, rank: int) -> str:
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return em.op("Transpose", [x], perm=perm)


@rule("MatMul")
def _matmul(em: Emitter, node: onnx.NodeProto, dys: Grads, needed: list[bool]) -> Grads:
    (dy,) = dys
    a, b = node.input
    a_shape, b_shape, y_shape = em.shape(a), em.shape(b), em.shape(node.output[0])
    if a_shape is None or b_shape is None or y_shape is None:
        raise em.error("the ranks of its operands are unknown")
    ra, rb = len(a_shape), len(b_shape)
    if ra == 1 and rb == 1:  # a dot product: y is a scalar
        return [
            em.op("Mul", [dy, b]) if needed[0] else None,
            em.op("Mul", [dy, a]) if needed[1] else None,
        ]
    # Promote 1-D operands to matrices, as MatMul does, and dY to match.
    a2, a2_shape = (em.unsqueeze(a, [0]), (1, *a_shape)) if ra == 1 else (a, a_shape)
    b2, b2_shape = (em.unsqueeze(b, [1]), (*b_shape, 1)) if rb == 1 else (b, b_shape)
    dy2, dy2_shape = dy, tuple(y_shape)
    if ra == 1:
        dy2 = em.unsqueeze(dy2, [len(dy2_shape) - 1])
        dy2_shape = (*dy2_shape[:-1], 1, dy2_shape[-1])
    if rb == 1:
        dy2 = em.unsqueeze(dy2, [len(dy2_shape)])
        dy2_shape = (*dy2_shape, 1)
    batch = dy2_shape[:-2]
    out: Grads = [None, None]
    if needed[0]:
        da = em.op("MatMul", [dy2, _swap_last(em, b2, len(b2_shape))])
        out[0] = em.unbroadcast(da, (*batch, *a2_shape[-2:]), a)
    if needed[1]:
        db = em.op("MatMul", [_swap_last(em, a2, len(a2_shape)), dy2])
        db_shape = (*batch, *b2_shape[-2:])
        if rb == 1:
            db = em.squeeze(db, [len(db_shape) - 1])
            db_shape = db_shape[:-1]
        out[1] = em.unbroadcast(db, db_shape, b)
    return out

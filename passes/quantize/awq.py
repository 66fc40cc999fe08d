"""Activation-aware weight quantization (AWQ, Lin et al. 2023) for blockwise int4 weights.

Input channels that carry large activations matter most to a MatMul's output, and int4
rounds them as coarsely as any other. AWQ multiplies the weight's rows by per-input-channel
scales ``s = mean|x_k| ** alpha`` (normalised so that ``max(s) * min(s) = 1``) before
rounding, and divides the activation by ``s``, which leaves the float model's math unchanged:
``x @ W == (x / s) @ (s[:, None] * W)``. `alpha` is searched on a grid over [0, 1] per
activation, minimising ``||x @ W - x @ Qdq(s W) / s||^2`` on rows sampled from the
calibration data; alpha 0 is plain round-to-nearest, so the search never does worse than RTN
on those rows.

The division by ``s`` has to live somewhere in the graph, exactly, at no run-time cost: it is
folded into the constants of the op that produces the activation (a `Fold`):

- LayerNormalization: its scale and bias;
- Mul by a constant (broadcast along the last axis): the constant;
- MatMul / Gemm with a constant weight: the weight's output columns (and Gemm's bias);
- Add of a constant to any of the above (a Linear's bias): the constant, then the op before.

All readers of the activation share one ``s`` (q/k/v projections of one LayerNormalization
are searched together), so every reader must be a quantized MatMul/Gemm. Where no fold
exists (a graph input, a Softmax, a Gelu, another reader, a shared weight) the layer is
quantized with plain RTN and the reason is reported.

Activations are streamed (`graphopt.runtime.capture`): per activation the running sum of
|x| over all calibration rows and a uniform sample of at most `MAX_ROWS` rows (reservoir
sampling), captured in rounds that keep the samples under `CAPTURE_BYTES`.

Not done (unlike the reference implementation): the search for per-block weight clipping
ranges, and scaling through activation functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.calibration.datasets import head
from graphopt.context import Context
from graphopt.model import Model
from graphopt.passes.quantize import blockwise
from graphopt.passes.quantize.graphutil import NameSource, constant, node_label, plain_attr
from graphopt.passes.quantize.ranges import usable_samples
from graphopt.runtime import capture

#: alpha takes GRID + 1 values, 0, 1/GRID, ..., 1 (the reference implementation uses 20).
GRID = 20
#: Rows of each activation kept for the search.
MAX_ROWS = 4096
#: Bound on the sampled rows held at once, all activations of a capture round together.
CAPTURE_BYTES = 256 * 2**20
# Activation magnitudes below this are treated as this (AWQ clamps at 1e-4 as well).
_MIN_MAGNITUDE = 1e-4


@dataclass(frozen=True)
class Step:
    """One constant input whose values are scaled along one axis: ``axis=None`` means the
    last axis, broadcast out to K where the constant has size 1 there."""

    node: ir.Node
    input: int
    axis: int | None

    def describe(self) -> str:
        return f"{self.node.op_type} '{node_label(self.node)}' input {self.input}"


@dataclass
class Group:
    """The weights that read one activation, searched together with one set of scales.

    Attributes:
        activation: the value the MatMuls/Gemms read as their first input.
        readers: (MatMul/Gemm, the K axis of its stored weight: 0, or 1 for a Gemm with
            transB).
        folds: where 1/s goes, producer first.
    """

    activation: ir.Value
    readers: list[tuple[ir.Node, int]]
    folds: list[Step]
    mean_abs: np.ndarray | None = None
    rows: np.ndarray | None = None
    seen: int = 0
    finite: bool = True

    @property
    def name(self) -> str:
        assert self.activation.name is not None
        return self.activation.name


@dataclass(frozen=True)
class Fallback:
    """Readers of an activation left to plain RTN, and why (a code and a sentence)."""

    nodes: tuple[str, ...]
    reason: str
    detail: str

    def to_dict(self) -> dict[str, object]:
        return {"nodes": list(self.nodes), "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class Search:
    """The outcome of the alpha search for one group."""

    scales: np.ndarray
    alpha: float
    error: float
    rtn_error: float
    rows: int


@dataclass
class Planned:
    groups: list[Group] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)


# ---------------------------------------------------------------------------- planning


def plan(readers: Sequence[tuple[ir.Node, int]]) -> Planned:
    """Group the quantized MatMuls/Gemms (node, K axis of the weight) by the activation they
    read, and find where each group's 1/s can be folded."""
    k_axis = {id(node): axis for node, axis in readers}
    by_activation: dict[int, list[ir.Node]] = {}
    values: dict[int, ir.Value] = {}
    for node, _ in readers:
        x = node.inputs[0]
        assert x is not None
        by_activation.setdefault(id(x), []).append(node)
        values[id(x)] = x
    planned = Planned()
    for key, nodes in by_activation.items():
        x = values[key]
        labels = tuple(node_label(n) for n in nodes)
        reason = _refusal(x, nodes)
        if reason is None:
            k = _weight(nodes[0]).shape[k_axis[id(nodes[0])]]
            folds = _folds(x, k)
            if isinstance(folds, list):
                group = Group(x, [(n, k_axis[id(n)]) for n in nodes], folds)
                planned.groups.append(group)
                continue
            reason = folds
        planned.fallbacks.append(Fallback(labels, *reason))
    return planned


def _refusal(x: ir.Value, nodes: list[ir.Node]) -> tuple[str, str] | None:
    members = {id(n) for n in nodes}
    for user, index in x.uses():
        if id(user) not in members or index != 0:
            return (
                "shared-activation",
                f"'{x.name}' is also read by {user.op_type} '{node_label(user)}', which 1/s "
                "would change",
            )
    for node in nodes:
        if node.op_type == "Gemm" and plain_attr(node, "transA", 0):
            return "transA", f"Gemm '{node_label(node)}' reads its activation transposed"
        w = node.inputs[1]
        assert w is not None
        if len(w.uses()) > 1:
            return "shared-weight", f"weight '{w.name}' is read by more than one node"
    return None


def _weight(node: ir.Node) -> np.ndarray:
    tensor = constant(node.inputs[1])
    assert tensor is not None
    return tensor.numpy()


def _folds(x: ir.Value, k: int) -> list[Step] | tuple[str, str]:
    """The constants that absorb 1/s exactly for activation `x` (K channels on its last
    axis), or (reason code, sentence)."""
    if x.is_graph_input():
        return "input", f"'{x.name}' is a graph input: no op before it to fold 1/s into"
    if x.is_graph_output():
        return "no-fold", f"'{x.name}' is a graph output, which 1/s would change"
    node = x.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return "no-fold", f"'{x.name}' comes from an op that cannot absorb per-channel scales"
    op = node.op_type
    if op == "LayerNormalization" and x is node.outputs[0]:
        steps = [Step(node, 1, None)]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            steps.append(Step(node, 2, None))
        if all(_channelwise(node.inputs[s.input], k, any_leading=True) for s in steps):
            return steps
    elif op in ("Mul", "Add") and len(node.inputs) == 2:
        for c, other in ((1, 0), (0, 1)):
            if _channelwise(node.inputs[c], k) and constant(node.inputs[other]) is None:
                break
        else:
            return "no-fold", f"{op} '{node_label(node)}' has no constant per-channel operand"
        step = Step(node, c, None)
        if op == "Mul":
            return [step]
        v = node.inputs[other]
        assert v is not None
        if len(v.uses()) != 1:
            return "no-fold", f"'{v.name}' before Add '{node_label(node)}' has other readers"
        inner = _folds(v, k)
        return inner if isinstance(inner, tuple) else [step, *inner]
    elif op in ("MatMul", "Gemm"):
        b = constant(node.inputs[1])
        trans_b = op == "Gemm" and plain_attr(node, "transB", 0)
        axis = 0 if trans_b else 1
        if b is not None and b.dtype == ir.DataType.FLOAT and len(b.shape) == 2:
            if b.shape[axis] == k:
                steps = [Step(node, 1, axis)]
                bias = node.inputs[2] if op == "Gemm" and len(node.inputs) > 2 else None
                if bias is None or _channelwise(bias, k, any_leading=True):
                    if bias is not None:
                        steps.append(Step(node, 2, None))
                    return steps
    return "no-fold", f"{op} '{node_label(node)}' before '{x.name}' cannot absorb the scales"


def _channelwise(value: ir.Value | None, k: int, *, any_leading: bool = False) -> bool:
    """A float32 constant whose last axis is 1 or K and (unless `any_leading`) whose other
    axes are 1: dividing it along the last axis scales each channel of the op's output."""
    tensor = constant(value)
    if tensor is None or tensor.dtype != ir.DataType.FLOAT:
        return False
    shape = tuple(int(d) for d in tensor.shape.numpy())
    if not shape:
        return True
    if shape[-1] not in (1, k):
        return False
    return any_leading or all(d == 1 for d in shape[:-1])


# ---------------------------------------------------------------------------- statistics


def collect(model: Model, ctx: Context, groups: Sequence[Group], samples: int) -> None:
    """Stream the first `samples` calibration samples through the float model and fill each
    group's mean |x| per channel and its sampled rows."""
    dataset = ctx.calib_data
    assert dataset is not None
    data = head(dataset, usable_samples(model, samples), model.input_specs())
    rng = np.random.default_rng(ctx.seed)
    for round_ in _rounds(groups):
        sums = {g.name: np.zeros(_channels(g), np.float64) for g in round_}

        def take(_batch: object, values: dict[str, np.ndarray], round_=round_, sums=sums) -> None:
            for group in round_:
                x = np.asarray(values[group.name], np.float32)
                x = x.reshape(-1, x.shape[-1])
                if not np.isfinite(x).all():
                    group.finite = False
                    continue
                sums[group.name] += np.abs(x).sum(axis=0, dtype=np.float64)
                _reservoir(group, x, rng)

        capture(
            model,
            data,
            [g.name for g in round_],
            take,
            batch_size=ctx.batch_size,
            device=ctx.device,
            threads=ctx.threads,
            workdir=ctx.workdir,
        )
        for group in round_:
            if group.seen:
                group.mean_abs = (sums[group.name] / group.seen).astype(np.float32)


def _channels(group: Group) -> int:
    node, axis = group.readers[0]
    return _weight(node).shape[axis]


def _rounds(groups: Sequence[Group]) -> list[list[Group]]:
    rounds: list[list[Group]] = []
    used = CAPTURE_BYTES
    for group in groups:
        size = MAX_ROWS * _channels(group) * 4
        if used + size > CAPTURE_BYTES and (not rounds or rounds[-1]):
            rounds.append([])
            used = 0
        rounds[-1].append(group)
        used += size
    return rounds


def _reservoir(group: Group, x: np.ndarray, rng: np.random.Generator) -> None:
    """Keep a uniform sample of at most MAX_ROWS rows of everything seen so far."""
    limit = MAX_ROWS
    if group.rows is None:
        group.rows = np.empty((0, x.shape[1]), np.float32)
    start = group.seen
    group.seen += x.shape[0]
    room = max(0, limit - group.rows.shape[0])
    if room:
        group.rows = np.concatenate([group.rows, x[:room]])
    rest = x[room:]
    if not len(rest):
        return
    # Row number t (0-based, over all rows seen) replaces a random slot with probability
    # limit / (t + 1); later rows overwrite earlier ones, as in the sequential algorithm.
    t = np.arange(start + room, start + room + len(rest))
    slots = rng.integers(0, t + 1)
    chosen = slots < limit
    group.rows[slots[chosen]] = rest[chosen]


# ---------------------------------------------------------------------------- search


def search(
    rows: np.ndarray,
    weight: np.ndarray,
    mean_abs: np.ndarray,
    *,
    block_size: int,
    symmetric: bool,
    grid: int = GRID,
) -> Search:
    """The alpha (and scales) with the least output error on `rows` ([R, K]) for a weight
    taken as [K, N]."""
    x = np.asarray(rows, np.float32)
    w = np.asarray(weight, np.float32)
    reference = x @ w
    magnitude = np.maximum(np.asarray(mean_abs, np.float64), _MIN_MAGNITUDE)
    best: Search | None = None
    rtn_error = np.inf
    for alpha in np.arange(grid + 1) / grid:
        scales = awq_scales(magnitude, float(alpha))
        fake = blockwise.fake_quantize(w * scales[:, None], block_size, symmetric=symmetric)
        error = float(np.mean((x @ (fake / scales[:, None]) - reference) ** 2))
        if alpha == 0:
            rtn_error = error
        if best is None or error < best.error:
            best = Search(scales, float(alpha), error, rtn_error, x.shape[0])
    assert best is not None
    return Search(best.scales, best.alpha, best.error, rtn_error, x.shape[0])


def awq_scales(magnitude: np.ndarray, alpha: float) -> np.ndarray:
    """``magnitude ** alpha`` normalised to ``max * min == 1`` (float32; all ones at 0)."""
    scales = np.power(np.asarray(magnitude, np.float64), alpha)
    scales = scales / np.sqrt(scales.max() * scales.min())
    return scales.astype(np.float32)


# ---------------------------------------------------------------------------- rewrite


def apply(group: Group, scales: np.ndarray, names: NameSource) -> None:
    """Divide the producer's constants by `scales` and multiply the readers' weights' K rows
    by them: the float model computes the same outputs (up to float rounding)."""
    for step in group.folds:
        _scale_constant(step.node, step.input, step.axis, 1.0 / scales.astype(np.float64), names)
    for node, axis in group.readers:
        _scale_constant(node, 1, axis, scales.astype(np.float64), names)


def _scale_constant(
    node: ir.Node, index: int, axis: int | None, factors: np.ndarray, names: NameSource
) -> None:
    value = node.inputs[index]
    tensor = constant(value)
    assert value is not None and tensor is not None
    array = tensor.numpy().astype(np.float64)
    if axis is None:
        shape = (*array.shape[:-1], len(factors)) if array.ndim else (len(factors),)
        scaled = np.broadcast_to(array, shape) * factors
    else:
        shape = [1] * array.ndim
        shape[axis] = len(factors)
        scaled = array * factors.reshape(shape)
    scaled = np.ascontiguousarray(scaled, np.float32)
    graph = node.graph
    assert isinstance(graph, ir.Graph)
    name = value.name or "awq"
    if graph.initializers.get(name) is value and len(value.uses()) == 1:
        value.const_value = ir.tensor(scaled, name=name)
        value.shape = ir.Shape(scaled.shape)
        return
    new_name = names.take(f"{name}_awq")
    new = ir.Value(
        name=new_name, shape=ir.Shape(scaled.shape), type=ir.TensorType(ir.DataType.FLOAT)
    )
    new.const_value = ir.tensor(scaled, name=new_name)
    graph.register_initializer(new)
    node.replace_input_with(index, new)

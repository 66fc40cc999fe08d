"""Which initializers `prune` may sparsify, along which axis, and why the others are left.

Pattern: a Conv (input 1), Gemm (input 1) or MatMul (input 1) whose weight is an initializer,
read directly or through a chain of DequantizeLinear, QuantizeLinear, Cast, Transpose and
Identity (`_PASS_THROUGH`). Along that chain the op's view of the weight is the initializer
with its axes permuted: each Transpose is followed through its `perm`, the other ops keep
the layout. The reduction axis (the one TensorRT's 2:4 groups run along) in the op's view:

- Conv `[K, C/group, R, S, ...]`: axis 1 (C of one group, so groups never cross conv groups);
- Gemm B: axis 0 (`[K, N]`), or 1 when `transB=1` (`[N, K]`);
- MatMul B `[..., K, N]`: axis -2.

Check (`_refuse_reader`, `_check_weight`): every refusal is a `Skip` with a reason code —
``user`` (an `exclude` entry), ``first-layer`` (a Conv reading a graph input), ``depthwise``
(a grouped Conv with one input channel per group), ``small`` (fewer than `min_params`
elements), ``not-multiple`` (reduction axis not a multiple of M, for N:M), ``dtype``,
``dynamic-weight`` (computed at run time), ``constant-node`` (a Constant, not an
initializer: run `cleanup` first), ``unsupported-path`` (computed from constants by an op
that `cleanup` would fold), ``other-reader`` (the initializer, or a value on its chain, is also read by
something other than a pruned op's weight input), ``axis-conflict`` (two readers reduce
along different axes of a shared initializer), ``subgraph`` (inside If/Loop/Scan), ``shape``.

A weight shared by several readers is one `Target`: pruned once, the same for all of them;
any reader's refusal refuses the weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx_ir as ir

from graphopt.passes.quantize.graphutil import constant, is_onnx_op, node_label, plain_attr
from graphopt.passes.quantize.sites import Excluder

_READERS = ("Conv", "Gemm", "MatMul")
_PASS_THROUGH = ("DequantizeLinear", "QuantizeLinear", "Cast", "Transpose", "Identity")
_FLOAT_TYPES = (
    ir.DataType.FLOAT,
    ir.DataType.FLOAT16,
    ir.DataType.BFLOAT16,
    ir.DataType.DOUBLE,
)
_INT_TYPES = (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16)


@dataclass(frozen=True)
class Skip:
    """A weight (or an op without a prunable weight) left alone, and why."""

    weight: str
    nodes: tuple[str, ...]
    op: str
    reason: str
    detail: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "weight": self.weight,
            "nodes": list(self.nodes),
            "op": self.op,
            "reason": self.reason,
            "detail": self.detail,
        }


@dataclass(frozen=True, eq=False)
class Reader:
    """A Conv/Gemm/MatMul reading a weight, and how its view maps onto the initializer.

    Attributes:
        node: the op.
        perm: op-view axis i is initializer axis perm[i].
        chain: the pass-through nodes from the initializer to the op, initializer side first.
        axis: the reduction axis, in the initializer's layout.
        out_axes: the axes that index the op's outputs, in the initializer's layout.
        activation: the activation input the weight multiplies (Wanda's X).
        act_axis: X's channel axis (the one paired with the reduction axis).
    """

    node: ir.Node
    perm: tuple[int, ...]
    chain: tuple[ir.Node, ...]
    axis: int
    out_axes: tuple[int, ...]
    activation: ir.Value | None
    act_axis: int


@dataclass(eq=False)
class Target:
    """An initializer to prune, with every op that reads it.

    Attributes:
        value: the initializer.
        readers: the ops reading it (all agree on `axis` and `out_axes`).
        dequantize: the DequantizeLinear reading the initializer, when it stores integers
            (pruned entries become the zero point, so they dequantize to exactly 0).
    """

    value: ir.Value
    readers: list[Reader] = field(default_factory=list)
    dequantize: ir.Node | None = None

    @property
    def name(self) -> str:
        return self.value.name or ""

    @property
    def axis(self) -> int:
        return self.readers[0].axis

    @property
    def out_axes(self) -> tuple[int, ...]:
        return self.readers[0].out_axes

    @property
    def shape(self) -> tuple[int, ...]:
        tensor = self.value.const_value
        assert tensor is not None
        return tuple(int(d) for d in tensor.shape.numpy())

    @property
    def size(self) -> int:
        tensor = self.value.const_value
        assert tensor is not None
        return int(tensor.size)

    def labels(self) -> tuple[str, ...]:
        return tuple(node_label(r.node) for r in self.readers)


@dataclass(frozen=True)
class Rules:
    """What the options ask of `find`."""

    excluder: Excluder
    min_params: int
    include_first: bool
    include_depthwise: bool
    group_size: int | None  # M of N:M; None for unstructured


def find(graph: ir.Graph, rules: Rules) -> tuple[list[Target], list[Skip]]:
    """Every Conv/Gemm/MatMul weight of the main graph as a target or a skip."""
    top_level = {id(node) for node in graph}
    by_value: dict[int, tuple[Target, list[Skip]]] = {}
    skips: list[Skip] = []
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if not is_onnx_op(node, *_READERS) or len(node.inputs) < 2:
            continue
        label = node_label(node)
        if id(node) not in top_level:
            skips.append(Skip("", (label,), node.op_type, "subgraph", "inside If/Loop/Scan"))
            continue
        traced = _trace(graph, node)
        if isinstance(traced, Skip):
            skips.append(traced)
            continue
        value, reader = traced
        target, refusals = by_value.setdefault(id(value), (Target(value), []))
        target.readers.append(reader)
        refusal = _refuse_reader(reader, value, rules)
        if refusal is not None:
            refusals.append(refusal)
    targets = []
    for target, refusals in by_value.values():
        if refusals:
            first = refusals[0]
            shared = f" (shared by {', '.join(target.labels())})" if len(target.readers) > 1 else ""
            skips.append(
                Skip(target.name, target.labels(), first.op, first.reason, first.detail + shared)
            )
            continue
        refusal = _check_weight(graph, target, rules)
        if refusal is not None:
            skips.append(refusal)
        else:
            targets.append(target)
    return targets, skips


def _trace(graph: ir.Graph, node: ir.Node) -> tuple[ir.Value, Reader] | Skip:
    """Walk from the op's weight input back to an initializer, composing the permutation."""
    label = node_label(node)
    value = node.inputs[1]
    chain: list[ir.Node] = []
    perm: list[int] | None = None
    while value is not None:
        if value.is_graph_input():
            return Skip(
                value.name or "",
                (label,),
                node.op_type,
                "dynamic-weight",
                "the weight is a graph input",
            )
        if graph.initializers.get(value.name or "") is value:
            break
        producer = value.producer()
        if producer is None:
            return Skip(value.name or "", (label,), node.op_type, "dynamic-weight", "no producer")
        if is_onnx_op(producer, "Constant"):
            return Skip(
                value.name or "",
                (label,),
                node.op_type,
                "constant-node",
                "a Constant node, not an initializer (run cleanup first)",
            )
        if not is_onnx_op(producer, *_PASS_THROUGH):
            if all(constant(v) is not None for v in producer.inputs if v is not None):
                detail = f"{node_label(producer)} computes it from constants (run cleanup)"
                return Skip(value.name or "", (label,), node.op_type, "unsupported-path", detail)
            detail = f"computed at run time by {node_label(producer)}"
            return Skip(value.name or "", (label,), node.op_type, "dynamic-weight", detail)
        if is_onnx_op(producer, "Transpose"):
            attr = producer.attributes.get("perm")
            if attr is None or attr.is_ref():
                rank = _rank(producer.inputs[0])
                if rank is None:
                    return Skip(value.name or "", (label,), node.op_type, "shape", "unknown rank")
                step = list(range(rank))[::-1]
            else:
                step = list(attr.as_ints())
            perm = step if perm is None else [step[p] for p in perm]
        chain.insert(0, producer)
        value = producer.inputs[0]
    if value is None:
        return Skip("", (label,), node.op_type, "dynamic-weight", "no weight input")
    tensor = value.const_value
    if tensor is None:
        return Skip(value.name or "", (label,), node.op_type, "dynamic-weight", "no value")
    rank = len(tensor.shape)
    perm_t = tuple(range(rank)) if perm is None else tuple(perm)
    geometry = _geometry(node, [int(d) for d in tensor.shape.numpy()], perm_t)
    if isinstance(geometry, str):
        return Skip(value.name or "", (label,), node.op_type, "shape", geometry)
    axis, out_axes, act_axis = geometry
    reader = Reader(
        node=node,
        perm=perm_t,
        chain=tuple(chain),
        axis=perm_t[axis],
        out_axes=tuple(sorted(perm_t[a] for a in out_axes)),
        activation=node.inputs[0],
        act_axis=act_axis,
    )
    return value, reader


def _rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def _geometry(
    node: ir.Node, init_shape: Sequence[int], perm: tuple[int, ...]
) -> tuple[int, tuple[int, ...], int] | str:
    """(reduction axis, output axes, activation channel axis), in the op's view, or why not."""
    rank = len(init_shape)
    if len(perm) != rank:
        return f"a Transpose perm of {len(perm)} axes on a weight of rank {rank}"
    op = node.op_type
    if op == "Conv":
        if rank < 3:
            return f"a Conv weight of rank {rank}"
        return 1, (0,), 1
    if op == "Gemm":
        if rank != 2:
            return f"a Gemm weight of rank {rank}"
        act_axis = 0 if plain_attr(node, "transA", 0) else 1
        return (1, (0,), act_axis) if plain_attr(node, "transB", 0) else (0, (1,), act_axis)
    if rank < 2:
        return "a MatMul with a vector weight"
    return rank - 2, tuple(a for a in range(rank) if a != rank - 2), -1


def _refuse_reader(reader: Reader, value: ir.Value, rules: Rules) -> Skip | None:
    node = reader.node
    tensor = value.const_value
    assert tensor is not None

    def refuse(reason: str, detail: str) -> Skip:
        return Skip(value.name or "", (node_label(node),), node.op_type, reason, detail)

    if rules.excluder.matches(node):
        return refuse("user", "excluded by the exclude option")
    if node.op_type == "Conv":
        groups = plain_attr(node, "group", 1) or 1
        view_shape = [int(tensor.shape[p]) for p in reader.perm]
        if groups > 1 and view_shape[1] == 1 and not rules.include_depthwise:
            return refuse("depthwise", f"depthwise Conv ({groups} groups of one channel)")
        if _reads_graph_input(node.inputs[0]) and not rules.include_first:
            return refuse("first-layer", "the first Conv reads the graph input (include_first)")
    return None


def _reads_graph_input(value: ir.Value | None) -> bool:
    while value is not None:
        if value.is_graph_input():
            return True
        producer = value.producer()
        if producer is None or not is_onnx_op(producer, *_PASS_THROUGH):
            return False
        value = producer.inputs[0]
    return False


def _check_weight(graph: ir.Graph, target: Target, rules: Rules) -> Skip | None:
    value = target.value
    tensor = value.const_value
    assert tensor is not None

    def refuse(reason: str, detail: str) -> Skip:
        return Skip(target.name, target.labels(), target.readers[0].node.op_type, reason, detail)

    if value.is_graph_output():
        return refuse("other-reader", "the weight is also a graph output")
    first_hops = {r.chain[0] if r.chain else r.node for r in target.readers}
    dequantize = [n for n in first_hops if is_onnx_op(n, "DequantizeLinear")]
    if tensor.dtype in _INT_TYPES:
        if len(first_hops) != 1 or len(dequantize) != 1:
            return refuse("dtype", f"{tensor.dtype.name} weight not read by one DequantizeLinear")
        target.dequantize = dequantize[0]
        if constant(target.dequantize.inputs[1]) is None:
            return refuse("dynamic-weight", "its DequantizeLinear scale is computed at run time")
    elif tensor.dtype not in _FLOAT_TYPES:
        return refuse("dtype", f"a {tensor.dtype.name} weight")
    other = _other_reader(value, target)
    if other is not None:
        return refuse("other-reader", other)
    axes = {(r.axis, r.out_axes) for r in target.readers}
    if len(axes) > 1:
        return refuse(
            "axis-conflict",
            "its readers reduce along different axes: "
            + ", ".join(f"{node_label(r.node)} axis {r.axis}" for r in target.readers),
        )
    if target.size < rules.min_params:
        return refuse("small", f"{target.size} elements (min_params {rules.min_params})")
    m = rules.group_size
    if m is not None and target.shape[target.axis] % m:
        return refuse(
            "not-multiple",
            f"reduction axis {target.axis} holds {target.shape[target.axis]}, not a multiple of {m}",
        )
    return None


def _other_reader(value: ir.Value, target: Target) -> str | None:
    """Why something other than the targets' weight inputs sees this value, or None."""
    readers = {id(r.node) for r in target.readers}
    chain_nodes = {id(n) for r in target.readers for n in r.chain}
    stack = [value]
    while stack:
        current = stack.pop()
        if current.is_graph_output():
            return f"'{current.name}' is a graph output"
        for user, index in current.uses():
            if id(user) in readers and index == 1:
                continue
            if id(user) in chain_nodes and index == 0:
                stack.extend(user.outputs[:1])
                continue
            return f"also read by {node_label(user)} (input {index})"
    return None

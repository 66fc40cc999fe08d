"""Dependency analysis: which channels of which tensors must be removed together.

Elements are (slot, index) pairs, a slot being one axis of one value (an activation, a
weight, a per-channel constant). Starting from the output channels of every Conv,
ConvTranspose, Gemm and MatMul with constant weights, the analysis visits the producer and
every consumer of each slot it reaches and asks that op's handler what the slot is tied to
(`handlers`); each answer ties elements of two slots one to one, at an offset (Concat, Split,
Slice) or in blocks (Flatten, Reshape, depthwise multipliers). The connected sets of elements
are the *channels*: removing one removes all its elements. Channels that touch exactly the
same slots in the same way form a *group*: the unit that gets a ratio, an importance ranking
and a rounding.

A slot is refused, with a sentence, when it is a graph input or output, is read inside an
If/Loop/Scan body, is read or produced by an op of another domain, an op without a handler,
an op the user excluded, or when a handler cannot prove the removal safe. Every group that
touches a refused slot is refused with those reasons.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from graphopt.passes.channels.handlers import HANDLERS, GraphView, Port, Visit, port_value
from graphopt.passes.channels.handlers.base import Dim, canonical, where
from graphopt.passes.channels.handlers.reshape import reshape_target
from graphopt.passes.channels.handlers.shape import expand_output
from graphopt.passes.cleanup.common import ONNX_DOMAINS, constant, node_label

_SOURCE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_MAX_ROUNDS = 32


@dataclass(eq=False)
class Slot:
    """One axis of one value, as far as the analysis reached it."""

    value: ir.Value
    axis: int
    size: int
    base: int  # element id of index 0
    refusals: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    roles: set[str] = field(default_factory=set)
    blocks: int = 1
    lossy: list[str] = field(default_factory=list)
    nodes: list[ir.Node] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.value.name or "?"

    @property
    def is_constant(self) -> bool:
        return constant(self.value) is not None

    def __repr__(self) -> str:
        return f"Slot({self.name}[axis {self.axis}], {self.size})"


@dataclass(eq=False)
class Group:
    """Channels removed together.

    Attributes:
        id: position in the analysis' list.
        members: for each slot the group touches, the slot's indices of every channel: an
            int array [channels, per-channel count] (per-channel count > 1 for blocks, e.g. a
            Flatten output holds H*W indices of each channel).
        sources: ops whose output channels these are (they lose compute when removed).
        consumers: ops that read these channels through constant weights.
        refusals: why these channels cannot be removed (empty: they can).
        lossy: why removing even all-zero channels changes the outputs (LayerNorm).
        block_of: the conv group of each channel when a grouped Conv reads or writes them
            (every conv group must keep the same number of channels), else None.
    """

    id: int
    members: dict[Slot, np.ndarray]
    sources: list[str]
    consumers: list[str]
    refusals: list[str]
    lossy: list[str]
    block_of: np.ndarray | None = None

    @property
    def channels(self) -> int:
        return int(next(iter(self.members.values())).shape[0])

    @property
    def prunable(self) -> bool:
        return not self.refusals

    def slots(self) -> list[Slot]:
        return list(self.members)

    def describe(self) -> dict[str, object]:
        """Plain data for `inspect --groups --json`."""
        return {
            "id": self.id,
            "channels": self.channels,
            "prunable": self.prunable,
            "sources": self.sources,
            "consumers": self.consumers,
            "tensors": [f"{s.name}[{s.axis}]" for s in self.members],
            "refusals": self.refusals,
            "lossy": self.lossy,
            "conv_groups": 1 if self.block_of is None else int(self.block_of.max()) + 1,
        }


@dataclass
class Analysis:
    groups: list[Group]
    slots: list[Slot]
    view: GraphView

    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]


def infer_shapes(model: ir.Model) -> dict[str, tuple[Dim, ...]]:
    """Every value's shape (ints, dim names) from ONNX shape inference on a copy.

    Reshape and Expand targets computed at run time (Shape -> Gather -> Concat) are then
    evaluated here (`shape_vector`), which ONNX's data propagation leaves unknown past a Div,
    a Where or a Cast, and gives only a fresh name where the dim is a product ([N, C, H, W]
    -> [N, C, -1] is H*W here, "unk__4" there). Inference then runs again on a fresh copy
    holding the evaluated outputs, so what follows them (an Add of two H*W token streams, the
    next block's reshapes) is inferred from them. The names ONNX invents are renamed after
    the first place they appear (`?value[axis]`), so they stay the same from round to round;
    a dim nobody can name gets a name of its own the same way, so a Shape of that value
    still matches it."""
    known: dict[str, tuple[tuple[Dim, ...], ir.TypeProtocol | None]] = {}
    shapes: dict[str, tuple[Dim, ...]] = {}
    # each round makes the next Reshape in a chain known (a transformer block reshapes from
    # the Shape of the previous block's output); stop when a round learns nothing
    for _ in range(_MAX_ROUNDS):
        clone = model.clone()
        for node in clone.graph:
            for out in node.outputs:
                if out.name in known:
                    dims, type_ = known[out.name]
                    out.shape = ir.Shape(list(dims))
                    out.type = out.type or type_  # a shape without a type is not written
        _infer(clone)
        _stable_names(clone)
        shapes = _collect(clone)
        refined = _refine(clone, shapes)
        if refined == known:
            break
        known = refined
    return shapes


def _infer(model: ir.Model) -> None:
    try:
        ShapeInferencePass(strict_mode=False)(model)
    except Exception:  # noqa: BLE001 - inference is best effort; declared shapes remain
        pass


_INVENTED = re.compile(r"unk__\d+")


def _stable_names(model: ir.Model) -> None:
    """Rename the dims ONNX inference invented ("unk__7") after the first value and axis
    that hold them; its counter depends on the whole graph, this does not."""
    values = [*model.graph.inputs, *(v for node in model.graph for v in node.outputs)]
    names: dict[str, str] = {}
    for value in values:
        for k, d in enumerate(value.shape or ()):
            text = getattr(d, "value", None)
            if isinstance(text, str) and _INVENTED.fullmatch(text) and text not in names:
                names[text] = f"?{value.name}[{k}]"
    if not names:
        return
    for value in values:
        if value.shape is None:
            continue
        dims = [getattr(d, "value", None) if not isinstance(d, int) else d for d in value.shape]
        if any(isinstance(d, str) and d in names for d in dims):
            value.shape = ir.Shape([names.get(d, d) if isinstance(d, str) else d for d in dims])


def _collect(model: ir.Model) -> dict[str, tuple[Dim, ...]]:
    shapes: dict[str, tuple[Dim, ...]] = {}
    values = [*model.graph.inputs, *(v for node in model.graph for v in node.outputs)]
    for value in values:
        if value.name and value.shape is not None:
            shapes[value.name] = _dims(value.shape, value.name)
    return shapes


def _refine(
    model: ir.Model, shapes: dict[str, tuple[Dim, ...]]
) -> dict[str, tuple[tuple[Dim, ...], ir.TypeProtocol | None]]:
    """Give Reshape and Expand outputs the dims their evaluated targets say (where inference
    has no number); returns them, with their types, by value name."""
    view = GraphView(model, shapes)
    refined: dict[str, tuple[tuple[Dim, ...], ir.TypeProtocol | None]] = {}
    for node in model.graph:
        if node.domain not in ONNX_DOMAINS or node.op_type not in ("Reshape", "Expand"):
            continue
        out = node.outputs[0]
        if not out.name:
            continue
        dims = (
            reshape_target(node, view) if node.op_type == "Reshape" else expand_output(node, view)
        )
        if isinstance(dims, str):
            continue
        old = shapes.get(out.name)
        if old is not None and len(old) == len(dims):
            dims = tuple(
                o if isinstance(o, int) or d is None else d for o, d in zip(old, dims, strict=True)
            )
        if any(d is None for d in dims):
            continue
        shapes[out.name] = tuple(dims)
        refined[out.name] = (tuple(dims), out.type or node.inputs[0].type)
    return refined


def _dims(shape: ir.Shape, name: str) -> tuple[Dim, ...]:
    return tuple(
        d
        if isinstance(d, int)
        else (canonical(d.value) if getattr(d, "value", None) else f"?{name}[{k}]")
        for k, d in enumerate(shape)
    )


class _Builder:
    def __init__(self, model: ir.Model, excluded: set[int], exclude_reason: str) -> None:
        self.graph = model.graph
        self.view = GraphView(model, infer_shapes(model))
        self.excluded = excluded
        self.exclude_reason = exclude_reason
        self.slots: dict[tuple[int, int], Slot] = {}
        self.order: list[Slot] = []
        self.size = 0
        self.edges_u: list[np.ndarray] = []
        self.edges_v: list[np.ndarray] = []
        self.queue: deque[Slot] = deque()

    # ------------------------------------------------------------------ slots

    def slot(self, value: ir.Value, axis: int) -> Slot | str:
        key = (id(value), axis)
        if key in self.slots:
            return self.slots[key]
        shape = self.view.shape(value)
        if shape is None or not 0 <= axis < len(shape):
            return f"the shape of '{value.name}' is unknown"
        size = shape[axis]
        if not isinstance(size, int):
            return f"the channel count of '{value.name}' (axis {axis}) is not fixed"
        slot = Slot(value, axis, size, self.size)
        self.size += size
        self.slots[key] = slot
        self.order.append(slot)
        self.queue.append(slot)
        return slot

    def tie(self, a: Slot, b: Slot, pairs: tuple[np.ndarray, np.ndarray] | None) -> str | None:
        if pairs is None:
            if a.size != b.size:
                return f"'{a.name}' and '{b.name}' have {a.size} and {b.size} channels"
            here = there = np.arange(a.size)
        else:
            here, there = (np.asarray(p, np.int64) for p in pairs)
        self.edges_u.append(a.base + here)
        self.edges_v.append(b.base + there)
        return None

    # ------------------------------------------------------------------ traversal

    def start(self) -> None:
        for node in self.graph:
            if node.domain not in ONNX_DOMAINS or node.op_type not in _SOURCE_OPS:
                continue
            rank = self.view.rank(node.outputs[0])
            if rank is None or rank < 2:
                continue
            axis = rank - 1 if node.op_type == "MatMul" else 1
            visit = HANDLERS[node.op_type].visit(node, ("out", 0), axis, self.view)
            if visit.source:
                self.slot(node.outputs[0], axis)

    def run(self) -> None:
        self.start()
        while self.queue:
            slot = self.queue.popleft()
            value = slot.value
            if value.is_graph_output():
                slot.refusals.append(f"'{value.name}' is a graph output")
            if value.is_graph_input():
                slot.refusals.append(f"'{value.name}' is a graph input")
            producer = value.producer()
            if producer is not None and not (
                producer.op_type == "Constant" and producer.domain in ONNX_DOMAINS
            ):
                self.visit(slot, producer, ("out", value.index() or 0))
            for use in value.uses():
                self.visit(slot, use.node, ("in", use.idx))

    def visit(self, slot: Slot, node: ir.Node, port: Port) -> None:
        if node.graph is not self.graph:
            slot.refusals.append(f"'{slot.name}' is used inside a subgraph (If/Loop/Scan body)")
            return
        if node.domain not in ONNX_DOMAINS:
            slot.refusals.append(f"{where(node)} is in the custom domain '{node.domain}'")
            return
        if id(node) in self.excluded:
            slot.refusals.append(f"{where(node)} is {self.exclude_reason}")
            return
        handler = HANDLERS.get(node.op_type)
        if handler is None:
            slot.refusals.append(f"no handler for {where(node)}")
            return
        visit: Visit = handler.visit(node, port, slot.axis, self.view)
        if visit.refusal is not None:
            slot.refusals.append(visit.refusal)
            return
        slot.nodes.append(node)
        label = f"{node.op_type} '{node_label(node)}'"
        if visit.source:
            slot.sources.append(label)
        if visit.consumer:
            slot.consumers.append(label)
        if visit.role:
            slot.roles.add(visit.role)
        if visit.lossy:
            slot.lossy.append(visit.lossy)
        slot.blocks = max(slot.blocks, visit.blocks)
        for link in visit.links:
            value = port_value(node, link.port)
            if value is None:
                continue
            target = self.slot(value, link.axis)
            if isinstance(target, str):
                slot.refusals.append(target)
                continue
            if link.role:
                target.roles.add(link.role)
            problem = self.tie(slot, target, link.pairs)
            if problem:
                slot.refusals.append(problem)

    # ------------------------------------------------------------------ groups

    def components(self) -> np.ndarray:
        """Component label of every element (the smallest element id in it)."""
        labels = np.arange(self.size)
        if not self.edges_u:
            return labels
        u = np.concatenate(self.edges_u)
        v = np.concatenate(self.edges_v)
        while True:
            low = np.minimum(labels[u], labels[v])
            before = labels.copy()
            np.minimum.at(labels, u, low)
            np.minimum.at(labels, v, low)
            while True:  # pointer jumping: every label points at a root
                jumped = labels[labels]
                if np.array_equal(jumped, labels):
                    break
                labels = jumped
            if np.array_equal(before, labels):
                return labels

    def groups(self) -> list[Group]:
        labels = self.components()
        # per component: which slots it touches with how many indices
        by_label: dict[int, list[tuple[int, int]]] = {}
        for s_index, slot in enumerate(self.order):
            ids = labels[slot.base : slot.base + slot.size]
            uniq, counts = np.unique(ids, return_counts=True)
            for label, count in zip(uniq.tolist(), counts.tolist(), strict=True):
                by_label.setdefault(label, []).append((s_index, count))
        by_signature: dict[tuple[tuple[int, int], ...], list[int]] = {}
        for label, signature in by_label.items():
            by_signature.setdefault(tuple(signature), []).append(label)
        groups = []
        for signature, comp_labels in sorted(by_signature.items(), key=lambda kv: min(kv[1])):
            comp_labels.sort()
            members: dict[Slot, np.ndarray] = {}
            for s_index, count in signature:
                slot = self.order[s_index]
                ids = labels[slot.base : slot.base + slot.size]
                positions = np.searchsorted(comp_labels, ids)
                positions = np.minimum(positions, len(comp_labels) - 1)
                hit = np.asarray(comp_labels)[positions] == ids
                index = np.nonzero(hit)[0]
                order = np.argsort(positions[index], kind="stable")
                members[slot] = index[order].reshape(len(comp_labels), count)
            groups.append(self._group(len(groups), members))
        return groups

    def _group(self, gid: int, members: dict[Slot, np.ndarray]) -> Group:
        slots = list(members)
        refusals = _unique(r for s in slots for r in s.refusals)
        sources = _unique(x for s in slots for x in s.sources)
        consumers = _unique(x for s in slots for x in s.consumers)
        lossy = _unique(x for s in slots for x in s.lossy)
        if not sources and not refusals:
            refusals.append("no Conv/Gemm/MatMul with constant weights computes these channels")
        block_of: np.ndarray | None = None
        for slot, index in members.items():
            if slot.blocks == 1:
                continue
            if index.size != slot.size:
                refusals.append(
                    f"'{slot.name}' is split into {slot.blocks} conv groups but holds channels "
                    "of several dependency groups"
                )
                continue
            per_block = slot.size // slot.blocks
            blocks = index[:, 0] // per_block
            if not np.all(index // per_block == blocks[:, None]):
                refusals.append(f"a channel of '{slot.name}' spans two conv groups")
                continue
            if block_of is None:
                block_of = blocks
            elif len(set(zip(block_of.tolist(), blocks.tolist(), strict=True))) != len(
                set(block_of.tolist())
            ):
                refusals.append("two grouped convolutions split these channels differently")
        return Group(gid, members, sources, consumers, refusals, lossy, block_of)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def analyze(
    model: ir.Model, excluded: Iterable[ir.Node] = (), reason: str = "excluded"
) -> Analysis:
    """Build the channel groups of `model`'s main graph (the model is not changed)."""
    builder = _Builder(model, {id(n) for n in excluded}, reason)
    builder.run()
    return Analysis(builder.groups(), builder.order, builder.view)

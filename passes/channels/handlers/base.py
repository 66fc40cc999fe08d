"""What a handler is: how channels flow through one ONNX op type, and how to rewrite the
constants of that op that encode channel counts.

The dependency analysis (`groups`) reaches a node through one of its ports (an input or an
output) on one axis, a *slot*, and asks the node's handler what else that slot is tied to.
The handler answers with a `Visit`: links to other ports' slots, each with an index map
(identity, or explicit pairs for offsets and blocks), or the reason it cannot prove that
removing channels on that slot is safe. A handler never guesses: an op or an attribute value
it does not understand is a refusal with a sentence a user can act on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

from graphopt.passes.cleanup.common import constant, node_label

Port = tuple[Literal["in", "out"], int]
Role = Literal["", "weight", "bn-scale"]
Dim = int | str | None
"""A dim: a known int, a symbol (a dim name, or a product of names such as "2*H*W"), None."""
Monomial = tuple[int, tuple[str, ...]]

_NOT_A_FACTOR = frozenset("()+- %^,")  # a sum or a call is one name


def monomial(dim: Dim) -> Monomial | None:
    """A dim as coefficient x sorted symbol names: 6 -> (6, ()), "W*H" -> (1, ("H", "W")).

    A name holding '*' between plain factors (ONNX Runtime's symbolic inference writes
    products so) is read as that product; any other name is one opaque symbol."""
    if dim is None:
        return None
    if isinstance(dim, int):
        return (dim, ())
    parts = dim.split("*")
    if len(parts) == 1 or any(not p or _NOT_A_FACTOR & set(p) for p in parts):
        return (1, (dim,))
    coef, names = 1, []
    for part in parts:
        if part.isdigit():
            coef *= int(part)
        else:
            names.append(part)
    return (coef, tuple(sorted(names)))


def dim_of(term: Monomial) -> Dim:
    """The canonical dim of a monomial: an int, or "coef*A*B" with names sorted."""
    coef, names = term
    if not names:
        return coef
    return "*".join(([str(coef)] if coef != 1 else []) + list(names))


def canonical(dim: Dim) -> Dim:
    term = monomial(dim)
    return None if term is None else dim_of(term)


def dim_product(dims: Iterable[Dim]) -> Dim:
    """The product of dims (None when one is unknown)."""
    coef, names = 1, []
    for dim in dims:
        term = monomial(dim)
        if term is None:
            return None
        coef *= term[0]
        names.extend(term[1])
    return dim_of((coef, tuple(sorted(names))))


def dim_quotient(a: Dim, b: Dim) -> Dim:
    """a / b when it is a whole dim for every value of the symbols, else None."""
    ta, tb = monomial(a), monomial(b)
    if ta is None or tb is None or tb[0] == 0 or ta[0] % tb[0]:
        return None
    rest = Counter(ta[1])
    rest.subtract(tb[1])
    if any(n < 0 for n in rest.values()):
        return None
    return dim_of((ta[0] // tb[0], tuple(sorted(rest.elements()))))


@dataclass
class Link:
    """The visited slot is tied to `axis` of the value at `port` of the same node.

    `pairs` is None for the identity map (index i here is index i there; the sizes must
    agree), or two equal-length index arrays (here, there): each pair is one tie. Indices of
    either slot that appear in no pair are not tied through this link.
    """

    port: Port
    axis: int
    pairs: tuple[np.ndarray, np.ndarray] | None = None
    role: Role = ""


@dataclass
class Visit:
    """A handler's answer for one slot.

    Attributes:
        links: slots of the same node tied to the visited one.
        refusal: why channels on the visited slot cannot be removed (None: they can).
        source: the visited slot holds output channels computed from constant weights here,
            so removing them removes compute (Conv/Gemm/MatMul outputs).
        consumer: the visited slot is read as input channels of a weighted op.
        role: what the visited slot is, if it is a constant the importance scorers read.
        blocks: the visited slot is split into this many equal blocks (grouped Conv) and
            every block must keep the same number of channels.
        lossy: why removing even all-zero channels here changes the outputs (a
            normalization over the channels), or None.
    """

    links: list[Link] = field(default_factory=list)
    refusal: str | None = None
    source: bool = False
    consumer: bool = False
    role: Role = ""
    blocks: int = 1
    lossy: str | None = None


def refuse(reason: str) -> Visit:
    return Visit(refusal=reason)


class GraphView:
    """What handlers may read about the graph: shapes (from shape inference on a copy),
    constants, the opset. Read-only."""

    def __init__(self, model: ir.Model, shapes: dict[str, tuple[Dim, ...]]) -> None:
        self.model = model
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self._shapes = shapes
        self._arrays: dict[int, tuple[ir.Value, ir.TensorProtocol | None, np.ndarray | None]] = {}

    def shape(self, value: ir.Value | None) -> tuple[Dim, ...] | None:
        if value is None:
            return None
        tensor = constant(value)
        if tensor is not None:
            return tuple(int(d) for d in tensor.shape)
        if value.name and value.name in self._shapes:
            return self._shapes[value.name]
        if value.shape is None:
            return None
        return tuple(
            d if isinstance(d, int) else (canonical(d.value) if d.value else None)
            for d in value.shape
        )

    def rank(self, value: ir.Value | None) -> int | None:
        shape = self.shape(value)
        return None if shape is None else len(shape)

    def array(self, value: ir.Value | None) -> np.ndarray | None:
        """The value as a numpy array when it is a constant (cached), else None."""
        if value is None:
            return None
        # keyed by id, holding the value too: a value made by a rewrite may reuse a freed id;
        # and its tensor: a pass may write new values into an initializer in place
        # (channels' compensation) after the analysis read it
        hit = self._arrays.get(id(value))
        if hit is None or hit[0] is not value or hit[1] is not value.const_value:
            tensor = constant(value)
            array = None if tensor is None else tensor.numpy()
            hit = self._arrays[id(value)] = (value, value.const_value, array)
        return hit[2]

    def ints(self, value: ir.Value | None) -> list[int] | None:
        """A constant integer vector (or scalar) as a list, else None."""
        array = self.array(value)
        if array is None or not np.issubdtype(array.dtype, np.integer):
            return None
        return [int(v) for v in array.reshape(-1)]

    def weight_like(self, value: ir.Value | None) -> bool:
        """A constant, or a DequantizeLinear of a constant (a quantized weight)."""
        if value is None:
            return False
        if constant(value) is not None:
            return True
        producer = value.producer()
        return (
            producer is not None
            and producer.op_type == "DequantizeLinear"
            and producer.domain in ("", "ai.onnx")
            and constant(producer.inputs[0]) is not None
        )


def port_value(node: ir.Node, port: Port) -> ir.Value | None:
    kind, index = port
    values = node.inputs if kind == "in" else node.outputs
    return values[index] if index < len(values) else None


def ints_attr(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    if attr is None or attr.is_ref():
        return None
    return [int(v) for v in attr.as_ints()]


def int_attr(node: ir.Node, name: str, default: int) -> int | None:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    if attr.is_ref() or attr.type != ir.AttributeType.INT:
        return None
    return int(attr.as_int())


def where(node: ir.Node) -> str:
    return f"{node.op_type} '{node_label(node)}'"


class Rewriter:
    """What a handler's `rewrite` may use: the removed indices of every slot and helpers to
    give a node a new constant input without touching other users of the old one."""

    def __init__(
        self,
        graph: ir.Graph,
        view: GraphView,
        removed: Callable[[ir.Value | None, int], np.ndarray],
        new_size: Callable[[ir.Value | None, int], int | None],
    ) -> None:
        self.graph = graph
        self.view = view
        self.removed = removed
        self.new_size = new_size
        #: constants a handler rewrote itself, which the generic slicing must leave alone
        self.claimed: set[int] = set()
        self._taken = {v.name for v in graph.initializers.values() if v.name}
        for node in graph:
            self._taken.update(v.name for v in node.outputs if v.name)

    def set_weight(self, value: ir.Value, array: np.ndarray) -> None:
        """Replace a constant used by one node only, sliced by its handler (not generically)."""
        self.claimed.add(id(value))
        replace_constant(value, array)

    def kept(self, value: ir.Value | None, axis: int, size: int) -> np.ndarray:
        return np.setdiff1d(np.arange(size), self.removed(value, axis))

    def _fresh(self, base: str) -> str:
        name, i = f"{base}_channels", 1
        while name in self._taken:
            i += 1
            name = f"{base}_channels_{i}"
        self._taken.add(name)
        return name

    def _initializer(self, array: np.ndarray, base: str) -> ir.Value:
        name = self._fresh(base)
        array = _contiguous(array)
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.shape = ir.Shape(array.shape)
        value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
        self.graph.register_initializer(value)
        return value

    def scale_output(self, node: ir.Node, factor: float) -> None:
        """Multiply `node`'s first output by `factor` for every reader (a new Mul after
        it); a graph output keeps its name."""
        out = node.outputs[0]
        dtype = _dtype(out)
        base = out.name or node.name or node.op_type
        scale = self._initializer(np.array(factor, dtype=dtype.numpy()), f"{base}_scale")
        scaled = ir.Value(name=self._fresh(base), shape=out.shape, type=out.type)
        if out.is_graph_output():
            out.name, scaled.name = scaled.name, out.name
        out.replace_all_uses_with(scaled, replace_graph_outputs=True)
        self.graph.insert_after(node, ir.node("Mul", [out, scale], outputs=[scaled]))

    def set_input(self, node: ir.Node, index: int, array: np.ndarray, base: str) -> None:
        """Give `node` a new constant at input `index` (the old one may be shared)."""
        value = self._initializer(array, base)
        old = node.inputs[index]
        node.replace_input_with(index, value)
        if (
            old is not None
            and old.is_initializer()
            and not old.uses()
            and not old.is_graph_output()
        ):
            if not old.is_graph_input() and old.name in self.graph.initializers:
                self.graph.initializers.pop(old.name)


class Handler:
    """How channels flow through one op type. Subclasses override `visit` and, where the op
    holds constants that encode channel counts, `rewrite`."""

    def visit(self, node: ir.Node, port: Port, axis: int, g: GraphView) -> Visit:
        raise NotImplementedError

    def rewrite(self, node: ir.Node, rw: Rewriter) -> None:
        """Rewrite attributes and count-encoding constants after channels were removed.
        Constant slots (weights, biases, per-channel parameters) are sliced generically."""
        del node, rw


def _dtype(value: ir.Value) -> ir.DataType:
    """The element type of a float value: declared, else that of the first input up the
    chain of producers (a Cast's `to`); intermediate values often carry no type."""
    seen: ir.Value | None = value
    while seen is not None:
        if seen.dtype is not None:
            return seen.dtype
        producer = seen.producer()
        if producer is None or not producer.inputs:
            break
        if producer.op_type == "Cast" and "to" in producer.attributes:
            return ir.DataType(producer.attributes["to"].as_int())
        seen = producer.inputs[0]
    raise ValueError(f"the element type of '{value.name}' is unknown")


def normalize_axis(axis: int, rank: int) -> int | None:
    if -rank <= axis < rank:
        return axis % rank
    return None


def replace_constant(value: ir.Value, array: np.ndarray) -> None:
    """Give an initializer or a Constant node's output new contents (same name and dtype)."""
    array = _contiguous(array)
    tensor = ir.tensor(array, name=value.name)
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant":
        producer.attributes["value"] = ir.AttrTensor("value", tensor)
    else:
        value.const_value = tensor
    value.shape = ir.Shape(array.shape)


def _contiguous(array: np.ndarray) -> np.ndarray:
    """C-contiguous with the same shape (np.ascontiguousarray turns a scalar into [x])."""
    return np.ascontiguousarray(array).reshape(np.shape(array))

"""Cleanup: lossless tidying that every later pass and every backend benefits from.

What it does, repeated until nothing changes:

- removes nodes, initializers, functions and opset imports that nothing uses, and unused
  optional outputs (onnx-ir's passes);
- removes Identity nodes, and Dropout nodes that run in inference mode (own rules, because
  onnx-ir's IdentityEliminationPass can rename a graph output away when one value feeds two
  outputs, and rewrites the declared shape of graph inputs);
- folds constant subgraphs with onnxscript's constant folder, bounded in size so it never
  loads a huge external tensor or grows the model, and never turns a graph output into an
  initializer (it becomes a Constant node instead);
- folds an inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm before it
  where that is exact;
- merges initializers with identical dtype, shape and bytes.

Lossless: outputs equal within float rounding. Preserves the names, types and shapes of the
graph inputs and outputs, and subgraphs (If, Loop, Scan). Models of IR version 3 get no
constant or BatchNormalization folding, because there every new weight would have to become a
graph input.

`CleanupPass.explain(model)` lists every BatchNormalization, Dropout and Identity a rule leaves
alone, with the reason (for `--explain`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

# onnxscript exports only the function; the class lets us bound and steer it (see below).
from onnxscript.optimizer._constant_folding import FOLDED_FROM_KEY, FoldConstantsPass

from graphopt.context import Context
from graphopt.model import Model
from graphopt.passes.base import Pass, PassResult, option, register_pass

# A fixed point is usually reached in two rounds; more means two rules undo each other.
_MAX_ROUNDS = 8
_ONNX_DOMAINS = ("", "ai.onnx")
_FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}
)
# Sampling ops: folding one would freeze a single draw. onnxscript skips most of them itself.
_RANDOM_OPS = frozenset(
    {
        "Bernoulli",
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
    }
)


@dataclass(frozen=True, kw_only=True)
class CleanupOptions:
    """Which cleanup rules run; unused-node, Identity and opset removal always do."""

    fold_constants: bool = option(
        True, "evaluate nodes whose inputs are all constants and keep the results as weights"
    )
    fold_batchnorm: bool = option(
        True,
        "fold inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm before it",
    )
    deduplicate: bool = option(True, "merge initializers with identical dtype, shape and bytes")
    remove_dropout: bool = option(True, "remove Dropout nodes that run in inference mode")
    fold_size_limit: int = option(
        1 << 20,
        "largest tensor (in elements) constant folding may read or create",
        range=(0, None),
    )


@dataclass(frozen=True)
class Refusal:
    """A node a rule left alone, and why (for `--explain`)."""

    node: str
    op_type: str
    rule: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op_type} '{self.node}' kept by {self.rule}: {self.reason}"


@register_pass
class CleanupPass(Pass[CleanupOptions]):
    """Removes dead and redundant nodes, folds constants and BatchNormalization.

    Changes: node and initializer counts, weights of Conv/ConvTranspose/Gemm that absorb a
    BatchNormalization. Preserves: graph input/output names, types and shapes; subgraphs.
    Lossless: outputs equal within float rounding.
    """

    name = "cleanup"
    options_type = CleanupOptions
    summary = "remove unused/Identity/Dropout nodes, fold constants and BatchNorm, dedupe weights"
    lossless = True

    def run(self, model: Model, ctx: Context) -> PassResult:
        del ctx  # needs no data
        m = model.ir
        opts = self.options
        warnings: list[str] = []
        # IR 3 requires every initializer to be a graph input: new weights would change the
        # model's signature, so the rules that create weights stay off there.
        can_add_weights = m.ir_version is None or m.ir_version >= 4
        if not can_add_weights and (opts.fold_constants or opts.fold_batchnorm):
            warnings.append(
                f"IR version {m.ir_version} model: constant and BatchNormalization folding "
                "skipped, because every new weight would have to become a graph input. "
                "Export with a newer IR version to enable them."
            )
        signature = _io_signature(m.graph)
        start = _fingerprint(m)
        nodes, initializers = _count_nodes(m), _count_initializers(m)
        stats: Counter[str] = Counter()
        reported = False
        for _ in range(_MAX_ROUNDS):
            stats["rounds"] += 1
            before = _fingerprint(m)
            reported |= self._round(m, stats, can_add_weights)
            if _fingerprint(m) == before:
                break
        else:
            warnings.append(f"cleanup still changed the model after {_MAX_ROUNDS} rounds")
        if opts.deduplicate:
            # Once, after the rounds: it reads every weight, and merging enables no other rule.
            before = _count_initializers(m)
            reported |= _deduplicate(m)
            stats["initializers_deduplicated"] = before - _count_initializers(m)
            reported |= _remove_unused(m, stats)
        _restore_io(m.graph, signature)
        stats["nodes_removed"] = nodes - _count_nodes(m)
        stats["initializers_removed"] = initializers - _count_initializers(m)
        stats["batchnorms_kept"] = sum(
            1 for node, _ in _nodes_with_opset(m) if node.op_type == "BatchNormalization"
        )
        modified = reported or _fingerprint(m) != start
        return PassResult(modified=modified, stats=dict(stats), warnings=warnings)

    def _round(self, m: ir.Model, stats: Counter[str], can_add_weights: bool) -> bool:
        """One round of every enabled rule; True if any of them reported a change."""
        opts = self.options
        modified = _remove_unused(m, stats)
        if opts.remove_dropout:
            count = _bypass_all(m, "Dropout")
            stats["dropouts_removed"] += count
            modified |= count > 0
        count = _bypass_all(m, "Identity")
        stats["identities_removed"] += count
        modified |= count > 0
        if opts.fold_constants and can_add_weights:
            before = _count_nodes(m)
            lifted = ir_passes.LiftConstantsToInitializersPass()(m).modified
            folded = _fold_constants(m, opts.fold_size_limit)
            stats["constants_folded"] += before - _count_nodes(m)
            modified |= lifted or folded
            modified |= _remove_unused(m, stats)
        if opts.fold_batchnorm and can_add_weights:
            count = _fold_batchnorms(m)
            stats["batchnorms_folded"] += count
            modified |= count > 0
        modified |= _remove_unused(m, stats)
        opsets = _count_opsets(m)
        modified |= ir_passes.RemoveUnusedOpsetsPass()(m).modified
        stats["opsets_removed"] += opsets - _count_opsets(m)
        return modified

    def explain(self, model: Model) -> list[Refusal]:
        """Every BatchNormalization, Dropout and Identity the rules would leave alone, and why."""
        m = model.ir
        main_graph_nodes = {id(n) for n in ir.traversal.RecursiveGraphIterator(m.graph)}
        refusals = []
        for node, opset in _nodes_with_opset(m):
            if node.domain not in _ONNX_DOMAINS:
                continue
            reason, rule = None, ""
            if node.op_type == "BatchNormalization" and self.options.fold_batchnorm:
                if id(node) in main_graph_nodes:
                    match = _match_batchnorm(node, opset)
                    reason = match if isinstance(match, str) else None
                else:
                    reason = "it is inside a function body"
                rule = "fold-batchnorm"
            elif node.op_type == "Dropout" and self.options.remove_dropout:
                reason, rule = _dropout_refusal(node, opset), "remove-dropout"
            elif node.op_type == "Identity":
                reason, rule = _bypass_refusal(node), "remove-identity"
            if reason is not None:
                refusals.append(Refusal(_node_label(node), node.op_type, rule, reason))
        return refusals


# ---------------------------------------------------------------------------- bookkeeping


def _count_nodes(m: ir.Model) -> int:
    return sum(1 for graph in m.graphs() for _ in graph) + sum(
        1 for f in m.functions.values() for _ in f
    )


def _count_initializers(m: ir.Model) -> int:
    return sum(len(graph.initializers) for graph in m.graphs())


def _count_opsets(m: ir.Model) -> int:
    return len(m.opset_imports) + sum(len(f.opset_imports) for f in m.functions.values())


def _fingerprint(m: ir.Model) -> int:
    """A hash of everything a rule can change except tensor bytes (which only change together
    with an initializer's name)."""
    parts: list[Any] = [tuple(sorted(m.opset_imports.items())), tuple(m.functions)]
    graphs: list[ir.Graph | ir.Function] = [*m.graphs(), *m.functions.values()]
    for graph in graphs:
        parts.append(tuple(v.name for v in graph.inputs))
        parts.append(tuple(v.name for v in graph.outputs))
        if isinstance(graph, ir.Graph):
            parts.append(tuple(graph.initializers))
        for node in graph:
            parts.append(
                (
                    node.domain,
                    node.op_type,
                    node.name,
                    tuple(None if v is None else v.name for v in node.inputs),
                    tuple(v.name for v in node.outputs),
                    tuple(node.attributes),
                )
            )
    return hash(tuple(parts))


def _io_signature(graph: ir.Graph) -> tuple[list[Any], list[Any]]:
    def spec(v: ir.Value) -> tuple[str | None, ir.TypeProtocol | None, ir.Shape | None]:
        return v.name, v.type, None if v.shape is None else v.shape.copy()

    return [spec(v) for v in graph.inputs], [spec(v) for v in graph.outputs]


def _restore_io(graph: ir.Graph, signature: tuple[list[Any], list[Any]]) -> None:
    """Put back declared types and shapes of graph inputs and outputs.

    The folder and shape merging may refine them (e.g. copy an inner value's static shape onto
    a dynamic graph input); the model's contract must not change.
    """
    for values, specs in ((graph.inputs, signature[0]), (graph.outputs, signature[1])):
        for value, (name, type_, shape) in zip(values, specs, strict=True):
            if value.name != name:
                raise RuntimeError(f"cleanup renamed graph value {name!r} to {value.name!r}")
            value.type = type_
            value.shape = shape


def _node_label(node: ir.Node) -> str:
    return node.name or f"{node.op_type} -> {node.outputs[0].name if node.outputs else '?'}"


def _nodes_with_opset(m: ir.Model, *, functions: bool = True) -> Iterator[tuple[ir.Node, int]]:
    """Every node of the model, subgraphs (and functions) included, with its ONNX opset."""
    main = m.opset_imports.get("", m.opset_imports.get("ai.onnx", 1))
    for node in ir.traversal.RecursiveGraphIterator(m.graph):
        yield node, main
    if not functions:
        return
    for function in m.functions.values():
        opset = function.opset_imports.get("", main)
        for node in ir.traversal.RecursiveGraphIterator(function):
            yield node, opset


def _constant(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The value's tensor if it is fixed: an initializer users cannot feed, or a Constant."""
    if value is None or value.is_graph_input():
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:  # a malformed Constant node
        return None


def _int_attr(node: ir.Node, name: str, default: int) -> int | None:
    """An int attribute, or None when it is a function-attribute reference or not an int."""
    attr = node.attributes.get(name)
    if attr is None:
        return default
    if attr.is_ref() or attr.type != ir.AttributeType.INT:
        return None
    return attr.as_int()


def _float_attr(node: ir.Node, name: str, default: float) -> float | None:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    if attr.is_ref() or attr.type != ir.AttributeType.FLOAT:
        return None
    return attr.as_float()


# ---------------------------------------------------------------------------- unused


def _remove_unused(m: ir.Model, stats: Counter[str]) -> bool:
    modified = ir_passes.RemoveUnusedNodesPass()(m).modified
    functions = len(m.functions)
    modified |= ir_passes.RemoveUnusedFunctionsPass()(m).modified
    stats["functions_removed"] += functions - len(m.functions)
    return modified


def _deduplicate(m: ir.Model) -> bool:
    """onnx-ir's hashing deduplication, run only where two initializers could be equal.

    It reads every weight: skip that when no two initializers of a graph share dtype and
    shape, and unmap external weights it mapped, so a big model's pages do not stay mapped.
    """
    collide = False
    for graph in m.graphs():
        keys = Counter(
            (v.const_value.dtype, tuple(v.const_value.shape.numpy()))
            for v in graph.initializers.values()
            if v.const_value is not None
        )
        collide |= any(n > 1 for n in keys.values())
    if not collide:
        return False
    unmapped = [
        v.const_value
        for graph in m.graphs()
        for v in graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor) and v.const_value.raw is None
    ]
    modified = ir_passes.DeduplicateHashedInitializersPass()(m).modified
    for tensor in unmapped:
        tensor.release()
    return modified


# ---------------------------------------------------------------------------- Identity, Dropout


def _bypass_refusal(node: ir.Node) -> str | None:
    """Why `y = op(x)` cannot be replaced by `x` itself (None when it can)."""
    if not node.inputs or node.inputs[0] is None or not node.outputs:
        return "it has no input"
    x, y = node.inputs[0], node.outputs[0]
    if not y.is_graph_output():
        return None
    if x.is_graph_input() or x.is_initializer():
        return "it passes a graph input or weight straight to a graph output"
    if x.is_graph_output():
        return "its input is already a graph output under another name"
    producer = x.producer()
    if producer is None or producer.graph is not node.graph:
        return "its input comes from an enclosing graph"
    return None


def _dropout_refusal(node: ir.Node, opset: int) -> str | None:
    """Why a Dropout is not an identity here (None when it is)."""
    mask = node.outputs[1] if len(node.outputs) > 1 else None
    if mask is not None and (mask.uses() or mask.is_graph_output()):
        return "its mask output is used"
    if opset < 7 and _int_attr(node, "is_test", 0) != 1:
        return f"Dropout-{opset} without is_test=1 runs in training mode"
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is not None:
        tensor = _constant(training)
        if tensor is None:
            return "its training_mode is not a constant"
        if np.asarray(tensor.numpy()).any():
            return "its training_mode is true"
    return _bypass_refusal(node)


def _bypass_all(m: ir.Model, op_type: str) -> int:
    """Replace every removable `op_type` node (Identity or Dropout) by its input."""
    count = 0
    candidates = [
        (node, opset)
        for node, opset in _nodes_with_opset(m)
        if node.op_type == op_type and node.domain in _ONNX_DOMAINS
    ]
    for node, opset in candidates:
        if op_type == "Dropout":
            reason = _dropout_refusal(node, opset)
        else:
            reason = _bypass_refusal(node)
        if reason is None:
            _bypass(node)
            count += 1
    return count


def _bypass(node: ir.Node) -> None:
    graph = node.graph
    assert graph is not None
    x, y = node.inputs[0], node.outputs[0]
    assert x is not None
    output = y.is_graph_output()
    name, type_, shape = y.name, y.type, y.shape
    ir.convenience.replace_all_uses_with(y, x, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    if output:
        # x now stands for the graph output: it takes the output's name and declared type.
        x.name = name
        if type_ is not None:
            x.type = type_
        if shape is not None:
            x.shape = shape


# ---------------------------------------------------------------------------- constants


# Dropout belongs to the remove_dropout rule. onnxscript's sequence rewrites emit opset-13
# Split/Unsqueeze whatever the model's opset, and its CastLike -> Cast rewrite drops
# `saturate` (all three found by the backend corpus test).
_NOT_FOLDED = frozenset({"Dropout", "SplitToSequence", "ConcatFromSequence"})


def _not_folded(node: ir.Node) -> bool:
    if node.domain not in _ONNX_DOMAINS:
        return False
    return node.op_type in _NOT_FOLDED or (
        node.op_type == "CastLike" and "saturate" in node.attributes
    )


class _BoundedFolder(FoldConstantsPass):
    """onnxscript's constant folder, steered away from what this pass must not do.

    It leaves alone the ops in `_not_folded` (Dropout is the `remove_dropout` rule's, so the
    option means what it says), turns a folded graph output into a Constant node rather than
    an initializer (every graph output stays produced by a node, as in the input model), and
    treats an evaluator that raises as "not foldable" rather than failing the pass.
    """

    def process_node(self, node: ir.Node, is_function: bool) -> Any:
        if _not_folded(node):
            return None
        # onnxscript emits Constant nodes instead of initializers inside functions.
        as_constant = is_function or any(out.is_graph_output() for out in node.outputs)
        try:
            return super().process_node(node, is_function=as_constant)
        except RuntimeError:
            # An evaluator that trips over an unusual node: leave that node as it is.
            return None


def _fold_constants(m: ir.Model, size_limit: int) -> bool:
    def should_fold(node: ir.Node) -> bool | None:
        if node.op_type in _RANDOM_OPS:
            return False
        for value in node.inputs:
            tensor = None if value is None else value.const_value
            if tensor is not None and tensor.size > size_limit:
                # onnxscript would still fold a Transpose of a huge weight; reading it into
                # memory is what this bound is for.
                return False
        return None

    folder = _BoundedFolder(
        shape_inference=False,
        input_size_limit=size_limit,
        output_size_limit=size_limit,
        should_fold=should_fold,
    )
    with np.errstate(all="ignore"):  # folding NaN or inf is fine; numpy's warnings are noise
        modified = folder(m).modified
    if modified:
        _forget_provenance(m)
        _contiguous_initializers(m)
        if m.opset_imports.get("", 1) < 12:
            _constants_as_tensors(m)
    return modified


def _forget_provenance(m: ir.Model) -> None:
    """Drop the "folded from" notes onnxscript writes into every folded value's metadata: a
    cleanup should not leave new text in the model file."""
    for graph in m.graphs():
        values = [*graph.initializers.values(), *(out for node in graph for out in node.outputs)]
        for value in values:
            value.metadata_props.pop(FOLDED_FROM_KEY, None)


def _contiguous_initializers(m: ir.Model) -> None:
    """Folded results can be numpy views (a Transpose); onnx-ir's hashing deduplication needs
    C-contiguous buffers."""
    for graph in m.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.Tensor) and isinstance(tensor.raw, np.ndarray):
                if not tensor.raw.flags.c_contiguous:
                    value.const_value = ir.Tensor(
                        np.ascontiguousarray(tensor.raw), dtype=tensor.dtype, name=tensor.name
                    )


def _constants_as_tensors(m: ir.Model) -> None:
    """Rewrite Constant(value_ints=...) and friends, which the folder emits for shapes, as
    Constant(value=tensor): before opset 12 `value` is the only attribute Constant has."""
    for node in ir.traversal.RecursiveGraphIterator(m.graph):
        if node.op_type != "Constant" or node.domain not in _ONNX_DOMAINS:
            continue
        if set(node.attributes) <= {"value", "sparse_value"}:
            continue
        tensor = _constant(node.outputs[0])
        if tensor is not None:
            node.attributes.clear()
            node.attributes["value"] = ir.AttrTensor("value", tensor)


# ---------------------------------------------------------------------------- BatchNormalization


@dataclass
class _BatchNormMatch:
    bn: ir.Node
    producer: ir.Node
    params: tuple[ir.TensorProtocol, ...]  # scale, bias, mean, variance
    epsilon: float
    weight: ir.TensorProtocol
    bias: ir.TensorProtocol | None  # Conv/ConvTranspose bias or Gemm C


_BN_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")
_BN_PARAMS = ("scale", "bias", "mean", "variance")


def _match_batchnorm(bn: ir.Node, opset: int) -> _BatchNormMatch | str:
    """Check that `bn` can be folded exactly into its producer; a string says why not."""
    if opset < 7:
        return f"BatchNormalization-{opset} (before opset 7) is not folded"
    if _int_attr(bn, "spatial", 1) != 1:
        return "spatial=0 normalizes every element, not every channel"
    if _int_attr(bn, "training_mode", 0) != 0:
        return "it runs in training mode"
    if any(out.name for out in bn.outputs[1:]):
        return "it also returns batch statistics (training mode)"
    epsilon = _float_attr(bn, "epsilon", 1e-5)
    if epsilon is None:
        return "its epsilon is not a plain float"
    x = bn.inputs[0] if bn.inputs else None
    producer = None if x is None else x.producer()
    if x is None or producer is None:
        return "its input is a graph input or a weight"
    if producer.graph is not bn.graph:
        return "its input comes from an enclosing graph"
    if producer.op_type not in _BN_PRODUCERS or producer.domain not in _ONNX_DOMAINS:
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
        tensor = _constant(value)
        if tensor is None:
            where = (
                "a graph input"
                if value is not None and value.is_graph_input()
                else "not a constant"
            )
            return f"its {label} is {where}"
        if tensor.dtype not in _FLOAT_TYPES:
            return f"its {label} has type {tensor.dtype}"
        params.append(tensor)
    channels = params[0].shape.numpy()
    if len(channels) != 1 or any(t.shape.numpy() != channels for t in params):
        return "its scale, bias, mean and variance are not vectors of one length"
    refusal = _producer_refusal(producer, opset, channels[0])
    if refusal is not None:
        return refusal
    weight = _constant(producer.inputs[1])
    assert weight is not None
    bias = _constant(producer.inputs[2]) if len(producer.inputs) > 2 else None
    return _BatchNormMatch(bn, producer, tuple(params), epsilon, weight, bias)


def _producer_refusal(producer: ir.Node, opset: int, channels: int) -> str | None:
    kind = producer.op_type
    if len(producer.inputs) < 2 or (weight := _constant(producer.inputs[1])) is None:
        return f"the {kind} weight is not a constant"
    if weight.dtype not in _FLOAT_TYPES:
        return f"the {kind} weight has type {weight.dtype}"
    bias_value = producer.inputs[2] if len(producer.inputs) > 2 else None
    bias = _constant(bias_value)
    if bias_value is not None and bias is None:
        return f"the {kind} bias is not a constant"
    if bias is not None and bias.dtype != weight.dtype:
        return f"the {kind} bias and weight differ in type"
    shape = weight.shape.numpy()
    if kind == "Conv":
        if len(shape) < 3 or shape[0] != channels:
            return f"the Conv weight {list(shape)} does not have {channels} output channels"
    elif kind == "ConvTranspose":
        group = _int_attr(producer, "group", 1)
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
        trans_b = _int_attr(producer, "transB", 0)
        if trans_b is None or _float_attr(producer, "beta", 1.0) is None:
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


def _fold_batchnorms(m: ir.Model) -> int:
    names = _all_value_names(m)
    count = 0
    # Function bodies are left out: they hold no initializers to fold into.
    candidates = [
        (node, opset)
        for node, opset in _nodes_with_opset(m, functions=False)
        if node.op_type == "BatchNormalization" and node.domain in _ONNX_DOMAINS
    ]
    for node, opset in candidates:
        match = _match_batchnorm(node, opset)
        if isinstance(match, _BatchNormMatch) and _fold_batchnorm(match, names):
            count += 1
    return count


def _fold_batchnorm(match: _BatchNormMatch, names: set[str]) -> bool:
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
    if kind == "Conv":
        w = w * factor.reshape((-1,) + (1,) * (w.ndim - 1))
        b = old_bias * factor + shift
    elif kind == "ConvTranspose":
        group = _int_attr(producer, "group", 1) or 1
        cin, per_group, *kernel = w.shape
        grouped = w.reshape(group, cin // group, per_group, *kernel)
        w = (grouped * factor.reshape(group, 1, per_group, *[1] * len(kernel))).reshape(w.shape)
        b = old_bias * factor + shift
    else:  # Gemm: alpha·A·(B·f) + (beta·C·f + shift), with beta set to 1
        beta = _float_attr(producer, "beta", 1.0)
        assert beta is not None
        w = w * (factor[:, None] if _int_attr(producer, "transB", 0) else factor[None, :])
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
    producer.replace_input_with(1, _new_initializer(graph, f"{base}_weight_bn", new_w, names))
    if len(producer.inputs) < 3:
        producer.resize_inputs(3)
    producer.replace_input_with(2, _new_initializer(graph, f"{base}_bias_bn", new_b, names))
    # The producer now computes what the BatchNormalization did: give it the BN's output.
    y, z = producer.outputs[0], bn.outputs[0]
    name, type_, shape = z.name, z.type, z.shape
    ir.convenience.replace_all_uses_with(z, y, replace_graph_outputs=True)
    graph.remove(bn, safe=True)
    y.name = name
    if type_ is not None:
        y.type = type_
    if shape is not None:
        y.shape = shape
    return True


def _all_value_names(m: ir.Model) -> set[str]:
    names: set[str] = set()
    for graph in m.graphs():
        names.update(v.name for v in graph.inputs if v.name)
        names.update(graph.initializers)
        for node in graph:
            names.update(v.name for v in node.outputs if v.name)
    return names


def _new_initializer(graph: ir.Graph, base: str, array: np.ndarray, names: set[str]) -> ir.Value:
    name, suffix = base, 1
    while name in names:
        suffix += 1
        name = f"{base}_{suffix}"
    names.add(name)
    tensor = ir.tensor(array, name=name)
    value = ir.Value(
        name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor
    )
    graph.register_initializer(value)
    return value

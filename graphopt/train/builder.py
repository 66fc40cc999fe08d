"""Reverse-mode builder: a model becomes a training graph of standard ONNX ops.

The training graph holds the forward graph unchanged, the loss subgraph, and the backward
subgraph. The trainable initializers become graph inputs (so the optimizer can change them
between steps without rebuilding the session); the outputs are the loss and one gradient per
trainable, named `grad.<trainable>`. Any ONNX runtime runs it; graphopt runs it on ONNX
Runtime (graphopt.train.session).

Backward: the nodes are visited in reverse order; a node whose outputs received gradients
and which has an input that depends on a trainable calls its op's rule
(graphopt.train.rules), which emits only the input gradients that are needed. Several
contributions to one tensor are summed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt.errors import GraphoptError
from graphopt.model import Model
from graphopt.train.graph import FLOAT_TYPES, Emitter, GradientError, Shape
from graphopt.train.losses import Loss, emit_losses
from graphopt.train.qat import QuantizedWeight, unfold
from graphopt.train.rules import RULES, differentiable
from graphopt.train.rules.quant import STRAIGHT_THROUGH

# ONNX Runtime 1.31 loads IR versions up to 10 (onnx 1.23 writes 11 and more by default).
MAX_IR_VERSION = 10
MIN_OPSET = 13  # single-axis Softmax, axes as inputs of ReduceSum/Squeeze/Unsqueeze, Split
CONTROL_FLOW = {"If", "Loop", "Scan", "SequenceMap"}
LOSS = "loss"
GRAD_PREFIX = "grad."

# Ops whose first output has the element type of input 0 (and, for the first set, its shape
# too). ONNX shape inference leaves some of them untyped (GroupNormalization at opset 18/21
# in onnx 1.x); without a type the builder cannot tell a float output from an integer one.
SAME_SHAPE_AS_INPUT0 = frozenset({
    "Abs", "BatchNormalization", "Clip", "Erf", "Exp", "Gelu", "GroupNormalization",
    "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization", "LayerNormalization",
    "LeakyRelu", "Log", "LogSoftmax", "Neg", "Reciprocal", "Relu", "Sigmoid", "Softmax",
    "Sqrt", "Tanh",
})  # fmt: skip
SAME_TYPE_AS_INPUT0 = SAME_SHAPE_AS_INPUT0 | {
    "Add", "AveragePool", "Concat", "Conv", "ConvTranspose", "Div", "Flatten", "Gather",
    "GatherElements", "Gemm", "GlobalAveragePool", "MatMul", "Max", "MaxPool", "Min", "Mul",
    "Pad", "Pow", "ReduceMean", "ReduceSum", "Reshape", "Resize", "Slice", "Split", "Squeeze",
    "Sub", "Sum", "Transpose", "Unsqueeze",
}  # fmt: skip


@dataclass
class TrainingGraph:
    """A model's training graph and how to feed it.

    Attributes:
        proto: the training graph (IR version pinned for ONNX Runtime).
        loss: the name of the scalar loss output.
        gradients: trainable name -> name of its gradient output.
        initial: trainable name -> its value in the model (the first feed).
        data_inputs: the model's own inputs, fed as for inference.
        loss_inputs: the inputs the losses add (targets, labels, teacher logits).
        outputs: extra model tensors exposed as outputs (e.g. logits for metrics).
        quantized: the trainables that are float shadows of integer initializers (QAT,
            graphopt.train.qat), with what turns them back into integers.
        frozen_quantized: integer weights behind a DequantizeLinear left untrained, with
            the reason.
        untied: Identity output -> the initializer it copied (`untie_identities`): in the
            training graph the output is an initializer of its own (trainable when chosen).
    """

    proto: onnx.ModelProto
    loss: str
    gradients: dict[str, str]
    initial: dict[str, np.ndarray]
    data_inputs: list[str]
    loss_inputs: list[str]
    outputs: list[str] = field(default_factory=list)
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    frozen_quantized: dict[str, str] = field(default_factory=dict)
    untied: dict[str, str] = field(default_factory=dict)

    @property
    def trainables(self) -> list[str]:
        return list(self.gradients)


def build_training_graph(
    model: Model,
    losses: Sequence[Loss],
    *,
    trainables: Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int | str]] | None = None,
    outputs: Sequence[str] = (),
    qat: bool | None = None,
    untie_identities: bool = True,
) -> TrainingGraph:
    """Build the forward + loss + backward graph of `model` (which is not modified).

    Args:
        model: the model to train.
        losses: the loss terms; their weighted sum is the loss.
        trainables: initializers to train (default: every float initializer with more than
            one element that feeds a differentiable input: weights, biases, BatchNorm
            scale and bias, but not running statistics or scalar constants).
        input_shapes: fixed shapes for graph inputs whose dims are dynamic (Conv and pool
            gradients need static spatial sizes; the batch may stay dynamic).
        outputs: model tensors to expose beside the loss and gradients.
        qat: quantization-aware training of the integer weights behind DequantizeLinear
            nodes (graphopt.train.qat): each one named in `trainables`, or all of them when
            `trainables` is None, becomes a float shadow trained through a QuantizeLinear by
            the straight-through estimator. None (the default) does so where there are such
            weights; True also fails when there are none; False never does.
        untie_identities: give every `Identity(initializer)` its own copy of the value, as
            an initializer named after the Identity's output (recorded in
            `TrainingGraph.untied`). torch.onnx.export deduplicates identical initializers
            (fresh BatchNorm ones and zeros) behind Identity nodes; untied, distinct weights
            train separately and frozen statistics that shared a trained weight's value stay
            frozen. False trains a shared value as one tensor (its gradient the sum over its
            uses).

    Raises:
        GradientError: an op without a gradient rule on the path from a trainable to the loss,
            control flow or a custom domain, an unknown shape a rule needs.
        GraphoptError: bad losses, trainables or input shapes.
    """
    if not losses:
        raise GraphoptError("A training graph needs at least one loss.")
    for loss in losses:
        loss.check()
    proto = _prepared_proto(model, input_shapes)
    graph = proto.graph
    _refuse_graph_level(graph)
    untied = _untie_identities(graph) if untie_identities else {}
    quantized, frozen_quantized = unfold(
        proto, requested=trainables, qat=qat, prefix=_free_prefix("qat", _all_names(graph))
    )
    inits = {t.name: t for t in graph.initializer}
    chosen = _choose_trainables(graph, inits, trainables)
    chosen += [name for name in quantized if name not in chosen]
    elem_type = _elem_type(chosen, inits)
    initial = {name: numpy_helper.to_array(inits[name]) for name in chosen}

    # Trainables become graph inputs; the rest stay constants the rules may read.
    kept = [t for t in graph.initializer if t.name not in initial]
    consts = {t.name: numpy_helper.to_array(t) for t in kept}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
    data_inputs = [v for v in graph.input if v.name not in inits]
    trainable_inputs = [
        helper.make_tensor_value_info(name, inits[name].data_type, list(inits[name].dims))
        for name in chosen
    ]
    shapes, types = _infer(proto)
    for name in [loss.output for loss in losses] + list(outputs):
        if name not in shapes:
            raise GraphoptError(
                f"The model has no tensor '{name}' to compute a loss on or to expose.",
                hint=f"Its outputs are {', '.join(v.name for v in graph.output)}.",
            )
    opset = _opset(proto)
    names = _all_names(graph)
    loss_em = Emitter(
        opset=opset, elem_type=elem_type, shapes=shapes, types=types, consts=consts,
        prefix=_free_prefix("loss", names),
    )  # fmt: skip
    total, loss_inputs = emit_losses(loss_em, list(losses), shapes)
    clash = [v.name for v in loss_inputs if v.name in names]
    if clash:
        raise GraphoptError(
            f"The loss input name(s) {', '.join(clash)} are already used in the model.",
            hint="Name the loss inputs with Loss(target=...).",
        )
    forward = list(graph.node) + loss_em.nodes + [helper.make_node("Identity", [total], [LOSS])]
    extra_outputs = [
        helper.make_tensor_value_info(name, types.get(name, elem_type), None) for name in outputs
    ]

    # Shapes of the forward graph with the losses, for the rules.
    staged = helper.make_graph(
        forward,
        graph.name,
        data_inputs + trainable_inputs + loss_inputs,
        [helper.make_tensor_value_info(LOSS, elem_type, [])],
        kept + loss_em.initializers,
    )
    staged_model = helper.make_model(staged, opset_imports=list(proto.opset_import))
    staged_model.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    shapes, types = _infer(staged_model)
    forward = list(staged_model.graph.node)

    relevant = _relevant(forward, LOSS)
    active = _active(forward, set(initial), types, relevant)
    _refuse_unsupported(forward, active, relevant)

    em = Emitter(
        opset=opset, elem_type=elem_type, shapes=shapes, types=types, consts=consts,
        prefix=_free_prefix("grad", names),
    )  # fmt: skip
    em.producers = {out: node for node in forward for out in node.output if out}
    for node in forward:
        for name in node.input:
            em.consumers[name] = em.consumers.get(name, 0) + 1
    em.active = active
    grads: dict[str, list[str]] = {LOSS: [em.const(1.0)]}
    for node in reversed(forward):
        dys = [em.add_all(grads[o]) if grads.get(o) else None for o in node.output]
        if all(d is None for d in dys):
            continue
        needed = [
            bool(name) and name in active and differentiable(node.op_type, i)
            for i, name in enumerate(node.input)
        ]
        if not any(needed):
            continue
        em.node = node
        results = list(RULES[node.op_type](em, node, dys, needed))
        results += [None] * (len(node.input) - len(results))  # rules may omit trailing Nones
        em.node = None
        for name, grad, need in zip(node.input, results, needed, strict=True):
            if need and grad is not None:
                grads.setdefault(name, []).append(grad)

    gradients: dict[str, str] = {}
    grad_outputs = []
    for name in chosen:
        out = f"{GRAD_PREFIX}{name}"
        contributions = grads.get(name)
        # A trainable that does not reach the loss gets a zero gradient.
        value = em.add_all(contributions) if contributions else em.zeros_like(name)
        em.nodes.append(helper.make_node("Identity", [value], [out]))
        gradients[name] = out
        grad_outputs.append(
            helper.make_tensor_value_info(out, inits[name].data_type, list(inits[name].dims))
        )

    nodes = forward + em.nodes
    outs = [helper.make_tensor_value_info(LOSS, elem_type, [])] + grad_outputs + extra_outputs
    nodes = _live(nodes, [o.name for o in outs])
    used = {name for node in nodes for name in node.input}
    final = helper.make_graph(
        nodes,
        f"{graph.name or 'model'}_training",
        data_inputs + trainable_inputs + loss_inputs,
        outs,
        [t for t in kept + loss_em.initializers + em.initializers if t.name in used],
    )
    trained = helper.make_model(
        final, opset_imports=list(proto.opset_import), producer_name="graphopt.train"
    )
    trained.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    return TrainingGraph(
        proto=trained,
        loss=LOSS,
        gradients=gradients,
        initial=initial,
        data_inputs=[v.name for v in data_inputs],
        loss_inputs=[v.name for v in loss_inputs],
        outputs=list(outputs),
        quantized=quantized,
        frozen_quantized=frozen_quantized,
        untied=untied,
    )


# ---------------------------------------------------------------------------- preparation


def _prepared_proto(
    model: Model, input_shapes: Mapping[str, Sequence[int | str]] | None
) -> onnx.ModelProto:
    proto = model.to_proto()
    if _opset(proto) < MIN_OPSET:
        try:
            proto = onnx.version_converter.convert_version(proto, MIN_OPSET)
        except Exception as exc:  # the converter raises assorted errors
            raise GraphoptError(
                f"The model uses opset {_opset(proto)}; training needs opset {MIN_OPSET} or "
                f"newer, and converting it failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}).",
                hint="Export the model with opset 13 or newer.",
            ) from None
    graph = proto.graph
    del graph.value_info[:]
    if input_shapes:
        by_name = {v.name: v for v in graph.input}
        for name, dims in input_shapes.items():
            if name not in by_name:
                raise GraphoptError(
                    f"input_shapes names '{name}', which is not an input of the model.",
                    hint=f"Its inputs are {', '.join(by_name)}.",
                )
            shape = by_name[name].type.tensor_type.shape
            del shape.dim[:]
            for d in dims:
                dim = shape.dim.add()
                if isinstance(d, str):
                    dim.dim_param = d
                else:
                    dim.dim_value = int(d)
    return proto


def _opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def _infer(proto: onnx.ModelProto) -> tuple[dict[str, Shape | None], dict[str, int]]:
    """Shapes and element types by value name, from ONNX shape inference; where inference
    leaves the output of a type-preserving op untyped (SAME_TYPE_AS_INPUT0), it is declared
    from input 0 and inference runs again."""
    shapes, types = _infer_once(proto)
    annotated: onnx.ModelProto | None = None
    for _ in range(len(proto.graph.node)):
        missing = [
            n for n in proto.graph.node
            if n.op_type in SAME_TYPE_AS_INPUT0 and n.domain in ("", "ai.onnx") and n.input
            and n.output[0] and n.output[0] not in types and n.input[0] in types
        ]  # fmt: skip
        if not missing:
            break
        if annotated is None:
            annotated = onnx.ModelProto()
            annotated.CopyFrom(proto)
        for n in missing:
            shape = shapes.get(n.input[0]) if n.op_type in SAME_SHAPE_AS_INPUT0 else None
            annotated.graph.value_info.append(
                helper.make_tensor_value_info(n.output[0], types[n.input[0]], shape)
            )
        shapes, types = _infer_once(annotated)
    return shapes, types


def _infer_once(proto: onnx.ModelProto) -> tuple[dict[str, Shape | None], dict[str, int]]:
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    shapes: dict[str, Shape | None] = {}
    types: dict[str, int] = {}
    graph = inferred.graph
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor = info.type.tensor_type
        if not info.type.HasField("tensor_type"):
            continue
        types[info.name] = tensor.elem_type
        if tensor.HasField("shape"):
            shapes[info.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in tensor.shape.dim
            )
        else:
            shapes.setdefault(info.name, None)
    for init in graph.initializer:
        types[init.name] = init.data_type
        shapes[init.name] = tuple(int(d) for d in init.dims)
    return shapes, types


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.output)
    return names


def _free_prefix(base: str, names: set[str]) -> str:
    prefix, i = base, 0
    while any(n.startswith(prefix + "/") for n in names):
        i += 1
        prefix = f"{base}{i}"
    return prefix


def _refuse_graph_level(graph: onnx.GraphProto) -> None:
    bad: dict[str, list[str]] = {}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            bad.setdefault(f"{node.domain}::{node.op_type}", []).append(node.name)
        elif node.op_type in CONTROL_FLOW or any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            bad.setdefault(node.op_type, []).append(node.name)
    training_bn = [
        n.name
        for n in graph.node
        if n.op_type == "BatchNormalization"
        and any(a.name == "training_mode" and a.i for a in n.attribute)
    ]
    if training_bn:
        raise GradientError(
            "Cannot train this model: BatchNormalization "
            f"{_describe({'': training_bn}).strip(' ')} runs in training mode (batch "
            "statistics); only inference mode, with frozen running statistics, is supported.",
            hint="Export the model in eval mode.",
        )
    if bad:
        raise GradientError(
            f"Cannot train this model: it contains {_describe(bad)}; control flow "
            "(If/Loop/Scan) and custom-domain ops are not differentiated.",
            hint="Remove or inline them (e.g. export without control flow) and try again.",
        )


def _untie_identities(graph: onnx.GraphProto) -> dict[str, str]:
    """Replace each Identity of a float initializer (or of an untied output) by an
    initializer of its own, named after its output; return output -> the initializer it
    copied (the root of an Identity chain). Graph outputs stay Identity nodes."""
    inits = {t.name: t for t in graph.initializer}
    outputs = {v.name for v in graph.output}
    untied: dict[str, str] = {}
    kept = []
    for node in graph.node:
        source = node.input[0] if node.op_type == "Identity" and node.input else None
        if (
            source is not None
            and node.domain in ("", "ai.onnx")
            and source in inits
            and inits[source].data_type in FLOAT_TYPES
            and node.output[0] not in outputs
            and node.output[0] not in inits
        ):
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[source])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            inits[copy.name] = copy
            untied[copy.name] = untied.get(source, source)
        else:
            kept.append(node)
    if untied:
        del graph.node[:]
        graph.node.extend(kept)
    return untied


def _choose_trainables(
    graph: onnx.GraphProto,
    inits: dict[str, onnx.TensorProto],
    requested: Sequence[str] | None,
) -> list[str]:
    if requested is not None:
        names = list(dict.fromkeys(requested))
        missing = [n for n in names if n not in inits]
        wrong = [n for n in names if n in inits and inits[n].data_type not in FLOAT_TYPES]
        if missing or wrong:
            parts = []
            if missing:
                parts.append(f"not initializers: {', '.join(missing)}")
            if wrong:
                parts.append(f"not float32/float64: {', '.join(wrong)}")
            raise GraphoptError(
                f"Cannot train the requested tensors ({'; '.join(parts)}).",
                hint="Trainables must be float initializers of the main graph, or integer "
                "weights behind a DequantizeLinear (trained unless qat=False).",
            )
        if not names:
            raise GraphoptError("The list of trainables is empty.")
        return names
    differentiable_use: set[str] = set()
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in inits and differentiable(node.op_type, i):
                differentiable_use.add(name)
    names = [
        t.name
        for t in graph.initializer
        if t.name in differentiable_use
        and t.data_type in FLOAT_TYPES
        and int(np.prod(t.dims, dtype=np.int64)) > 1
    ]
    if not names:
        raise GraphoptError(
            "The model has no float initializers to train.",
            hint="Weights held as Constant nodes (as in Paddle's exports) cannot be trained: "
            "the cleanup pass turns them into initializers (graphopt optimize MODEL --pass "
            "cleanup --pass distill ...). Integer weights behind a DequantizeLinear are "
            "trained unless qat=False.",
        )
    return names


def _elem_type(names: list[str], inits: dict[str, onnx.TensorProto]) -> int:
    kinds = {inits[n].data_type for n in names}
    if len(kinds) > 1:
        raise GraphoptError(
            "The trainables mix float32 and float64; train tensors of one float type."
        )
    return kinds.pop()


# ---------------------------------------------------------------------------- analysis


def _active(
    nodes: list[onnx.NodeProto], trainables: set[str], types: dict[str, int], relevant: set[str]
) -> set[str]:
    """Tensors that depend on a trainable through differentiable inputs (float ones only, and
    the quantized outputs the straight-through estimator differentiates).

    Raises:
        GradientError: a node on the path to the loss whose output type is unknown after
            shape inference (its gradient would silently be dropped).
    """
    active = set(trainables)
    for node in nodes:
        if any(
            name in active and differentiable(node.op_type, i) for i, name in enumerate(node.input)
        ):
            for out in node.output:
                if not out:
                    continue
                if node.op_type in STRAIGHT_THROUGH or types.get(out) in FLOAT_TYPES:
                    active.add(out)
                elif out not in types and out in relevant:
                    raise GradientError(
                        f"Cannot build the gradient of {node.op_type} node "
                        f"'{node.name or '(unnamed)'}': ONNX shape inference left the type of "
                        f"its output '{out}' unknown, so it cannot tell whether a gradient "
                        "flows through it.",
                        hint="Declare the output's type in the model's value_info (e.g. run "
                        "onnx.shape_inference with a newer onnx), or fix the input shapes "
                        "(input_shapes=).",
                    )
    return active


def _relevant(nodes: list[onnx.NodeProto], target: str) -> set[str]:
    """Tensors the target depends on."""
    relevant = {target}
    for node in reversed(nodes):
        if any(out in relevant for out in node.output):
            relevant.update(n for n in node.input if n)
    return relevant


def _refuse_unsupported(nodes: list[onnx.NodeProto], active: set[str], relevant: set[str]) -> None:
    bad: dict[str, list[str]] = {}
    for node in nodes:
        if node.op_type in RULES:
            continue
        on_path = any(out in active and out in relevant for out in node.output)
        if on_path:
            bad.setdefault(node.op_type, []).append(node.name)
    if bad:
        raise GradientError(
            f"Cannot train this model: no gradient rule for {_describe(bad)}, on the path "
            "from the trainables to the loss.",
            hint="Freeze the weights before those ops (trainables=...), or wait for their "
            "rules; the supported ops are: " + ", ".join(sorted(RULES)) + ".",
        )


def _describe(bad: dict[str, list[str]]) -> str:
    parts = []
    for op, nodes in sorted(bad.items()):
        named = [n for n in nodes if n]
        shown = ", ".join(f"'{n}'" for n in named[:3]) + (" ..." if len(named) > 3 else "")
        parts.append(
            f"{op} ({len(nodes)} node{'s' if len(nodes) > 1 else ''}{': ' + shown if named else ''})"
        )
    return "; ".join(parts)


def _live(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """Drop nodes nothing needed reads (e.g. model outputs the loss does not use)."""
    needed = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(out in needed for out in node.output if out):
            keep.append(node)
            needed.update(n for n in node.input if n)
    return list(reversed(keep))

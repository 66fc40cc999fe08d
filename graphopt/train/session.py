"""Train a model's initializers on ONNX Runtime with its training graph.

`Trainer` builds the training graph once and opens one ONNX Runtime session through
graphopt.runtime. By default the optimizer step is part of that graph
(graphopt.train.update): each step feeds a batch, the weights, the optimizer state and the
hyperparameters, and reads back the loss, the updated weights and the updated state; the
gradients are multiplied by the pruning keep-masks (from `model.metadata["masks"]`) inside the
graph, so pruned weights stay exactly zero. With `optimizer_in_graph=False` (or an optimizer
other than SGD/AdamW) the graph stops at the gradients and the numpy optimizer updates the
weights. Either way the weights live in `Trainer.params` (numpy, read and assignable) and the
optimizer state in the optimizer object.

`trained_model()` writes the weights back into a copy of the inference graph; the float
shadows of quantized weights (quantization-aware training, graphopt.train.qat) go back
quantized, into the original integer initializers, so dtypes stay as they were.

With `io_binding` (the default on CUDA) the weights and the optimizer state stay on the
session's device between steps as OrtValues (graphopt.train.resident): only the batch and the
hyperparameters go in and only the loss comes out. `params` (and the optimizer's state) are
then copied back to numpy when read, and uploaded again at the next step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.errors import DataError
from graphopt.model import Model
from graphopt.runtime import Device, Session, create_session
from graphopt.train.builder import TrainingGraph, build_training_graph
from graphopt.train.losses import Loss
from graphopt.train.optim import Optimizer
from graphopt.train.resident import ResidentStep
from graphopt.train.update import UpdateGraph, state_store, update_key, with_update


@dataclass
class StepResult:
    """The loss of one step (before its update) and any exposed outputs."""

    loss: float
    outputs: dict[str, np.ndarray]


class Trainer:
    """Trains the initializers of `model` against `losses` with `optimizer`.

    Args:
        model: the model; never modified (see `trained_model`).
        losses: the loss terms.
        optimizer: SGD or AdamW (numpy).
        trainables, input_shapes, outputs, qat: see `build_training_graph`.
        device, threads: for the ONNX Runtime session (graphopt.runtime.create_session).
        use_masks: multiply gradients by the pruning masks in `model.metadata["masks"]`
            (a quantized weight's mask may be stored under its float weight's name).
        optimizer_in_graph: run SGD/AdamW as ONNX nodes in the training graph
            (graphopt.train.update); False, or another optimizer, steps in numpy. Both give
            the same weights to float rounding; the optimizer's hyperparameters (`lr`, ...)
            may change between steps either way.
        untie_identities: see `build_training_graph`.
        io_binding: keep the weights and optimizer state on the session's device between
            steps (graphopt.train.resident); only with the in-graph optimizer. None: on CUDA,
            where it saves the PCIe round trip of every weight and state tensor; off on the
            CPU, where host-fed and bound steps took the same time (within noise).

    Attributes:
        params: trainable name -> its current value (numpy; may be replaced, e.g. by a
            saved copy of the best weights, or changed in place, between steps; with
            io_binding, reading it copies the weights back from the device).
        graph: the training graph (without the update).
        update: the training graph with the update, when the optimizer runs in the graph.
    """

    def __init__(
        self,
        model: Model,
        losses: Sequence[Loss],
        optimizer: Optimizer,
        *,
        trainables: Sequence[str] | None = None,
        input_shapes: Mapping[str, Sequence[int | str]] | None = None,
        outputs: Sequence[str] = (),
        device: Device = "cpu",
        threads: int | None = None,
        use_masks: bool = True,
        qat: bool | None = None,
        optimizer_in_graph: bool = True,
        untie_identities: bool = True,
        io_binding: bool | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.graph: TrainingGraph = build_training_graph(
            model,
            losses,
            trainables=trainables,
            input_shapes=input_shapes,
            outputs=outputs,
            qat=qat,
            untie_identities=untie_identities,
        )
        self._params = {k: np.array(v, copy=True) for k, v in self.graph.initial.items()}
        self.masks = _masks(model, self._params, self.graph) if use_masks else {}
        self._device, self._threads = device, threads
        self.update: UpdateGraph | None = None
        if optimizer_in_graph and update_key(optimizer) is not None:
            self.update = with_update(self.graph, optimizer, self.masks)
        proto = self.update.proto if self.update is not None else self.graph.proto
        self.session: Session = create_session(_source(proto), device=device, threads=threads)
        self.steps = 0
        self.io_binding = self.session.device_type == "cuda" if io_binding is None else io_binding
        self._resident: ResidentStep | None = None
        self._device_newer = False  # the device holds weights newer than self._params
        self._upload = True  # self._params (or the state) may differ from the device's

    @property
    def params(self) -> dict[str, np.ndarray]:
        self.sync()
        # whoever reads the dict may change it in place: upload it before the next step
        self._upload = True
        return self._params

    @params.setter
    def params(self, value: dict[str, np.ndarray]) -> None:
        self.sync()  # for the optimizer state, which stays
        self._params = value
        self._upload = True

    def sync(self) -> None:
        """With io_binding, copy the weights and the optimizer's state (its numpy stores) back
        from the device; reading `params` does it too. Nothing to do otherwise."""
        if self._resident is not None and self._device_newer:
            self._pull()

    @property
    def feeds_needed(self) -> list[str]:
        return self.graph.data_inputs + self.graph.loss_inputs

    def gradients(
        self, feeds: Mapping[str, np.ndarray]
    ) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(loss, masked gradients by trainable, exposed outputs) at the current weights."""
        graph = self.graph
        names = [graph.loss, *graph.gradients.values(), *graph.outputs]
        if self.update is not None:
            values = self.session.run(self._update_feeds(feeds, self.steps + 1), names)
        else:
            values = self.session.run({**self._checked(feeds), **self.params}, names)
        grads = {}
        for name, out in graph.gradients.items():
            g = values[out]
            mask = self.masks.get(name) if self.update is None else None
            grads[name] = g * mask if mask is not None else g
        outputs = {name: values[name] for name in graph.outputs}
        return float(values[graph.loss]), grads, outputs

    def step(self, feeds: Mapping[str, np.ndarray]) -> StepResult:
        """One optimizer step on one batch."""
        update = self.update
        if update is not None and update_key(self.optimizer) != update.key:
            # Another optimizer, or one whose baked-in structure (Nesterov, momentum on or
            # off) changed: rebuild the graph with its update.
            self.sync()
            self._resident = None
            update = self.update = with_update(self.graph, self.optimizer, self.masks)
            self.session = create_session(
                _source(update.proto), device=self._device, threads=self._threads
            )
        if update is None:
            loss, grads, outputs = self.gradients(feeds)
            self.optimizer.step(self.params, grads)
            self.steps += 1
            return StepResult(loss=loss, outputs=outputs)
        count = _advance(self.optimizer)
        graph = self.graph
        if self.io_binding:
            return self._resident_step(feeds, count)
        new_state = list(update.state_outputs.items())
        names = [graph.loss, *graph.outputs, *update.new_weights.values()]
        names += [out for _, out in new_state]
        values = self.session.run(self._update_feeds(feeds, count), names)
        for name, out in update.new_weights.items():
            self._params[name] = values[out]
        for (slot, name), out in new_state:
            state_store(self.optimizer, slot)[name] = values[out]
        self.steps += 1
        outputs = {name: values[name] for name in graph.outputs}
        return StepResult(loss=float(values[graph.loss]), outputs=outputs)

    def _resident_step(self, feeds: Mapping[str, np.ndarray], count: int) -> StepResult:
        update, graph = self.update, self.graph
        assert update is not None
        if self._resident is None:
            carried = dict(update.new_weights)
            carried.update(
                {update.state_inputs[key]: out for key, out in update.state_outputs.items()}
            )
            self._resident = ResidentStep(self.session, carried)
            self._upload = True
        if self._upload:
            self._resident.upload({**self._params, **self._state_feeds()})
            self._upload = False
        host = self._checked(feeds)
        host.update(update.hyper_feeds(self.optimizer, count))
        values = self._resident.run(host, [graph.loss, *graph.outputs])
        self._device_newer = True
        self.steps += 1
        outputs = {name: values[name] for name in graph.outputs}
        return StepResult(loss=float(values[graph.loss]), outputs=outputs)

    def _pull(self) -> None:
        """Copy the weights and the optimizer state back from the device."""
        update, resident = self.update, self._resident
        assert update is not None and resident is not None
        values = resident.download()
        for name in update.new_weights:
            self._params[name] = values[name]
        for (slot, name), input_name in update.state_inputs.items():
            state_store(self.optimizer, slot)[name] = values[input_name]
        self._device_newer = False

    def _state_feeds(self) -> dict[str, np.ndarray]:
        """The optimizer state inputs (zeros before the first step)."""
        update = self.update
        assert update is not None
        out = {}
        for (slot, name), input_name in update.state_inputs.items():
            value = state_store(self.optimizer, slot).get(name)
            out[input_name] = np.zeros_like(self._params[name]) if value is None else value
        return out

    def _checked(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.feeds_needed if n not in feeds]
        if missing:
            raise DataError(
                f"The training step needs the input(s) {', '.join(missing)}.",
                hint=f"Feed {', '.join(self.feeds_needed)}.",
            )
        return dict(feeds)

    def _update_feeds(self, feeds: Mapping[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
        """The feeds of the update graph: batch, weights, optimizer state (zeros before the
        first step), hyperparameters for step number `count`."""
        update = self.update
        assert update is not None
        out = self._checked(feeds)
        out.update(self.params)
        out.update(self._state_feeds())
        out.update(update.hyper_feeds(self.optimizer, count))
        return out

    def trained_model(self) -> Model:
        """A copy of the model with the trained weights (see `write_weights`)."""
        out = self.model.copy()
        self.write_weights(out)
        return out

    def write_weights(self, model: Model) -> None:
        """Write the trained weights into `model` (the trained model or one with the same
        initializer and Identity names), in place.

        Initializer dtypes stay as they were (float shadows are quantized back into their
        integers). The node list is unchanged, except for Identity nodes that the builder
        untied (`untie_identities`) whose value changed: such an `Identity(shared)` is
        replaced by an initializer of its own, named after its output, holding its trained
        value (or, when only the shared source trained, the value it had). So two BatchNorm
        layers that torch.onnx.export tied to one initializer come back with their own
        weights.
        """
        graph = model.graph
        initializers = graph.initializers
        untied = {
            out: source
            for out, source in self.graph.untied.items()
            if out in self.params or source in self.params
        }
        # Values of the untied copies that did not train: read before the sources change.
        frozen = {}
        for out, source in untied.items():
            if out not in self.params and out not in initializers:
                frozen[out] = initializers[source].const_value.numpy().copy()
        for name, value in self.params.items():
            quantized = self.graph.quantized.get(name)
            if quantized is not None:
                value = quantized.quantize(value)
            if name in initializers:
                initializers[name].const_value = ir.tensor(value, name=name)
        identities = {
            node.outputs[0].name: node
            for node in graph
            if node.op_type == "Identity" and node.domain in ("", "ai.onnx")
        }
        for out in untied:
            if out in initializers:
                continue  # written above (a model whose Identity was already replaced)
            value = self.params[out] if out in self.params else frozen[out]
            node = identities[out]
            old = node.outputs[0]
            new = ir.Value(
                shape=ir.Shape(value.shape),
                type=old.type,
                const_value=ir.tensor(np.array(value, copy=True), name=out),
            )
            ir.convenience.replace_all_uses_with(old, new)
            graph.remove(node, safe=True)
            new.name = out
            graph.register_initializer(new)


def _source(proto: onnx.ModelProto) -> bytes | Model:
    """The training graph as create_session takes it: a Model when it holds float8 tensors
    (fp8 QAT), for which graphopt.runtime turns off ONNX Runtime's QDQ rewrites (they take
    float8 Q/DQ for int8 ones and the session fails to load)."""
    if any(t.data_type in _FLOAT8 for t in proto.graph.initializer):
        return Model(ir=ir.from_proto(proto))
    return proto.SerializeToString()


_FLOAT8 = {
    onnx.TensorProto.FLOAT8E4M3FN,
    onnx.TensorProto.FLOAT8E4M3FNUZ,
    onnx.TensorProto.FLOAT8E5M2,
    onnx.TensorProto.FLOAT8E5M2FNUZ,
}


def _advance(optimizer: Optimizer) -> int:
    """Count one more step where the optimizer keeps its count (AdamW); return it."""
    count = getattr(optimizer, "_t", None)
    if count is None:
        return 0
    optimizer._t = count + 1  # type: ignore[union-attr]
    return count + 1


def _masks(
    model: Model, params: dict[str, np.ndarray], graph: TrainingGraph
) -> dict[str, np.ndarray]:
    from graphopt.passes.prune.masks import existing_keep

    masks = {}
    for name, value in params.items():
        quantized = graph.quantized.get(name)
        for key in quantized.mask_names if quantized is not None else (name,):
            keep = existing_keep(model.metadata, key, value.shape)
            if keep is not None:
                masks[name] = keep.astype(value.dtype)
                break
    return masks

"""Train a model's initializers on ONNX Runtime with its training graph.

`Trainer` builds the training graph once, opens one ONNX Runtime session through
graphopt.runtime, and keeps the weights in numpy: each step feeds the weights and a batch,
reads the loss and the gradients, multiplies each gradient by its pruning keep-mask (from
`model.metadata["masks"]`, so pruned weights stay exactly zero) and lets the optimizer update
the weights. `trained_model()` writes the weights back into a copy of the unchanged inference
graph; the float shadows of quantized weights (quantization-aware training, graphopt.train.qat)
go back quantized, into the original integer initializers, so dtypes stay as they were.

On CUDA the session runs, but weights and gradients cross the PCIe bus every step: IO binding
with device-resident weights and an in-graph optimizer are the next step (untested here).
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
        )
        self.session: Session = create_session(
            _source(self.graph.proto), device=device, threads=threads
        )
        self.params = {k: np.array(v, copy=True) for k, v in self.graph.initial.items()}
        self.masks = _masks(model, self.params, self.graph) if use_masks else {}
        self.steps = 0

    @property
    def feeds_needed(self) -> list[str]:
        return self.graph.data_inputs + self.graph.loss_inputs

    def gradients(
        self, feeds: Mapping[str, np.ndarray]
    ) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(loss, masked gradients by trainable, exposed outputs) at the current weights."""
        missing = [n for n in self.feeds_needed if n not in feeds]
        if missing:
            raise DataError(
                f"The training step needs the input(s) {', '.join(missing)}.",
                hint=f"Feed {', '.join(self.feeds_needed)}.",
            )
        graph = self.graph
        names = [graph.loss, *graph.gradients.values(), *graph.outputs]
        values = self.session.run({**dict(feeds), **self.params}, names)
        grads = {}
        for name, out in graph.gradients.items():
            g = values[out]
            mask = self.masks.get(name)
            grads[name] = g * mask if mask is not None else g
        outputs = {name: values[name] for name in graph.outputs}
        return float(values[graph.loss]), grads, outputs

    def step(self, feeds: Mapping[str, np.ndarray]) -> StepResult:
        """One optimizer step on one batch."""
        loss, grads, outputs = self.gradients(feeds)
        self.optimizer.step(self.params, grads)
        self.steps += 1
        return StepResult(loss=loss, outputs=outputs)

    def trained_model(self) -> Model:
        """A copy of the model with the trained weights; its node list and initializer
        dtypes are unchanged (float shadows are quantized back into their integers)."""
        out = self.model.copy()
        initializers = out.graph.initializers
        for name, value in self.params.items():
            quantized = self.graph.quantized.get(name)
            if quantized is not None:
                value = quantized.quantize(value)
            initializers[name].const_value = ir.tensor(value, name=name)
        return out


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

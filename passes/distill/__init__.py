"""Distillation: fine-tune the model's weights against a teacher's logits, on the ONNX graph.

After `prune`, `channels` or `quantize` a model loses accuracy; this pass wins it back by
training the student's initializers so its logits follow the teacher's, with graphopt's
gradient engine (graphopt.train: the training graph is standard ONNX ops, run by ONNX
Runtime). The teacher is a logits file, a teacher ONNX model, or by default the model as it
was before the pipeline's first pass (`Context.teacher`, `Context.original`).

Loss per distilled output: T²·KL(softmax(t/T) ‖ softmax(s/T)) over the class axis (`loss=kl`;
the logits behind a final Softmax, see `teacher.logits_view`), or the mean squared error of
the outputs (`loss=mse`, for regression or feature outputs). When the data has labels and
`alpha > 0`, (1-α)·distillation + α·cross-entropy on the labels.

Changes: initializer values; the node list, names and shapes stay as they are, except that
an initializer torch.onnx.export tied to another behind an Identity (identical fresh
BatchNorm parameters) comes back as an initializer of its own, replacing the Identity. Pruning
masks in the model's metadata are applied to the gradients, so pruned weights stay exactly
zero. BatchNormalization keeps its running statistics (inference mode). Lossy by design:
validate the result (the pipeline compares it with the original on --val-data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graphopt.context import Context
from graphopt.data import Dataset
from graphopt.data.checks import names as quoted_names
from graphopt.errors import DataError
from graphopt.model import Model
from graphopt.passes.base import Pass, PassResult, option, register_pass
from graphopt.passes.distill.loop import LoopSettings, Outcome, Target, run_loop
from graphopt.passes.distill.teacher import (
    LogitsView,
    TeacherLogits,
    TeacherSpec,
    check_against,
    export_logits,
    logits_view,
    open_logits,
)
from graphopt.runtime import create_session

__all__ = ["DistillOptions", "DistillPass", "TeacherSpec", "export_logits", "logits_view"]


@dataclass(frozen=True, kw_only=True)
class DistillOptions:
    """How long and how hard to train, and what to match."""

    epochs: int = option(3, "passes over the training data (--data)", range=(1, 10_000))
    steps: int = option(0, "optimizer steps in all; 0: epochs decide", range=(0, None))
    batch_size: int = option(32, "samples per training step", range=(1, None))
    lr: float = option(1e-4, "peak learning rate", range=(0.0, None))
    optimizer: Literal["adamw", "sgd"] = option("adamw", "AdamW or SGD with momentum")
    weight_decay: float = option(
        0.0, "decoupled weight decay (AdamW) or L2 (SGD)", range=(0.0, None)
    )
    momentum: float = option(0.9, "SGD momentum", range=(0.0, 0.999))
    warmup: float = option(0.05, "share of the steps with a linear warm-up", range=(0.0, 1.0))
    schedule: Literal["cosine", "constant"] = option("cosine", "learning rate after warm-up")
    temperature: float = option(4.0, "softmax temperature T of the kl loss", range=(0.01, 100.0))
    alpha: float = option(
        0.5,
        "weight of cross-entropy on the data's labels (1-alpha goes to distillation); "
        "ignored when the data has no labels",
        range=(0.0, 1.0),
    )
    loss: Literal["kl", "mse"] = option("kl", "kl on logits (classifiers) or mse on outputs")
    outputs: tuple[str, ...] = option((), "model outputs to match (default: the first)")
    holdout: float = option(
        0.1, "share of the data held out to pick the best epoch; 0: keep the last", range=(0.0, 0.5)
    )
    patience: int = option(
        0, "stop after this many epochs without improvement; 0: never", range=(0, None)
    )
    shuffle_buffer: int = option(2048, "samples shuffled together (bounds memory)", range=(1, None))


@register_pass
class DistillPass(Pass[DistillOptions]):
    """Trains the model's float initializers to match a teacher's logits.

    Changes: initializer values. Preserves: nodes, names, shapes, pruned zeros.
    """

    name = "distill"
    options_type = DistillOptions
    summary = "fine-tune the weights against a teacher's logits on ONNX Runtime (win back accuracy)"

    def run(self, model: Model, ctx: Context) -> PassResult:
        opts = self.options
        data = ctx.calib_data
        if data is None:
            raise DataError(
                "The distill pass trains on data, and none was given.",
                hint="Pass --data with the training samples (without the validation ones).",
            )
        outputs = list(opts.outputs) or [model.graph.outputs[0].name]
        views = {name: logits_view(model, name) for name in outputs}
        spec = ctx.teacher or TeacherSpec(model=ctx.original, is_original=True)
        teacher = _teacher_logits(spec, data, outputs, ctx)
        shapes = _student_shapes(model, data, views, ctx)
        check_against(teacher, len(data), shapes, views)
        targets = [_target(views[name], teacher, opts.loss) for name in outputs]
        use_labels = data.has_labels and opts.alpha > 0
        settings = LoopSettings(
            epochs=opts.epochs, steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr,
            optimizer=opts.optimizer, weight_decay=opts.weight_decay, momentum=opts.momentum,
            warmup=opts.warmup, schedule=opts.schedule, temperature=opts.temperature,
            alpha=opts.alpha, loss=opts.loss, holdout=opts.holdout, patience=opts.patience,
            shuffle_buffer=opts.shuffle_buffer, seed=ctx.seed,
        )  # fmt: skip
        outcome = run_loop(
            model, data, teacher, targets, settings,
            use_labels=use_labels, fixed_batch=_fixed_batch(model), device=ctx.device,
            threads=ctx.threads, metric=ctx.metric,
        )  # fmt: skip
        return _result(model, outcome, spec, teacher, targets, data, opts)


def _teacher_logits(
    spec: TeacherSpec, data: Dataset, outputs: list[str], ctx: Context
) -> TeacherLogits:
    if spec.logits is not None:
        return open_logits(spec.logits, outputs)
    if spec.model is None:
        raise DataError(
            "The distill pass needs a teacher, and none was given.",
            hint="Give --teacher TEACHER.onnx or --teacher-logits LOGITS.npy.",
        )
    teacher = spec.model
    teacher_outputs = _teacher_outputs(teacher, outputs)
    path = export_logits(
        teacher, data, ctx.workdir / "teacher-logits.npz", outputs=teacher_outputs,
        batch_size=ctx.batch_size, device=ctx.device, threads=ctx.threads, workdir=ctx.workdir,
    )  # fmt: skip
    logits = open_logits(path, teacher_outputs)
    logits.arrays = dict(zip(outputs, logits.arrays.values(), strict=True))
    logits.source = spec.describe()
    return logits


def _teacher_outputs(teacher: Model | Path, outputs: list[str]) -> list[str]:
    """The teacher's outputs that match the student's `outputs`: the same names, or the only
    output of each."""
    from graphopt.model import load_model

    model = load_model(teacher) if isinstance(teacher, Path) else teacher
    names = [v.name for v in model.graph.outputs]
    if all(o in names for o in outputs):
        return outputs
    if len(outputs) == 1 and len(names) == 1:
        return names
    raise DataError(
        f"The teacher has no output(s) {quoted_names([o for o in outputs if o not in names])} "
        f"to match the student's (it has {quoted_names(names)}).",
        hint="Match outputs by name, or export the teacher's logits with graphopt export-logits.",
    )


def _student_shapes(
    model: Model, data: Dataset, views: dict[str, LogitsView], ctx: Context
) -> dict[str, tuple[int, ...]]:
    """The per-sample shape of each distilled tensor, from one run on the first sample."""
    tensors = list(dict.fromkeys(v.tensor for v in views.values()))
    session = create_session(
        model, device=ctx.device, threads=ctx.threads, extra_outputs=tensors, only_extra=True,
        workdir=ctx.workdir,
    )  # fmt: skip
    first = next(iter(data.batches(1)))
    values = session.run(first.feeds, tensors)
    return {name: tuple(values[v.tensor].shape[1:]) for name, v in views.items()}


def _target(view: LogitsView, teacher: TeacherLogits, loss: str) -> Target:
    probabilities = teacher.probabilities.get(view.output, False)
    if loss == "mse" and view.is_softmax and probabilities:
        # The teacher gave probabilities: compare them with the student's probabilities.
        return Target(view=view, tensor=view.output, teacher_as_logits=False)
    return Target(view=view, tensor=view.tensor, teacher_as_logits=True)


def _fixed_batch(model: Model) -> int | None:
    """The batch size the model's inputs fix, or None when it is dynamic."""
    for spec in model.input_specs():
        if spec.shape and isinstance(spec.shape[0], int):
            return spec.shape[0]
    return None


def _result(
    model: Model,
    outcome: Outcome,
    spec: TeacherSpec,
    teacher: TeacherLogits,
    targets: list[Target],
    data: Dataset,
    opts: DistillOptions,
) -> PassResult:
    trainer = outcome.trainer
    parameters = int(sum(v.size for v in trainer.params.values()))
    stats = {
        "teacher": teacher.source if spec.logits is not None else spec.describe(),
        "outputs": [t.view.output for t in targets],
        "loss_on": [t.tensor for t in targets],
        "trainables": len(trainer.params),
        "parameters": parameters,
        "train_samples": outcome.train_samples,
        "holdout_samples": outcome.holdout_samples,
        "epochs": outcome.epochs,
        "steps": outcome.steps,
        "train_seconds": round(outcome.seconds, 2),
        "epoch_train_loss": [round(x, 6) for x in outcome.epoch_losses],
        "holdout": [s.to_dict() for s in outcome.holdout],
        "best_epoch": outcome.best_epoch,
        "stopped_early": outcome.stopped_early,
        "labels_used": data.has_labels and opts.alpha > 0,
    }
    warnings = []
    if data.is_random:
        warnings.append("trained on RANDOM data: the weights now fit noise, not your task.")
    if outcome.params is None:
        warnings.append(
            "no epoch beat the untrained model on the held-out samples, so the weights were "
            "left as they were (try a lower lr, more epochs or more data)."
        )
        return PassResult(modified=False, stats=stats, warnings=warnings)
    trainer.params = outcome.params
    trainer.write_weights(model)
    return PassResult(modified=True, stats=stats, warnings=warnings)

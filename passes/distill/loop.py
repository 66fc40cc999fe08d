"""The distillation loop: stream the data, step the Trainer, pick the best epoch.

Data: the training samples are streamed from the Dataset in its order and shuffled within a
buffer of `shuffle_buffer` samples (memory stays at one buffer, whatever the data size); the
teacher's rows are read by sample index. A random `holdout` share of the samples (fixed by
the seed) is set aside before training, kept in memory, and never trained on.

Selection: the held-out samples are scored before training and after every epoch: the
distillation loss against the teacher (in numpy, independent of the training graph), the
cosine of the student's logits to the teacher's, and, with labels, the accuracy metric. The
weights of the best epoch are kept (accuracy with labels, held-out loss otherwise); when no
epoch beats the untrained student the model is left as it was. `patience` stops early.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from graphopt import console
from graphopt.data import Dataset
from graphopt.errors import DataError
from graphopt.model import Model
from graphopt.passes.distill.schedule import LearningRate
from graphopt.passes.distill.teacher import LogitsView, TeacherLogits
from graphopt.runtime import Device, create_session
from graphopt.train import SGD, AdamW, Loss, Trainer
from graphopt.train.static import freeze_shape_subgraphs

Metric = Callable[[Mapping[str, np.ndarray], np.ndarray], float]


@dataclass(frozen=True)
class Target:
    """One distilled output: the tensor the loss reads, and how the teacher's rows are read."""

    view: LogitsView
    tensor: str  # the student tensor the loss reads (logits, or the output itself)
    teacher_as_logits: bool


@dataclass(frozen=True, kw_only=True)
class LoopSettings:
    epochs: int
    steps: int
    batch_size: int
    lr: float
    optimizer: str
    weight_decay: float
    momentum: float
    warmup: float
    schedule: str
    temperature: float
    alpha: float
    loss: str
    holdout: float
    patience: int
    shuffle_buffer: int
    seed: int


@dataclass
class HoldoutScore:
    loss: float
    cosine: float
    accuracy: float | None = None

    def better_than(self, other: HoldoutScore) -> bool:
        if self.accuracy is not None and other.accuracy is not None:
            if self.accuracy != other.accuracy:
                return self.accuracy > other.accuracy
        return self.loss < other.loss

    def to_dict(self) -> dict[str, float | None]:
        return {"loss": self.loss, "cosine": self.cosine, "accuracy": self.accuracy}


@dataclass
class Outcome:
    """What the loop did, for the pass's stats."""

    params: dict[str, np.ndarray] | None  # the kept weights; None: keep the untrained model
    trainer: Trainer
    steps: int = 0
    epochs: int = 0
    seconds: float = 0.0
    train_samples: int = 0
    holdout_samples: int = 0
    best_epoch: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    holdout: list[HoldoutScore] = field(default_factory=list)
    stopped_early: bool = False


def run_loop(
    student: Model,
    data: Dataset,
    teacher: TeacherLogits,
    targets: Sequence[Target],
    settings: LoopSettings,
    *,
    use_labels: bool,
    fixed_batch: int | None,
    device: Device,
    threads: int | None,
    metric: Metric | None,
) -> Outcome:
    rng = np.random.default_rng(settings.seed)
    total = len(data)
    holdout_count = int(round(total * settings.holdout)) if settings.holdout > 0 else 0
    if settings.holdout > 0:
        holdout_count = min(max(holdout_count, 1), total - 1)
        if fixed_batch:  # held-out samples are run in whole batches too
            holdout_count = max(holdout_count // fixed_batch, 1) * fixed_batch
            if holdout_count > total - fixed_batch:
                holdout_count = 0
    held = np.zeros(total, dtype=bool)
    held[rng.choice(total, size=holdout_count, replace=False)] = True
    train_count = total - holdout_count
    # The training graph has a fixed batch (shape subgraphs fold to constants with it); the
    # samples that do not fill the last batch of an epoch wait for the next shuffle.
    batch_size = fixed_batch or min(settings.batch_size, train_count)
    if train_count < batch_size:
        raise DataError(
            f"The model takes batches of exactly {fixed_batch} samples, but only "
            f"{train_count} training samples are left after the holdout.",
            hint="Give more data, or holdout=0.",
        )
    per_epoch = train_count // batch_size
    total_steps = settings.steps or per_epoch * settings.epochs
    epochs = math.ceil(total_steps / per_epoch)

    first = next(iter(data.batches(1)))
    input_shapes = {name: [batch_size, *value.shape[1:]] for name, value in first.feeds.items()}
    training_model, _ = freeze_shape_subgraphs(
        student, input_shapes, device=device, threads=threads
    )
    losses = _losses(targets, settings, use_labels)
    optimizer: SGD | AdamW
    if settings.optimizer == "sgd":
        optimizer = SGD(
            lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
    else:
        optimizer = AdamW(lr=settings.lr, weight_decay=settings.weight_decay)
    trainer = Trainer(training_model, losses, optimizer, device=device, threads=threads)
    schedule = LearningRate(
        lr=settings.lr,
        total=total_steps,
        warmup_steps=int(round(settings.warmup * total_steps)),
        kind=settings.schedule,  # type: ignore[arg-type]
    )
    holdout = _collect(data, held) if holdout_count else None
    outcome = Outcome(
        params=None, trainer=trainer, train_samples=train_count, holdout_samples=holdout_count
    )
    evaluate = _Evaluator(
        student, targets, teacher, settings, device, threads, metric, use_labels,
        chunk=fixed_batch or 64,
    )  # fmt: skip
    best: HoldoutScore | None = None
    if holdout is not None:
        best = evaluate(trainer, holdout)
        outcome.holdout.append(best)
        _say(f"before training: held-out {_score_text(best)}")

    start = time.perf_counter()
    since_best = 0
    step = 0
    with console.progress(total_steps, "distilling") as bar:
        for epoch in range(1, epochs + 1):
            running = []
            for batch in _minibatches(
                data,
                held,
                batch_size,
                settings.shuffle_buffer,
                rng,
                drop_last=True,
            ):
                if step >= total_steps:
                    break
                optimizer.lr = schedule.at(step)
                result = trainer.step(_feeds(batch, targets, teacher, losses))
                if not math.isfinite(result.loss):
                    raise DataError(
                        f"The distillation loss became {result.loss} at step {step + 1}.",
                        hint="Lower the learning rate (lr=...) or the temperature.",
                    )
                running.append(result.loss)
                step += 1
                bar.advance(
                    f"distilling, epoch {epoch}/{epochs}, loss {np.mean(running[-20:]):.4g}"
                )
            outcome.epoch_losses.append(float(np.mean(running)) if running else math.nan)
            outcome.epochs = epoch
            line = f"epoch {epoch}/{epochs}: train loss {outcome.epoch_losses[-1]:.4g}"
            if holdout is not None:
                score = evaluate(trainer, holdout)
                outcome.holdout.append(score)
                line += f", held-out {_score_text(score)}"
                assert best is not None
                if score.better_than(best):
                    best, since_best = score, 0
                    outcome.best_epoch = epoch
                    outcome.params = {k: v.copy() for k, v in trainer.params.items()}
                    line += " (best)"
                else:
                    since_best += 1
            _say(line)
            if settings.patience and since_best >= settings.patience and epoch < epochs:
                outcome.stopped_early = True
                break
            if step >= total_steps:
                break
    outcome.steps = step
    outcome.seconds = time.perf_counter() - start
    if holdout is None:
        outcome.params = trainer.params
        outcome.best_epoch = outcome.epochs
    return outcome


def _losses(targets: Sequence[Target], settings: LoopSettings, use_labels: bool) -> list[Loss]:
    kd_weight = 1.0 - settings.alpha if use_labels else 1.0
    losses = []
    for i, target in enumerate(targets):
        name = f"teacher.{i}"
        if settings.loss == "mse":
            losses.append(Loss.mse(target.tensor, weight=kd_weight, target=name))
        else:
            losses.append(
                Loss.distillation(
                    target.tensor,
                    temperature=settings.temperature,
                    weight=kd_weight,
                    axis=target.view.axis if target.view.axis is not None else -1,
                    target=name,
                )
            )
    if use_labels:
        first = targets[0]
        axis = first.view.axis if first.view.axis is not None else -1
        losses.append(
            Loss.cross_entropy(
                first.view.tensor, weight=settings.alpha, axis=axis, target="labels.0"
            )
        )
    return losses


@dataclass
class _Samples:
    indices: np.ndarray
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None

    @property
    def size(self) -> int:
        return int(self.indices.shape[0])

    def take(self, rows: np.ndarray) -> _Samples:
        return _Samples(
            self.indices[rows],
            {k: v[rows] for k, v in self.feeds.items()},
            None if self.labels is None else self.labels[rows],
        )


def _indexed(data: Dataset, read: int) -> Iterator[_Samples]:
    start = 0
    for batch in data.batches(read):
        size = batch.size
        yield _Samples(np.arange(start, start + size), dict(batch.feeds), batch.labels)
        start += size


def _join(parts: list[_Samples]) -> _Samples:
    if len(parts) == 1:
        return parts[0]
    try:
        feeds = {k: np.concatenate([p.feeds[k] for p in parts]) for k in parts[0].feeds}
    except ValueError:
        shapes = sorted({str(list(p.feeds[k].shape[1:])) for p in parts for k in p.feeds})
        raise DataError(
            f"Distillation needs samples of one shape, but the data has {', '.join(shapes)}.",
            hint="Pad or resize the samples to one shape.",
        ) from None
    labels = None
    if parts[0].labels is not None:
        labels = np.concatenate([p.labels for p in parts if p.labels is not None])
    return _Samples(np.concatenate([p.indices for p in parts]), feeds, labels)


def _collect(data: Dataset, held: np.ndarray) -> _Samples:
    """The held-out samples, in memory."""
    parts = []
    for samples in _indexed(data, 64):
        keep = held[samples.indices]
        if keep.any():
            parts.append(samples.take(np.flatnonzero(keep)))
    return _join(parts)


def _minibatches(
    data: Dataset,
    held: np.ndarray,
    batch_size: int,
    buffer: int,
    rng: np.random.Generator,
    *,
    drop_last: bool,
) -> Iterator[_Samples]:
    """Training minibatches: the data in order, shuffled within buffers, holdout left out."""
    pending: list[_Samples] = []
    count = 0

    def drain(final: bool) -> Iterator[_Samples]:
        nonlocal pending, count
        pool = _join(pending)
        pool = pool.take(rng.permutation(pool.size))
        full = pool.size // batch_size * batch_size
        for start in range(0, full, batch_size):
            yield pool.take(np.arange(start, start + batch_size))
        rest = pool.take(np.arange(full, pool.size))
        pending, count = ([rest], rest.size) if rest.size else ([], 0)
        if final and rest.size and not drop_last:
            pending, count = [], 0
            yield rest

    for samples in _indexed(data, max(batch_size, 64)):
        keep = np.flatnonzero(~held[samples.indices])
        if keep.size == 0:
            continue
        pending.append(samples.take(keep))
        count += keep.size
        if count >= buffer:
            yield from drain(final=False)
    if pending:
        yield from drain(final=True)


def _feeds(
    batch: _Samples, targets: Sequence[Target], teacher: TeacherLogits, losses: Sequence[Loss]
) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = dict(batch.feeds)
    for i, target in enumerate(targets):
        feeds[f"teacher.{i}"] = teacher.rows(
            target.view.output, batch.indices, as_logits=target.teacher_as_logits
        )
    if any(loss.kind == "cross_entropy" for loss in losses):
        assert batch.labels is not None
        feeds["labels.0"] = np.asarray(batch.labels).astype(np.int64, copy=False)
    return feeds


class _Evaluator:
    """Scores the trainer's current weights on the held-out samples."""

    def __init__(
        self,
        student: Model,
        targets: Sequence[Target],
        teacher: TeacherLogits,
        settings: LoopSettings,
        device: Device,
        threads: int | None,
        metric: Metric | None,
        use_labels: bool,
        chunk: int,
    ) -> None:
        self.chunk = chunk
        self.student = student
        self.targets = targets
        self.teacher = teacher
        self.settings = settings
        self.device = device
        self.threads = threads
        self.metric = metric
        self.use_labels = use_labels
        self.outputs = [v.name for v in student.graph.outputs]

    def __call__(self, trainer: Trainer, holdout: _Samples) -> HoldoutScore:
        model = self.student.copy()
        trainer.write_weights(model)
        tensors = list(dict.fromkeys([t.tensor for t in self.targets] + self.outputs))
        session = create_session(
            model, device=self.device, threads=self.threads, extra_outputs=tensors
        )
        losses, dots, norms_s, norms_t, correct = 0.0, 0.0, 0.0, 0.0, 0.0
        for start in range(0, holdout.size, self.chunk):
            part = holdout.take(np.arange(start, min(start + self.chunk, holdout.size)))
            values = session.run(part.feeds, tensors)
            for target in self.targets:
                s = np.asarray(values[target.tensor], dtype=np.float64)
                t = self.teacher.rows(
                    target.view.output, part.indices, as_logits=target.teacher_as_logits
                ).astype(np.float64)
                losses += _loss_sum(s, t, target, self.settings) / len(self.targets)
                dots += float(np.sum(s * t))
                norms_s += float(np.sum(s * s))
                norms_t += float(np.sum(t * t))
            if self.use_labels and part.labels is not None:
                outputs = {name: values[name] for name in self.outputs}
                correct += part.size * _score(outputs, part.labels, self.metric, self.outputs[0])
        cosine = dots / math.sqrt(norms_s * norms_t) if norms_s > 0 and norms_t > 0 else 0.0
        accuracy = correct / holdout.size if self.use_labels else None
        return HoldoutScore(loss=losses / holdout.size, cosine=cosine, accuracy=accuracy)


def _loss_sum(s: np.ndarray, t: np.ndarray, target: Target, settings: LoopSettings) -> float:
    """The distillation loss of every sample in the batch, summed (the graph's mean times n)."""
    n = s.shape[0]
    if settings.loss == "mse":
        return float(np.mean((s - t) ** 2)) * n
    axis = target.view.axis if target.view.axis is not None else -1
    temp = settings.temperature
    log_q = _log_softmax(s / temp, axis)
    log_p = _log_softmax(t / temp, axis)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=axis)
    return float(np.mean(kl)) * temp * temp * n


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def _score(
    outputs: Mapping[str, np.ndarray], labels: np.ndarray, metric: Metric | None, first: str
) -> float:
    if metric is not None:
        return float(metric(outputs, labels))
    predicted = np.asarray(outputs[first]).argmax(axis=-1)
    return float(np.mean(predicted == np.asarray(labels).reshape(predicted.shape)))


def _score_text(score: HoldoutScore) -> str:
    text = f"loss {score.loss:.4g}, cosine {score.cosine:.4f}"
    if score.accuracy is not None:
        text += f", accuracy {score.accuracy:.2%}"
    return text


def _say(line: str) -> None:
    console.err.print(f"  distill: {line}")

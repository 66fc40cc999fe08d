"""The accuracy budget: revert the quantized ops that hurt most to float until the model meets
a bound (`max_accuracy_drop` with labels, `min_cosine` / `min_sqnr` against the float model).

How (all on a small, fixed subset of the data, so every candidate is judged on the same
samples):

1. The fully quantized model is evaluated; if it meets the budget nothing is reverted.
2. Each quantized op is ranked by the error it *adds*: the relative noise (noise power over
   signal power, against the float model) at its output minus the worst relative noise at its
   activation inputs, both measured in one per-layer comparison of the quantized model with
   the float one. The noise an op receives from upstream is not held against it.
3. A bisection over k (revert the k worst) finds the fewest reverted ops that meet the
   budget, assuming that reverting more never hurts; it stops after `max_evals`
   evaluations and keeps the smallest k that was seen to pass.

The ranking is a proxy (it ignores how much each op's noise is amplified downstream), so the
bisection checks every choice on the real outputs: what is returned has been measured to meet
the budget on the subset, and the report says which ops went back to float and why.

Nothing here knows how to quantize: the pass hands in `build(reverted) -> Model`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.console import err
from graphopt.context import Context
from graphopt.data import Batch, Dataset
from graphopt.errors import GraphoptError
from graphopt.layerwise import compare_layers
from graphopt.model import Model
from graphopt.validate import FidelityAccumulator, FidelityReport, Gates

Metric = Callable[[Mapping[str, np.ndarray], np.ndarray], float]


@dataclass(frozen=True)
class Budget:
    """The bound the quantized model must meet, and what the search may spend."""

    max_accuracy_drop: float | None = None
    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    samples: int = 128
    max_evals: int = 10

    @property
    def active(self) -> bool:
        return any(
            bound is not None
            for bound in (self.max_accuracy_drop, self.min_cosine, self.min_sqnr_db)
        )

    def gates(self) -> Gates:
        return Gates(
            min_cosine=self.min_cosine,
            min_sqnr_db=self.min_sqnr_db,
            max_accuracy_drop=self.max_accuracy_drop,
        )


@dataclass(frozen=True)
class SiteTensors:
    """A quantized op as the ranking sees it: its label and the tensors around it."""

    label: str
    op: str
    inputs: tuple[str, ...]
    output: str


@dataclass
class Evaluation:
    """One candidate judged on the budget's subset."""

    reverted: int
    passed: bool
    summary: str

    def to_dict(self) -> dict[str, Any]:
        return {"reverted": self.reverted, "passed": self.passed, "summary": self.summary}


@dataclass
class Outcome:
    """What the search chose and what it measured on the way."""

    model: Model | None
    reverted: list[tuple[SiteTensors, float]]
    evaluations: list[Evaluation] = field(default_factory=list)
    data: str = ""
    ranking: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "evaluations": [e.to_dict() for e in self.evaluations],
            "reverted": [
                {"node": site.label, "op": site.op, "added_noise": _round(noise)}
                for site, noise in self.reverted
            ],
        }


class EvalSet:
    """The budget's subset, held in memory, with the float model's outputs on it."""

    def __init__(self, reference: Model, dataset: Dataset, samples: int, ctx: Context) -> None:
        from graphopt.runtime import create_session

        self.dataset = _MemoryDataset(dataset, samples, ctx.batch_size)
        session = create_session(
            reference, device=ctx.device, threads=ctx.threads, workdir=ctx.workdir
        )
        self.output_names = list(session.output_names)
        self.reference = [
            session.run({n: b.feeds[n] for n in session.input_names}) for b in self.dataset.held
        ]
        self._ctx = ctx

    def evaluate(self, candidate: Model, gates: Gates, metric: Metric | None) -> FidelityReport:
        from graphopt.runtime import create_session

        ctx = self._ctx
        session = create_session(
            candidate, device=ctx.device, threads=ctx.threads, workdir=ctx.workdir
        )
        accumulator = FidelityAccumulator(self.output_names, metric=metric)
        for batch, reference in zip(self.dataset.held, self.reference, strict=True):
            outputs = session.run({n: batch.feeds[n] for n in session.input_names})
            accumulator.update(reference, outputs, batch.labels, samples=batch.size)
        report = accumulator.report(gates)
        report.data = self.dataset.description
        return report


def rank(
    reference: Model, candidate: Model, sites: Sequence[SiteTensors], evalset: EvalSet, ctx: Context
) -> list[tuple[SiteTensors, float]]:
    """Sites by the relative noise they add, worst first (see the module docstring)."""
    tensors = sorted({t for site in sites for t in (*site.inputs, site.output)})
    layers = compare_layers(
        reference,
        candidate,
        evalset.dataset,
        batch_size=ctx.batch_size,
        device=ctx.device,
        threads=ctx.threads,
        workdir=ctx.workdir,
        tensors=tensors,
    )
    noise = {layer.tensor: _relative_noise(layer.fidelity.sqnr_db) for layer in layers.layers}
    scored = []
    for site in sites:
        out = noise.get(site.output)
        if out is None:  # not comparable (renamed, non-float): rank it last
            scored.append((site, -np.inf))
            continue
        upstream = max((noise.get(t, 0.0) for t in site.inputs), default=0.0)
        scored.append((site, out - upstream))
    scored.sort(key=lambda item: -item[1])
    return scored


def search(
    ranked: Sequence[tuple[SiteTensors, float]],
    build: Callable[[frozenset[str]], Model],
    judge: Callable[[Model], FidelityReport],
    *,
    max_evals: int,
    first: tuple[Model, FidelityReport],
) -> Outcome:
    """Bisect over how many of the worst-ranked sites go back to float.

    Args:
        ranked: sites worst first.
        build: the model with the given site labels left in float.
        judge: the candidate's report on the budget subset (gates applied).
        max_evals: evaluations allowed after `first`.
        first: the fully quantized model and its report (it failed the budget).
    """
    evaluations = [Evaluation(0, first[1].passed, _summary(first[1]))]
    if first[1].passed:
        return Outcome(model=first[0], reverted=[], evaluations=evaluations)
    low, high = 0, len(ranked)  # k = low fails; k = high (all float) is taken to pass
    best: Model | None = None
    while high - low > 1 and len(evaluations) <= max_evals:
        middle = (low + high) // 2
        labels = frozenset(site.label for site, _ in ranked[:middle])
        candidate = build(labels)
        report = judge(candidate)
        evaluations.append(Evaluation(middle, report.passed, _summary(report)))
        err.print(
            f"  budget: {middle} of {len(ranked)} op(s) in float -> "
            f"{'meets' if report.passed else 'misses'} the budget ({_summary(report)})"
        )
        if report.passed:
            high, best = middle, candidate
        else:
            low = middle
    if best is None:
        # Nothing quantized met the budget (or the evaluations ran out before one did).
        return Outcome(model=None, reverted=list(ranked), evaluations=evaluations)
    return Outcome(model=best, reverted=list(ranked[:high]), evaluations=evaluations)


def eval_data(budget: Budget, ctx: Context) -> Dataset:
    """The data the budget is judged on: the calibration data (labelled, when accuracy is
    bounded), else the validation data when accuracy needs labels only it has."""
    calib, val = ctx.calib_data, ctx.val_data
    if budget.max_accuracy_drop is None:
        assert calib is not None
        return calib
    if calib is not None and calib.has_labels:
        return calib
    if val is not None and val.has_labels:
        return val
    raise GraphoptError(
        "The quantize pass's max_accuracy_drop needs labelled data to measure accuracy, and "
        "neither the calibration data nor the validation data has labels.",
        hint="Add a 'labels' array to the .npz given to --data or --val-data, or bound the "
        "error against the float model with min_cosine or min_sqnr instead.",
    )


# ---------------------------------------------------------------------------- helpers


class _MemoryDataset(Dataset):
    """The first `samples` samples of a dataset, read once and held as batches (the search
    runs the same samples many times)."""

    def __init__(self, dataset: Dataset, samples: int, batch_size: int) -> None:
        self.held: list[Batch] = []
        count = 0
        for batch in dataset.batches(batch_size):
            if count >= samples:
                break
            self.held.append(batch)
            count += batch.size
        self._count = count
        self.has_labels = dataset.has_labels
        self.is_random = dataset.is_random
        self.description = f"the first {count} samples of {dataset.description}"

    def __len__(self) -> int:
        return self._count

    def batches(self, batch_size: int) -> Iterator[Batch]:  # the held batches, as read
        return iter(self.held)

    def num_batches(self, batch_size: int) -> int:
        return len(self.held)


def _relative_noise(sqnr_db: float | None) -> float:
    if sqnr_db is None or np.isnan(sqnr_db):
        return np.inf
    return float(10.0 ** (-sqnr_db / 10.0))


def _summary(report: FidelityReport) -> str:
    parts = []
    if report.worst_cosine is not None:
        parts.append(f"cosine {report.worst_cosine:.5f}")
    if report.min_sqnr_db is not None:
        parts.append(f"SQNR {report.min_sqnr_db:.1f} dB")
    if report.accuracy_drop is not None:
        parts.append(f"accuracy drop {report.accuracy_drop * 100:.2f} points")
    return ", ".join(parts) or "no metric"


def _round(value: float) -> float | str:
    return "inf" if not np.isfinite(value) else float(f"{value:.4g}")

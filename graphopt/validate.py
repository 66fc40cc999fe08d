"""Validation is a comparator: run two models on the same data and measure how far apart they are.

`compare` runs a reference and a candidate model on ONNX Runtime batch by batch and feeds a
`FidelityAccumulator`, which keeps a handful of float64 running sums per output (never the
outputs themselves), so validation streams over data of any size. The result is a
`FidelityReport`: per-output metrics, accuracy of both models when the data has labels, the
gates that were applied and one readable sentence per failure. `bool(report)` says whether the
gates hold.

Metrics per output, over the whole flattened output of all samples:

- cosine similarity: Σab / sqrt(Σa² Σb²) (1 when both are all zeros);
- SQNR in dB: 10 log10(Σref² / Σ(ref - cand)²) (inf when identical);
- max and mean absolute error;
- top-1 agreement, for logits-like outputs (2-D [N, C] float with C > 1).

Fail-closed rules: a candidate output that is missing, has another shape, or holds NaN/inf
where the reference does not is a failure whatever the gates; so is a gate that was set but
could not be measured (accuracy without labels, top-1 agreement without a logits-like output),
and a comparison over zero samples.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table

from graphopt.errors import DataError, GateFailed, GraphoptError, RecipeError

if TYPE_CHECKING:
    from graphopt.data import Dataset
    from graphopt.model import Model

Metric = Callable[[dict[str, np.ndarray], np.ndarray], float]

# Elements per chunk when streaming one output of one batch, to bound float64 temporaries.
_CHUNK = 1 << 22
# Accuracies are means of counts; allow for their rounding when checking max_accuracy_drop.
_ACCURACY_SLACK = 1e-12


# ---------------------------------------------------------------------------- gates

_GATE_RANGES: dict[str, tuple[float, float]] = {
    "min_cosine": (-1.0, 1.0),
    "min_sqnr_db": (-math.inf, math.inf),
    "max_abs_error": (0.0, math.inf),
    "min_top1_agreement": (0.0, 1.0),
    "max_accuracy_drop": (0.0, math.inf),
}


@dataclass(frozen=True)
class Gates:
    """Thresholds the candidate must meet; None leaves a metric unchecked.

    Attributes:
        min_cosine: lowest cosine similarity allowed for any output.
        min_sqnr_db: lowest signal-to-quantization-noise ratio (dB) for any output.
        max_abs_error: largest absolute difference allowed in any output element.
        min_top1_agreement: lowest fraction of samples whose arg-max class agrees, for every
            logits-like output.
        max_accuracy_drop: largest allowed reference accuracy minus candidate accuracy, in
            absolute fractions (0.01 = one percentage point); needs labelled data.
    """

    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    max_abs_error: float | None = None
    min_top1_agreement: float | None = None
    max_accuracy_drop: float | None = None

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], where: str) -> Gates:
        """Gates from a recipe's `validation` section or `--gate` flags.

        Raises:
            RecipeError: not a mapping, an unknown key, a value that is not a number, or a
                number out of range; the message names `where` and the key.
        """
        known = [f.name for f in fields(cls)]
        if not isinstance(mapping, Mapping):
            raise RecipeError(
                f"{where}: validation gates must be a mapping of gate names to numbers, "
                f"not {type(mapping).__name__}.",
                hint=f"Known gates: {', '.join(known)}.",
            )
        values: dict[str, float | None] = {}
        for key, value in mapping.items():
            if key not in known:
                raise RecipeError(
                    f"{where}: unknown validation gate '{key}'.",
                    hint=f"Known gates: {', '.join(known)}.",
                )
            if value is None:
                values[key] = None
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise RecipeError(
                    f"{where}: gate '{key}' must be a number, not {value!r} "
                    f"({type(value).__name__}).",
                    hint=f"Write e.g. {key}: {_example(key)}.",
                )
            number = float(value)
            low, high = _GATE_RANGES[key]
            if math.isnan(number) or not low <= number <= high:
                raise RecipeError(
                    f"{where}: gate '{key}' is {value!r}, outside its range {_range_text(key)}.",
                    hint=f"Write e.g. {key}: {_example(key)}.",
                )
            values[key] = number
        return cls(**values)

    def to_dict(self) -> dict[str, float]:
        """The gates that are set (an empty dict when none is)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def _range_text(key: str) -> str:
    low, high = _GATE_RANGES[key]
    if math.isinf(low) and math.isinf(high):
        return "of finite numbers"
    if math.isinf(high):
        return f">= {low:g}"
    return f"[{low:g}, {high:g}]"


def _example(key: str) -> str:
    return {
        "min_cosine": "0.999",
        "min_sqnr_db": "30",
        "max_abs_error": "0.01",
        "min_top1_agreement": "0.99",
        "max_accuracy_drop": "0.01",
    }[key]


# ---------------------------------------------------------------------------- report


@dataclass
class OutputFidelity:
    """How close one candidate output is to the reference's.

    Metrics are None when the output could not be compared (`problem` says why); they are
    inf/nan when the candidate held NaN or inf where the reference did not (`nonfinite`).
    """

    name: str
    max_abs: float | None
    mean_abs: float | None
    cosine: float | None
    sqnr_db: float | None
    top1_agreement: float | None
    samples: int
    elements: int = 0
    nonfinite: int = 0
    reference_nonfinite: int = 0
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_abs": _json_float(self.max_abs),
            "mean_abs": _json_float(self.mean_abs),
            "cosine": _json_float(self.cosine),
            "sqnr_db": _json_float(self.sqnr_db),
            "top1_agreement": _json_float(self.top1_agreement),
            "samples": int(self.samples),
            "elements": int(self.elements),
            "nonfinite": int(self.nonfinite),
            "reference_nonfinite": int(self.reference_nonfinite),
            "problem": self.problem,
        }


@dataclass
class FidelityReport:
    """Per-output metrics, accuracies and gate failures; true when every gate holds.

    Attributes:
        outputs: one entry per reference output, in the reference's order.
        samples: samples compared.
        reference_accuracy / candidate_accuracy: sample-weighted mean of the metric over
            labelled batches, or None without labels.
        metric_name: what the accuracies measure ("top-1 accuracy" or the user function).
        gates: the gates applied.
        failures: one sentence per failed gate or broken output.
        data: a description of the data the models ran on, when known.
        random_data: the data was random, so accuracy numbers mean nothing.
    """

    outputs: list[OutputFidelity]
    samples: int
    reference_accuracy: float | None
    candidate_accuracy: float | None
    metric_name: str | None
    gates: Gates
    failures: list[str]
    data: str | None = None
    random_data: bool = False

    def __bool__(self) -> bool:
        return not self.failures

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def accuracy_drop(self) -> float | None:
        if self.reference_accuracy is None or self.candidate_accuracy is None:
            return None
        return self.reference_accuracy - self.candidate_accuracy

    @property
    def worst_cosine(self) -> float | None:
        """Lowest cosine over the outputs (nan if any output held NaN/inf; None if none)."""
        return _worst([o.cosine for o in self.outputs])

    @property
    def min_sqnr_db(self) -> float | None:
        """Lowest SQNR over the outputs (nan if any output held NaN/inf; None if none)."""
        return _worst([o.sqnr_db for o in self.outputs])

    def raise_for_failures(self) -> None:
        """Raise GateFailed naming every failure, if there is any."""
        if self.failures:
            raise GateFailed(
                "Validation failed: " + "; ".join(self.failures) + ".",
                hint="Relax the gates, or change the passes' options.",
            )

    def table(self) -> Table:
        """Per-output metrics, with accuracy and the verdict in the caption."""
        title = "Fidelity: candidate vs reference on "
        title += self.data if self.data else f"{self.samples:,} samples"
        table = Table(title=title, title_justify="left")
        table.add_column("output")
        for column in ("max abs", "mean abs", "cosine", "SQNR dB", "top-1 agree"):
            table.add_column(column, justify="right")
        table.add_column("note")
        for out in self.outputs:
            note = out.problem or ""
            if out.nonfinite:
                note = f"{out.nonfinite:,} NaN/inf in candidate"
            elif out.reference_nonfinite:
                note = f"{out.reference_nonfinite:,} NaN/inf in reference only"
            table.add_row(
                out.name,
                _cell(out.max_abs, ".3g"),
                _cell(out.mean_abs, ".3g"),
                _cell(out.cosine, ".6f"),
                _cell(out.sqnr_db, ".2f"),
                _cell(out.top1_agreement, ".2%"),
                f"[red]{note}[/]" if note else "",
            )
        lines = []
        if self.reference_accuracy is not None:
            candidate = _cell(self.candidate_accuracy, ".4f")
            lines.append(
                f"{self.metric_name}: reference {self.reference_accuracy:.4f}, "
                f"candidate {candidate}"
            )
        if self.random_data:
            lines.append("[yellow]random data: these numbers say nothing about accuracy[/]")
        gates = ", ".join(f"{k}={v:g}" for k, v in self.gates.to_dict().items())
        verdict = "[green]PASS[/]" if self else "[bold red]FAIL[/]"
        lines.append(f"{verdict} (gates: {gates or 'none'})")
        lines.extend(f"[red]- {failure}[/]" for failure in self.failures)
        table.caption = "\n".join(lines)
        table.caption_justify = "left"
        return table

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (inf and nan written as the strings "inf", "-inf", "nan")."""
        return {
            "passed": bool(self),
            "samples": int(self.samples),
            "data": self.data,
            "random_data": bool(self.random_data),
            "metric": self.metric_name,
            "reference_accuracy": _json_float(self.reference_accuracy),
            "candidate_accuracy": _json_float(self.candidate_accuracy),
            "accuracy_drop": _json_float(self.accuracy_drop),
            "worst_cosine": _json_float(self.worst_cosine),
            "min_sqnr_db": _json_float(self.min_sqnr_db),
            "gates": self.gates.to_dict(),
            "failures": list(self.failures),
            "outputs": [o.to_dict() for o in self.outputs],
        }


def _worst(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    if not known:
        return None
    if any(math.isnan(v) for v in known):
        return math.nan
    return min(known)


def _cell(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return format(value, spec)


def _json_float(value: float | None) -> float | str | None:
    if value is None:
        return None
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return value


# ---------------------------------------------------------------------------- streaming


@dataclass
class _OutputSums:
    """Running float64 sums for one output: enough for every metric, O(1) memory."""

    samples: int = 0
    elements: int = 0
    sum_ab: float = 0.0
    sum_aa: float = 0.0
    sum_bb: float = 0.0
    sum_dd: float = 0.0
    sum_abs: float = 0.0
    max_abs: float = 0.0
    nonfinite: int = 0
    reference_nonfinite: int = 0
    logits_like: bool = False
    top1_agree: int = 0
    top1_rows: int = 0
    numeric: bool = True
    problem: str | None = None

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        a_all = ref.reshape(-1)
        b_all = cand.reshape(-1)
        for start in range(0, a_all.size, _CHUNK):
            a = a_all[start : start + _CHUNK].astype(np.float64)
            b = b_all[start : start + _CHUNK].astype(np.float64)
            finite = np.isfinite(a) & np.isfinite(b)
            if not finite.all():
                # Equal non-finite values (e.g. -inf logits of masked positions in both
                # models) agree and are left out; anything else is counted and reported.
                same = (a == b) | (np.isnan(a) & np.isnan(b))
                bad = ~finite & ~same
                cand_bad = bad & ~np.isfinite(b)
                self.nonfinite += int(np.count_nonzero(cand_bad))
                self.reference_nonfinite += int(np.count_nonzero(bad & ~cand_bad))
                a = a[finite]
                b = b[finite]
            d = a - b
            self.sum_ab += float(np.dot(a, b))
            self.sum_aa += float(np.dot(a, a))
            self.sum_bb += float(np.dot(b, b))
            self.sum_dd += float(np.dot(d, d))
            if d.size:
                absd = np.abs(d)
                self.sum_abs += float(absd.sum())
                self.max_abs = max(self.max_abs, float(absd.max()))
            self.elements += int(a.size)

    def add_top1(self, ref: np.ndarray, cand: np.ndarray) -> None:
        self.logits_like = True
        self.top1_agree += int(np.count_nonzero(ref.argmax(axis=1) == cand.argmax(axis=1)))
        self.top1_rows += int(ref.shape[0])

    def result(self, name: str) -> OutputFidelity:
        if self.problem is not None:
            return OutputFidelity(
                name, None, None, None, None, None, self.samples, problem=self.problem
            )
        if not self.numeric:
            return OutputFidelity(name, 0.0, 0.0, None, None, None, self.samples)
        top1 = self.top1_agree / self.top1_rows if self.logits_like and self.top1_rows else None
        if self.nonfinite or self.reference_nonfinite:
            return OutputFidelity(
                name,
                math.inf,
                math.inf,
                math.nan,
                math.nan,
                top1,
                self.samples,
                self.elements,
                self.nonfinite,
                self.reference_nonfinite,
            )
        return OutputFidelity(
            name,
            max_abs=self.max_abs,
            mean_abs=self.sum_abs / self.elements if self.elements else 0.0,
            cosine=_cosine(self.sum_ab, self.sum_aa, self.sum_bb, self.sum_dd),
            sqnr_db=_sqnr_db(self.sum_aa, self.sum_dd),
            top1_agreement=top1,
            samples=self.samples,
            elements=self.elements,
        )


def _cosine(ab: float, aa: float, bb: float, dd: float) -> float:
    if dd == 0.0:  # identical (all zeros included): exactly 1, whatever the rounding
        return 1.0
    if aa == 0.0 or bb == 0.0:
        return 0.0
    # Clamp: rounding can push identical vectors a hair past 1.
    return max(-1.0, min(1.0, ab / (math.sqrt(aa) * math.sqrt(bb))))


def _sqnr_db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _is_numeric(dtype: np.dtype) -> bool:
    # ml_dtypes' bfloat16/float8 have kind "V" but convert to float64.
    return dtype.kind in "biuf" or (dtype.kind == "V" and dtype.itemsize <= 2)


def _is_logits_like(array: np.ndarray) -> bool:
    return array.ndim == 2 and array.shape[1] > 1 and array.dtype.kind in "fV"


class _TopOne:
    """The default metric: top-1 accuracy of one output against integer class labels."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.__name__ = "top-1 accuracy"

    def __call__(self, outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> float:
        scores = np.asarray(outputs[self.output])
        if scores.ndim == 0:
            raise DataError(f"Output '{self.output}' is a scalar; top-1 accuracy needs classes.")
        predicted = scores.argmax(axis=-1)
        labels = np.asarray(labels)
        if labels.shape == scores.shape and scores.shape[-1] > 1:
            labels = labels.argmax(axis=-1)  # one-hot or probabilities
        elif labels.shape != predicted.shape and labels.size == predicted.size:
            labels = labels.reshape(predicted.shape)  # e.g. [N, 1] labels
        if labels.shape != predicted.shape:
            raise DataError(
                f"Labels of shape {list(labels.shape)} do not fit output '{self.output}' of "
                f"shape {list(scores.shape)}: top-1 accuracy needs one class index per "
                f"row, shape {list(predicted.shape)}.",
                hint="Check the labels array, or pass your own --metric.",
            )
        if predicted.size == 0:
            return 0.0
        return float(np.mean(predicted == labels))


class FidelityAccumulator:
    """Streams batches of reference and candidate outputs into running sums.

    Memory is O(number of outputs): each batch is folded into float64 sums and dropped.
    Feeding the same data in one batch or many gives the same numbers (up to float64
    summation order).
    """

    def __init__(self, output_names: Sequence[str], *, metric: Metric | None = None) -> None:
        """
        Args:
            output_names: the reference outputs to compare, in report order.
            metric: `fn(outputs, labels) -> float`, the batch's mean score; defaults to
                top-1 accuracy of the first output.
        """
        self.output_names = list(output_names)
        self._sums = {name: _OutputSums() for name in self.output_names}
        self._user_metric = metric is not None
        if metric is None and self.output_names:
            metric = _TopOne(self.output_names[0])
        self._metric = metric
        self.metric_name = _callable_name(metric) if metric is not None else None
        self.samples = 0
        self._labelled = 0
        self._reference_score = 0.0
        self._candidate_score = 0.0
        self._candidate_score_missing: str | None = None

    def update(
        self,
        reference: Mapping[str, np.ndarray],
        candidate: Mapping[str, np.ndarray],
        labels: np.ndarray | None = None,
        *,
        samples: int | None = None,
    ) -> None:
        """Fold one batch in.

        Args:
            reference: the reference's outputs for the batch, by name.
            candidate: the candidate's outputs, by name; missing or misshapen ones are
                recorded as failures, not raised.
            labels: the batch's labels, or None.
            samples: samples in the batch (default: from labels, else from the first
                output's leading dimension).
        """
        count = _batch_size(samples, labels, reference, self.output_names)
        self.samples += count
        for name in self.output_names:
            sums = self._sums[name]
            if sums.problem is not None:
                continue
            if name not in reference:
                raise GraphoptError(f"The reference produced no output '{name}' for a batch.")
            ref = np.asarray(reference[name])
            if name not in candidate or candidate[name] is None:
                sums.problem = "missing from the candidate's outputs"
                continue
            cand = np.asarray(candidate[name])
            if ref.shape != cand.shape:
                sums.problem = (
                    f"shape {list(cand.shape)} in the candidate but {list(ref.shape)} in the "
                    "reference"
                )
                continue
            sums.samples += count
            if not (_is_numeric(ref.dtype) and _is_numeric(cand.dtype)):
                sums.numeric = False
                if not np.array_equal(ref, cand):
                    sums.problem = "non-numeric values differ from the reference"
                continue
            sums.add(ref, cand)
            if _is_logits_like(ref):
                sums.add_top1(ref, cand)
        if labels is not None and self._metric is not None:
            self._update_accuracy(reference, candidate, labels, count)

    def _update_accuracy(
        self,
        reference: Mapping[str, np.ndarray],
        candidate: Mapping[str, np.ndarray],
        labels: np.ndarray,
        count: int,
    ) -> None:
        assert self._metric is not None
        ref_outputs = {n: np.asarray(reference[n]) for n in self.output_names if n in reference}
        self._reference_score += count * self._score(ref_outputs, labels, "reference")
        self._labelled += count
        if self._candidate_score_missing is not None:
            return
        broken = [n for n in self.output_names if self._sums[n].problem is not None]
        cand_outputs = {n: np.asarray(candidate[n]) for n in self.output_names if n in candidate}
        if broken:
            # The metric may need a broken output; measure only if it does not.
            try:
                score = float(self._metric(cand_outputs, labels))
            except Exception:
                self._candidate_score_missing = (
                    f"output(s) {', '.join(repr(n) for n in broken)} of the candidate could "
                    "not be compared"
                )
                return
        else:
            score = self._score(cand_outputs, labels, "candidate")
        self._candidate_score += count * score

    def _score(self, outputs: dict[str, np.ndarray], labels: np.ndarray, which: str) -> float:
        assert self._metric is not None
        try:
            value = self._metric(outputs, labels)
        except GraphoptError:
            raise
        except Exception as exc:
            raise GraphoptError(
                f"The metric '{self.metric_name}' raised {type(exc).__name__} on the "
                f"{which} model's outputs: {exc}",
                hint="The metric must be fn(outputs: dict[str, ndarray], labels: ndarray) "
                "-> float, the batch's mean score.",
            ) from exc
        if isinstance(value, bool) or not isinstance(value, numbers.Real | np.number):
            raise GraphoptError(
                f"The metric '{self.metric_name}' returned {value!r} "
                f"({type(value).__name__}) for the {which} model, not a number.",
                hint="Return the batch's mean score as a float.",
            )
        return float(value)

    def report(self, gates: Gates = Gates()) -> FidelityReport:
        """The metrics so far, with `gates` applied."""
        outputs = [self._sums[name].result(name) for name in self.output_names]
        reference_accuracy = candidate_accuracy = None
        if self._labelled:
            reference_accuracy = self._reference_score / self._labelled
            if self._candidate_score_missing is None:
                candidate_accuracy = self._candidate_score / self._labelled
        report = FidelityReport(
            outputs=outputs,
            samples=self.samples,
            reference_accuracy=reference_accuracy,
            candidate_accuracy=candidate_accuracy,
            metric_name=self.metric_name if self._labelled else None,
            gates=gates,
            failures=[],
        )
        report.failures = self._failures(report, gates)
        return report

    def _failures(self, report: FidelityReport, gates: Gates) -> list[str]:
        failures: list[str] = []
        if self.samples == 0:
            failures.append("no samples were compared (the data is empty)")
        for out in report.outputs:
            where = f"output '{out.name}'"
            if out.problem is not None:
                failures.append(f"{where}: {out.problem}")
                continue
            if out.nonfinite:
                failures.append(
                    f"{where}: the candidate has {out.nonfinite:,} non-finite value(s) "
                    "(NaN/inf) where the reference does not"
                )
            if out.reference_nonfinite:
                failures.append(
                    f"{where}: the reference has {out.reference_nonfinite:,} non-finite "
                    "value(s) (NaN/inf) where the candidate does not, so the outputs cannot be "
                    "compared there"
                )
            if out.nonfinite or out.reference_nonfinite:
                continue
            failures.extend(_gate_failures(where, out, gates))
        if gates.min_top1_agreement is not None and not any(
            o.top1_agreement is not None for o in report.outputs
        ):
            failures.append(
                f"min_top1_agreement {gates.min_top1_agreement:g} is set but no output is "
                "logits-like (2-D [N, C] floats with C > 1), so top-1 agreement was not measured"
            )
        if gates.max_accuracy_drop is not None:
            failures.extend(self._accuracy_failures(report, gates.max_accuracy_drop))
        return failures

    def _accuracy_failures(self, report: FidelityReport, limit: float) -> list[str]:
        if report.reference_accuracy is None:
            return [
                f"max_accuracy_drop {limit:g} is set but the data has no labels, so accuracy "
                "was not measured (give data with labels, e.g. a 'labels' array in the .npz)"
            ]
        if report.candidate_accuracy is None:
            return [
                f"max_accuracy_drop {limit:g} is set but the candidate's "
                f"{report.metric_name} could not be measured: {self._candidate_score_missing}"
            ]
        drop = report.reference_accuracy - report.candidate_accuracy
        if drop <= limit + _ACCURACY_SLACK:
            return []
        return [
            f"{report.metric_name} dropped by {_show(drop, limit)} (reference "
            f"{report.reference_accuracy:.4f}, candidate {report.candidate_accuracy:.4f}) "
            f"> max_accuracy_drop {limit:g}"
        ]


def _gate_failures(where: str, out: OutputFidelity, gates: Gates) -> list[str]:
    failures = []
    # `not (x >= bound)` rather than `x < bound`, so that a nan never passes.
    if gates.min_cosine is not None and out.cosine is not None:
        if not out.cosine >= gates.min_cosine:
            failures.append(
                f"{where}: cosine {_show(out.cosine, gates.min_cosine)} < min_cosine "
                f"{gates.min_cosine:g}"
            )
    if gates.min_sqnr_db is not None and out.sqnr_db is not None:
        if not out.sqnr_db >= gates.min_sqnr_db:
            failures.append(
                f"{where}: SQNR {_show(out.sqnr_db, gates.min_sqnr_db)} dB < min_sqnr_db "
                f"{gates.min_sqnr_db:g}"
            )
    if gates.max_abs_error is not None and out.max_abs is not None:
        if not out.max_abs <= gates.max_abs_error:
            failures.append(
                f"{where}: max abs error {_show(out.max_abs, gates.max_abs_error)} > "
                f"max_abs_error {gates.max_abs_error:g}"
            )
    if gates.min_top1_agreement is not None and out.top1_agreement is not None:
        if not out.top1_agreement >= gates.min_top1_agreement:
            failures.append(
                f"{where}: top-1 agreement "
                f"{_show(out.top1_agreement, gates.min_top1_agreement)} < min_top1_agreement "
                f"{gates.min_top1_agreement:g}"
            )
    return failures


def _show(value: float, bound: float) -> str:
    """`value` with enough digits that it does not print equal to `bound`."""
    for digits in range(4, 18):
        text = f"{value:.{digits}g}"
        if float(text) != float(f"{bound:.{digits}g}"):
            return text
    return repr(value)


def _batch_size(
    samples: int | None,
    labels: np.ndarray | None,
    reference: Mapping[str, np.ndarray],
    names: Sequence[str],
) -> int:
    if samples is not None:
        return int(samples)
    if labels is not None and np.ndim(labels) > 0:
        return len(labels)
    for name in names:
        if name in reference and np.ndim(reference[name]) > 0:
            return int(np.shape(reference[name])[0])
    return 1


def _callable_name(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or fn)


# ---------------------------------------------------------------------------- running


def compare(
    reference: Model | str | os.PathLike[str],
    candidate: Model | str | os.PathLike[str],
    dataset: Dataset,
    *,
    gates: Gates = Gates(),
    batch_size: int = 32,
    device: str = "auto",
    threads: int | None = None,
    metric: Metric | None = None,
    workdir: str | os.PathLike[str] | None = None,
) -> FidelityReport:
    """Run both models on ONNX Runtime over `dataset`, batch by batch, and compare outputs.

    Outputs are matched by name. A candidate output that is missing or has another shape is
    a failure in the report, not an exception.

    Args:
        reference: the model to compare against (a Model or a path).
        candidate: the model under test.
        dataset: the data both run on; with labels, accuracy of both is measured.
        gates: thresholds the candidate must meet.
        batch_size: samples per ORT run.
        device: "auto", "cpu" or "cuda".
        threads: ORT intra-op threads, None for ORT's choice.
        metric: `fn(outputs, labels) -> float` (batch mean); default top-1 accuracy of the
            first output.
        workdir: scratch folder for serialized models.

    Raises:
        DataError: the data does not feed the candidate.
        RuntimeFailed: ONNX Runtime refused a model.
    """
    from graphopt.runtime import create_session, run_dataset

    scratch = Path(workdir) if workdir is not None else None
    ref_session = create_session(reference, device=device, threads=threads, workdir=scratch)
    cand_session = create_session(candidate, device=device, threads=threads, workdir=scratch)
    names = list(ref_session.output_names)
    shared = [name for name in names if name in set(cand_session.output_names)]
    cand_inputs = list(cand_session.input_names)
    accumulator = FidelityAccumulator(names, metric=metric)
    for batch, ref_outputs in run_dataset(
        ref_session, dataset, batch_size=batch_size, description="validating"
    ):
        lacking = [name for name in cand_inputs if name not in batch.feeds]
        if lacking:
            raise DataError(
                f"The candidate model needs input(s) {', '.join(map(repr, lacking))} that the "
                f"reference does not have, so the data ({dataset.description}) cannot feed it.",
                hint="Compare models with the same inputs.",
            )
        feeds = {name: batch.feeds[name] for name in cand_inputs}
        cand_outputs = cand_session.run(feeds, shared) if shared else {}
        accumulator.update(ref_outputs, cand_outputs, batch.labels, samples=batch.size)
    report = accumulator.report(gates)
    report.data = dataset.description
    report.random_data = bool(dataset.is_random)
    return report


def load_metric(spec: str) -> Metric:
    """Import a metric the user named on the command line: "module:function" or
    "path/to/file.py:function". Never call this with text from a recipe or model file.

    Raises:
        GraphoptError: the spec is malformed, the module cannot be imported, or the
            function is missing or not callable.
    """
    from graphopt.usercode import load_callable

    return load_callable(spec, what="metric")


__all__ = [
    "FidelityAccumulator",
    "FidelityReport",
    "Gates",
    "Metric",
    "OutputFidelity",
    "compare",
    "load_metric",
]

"""Character error rate and fidelity of CTC outputs against the float model."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


@dataclass
class Accuracy:
    """Streaming CER and exact-line accuracy."""

    edits: int = 0
    chars: int = 0
    lines: int = 0
    exact: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)

    def add(self, predictions: list[str], truths: list[str]) -> None:
        for pred, truth in zip(predictions, truths, strict=True):
            distance = levenshtein(pred, truth)
            self.edits += distance
            self.chars += len(truth)
            self.lines += 1
            self.exact += distance == 0
            if distance and len(self.examples) < 5:
                self.examples.append((truth, pred))

    def to_dict(self) -> dict[str, object]:
        return {
            "cer": self.edits / max(self.chars, 1),
            "line_accuracy": self.exact / max(self.lines, 1),
            "edits": self.edits,
            "chars": self.chars,
            "lines": self.lines,
            "examples_truth_pred": self.examples,
        }


@dataclass
class Fidelity:
    """Candidate probabilities [N, T, C] against the float model's, streamed by batch.

    cosine: per line, over the flattened [T, C] probabilities (mean and minimum over lines);
    argmax agreement: the fraction of time steps whose most likely class is the same;
    text agreement: the fraction of lines that decode to the same string.
    """

    cosines: list[float] = field(default_factory=list)
    steps: int = 0
    steps_equal: int = 0
    lines: int = 0
    lines_equal: int = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        ref = reference.reshape(len(reference), -1).astype(np.float64)
        cand = candidate.reshape(len(candidate), -1).astype(np.float64)
        dots = np.einsum("ij,ij->i", ref, cand)
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
        self.cosines.extend((dots / np.maximum(norms, 1e-30)).tolist())
        ref_idx, cand_idx = reference.argmax(axis=2), candidate.argmax(axis=2)
        self.steps += ref_idx.size
        self.steps_equal += int((ref_idx == cand_idx).sum())

    def add_texts(self, reference: list[str], candidate: list[str]) -> None:
        self.lines += len(reference)
        self.lines_equal += sum(r == c for r, c in zip(reference, candidate, strict=True))

    def to_dict(self) -> dict[str, float]:
        cos = np.asarray(self.cosines)
        return {
            "cosine_mean": float(cos.mean()) if cos.size else float("nan"),
            "cosine_min": float(cos.min()) if cos.size else float("nan"),
            "argmax_agreement": self.steps_equal / max(self.steps, 1),
            "text_agreement": self.lines_equal / max(self.lines, 1),
        }

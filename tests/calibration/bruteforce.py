"""Plain, slow reference implementations of the calibration methods, written from their
definitions on the raw samples (or a histogram made with np.histogram), for the tests to
check the fast ones against. Loops are kept where they make the definition obvious."""

from __future__ import annotations

import numpy as np

QMAX = 127


def histogram(values: np.ndarray, bins: int) -> tuple[np.ndarray, float]:
    """np.histogram of |values| over [0, amax]; returns (counts, bin width)."""
    magnitude = np.abs(values.astype(np.float64).ravel())
    amax = float(magnitude.max())
    counts, _ = np.histogram(magnitude, bins=bins, range=(0.0, amax))
    return counts, amax / bins


def doubling_width(amax: float, bins: int) -> float:
    """The bin width of calibration's one-pass histograms: the least power of two w for
    which amax < 2 * bins * w."""
    width = 2.0 ** np.ceil(np.log2(amax))
    while amax >= 2 * bins * width:
        width *= 2
    while amax < bins * width:  # amax < 2 * bins * (width / 2): half of it still holds amax
        width /= 2
    return width


def signed_histograms(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, float]:
    """np.histogram of the values >= 0 and of the magnitudes of those < 0, in bins of
    calibration's width (`doubling_width`) from 0 up to the bin holding amax; returns
    (positive, negative, bin width)."""
    x = values.astype(np.float64).ravel()
    amax = float(np.abs(x).max())
    width = doubling_width(amax, bins)
    edges = np.arange(int(amax // width) + 2) * width
    positive, _ = np.histogram(x[x >= 0], bins=edges)
    negative, _ = np.histogram(-x[x < 0], bins=edges)
    return positive, negative, width


def kl_divergences(
    counts: np.ndarray, levels: int = 128, *, zero_spike: bool = True
) -> dict[int, float]:
    """KL(P || Q) for every candidate i in levels..n, as in TensorRT's calibration (with
    pytorch-quantization's first bin set to the second's count, unless not `zero_spike`)."""
    hist = counts.astype(np.float64).copy()
    if zero_spike:
        hist[0] = hist[1]
    n = len(hist)
    total = hist.sum()
    result = {}
    for i in range(levels, n + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        group_count = [0.0] * levels  # counts of hist[:i] merged into int8 levels
        group_nonzero = [0] * levels
        for j in range(i):
            group_count[j * levels // i] += hist[j]
            group_nonzero[j * levels // i] += p[j] > 0
        q = np.zeros(i)
        for j in range(i):
            level = j * levels // i
            if p[j] > 0:
                q[j] = group_count[level] / group_nonzero[level]
        if q.sum() == 0:
            result[i] = np.inf
            continue
        p = p / total
        q = q / q.sum()
        kl = 0.0
        for pj, qj in zip(p, q, strict=True):
            if pj > 0:
                kl += pj * np.log(pj / max(qj, 1e-12))
        result[i] = kl
    return result


def side_threshold(counts: np.ndarray, *, zero_spike: bool) -> int:
    """The entropy threshold (in bins) of one side searched on its own: the least KL, ties
    to the largest candidate unless the least KL holds from some candidate to the end (then
    the first of those); 0 for a side without values."""
    if not counts.any():
        return 0
    divergences = kl_divergences(counts, zero_spike=zero_spike)
    best = min(divergences.values())
    ties = sorted(i for i, d in divergences.items() if d == best)
    to_end = ties[-1] == max(divergences) and ties == list(range(ties[0], ties[-1] + 1))
    return ties[0] if to_end and len(ties) > 1 else ties[-1]


def quantization_mse(values: np.ndarray, threshold: float) -> float:
    """Mean squared error of symmetric int8 quantization with clip threshold `threshold`."""
    x = values.astype(np.float64).ravel()
    scale = threshold / QMAX
    quantized = np.clip(np.round(x / scale), -QMAX, QMAX) * scale
    return float(np.mean((x - quantized) ** 2))


def best_mse_threshold(values: np.ndarray, bins: int) -> tuple[float, float]:
    """The bin edge (of the |x| histogram) with the least quantization MSE, and that MSE."""
    amax = float(np.abs(values).max())
    width = amax / bins
    errors = [quantization_mse(values, k * width) for k in range(1, bins + 1)]
    best = int(np.argmin(errors))
    return (best + 1) * width, errors[best]

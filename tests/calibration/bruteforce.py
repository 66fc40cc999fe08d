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


def kl_divergences(counts: np.ndarray, levels: int = 128) -> dict[int, float]:
    """KL(P || Q) for every candidate i in levels..n, as in TensorRT's calibration (with
    pytorch-quantization's first bin set to the second's count)."""
    hist = counts.astype(np.float64).copy()
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

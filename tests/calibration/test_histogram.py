"""tests calibration/histogram.py: fixed-edge counting and the three thresholds, against
plain implementations of their definitions on the raw samples."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.calibration import histogram as hist_module
from graphopt.calibration.histogram import (
    Histogram,
    entropy_bins,
    entropy_sides,
    mse_bins,
    mse_errors,
    percentile_value,
)
from tests.calibration import bruteforce


def _samples(kind: str, n: int = 20000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "heavy":
        return rng.standard_t(2.5, n).astype(np.float32)
    if kind == "relu":
        return np.maximum(rng.standard_normal(n) * 2 + 0.3, 0).astype(np.float32)
    raise AssertionError(kind)


def _abs_histogram(x: np.ndarray, bins: int) -> Histogram:
    hist = Histogram(0.0, float(np.abs(x).max()), bins, absolute=True)
    hist.add(x)
    return hist


# ---------------------------------------------------------------------------- counting


def test_counts_match_np_histogram() -> None:
    x = _samples("heavy")
    hist = _abs_histogram(x, 2048)
    reference, _ = bruteforce.histogram(x, 2048)
    assert hist.total == x.size
    # float32 binning may move a value that sits on an edge into the neighbouring bin.
    assert np.abs(hist.counts - reference).sum() <= 4


def test_counts_do_not_depend_on_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _samples("normal", 10007)
    whole = _abs_histogram(x, 512)
    monkeypatch.setattr(hist_module, "CHUNK_ELEMENTS", 1000)
    pieces = Histogram(whole.low, whole.high, 512, absolute=True)
    for part in np.array_split(x, 37):
        pieces.add(part.reshape(-1, 1))
    np.testing.assert_array_equal(pieces.counts, whole.counts)


def test_signed_histogram_and_nonfinite_values() -> None:
    x = np.array([-2.0, -1.0, 0.0, 1.0, 3.0, np.nan, np.inf], dtype=np.float32)
    hist = Histogram(-2.0, 3.0, 5, absolute=False)
    hist.add(x)
    assert hist.nonfinite == 2
    np.testing.assert_array_equal(hist.counts, [1, 1, 1, 1, 1])  # bins [-2,-1) .. [2,3]
    assert hist.edge(2.5) == pytest.approx(0.5)


def test_float64_and_float16_data() -> None:
    x = _samples("normal", 5000)
    reference = _abs_histogram(x, 256).counts
    for dtype in (np.float64, np.float16):
        hist = Histogram(0.0, float(np.abs(x).max()), 256, absolute=True)
        hist.add(x.astype(dtype))
        assert hist.total == x.size
        assert np.abs(hist.counts - reference).sum() <= (4 if dtype == np.float64 else 2000)


def test_degenerate_histogram_is_refused() -> None:
    with pytest.raises(ValueError):
        Histogram(1.0, 1.0, 16, absolute=False)


# ---------------------------------------------------------------------------- percentile


def _assert_percentile(values: np.ndarray, ours: float, fraction: float, width: float) -> None:
    """`ours` is where `fraction` of the values lie below, up to one bin: fewer than that
    lie below ours - width, and at least that many at or below ours + width."""
    x = values.astype(np.float64)
    target = fraction * x.size
    assert np.count_nonzero(x < ours - width) <= target <= np.count_nonzero(x <= ours + width)


@pytest.mark.parametrize("kind", ["normal", "heavy", "relu"])
@pytest.mark.parametrize("percentile", [99.99, 99.9, 99.0, 90.0])
def test_percentile_matches_np_percentile(kind: str, percentile: float) -> None:
    x = _samples(kind)
    hist = _abs_histogram(x, 2048)
    ours = percentile_value(hist, percentile / 100)
    _assert_percentile(np.abs(x), ours, percentile / 100, hist.width)
    if percentile <= 99.0:  # where samples are dense, np.percentile's interpolation agrees
        exact = float(np.percentile(np.abs(x.astype(np.float64)), percentile))
        assert abs(ours - exact) <= 2 * hist.width


def test_signed_percentiles_match_np_percentile() -> None:
    x = _samples("heavy") + 0.5
    hist = Histogram(float(x.min()), float(x.max()), 2048, absolute=False)
    hist.add(x)
    for q in (0.005, 0.5, 50.0, 99.5, 99.995):
        _assert_percentile(x, percentile_value(hist, q / 100), q / 100, hist.width)
    for q in (5.0, 50.0, 95.0):
        exact = float(np.percentile(x.astype(np.float64), q))
        assert abs(percentile_value(hist, q / 100) - exact) <= 2 * hist.width


def test_percentile_100_is_the_top_of_the_last_filled_bin() -> None:
    hist = Histogram(0.0, 8.0, 8, absolute=True)
    hist.add(np.array([0.5, 1.5, 2.5], dtype=np.float32))
    assert percentile_value(hist, 1.0) == pytest.approx(3.0)
    assert percentile_value(hist, 0.5) == pytest.approx(1.5)


# ---------------------------------------------------------------------------- entropy


@pytest.mark.parametrize("kind", ["normal", "heavy", "relu"])
def test_entropy_matches_plain_kl_search(kind: str) -> None:
    x = _samples(kind, 8000)
    counts, _ = bruteforce.histogram(x, 512)
    divergences = bruteforce.kl_divergences(counts)
    ours = entropy_bins(counts)
    best = min(divergences.values())
    brute = max(i for i, d in divergences.items() if d == best)
    assert ours == brute or divergences[ours] <= best + 1e-12


def test_entropy_clips_heavy_tails_and_keeps_light_ones() -> None:
    heavy = _abs_histogram(_samples("heavy", 50000), 2048)
    uniform = _abs_histogram(
        np.random.default_rng(3).uniform(-1, 1, 50000).astype(np.float32), 2048
    )
    assert entropy_bins(heavy.counts) < 1024  # t(2.5) tails: clip well inside the max
    assert entropy_bins(uniform.counts) > 1900  # nothing to gain from clipping


def _hard_swish(x: np.ndarray) -> np.ndarray:
    return x * np.clip(x / 6 + 0.5, 0, 1)


def test_entropy_keeps_the_positive_tail_of_a_hard_swish_output() -> None:
    # PP-OCRv4's failure (CER 100 %): most values of a hard-swish output are negative and
    # small (down to -0.375, with a density spike at that minimum), the signal is the
    # positive tail. On |x| the KL search put the threshold at the end of the negative side,
    # where the clipped positive tail hides in a bin the negative side fills.
    rng = np.random.default_rng(0)
    y = _hard_swish(rng.normal(-1.5, 1.2, 400_000)).astype(np.float32)
    bins = 2048
    positive, negative, width = bruteforce.signed_histograms(y, bins)
    folded = entropy_bins(positive + negative) * width
    assert abs(folded - 0.375) < 0.02  # the old search: a tenth of the range
    assert np.mean(y > folded) > 0.03  # clipped 3 % of the values
    above, below = entropy_sides(positive, negative)
    assert below * width >= 0.375  # the negative side fits below its threshold
    assert np.mean(y > above * width) < 1e-3  # the tail is kept
    assert above > 4 * below  # the symmetric range takes the larger: the positive one


def test_entropy_is_not_won_by_a_narrow_side() -> None:
    # A hard-swish output scaled and shifted per channel (the affine after PP-LCNet's
    # activations): half the values in a narrow band below zero. On |x| that band's edge is
    # a cliff the KL search stops at, clipping the positive tail.
    rng = np.random.default_rng(1)
    y = _hard_swish(rng.normal(-1.0, 2.0, 400_000)) * 0.1
    y = np.where(y < 0, y * 0.05, y).astype(np.float32)
    positive, negative, width = bruteforce.signed_histograms(y, 2048)
    assert np.mean(y > entropy_bins(positive + negative) * width) > 0.02
    above, below = entropy_sides(positive, negative)
    assert above == entropy_bins(positive)  # TensorRT's search on the positive side alone
    assert below == 128  # the band fits under the smallest candidate
    assert np.mean(y > above * width) < 1e-3


def test_entropy_sides_of_one_sign() -> None:
    x = _samples("relu", 20000)
    positive, negative, _ = bruteforce.signed_histograms(x, 512)
    assert entropy_sides(positive, negative) == (entropy_bins(positive), 0)
    single = np.zeros(512)
    single[40] = 7
    assert entropy_sides(positive, single)[1] == 128  # flat KL: the least threshold
    zeros = np.zeros(512)
    zeros[0] = 1000  # exact zeros and tiny positives: nothing left after the zero-spike rule
    assert entropy_sides(zeros, positive) == (128, entropy_sides(np.zeros(512), positive)[1])
    with pytest.raises(ValueError, match="differ in shape"):
        entropy_sides(positive, negative[:-1])
    with pytest.raises(ValueError, match="with counts"):
        entropy_sides(np.zeros(512), np.zeros(512))


def test_entropy_needs_enough_bins() -> None:
    with pytest.raises(ValueError, match="at least 128"):
        entropy_bins(np.ones(64))


# ---------------------------------------------------------------------------- mse


@pytest.mark.parametrize("kind", ["normal", "heavy", "relu"])
def test_mse_threshold_has_the_least_quantization_error(kind: str) -> None:
    x = _samples(kind, 20000)
    bins = 512
    hist = _abs_histogram(x, bins)
    ours = hist.edge(mse_bins(hist.counts))
    best_threshold, best_error = bruteforce.best_mse_threshold(x, bins)
    ours_error = bruteforce.quantization_mse(x, ours)
    assert ours_error <= best_error * 1.02
    assert abs(ours - best_threshold) <= 0.1 * float(np.abs(x).max())


def test_mse_errors_follow_the_real_error_curve() -> None:
    """The expected error of each candidate (uniform values inside bins) tracks the real one."""
    x = np.random.default_rng(5).uniform(-4, 4, 200000).astype(np.float32)
    bins = 256
    hist = _abs_histogram(x, bins)
    expected = mse_errors(hist.counts) * hist.width**2 / hist.total
    for k in (8, 64, 128, 200, 256):
        real = bruteforce.quantization_mse(x, k * hist.width)
        assert expected[k - 1] == pytest.approx(real, rel=0.03)


# ---------------------------------------------------------------------------- fp8 grid


def _fp8_round(u: np.ndarray) -> np.ndarray:
    import ml_dtypes

    clipped = np.minimum(u, 448.0).astype(np.float32)
    return clipped.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


@pytest.mark.parametrize("x", [1e-3, 2.0**-6, 0.05, 1.0, 3.3, 100.0, 300.0, 448.0])
def test_fp8_rounding_integral_matches_numeric_integration(x: float) -> None:
    u = np.linspace(0.0, x, 400001)
    numeric = np.trapezoid((u - _fp8_round(u)) ** 2, u)
    exact = float(hist_module.fp8_rounding_integral(np.array([x]))[0])
    assert exact == pytest.approx(numeric, rel=1e-3)


def test_fp8_mse_errors_follow_the_real_error_curve() -> None:
    import ml_dtypes

    x = np.random.default_rng(0).standard_t(3, 100000).astype(np.float32)
    hist = _abs_histogram(x, 1024)
    expected = hist_module.mse_errors_fp8(hist.counts) * hist.width**2 / hist.total
    for k in (30, 100, 400, 1024):
        scale = np.float32(k * hist.width / 448.0)
        q = np.clip(x / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        real = float(np.mean((x.astype(np.float64) - q.astype(np.float64) * scale) ** 2))
        assert expected[k - 1] == pytest.approx(real, rel=0.02)


@pytest.mark.parametrize("kind", ["normal", "heavy", "relu"])
def test_fp8_mse_threshold_is_the_fp8_optimum(kind: str) -> None:
    """fp8's mse threshold is the true fp8 optimum; on long tails, where fp8's relative
    precision makes a wide range cheap, it clips less than int8's (on the others the two
    land within a few bins of each other)."""
    import ml_dtypes

    x = _samples(kind, 20000)
    hist = _abs_histogram(x, 512)
    fp8 = mse_bins(hist.counts, grid="fp8", top_position=None)
    if kind == "heavy":
        assert fp8 > mse_bins(hist.counts)
        assert entropy_bins(hist.counts, grid="fp8") > entropy_bins(hist.counts)

    def real(k: int) -> float:
        scale = np.float32(k * hist.width / 448.0)
        q = np.clip(x / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        return float(np.mean((x - q * scale).astype(np.float64) ** 2))

    best = min(real(k) for k in range(8, 513, 8))
    assert real(fp8) <= best * 1.02

"""Fixed-edge histograms, and the thresholds the histogram methods read from them.

A `Histogram` has its edges fixed before any data arrives (from the global range of pass
one), and counts values with `np.bincount` on computed bin indices. A value's bin depends
only on the value, and counts are integers, so the counts (and every threshold read from
them) are identical however the data is cut into batches or chunks.

The thresholds are pure functions of the counts:

- `percentile_value`: the value below which a fraction of the counted values lie,
  interpolated linearly inside the bin where that fraction is reached.
- `entropy_bins`: TensorRT's KL-divergence search (Migacz, "8-bit Inference with TensorRT",
  GTC 2017), vectorised: O(levels) per candidate threshold through prefix sums.
- `mse_bins`: the clip threshold that minimises the expected squared error of symmetric
  int8 quantization (clipping plus rounding), with values taken as uniform inside each bin.

Both search thresholds for a number grid: int8 (127 evenly spaced steps from 0 to the
threshold), or fp8 (float8 e4m3fn scaled so that its largest value, 448, is the threshold).
The fp8 grid is not even: its step doubles every power of two (3 mantissa bits, so the
relative rounding error is about the same at every magnitude) and is even only below 2^-6
(subnormals). A threshold right for int8 is not right for fp8: int8 pays for a wide range
with a coarse step everywhere, fp8 mostly at the top, so fp8 prefers clipping less.

Each takes 10-20 ms for 2048 bins on one core (int8); the fp8 mse search about 10 times that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np

# Values are binned this many at a time, so temporaries stay small (a few MiB) whatever the
# size of the tensor.
CHUNK_ELEMENTS = 1 << 16
# Candidates are scored in blocks of about this many (candidate, bin) cells.
BLOCK_CELLS = 1 << 16  # 512 KiB of float64: fits in a core's L2 cache
QUANT_LEVELS = 128  # int8 levels on one side (TensorRT's 128 quantized bins)
INT8_QMAX = 127  # symmetric int8 quantizes to -127..127
MIN_BINS = QUANT_LEVELS
Grid = Literal["int8", "fp8"]
FP8_MAX = 448.0  # float8 e4m3fn's largest finite value
# Every non-negative finite float8 e4m3fn value, ascending (0, 2^-9, ..., 448): 127 values.
FP8_VALUES = np.unique(
    np.abs(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64))
)
FP8_VALUES = FP8_VALUES[np.isfinite(FP8_VALUES)]
_FP8_MIN_NORMAL_EXP = -6  # smallest normal value 2^-6; below it the step is 2^-9
_FP8_MANTISSA_BITS = 3
_TOP_ONE = 1 << 24  # fixed-point unit of positions inside the last bin


class Histogram:
    """Counts of values in `bins` equal bins over [low, high].

    With `absolute`, |x| is counted (low is then 0). Values outside [low, high] land in the
    first or last bin; non-finite values are counted apart in `nonfinite`.

    With `track_top`, the mean position of the values inside the last bin is kept too
    (`top_position`): a saturating activation (ReLU6, tanh, sigmoid) piles its values up
    at one point there, and the mse method treats them as the point mass they are rather
    than spread over the bin. Positions are summed in fixed point, so the sum, too, does
    not depend on the order the values come in.
    """

    def __init__(
        self, low: float, high: float, bins: int, *, absolute: bool, track_top: bool = False
    ) -> None:
        if not (np.isfinite(low) and np.isfinite(high) and high > low):
            raise ValueError(f"A histogram needs finite low < high, got [{low}, {high}].")
        if bins < 1:
            raise ValueError(f"A histogram needs at least one bin, got {bins}.")
        self.low = float(low)
        self.high = float(high)
        self.bins = int(bins)
        self.absolute = absolute
        self.width = (self.high - self.low) / self.bins
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.nonfinite = 0
        self.track_top = track_top
        self._top_fixed = 0  # sum of (position - (bins - 1)) * _TOP_ONE over the last bin
        # float32 data is binned in float32 (half the memory traffic); the scale is rounded
        # once, so a value's bin is still a fixed function of the value.
        self._scale64 = self.bins / (self.high - self.low)

    def add(self, values: np.ndarray) -> None:
        """Count every element of `values` (any shape, any float dtype)."""
        flat = np.asarray(values).reshape(-1)
        native = flat.dtype in (np.float16, np.float32, np.float64)
        work = np.float64 if flat.dtype == np.float64 else np.float32
        scaled = np.empty(min(flat.size, CHUNK_ELEMENTS), dtype=work)
        # int32: the float32 -> int32 cast is vectorised where float32 -> int64 is not (without
        # AVX-512), 13 % of the counting time; np.bincount widens the indices itself.
        index = np.empty(scaled.size, dtype=np.int32)
        for start in range(0, flat.size, CHUNK_ELEMENTS):
            chunk = flat[start : start + CHUNK_ELEMENTS]
            if not native:  # bfloat16 and other ml_dtypes: numpy ufuncs want a cast first
                chunk = chunk.astype(np.float32)
            n = chunk.size
            self._count(chunk, scaled[:n], index[:n], work)

    def _count(self, chunk: np.ndarray, scaled: np.ndarray, index: np.ndarray, work: type) -> None:
        """Bin one chunk: position = (|x| or x - low) * bins / (high - low), truncated.

        The fast path leaves non-finite values to `np.bincount`, which refuses the negative
        index they turn into; the chunk is then counted again, carefully."""
        if self.absolute:
            np.abs(chunk, out=scaled)
        else:
            np.subtract(chunk, work(self.low), out=scaled)
        np.multiply(scaled, work(self._scale64), out=scaled)
        with np.errstate(invalid="ignore"):
            np.copyto(index, scaled, casting="unsafe")
        try:
            found = np.bincount(index, minlength=self.bins)
        except ValueError:  # a negative index: inf or NaN (or a value below low)
            scaled, index = self._finite(scaled)
            found = np.bincount(index, minlength=self.bins)
        if found.size > self.bins:  # the maximum itself (position == bins), or rounding
            found[self.bins - 1] += found[self.bins :].sum()
            found = found[: self.bins]
        self.counts += found
        if self.track_top:
            top = self.bins - 1
            inside = np.clip(scaled[scaled >= top] - top, 0.0, 1.0)
            self._top_fixed += int(np.rint(inside * _TOP_ONE).astype(np.int64).sum())

    def _finite(self, scaled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        finite = np.isfinite(scaled)
        self.nonfinite += int(scaled.size - np.count_nonzero(finite))
        kept = np.clip(scaled[finite], 0, self.bins - 1)
        return kept, kept.astype(np.intp)

    @property
    def top_position(self) -> float | None:
        """Mean position of the last bin's values, in bins from `low` (in [bins - 1, bins]);
        None unless tracked and the bin holds values."""
        if not self.track_top or not self.counts[-1]:
            return None
        return self.bins - 1 + self._top_fixed / _TOP_ONE / float(self.counts[-1])

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def edge(self, index: float) -> float:
        """The value at (fractional) bin position `index`: low + index * width."""
        return self.low + index * self.width


# ---------------------------------------------------------------------------- percentile


def percentile_value(hist: Histogram, fraction: float) -> float:
    """The value below which `fraction` (0..1) of the counted values lie.

    Values are taken as spread evenly inside each bin, so the result moves linearly inside
    the bin where the cumulative count reaches ``fraction * total``.
    """
    counts = hist.counts
    total = int(counts.sum())
    if total == 0:
        return hist.low
    cumulative = np.cumsum(counts)
    target = min(max(fraction, 0.0), 1.0) * total
    index = int(np.searchsorted(cumulative, target, side="left"))
    index = min(index, hist.bins - 1)
    before = float(cumulative[index - 1]) if index else 0.0
    inside = float(counts[index])
    within = (target - before) / inside if inside else 0.0
    return hist.edge(index + min(max(within, 0.0), 1.0))


# ---------------------------------------------------------------------------- entropy


def entropy_bins(counts: np.ndarray, levels: int = QUANT_LEVELS, *, grid: Grid = "int8") -> int:
    """TensorRT's calibration: the number of bins i (levels..len(counts)) whose right edge
    is the threshold with the least KL divergence KL(P || Q).

    As in NVIDIA's pytorch-quantization, the first bin is first given the count of the
    second: it holds the exact zeros of ReLU outputs, a spike that would otherwise decide
    the search. Then, for each candidate i:

    - P is counts[:i] with the counts of bins i.. (the outliers the threshold clips) added
      to bin i-1;
    - Q is counts[:i] merged into `levels` groups, bin j into group floor(j * levels / i)
      (as `levels` even quantization steps over [0, i) would), each group's count spread
      evenly over the group's bins where P is non-zero;
    - both are normalised, and KL = sum over P > 0 of p * log(p / q), with q floored at
      1e-12 where P has mass that Q lacks (outliers folded into an empty bin).

    Q is constant over each group, so KL = sum p log p - sum over groups of P_g log q_g:
    prefix sums make that O(levels) per candidate. Ties go to the largest i (least
    clipping), as in pytorch-quantization.

    With grid "fp8" the groups are the fp8 grid's steps instead of even ones: bin j goes
    into group g when the grid value v_g <= j * 448 / i < v_(g+1) (126 groups between the
    127 non-negative e4m3fn values), as the even grid's floor(j * levels / i) does for int8.
    Groups narrower than a bin (near zero) come out empty, and those bins are kept exactly:
    the grid resolves them. Candidates still start at `levels` bins.

    For a tensor of both signs, search each side apart (`entropy_sides`): this function on
    |x| lets one side's mass hide the other side's clipping.

    Raises:
        ValueError: fewer bins than levels, or no counts at all.
    """
    divergence = entropy_divergences(counts, levels, grid=grid)
    best = np.flatnonzero(divergence == divergence.min())[-1]
    return int(best) + levels


def entropy_sides(
    positive: np.ndarray,
    negative: np.ndarray,
    levels: int = QUANT_LEVELS,
    *,
    grid: Grid = "int8",
) -> tuple[int, int]:
    """`entropy_bins` for a tensor of both signs: the thresholds, in bins, of the values
    >= 0 (`positive`: bin j holds x in [j, j + 1) widths) and of the magnitudes of the
    values < 0 (`negative`, the same bin width), each searched on its own side.

    Why not on |x|, as TensorRT does: folding the signs lays one side's mass over the other
    side's bins. A hard-swish output has many small negative values (down to -0.375, with a
    density spike there, as at any stationary point) and a long positive tail; in the |x|
    histogram the end of the negative side is a cliff, a threshold just past it hides the
    clipped positive tail in a bin the negative side already fills, and the KL search took
    it (PP-OCRv4: hard-swish outputs clipped at 0.375, a tenth of their range). Summing the
    two sides' KL is not enough either: KL prices a distribution's shape, not magnitudes,
    so the fine structure of a side narrower than one quantization step (a hard-swish
    output shifted per channel: half the values within 0.5 % of the range) outweighed
    clipping the other side's tail (PP-OCRv4, one such tensor: 232 bins summed, 1132 on its
    positive side alone).

    So each side gets TensorRT's search on its own (P and Q normalised over that side),
    and the zero-spike rule applies to the side holding the exact zeros (`positive`). A
    symmetric range takes the larger threshold: neither side is clipped beyond what its
    own distribution justifies, and the other only loses resolution. A side with no values
    gives 0, a positive side with values in its first bin only gives `levels`. Ties go to
    the largest i, except that a side whose KL is flat from some i on (a side in one bin)
    returns the smallest such i, not the whole range.

    Raises:
        ValueError: sides of different lengths, fewer bins than levels, no counts at all.
    """
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(negative, dtype=np.float64)
    if pos.shape != neg.shape:
        raise ValueError(f"Positive counts {pos.shape} and negative {neg.shape} differ in shape.")
    if not (pos.any() or neg.any()):
        raise ValueError("The entropy method needs a histogram with counts.")
    found = []
    for side, zeros in ((pos, True), (neg, False)):
        if not side.any():
            found.append(0)
            continue
        if zeros and not side[1:].any():  # only (near-)zeros, which the zero-spike rule drops
            found.append(levels)
            continue
        divergence = entropy_divergences(side, levels, grid=grid, zero_spike=zeros)
        ties = np.flatnonzero(divergence == divergence.min())
        contiguous_to_end = ties[-1] == divergence.size - 1 and np.all(np.diff(ties) == 1)
        found.append(int(ties[0] if contiguous_to_end and ties.size > 1 else ties[-1]) + levels)
    return found[0], found[1]


def entropy_divergences(
    counts: np.ndarray,
    levels: int = QUANT_LEVELS,
    *,
    grid: Grid = "int8",
    zero_spike: bool = True,
) -> np.ndarray:
    """KL(P || Q) of `entropy_bins` for every candidate i = levels..len(counts) (element
    i - levels); with `zero_spike`, the first bin takes the second's count first.

    Raises:
        ValueError: fewer bins than levels, or no counts at all.
    """
    h = np.asarray(counts, dtype=np.float64).copy()
    n = h.size
    if n < levels:
        raise ValueError(f"The entropy method needs at least {levels} bins, got {n}.")
    if zero_spike and n > 1:
        h[0] = h[1]
    if float(h.sum()) <= 0:
        raise ValueError("The entropy method needs a histogram with counts.")
    prefix = _Prefix.of(h)
    candidates = np.arange(levels, n + 1)
    divergence = np.empty(candidates.size, dtype=np.float64)
    fractions = None if grid == "int8" else FP8_VALUES / FP8_MAX
    groups = levels if fractions is None else fractions.size - 1
    block = max(1, BLOCK_CELLS // groups)
    for first in range(0, candidates.size, block):
        chunk = candidates[first : first + block]
        divergence[first : first + chunk.size] = _divergences(prefix, chunk, levels, fractions)
    return divergence


@dataclass(frozen=True)
class _Prefix:
    """One side's counts h and prefix sums over it, each with a leading 0: cum of h,
    nonzero of h > 0, cum_hlogh of h log h."""

    h: np.ndarray
    cum: np.ndarray
    nonzero: np.ndarray
    cum_hlogh: np.ndarray

    @classmethod
    def of(cls, h: np.ndarray) -> _Prefix:
        with np.errstate(divide="ignore", invalid="ignore"):
            hlogh = np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0)
        return cls(
            h,
            np.concatenate(([0.0], np.cumsum(h))),
            np.concatenate(([0], np.cumsum(h > 0))),
            np.concatenate(([0.0], np.cumsum(hlogh))),
        )


def _divergences(
    side: _Prefix, candidates: np.ndarray, levels: int, fractions: np.ndarray | None
) -> np.ndarray:
    """KL(P || Q) of a block of candidates (see `entropy_bins`). `fractions`: the group
    boundaries as fractions of the threshold (0 .. 1), None for `levels` even groups."""
    h, cum, nonzero, cum_hlogh = side.h, side.cum, side.nonzero, side.cum_hlogh
    total = cum[-1]
    i = candidates[:, None]
    if fractions is None:
        level = np.arange(levels + 1)[None, :]
        bounds = (level * i + levels - 1) // levels  # group g is bins [bounds[g], bounds[g+1])
    else:
        bounds = np.ceil(fractions[None, :] * i).astype(np.int64)
    start, end = bounds[:, :-1], bounds[:, 1:]
    group_sum = cum[end] - cum[start]  # (C, L): counts[:i] per group
    group_nonzero = (nonzero[end] - nonzero[start]).astype(np.float64)
    outliers = total - cum[candidates]
    last = h[candidates - 1] + outliers  # P's bin i-1, outliers included
    group_nonzero[:, -1] += (h[candidates - 1] == 0) & (outliers > 0)
    kept = cum[candidates]  # Q's total
    with np.errstate(divide="ignore", invalid="ignore"):
        # sum over P > 0 of p log p, with p = P / total (P sums to total)
        last_log = np.where(last > 0, last * np.log(np.where(last > 0, last, 1.0)), 0.0)
        p_log_p = (cum_hlogh[candidates - 1] + last_log) / total - np.log(total)
        # sum over groups of P_g log q_g, q constant over a group's non-zero bins
        group_p = group_sum.copy()
        group_p[:, -1] += outliers
        group_p /= total
        q = group_sum / (group_nonzero * kept[:, None])
        log_q = np.log(np.maximum(np.where(group_nonzero > 0, q, 1.0), 1e-12))
        cross = np.sum(np.where(group_p > 0, group_p * log_q, 0.0), axis=1)
    divergence = p_log_p - cross
    divergence[kept <= 0] = np.inf
    return divergence


# ---------------------------------------------------------------------------- mse


def mse_bins(
    counts: np.ndarray,
    qmax: int = INT8_QMAX,
    *,
    top_position: float | None = None,
    grid: Grid = "int8",
) -> int:
    """The number of bins k (1..len(counts)) whose right edge, as the clip threshold t of
    symmetric quantization to -qmax..qmax (grid "int8") or to fp8 scaled so that 448 is t
    (grid "fp8"), gives the least expected squared error.

    See `mse_errors` and `mse_errors_fp8`. Ties go to the smallest k.
    """
    if grid == "fp8":
        errors = mse_errors_fp8(counts, top_position=top_position)
    else:
        errors = mse_errors(counts, qmax, top_position=top_position)
    return int(np.argmin(errors)) + 1


def _mse_setup(
    counts: np.ndarray, top_position: float | None
) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """(counts as float64, with the last bin moved to the point mass when `top_position` is
    given; that point mass; bin indices j = 0..n-1; candidates k = 1..n)."""
    c = np.asarray(counts, dtype=np.float64).copy()
    n = c.size
    if n < 1:
        raise ValueError("The mse method needs at least one bin.")
    point_mass = 0.0
    if top_position is not None:
        point_mass, c[-1] = c[-1], 0.0
    return c, point_mass, np.arange(n, dtype=np.float64), np.arange(1, n + 1, dtype=np.float64)


def _clipping_errors(c: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Clipping error for each threshold k: bins j >= k give c_j * ((j - k)^2 + (j - k) + 1/3),
    from suffix sums of c, c*j and c*j^2 (the same for every number grid)."""

    def suffix(values: np.ndarray) -> np.ndarray:
        return np.concatenate((np.cumsum(values[::-1])[::-1], [0.0]))[1:]  # sum over j >= k

    s0, s1, s2 = suffix(c), suffix(c * j), suffix(c * j * j)
    return s2 - (2 * k - 1) * s1 + (k * k - k + 1.0 / 3.0) * s0


def mse_errors(
    counts: np.ndarray, qmax: int = INT8_QMAX, *, top_position: float | None = None
) -> np.ndarray:
    """Expected total squared error for each clip threshold t = k bins (k = 1..n), bin
    width 1 (the minimiser does not depend on it); element k-1 is threshold k.

    Values are taken as uniform inside each bin, with exact integrals, so bins narrower or
    wider than the quantization step s = t / qmax both come out right:

    - a bin above t contributes its clipping error: the integral of (x - t)^2 over the bin,
      O(1) per candidate from suffix sums of c, c*j and c*j^2;
    - a bin below t its rounding error: the integral of r(x)^2, r(x) = x - s * round(x / s).
      Its antiderivative is F(u) = u s^2 / 12 + phi(u), phi(u) = r^3 / 3 - s^2 r / 12,
      periodic; so the bins below t give s^2 / 12 per value, plus
      sum over 0 < j < k of (c[j-1] - c[j]) * phi(j) (phi vanishes at 0 and at t).

    With `top_position` (in [n - 1, n]), the last bin's values are taken as one point mass
    there (`Histogram.top_position`): clipped by top_position - k below it, rounded at
    k = n.

    Raises:
        ValueError: no bins.
    """
    c, point_mass, j, k = _mse_setup(counts, top_position)
    n = c.size
    step = k / qmax
    clipping = _clipping_errors(c, j, k)

    # Rounding: bins j < k.
    below = np.cumsum(c)  # sum over j < k of c_j, for k = 1..n
    rounding = below * step * step / 12.0
    jumps = np.concatenate(([0.0], c[:-1] - c[1:]))  # c[j-1] - c[j] at edge j
    edges = j[1:]
    block = max(1, BLOCK_CELLS // max(n, 1))
    for first in range(0, n, block):
        kk = k[first : first + block]
        width = int(kk[-1]) - 1  # edges 1..k-1 of the largest candidate in the block
        if width <= 0:
            continue
        s = kk[:, None] / qmax
        u = edges[None, :width]
        r = u - s * np.floor(u / s + 0.5)
        phi = r * (r * r / 3.0 - s * s / 12.0)
        phi[u >= kk[:, None]] = 0.0
        rounding[first : first + block] += phi @ jumps[1 : width + 1]
    errors = clipping + rounding
    if point_mass:
        mu = float(top_position)  # type: ignore[arg-type]
        errors += point_mass * np.maximum(mu - k, 0.0) ** 2  # clipped below it
        step_n = n / qmax
        errors[-1] += point_mass * (mu - step_n * np.floor(mu / step_n + 0.5)) ** 2
    return errors


def mse_errors_fp8(counts: np.ndarray, *, top_position: float | None = None) -> np.ndarray:
    """`mse_errors` for the fp8 grid: the expected total squared error for each clip
    threshold t = k bins (k = 1..n), with values scaled by s = t / 448 and rounded to the
    nearest float8 e4m3fn value (saturating at t).

    Clipping is as for int8. Rounding uses the same exact integral over uniform bins, with the
    grid's step taken per binade: [2^e, 2^(e+1)) has step 2^(e-3) (and [0, 2^-6) step 2^-9),
    and each binade starts on a grid point, so the integral of r(x)^2 from 0 is
    G(x) = (sum over the binades below) + (x - L) step^2 / 12 + phi(x), phi as in
    `mse_errors` (`fp8_rounding_integral`). A bin j < k contributes c_j (G(j+1) - G(j)),
    so rounding(k) = c[k-1] G(k) + sum over 0 < j < k of (c[j-1] - c[j]) G(j), at scale s.

    Raises:
        ValueError: no bins.
    """
    c, point_mass, j, k = _mse_setup(counts, top_position)
    n = c.size
    scale = k / FP8_MAX
    clipping = _clipping_errors(c, j, k)

    # G at the threshold itself: scale^3 G_1(448).
    rounding = c * scale**3 * float(fp8_rounding_integral(np.array([FP8_MAX]))[0])
    jumps = np.concatenate(([0.0], c[:-1] - c[1:]))
    edges = j[1:]
    block = max(1, BLOCK_CELLS // max(n, 1))
    for first in range(0, n, block):
        kk = k[first : first + block]
        width = int(kk[-1]) - 1
        if width <= 0:
            continue
        s = scale[first : first + block, None]
        u = edges[None, :width]
        g = s**3 * fp8_rounding_integral(np.minimum(u / s, FP8_MAX))
        g[u >= kk[:, None]] = 0.0
        rounding[first : first + block] += g @ jumps[1 : width + 1]
    errors = clipping + rounding
    if point_mass:
        mu = float(top_position)  # type: ignore[arg-type]
        errors += point_mass * np.maximum(mu - k, 0.0) ** 2
        step = n / FP8_MAX
        nearest = np.float64(np.float32(min(mu / step, FP8_MAX)).astype(ml_dtypes.float8_e4m3fn))
        errors[-1] += point_mass * (mu - step * nearest) ** 2
    return errors


def fp8_rounding_integral(x: np.ndarray) -> np.ndarray:
    """G(x): the integral from 0 to x (0 <= x <= 448) of r(u)^2, r(u) = u minus the
    nearest float8 e4m3fn value (unit scale)."""
    x = np.asarray(x, dtype=np.float64)
    _, exponent = np.frexp(np.maximum(x, 2.0**_FP8_MIN_NORMAL_EXP))  # x in [2^(e-1), 2^e)
    binade = np.clip(exponent - 1, _FP8_MIN_NORMAL_EXP, 8)
    subnormal = x < 2.0**_FP8_MIN_NORMAL_EXP
    low = np.where(subnormal, 0.0, 2.0**binade)
    step = 2.0 ** (np.where(subnormal, _FP8_MIN_NORMAL_EXP, binade) - _FP8_MANTISSA_BITS)
    # Below binade b: [0, 2^-6) at step 2^-9, then binades -6 .. b-1, each of width 2^e and
    # step 2^(e-3), contributing 2^e 2^(2e-6) / 12 = 8^e / 768.
    sub_step = 2.0 ** (_FP8_MIN_NORMAL_EXP - _FP8_MANTISSA_BITS)
    first = 2.0**_FP8_MIN_NORMAL_EXP * sub_step**2 / 12.0
    ratio = 8.0
    below = first + (8.0**_FP8_MIN_NORMAL_EXP / 768.0) * (
        (ratio ** (binade - _FP8_MIN_NORMAL_EXP) - 1.0) / (ratio - 1.0)
    )
    below = np.where(subnormal, 0.0, below)
    r = x - step * np.floor(x / step + 0.5)
    phi = r * (r * r / 3.0 - step * step / 12.0)
    return below + (x - low) * step * step / 12.0 + phi

"""Streaming histograms whose bins are powers of two wide, and the thresholds the histogram
methods read from them.

A `Histogram` counts in one pass, with no range known beforehand. Its bins are 2^e wide,
e the least exponent for which every value seen so far lies below `2 * bins` of them, so
the observed range [0, max |x|] always spans more than `bins` bins (and at most 2 * bins).
A value larger than the range so far raises e, and the bins merge in pairs (or fours, …).
Merging is exact: with power-of-two widths, floor(floor(x / w) / 2) = floor(x / 2w), and
x / w is an exact float operation. So a value's final bin depends only on the value and
on the largest magnitude in the whole dataset, and the counts (and every threshold read
from them) are identical however the data is cut into batches or chunks, in whatever
order the batches come.

`add` counts a batch in two steps: `bin` does the element-wise work chunk by chunk, each
chunk read from memory once (extremes, magnitudes, bin indices in the chunk's own
power-of-two width), `count` the bincounts and their merge into the running counts.

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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np

# Values are binned this many at a time, so float temporaries stay small (a few MiB)
# whatever the size of the tensor.
CHUNK_ELEMENTS = 1 << 16
# Candidates are scored in blocks of about this many (candidate, bin) cells.
BLOCK_CELLS = 1 << 16  # 512 KiB of float64: fits in a core's L2 cache
# mse scores about this many evenly spaced thresholds first, then refines around the best.
MSE_COARSE_CANDIDATES = 512
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
# float32 holds 2^k exactly for -126 <= k <= 127; scales outside that are applied in float64.
_FLOAT32_EXPONENTS = range(-126, 128)
# With `track_max`, the values this many float steps or fewer below the largest magnitude are
# kept exactly (2^14 float32 steps: the top 2^-10 to 2^-9 of the range, a few bins): where a
# saturating activation piles up (tanh's values just under 1.0, 1.0 itself, 1 + ulp).
NEAR_MAX_STEPS = 1 << 14


@dataclass
class Binned:
    """One tensor's values from one batch, binned by `Histogram.bin` for `Histogram.count`.

    Attributes:
        parts: per chunk of values that holds a non-zero one, (exponent, indices): the
            chunk's bins are 2^exponent wide (wide enough for its largest magnitude, and no
            narrower than the batch's chunks before it),
            indices the bin of each of its finite values (uint16 or int32; with a signed
            histogram, the bins of negative values are offset by the histogram's size).
        zeros: finite values in chunks that held nothing else.
        low, high: the least and the largest finite value (inf, -inf when none).
        nonfinite: inf and NaN values, left out of everything else.
        near_max: the values near this batch's largest magnitude (with `track_max`).
    """

    parts: list[tuple[int, np.ndarray]]
    zeros: int
    low: float
    high: float
    nonfinite: int
    near_max: NearMax | None = None


class Histogram:
    """Counts of a tensor's values in bins of width 2^e over [0, 2 * bins * 2^e), streamed.

    Without `signed`, the magnitudes |x| are counted. With it, the values >= 0 (`positive`)
    and the magnitudes of the values < 0 (`negative`) are counted apart, in bins of the
    same width, so a method can search each side of a tensor of both signs on its own.
    Non-finite values are counted apart in `nonfinite`. `low` and `high` are the exact
    least and largest finite values. With `track_max`, `near_max` counts the exact values
    (magnitudes) within NEAR_MAX_STEPS float steps of the largest one: a saturating
    activation (ReLU6, tanh, sigmoid) piles its values up there, and the mse method treats
    them as the point masses they are rather than spread evenly over their bins. All of
    these are order-independent (see `NearMax`).
    """

    def __init__(self, bins: int, *, signed: bool = False, track_max: bool = False) -> None:
        if bins < 1 or bins & (bins - 1):
            raise ValueError(f"A histogram needs a power of two of bins, got {bins}.")
        self.bins = int(bins)
        self.size = 2 * self.bins
        self.signed = signed
        self.track_max = track_max
        self.exponent: int | None = None  # bins are 2^exponent wide; None: no value > 0 yet
        self.positive = np.zeros(self.size, dtype=np.int64)
        self.negative = np.zeros(self.size, dtype=np.int64) if signed else None
        self.nonfinite = 0
        self.low = math.inf
        self.high = -math.inf
        self.near_max: NearMax | None = None
        self._index_type = np.uint16 if (2 if signed else 1) * self.size <= 1 << 16 else np.int32

    # ------------------------------------------------------------------------ counting

    def add(self, values: np.ndarray) -> None:
        """Count every element of `values` (any shape, any float dtype)."""
        self.count(self.bin(values))

    def bin(self, values: np.ndarray) -> Binned:
        """The element-wise half of `add`, chunk by chunk so that each chunk is read from
        memory once: extremes, magnitudes, the values near the maximum, bin indices. It
        touches nothing of the histogram's counts."""
        flat = np.asarray(values).reshape(-1)
        if flat.dtype not in (np.float16, np.float32, np.float64):
            flat = flat.astype(np.float32)  # bfloat16 and other ml_dtypes
        kind = np.float64 if flat.dtype == np.float64 else np.float32
        found = Binned([], 0, math.inf, -math.inf, 0, NearMax(kind) if self.track_max else None)
        scratch = np.empty(min(flat.size, CHUNK_ELEMENTS), dtype=kind)
        for start in range(0, flat.size, CHUNK_ELEMENTS):
            self._bin_chunk(flat[start : start + CHUNK_ELEMENTS], scratch, found)
        return found

    def _bin_chunk(self, chunk: np.ndarray, scratch: np.ndarray, found: Binned) -> None:
        low, high = chunk.min(), chunk.max()
        if not (np.isfinite(low) and np.isfinite(high)):
            finite = np.isfinite(chunk)
            found.nonfinite += int(chunk.size - np.count_nonzero(finite))
            chunk = chunk[finite]
            if not chunk.size:
                return
            low, high = chunk.min(), chunk.max()
        found.low, found.high = min(found.low, float(low)), max(found.high, float(high))
        amax = abs(max(-float(low), float(high)))  # not -0.0
        magnitudes = np.abs(chunk, out=scratch[: chunk.size])
        if found.near_max is not None:
            found.near_max.add(magnitudes, amax)
        if amax == 0.0:
            found.zeros += chunk.size
            return
        exponent = math.frexp(amax)[1] - self.size.bit_length() + 1  # amax < size * 2^e
        if found.parts:  # the batch's widest bins so far: fewer widths for `count` to merge
            exponent = max(exponent, found.parts[-1][0])
        if magnitudes.dtype == np.float32 and -exponent not in _FLOAT32_EXPONENTS:
            magnitudes = magnitudes.astype(np.float64)  # a scale float32 cannot hold
        np.multiply(magnitudes, magnitudes.dtype.type(2.0**-exponent), out=magnitudes)  # exact
        indices = np.empty(chunk.size, dtype=self._index_type)
        np.copyto(indices, magnitudes, casting="unsafe")  # truncation: floor, for values >= 0
        if self.signed and low < 0:  # (a masked np.add(where=) is 20x slower than this)
            indices += (chunk < 0) * self._index_type(self.size)
        found.parts.append((exponent, indices))

    def count(self, binned: Binned) -> None:
        """The counting half of `add`: merge one batch's bins into the running counts."""
        self.nonfinite += binned.nonfinite
        if binned.low > binned.high:  # no finite values
            return
        self._count_extremes(binned)
        self.positive[0] += binned.zeros
        if not binned.parts:
            return
        top = max(exponent for exponent, _ in binned.parts)
        if self.exponent is None:
            self.exponent = top
        elif top > self.exponent:
            self._coarsen(top - self.exponent)
            self.exponent = top
        sides = [self.positive, self.negative] if self.signed else [self.positive]
        by_width: dict[int, np.ndarray] = {}
        for exponent, indices in binned.parts:
            counts = np.bincount(indices, minlength=self.size * len(sides))
            if exponent in by_width:
                by_width[exponent] += counts
            else:
                by_width[exponent] = counts
        for exponent, counts in by_width.items():
            for side, half in zip(sides, (counts[: self.size], counts[self.size :]), strict=False):
                side += _coarsened(half, self.exponent - exponent)

    def _count_extremes(self, binned: Binned) -> None:
        self.low = min(self.low, binned.low)
        self.high = max(self.high, binned.high)
        if binned.near_max is not None:
            if self.near_max is None:
                self.near_max = NearMax(binned.near_max.kind)
            self.near_max.merge(binned.near_max)

    def _coarsen(self, steps: int) -> None:
        self.positive = _coarsened(self.positive, steps)
        if self.negative is not None:
            self.negative = _coarsened(self.negative, steps)

    # ------------------------------------------------------------------------ reading

    @property
    def amax(self) -> float:
        """The largest finite magnitude seen (-inf before any)."""
        return max(-self.low, self.high)

    @property
    def total(self) -> int:
        """Finite values counted."""
        found = int(self.positive.sum())
        return found if self.negative is None else found + int(self.negative.sum())

    @property
    def width(self) -> float:
        """Bin width (0.0 while no non-zero value has been seen)."""
        return 0.0 if self.exponent is None else math.ldexp(1.0, self.exponent)

    @property
    def used(self) -> int:
        """Bins from 0 up to the one holding the largest magnitude (0 before any)."""
        if self.exponent is None:
            return 1 if self.total else 0
        return int(math.ldexp(self.amax, -self.exponent)) + 1

    def magnitudes(self) -> np.ndarray:
        """Counts of |x| in the `used` bins."""
        found = self.positive[: self.used]
        return found if self.negative is None else found + self.negative[: self.used]

    def sides(self) -> tuple[np.ndarray, np.ndarray]:
        """Counts of the values >= 0 and of the magnitudes of those < 0 (signed only), in
        the `used` bins each."""
        if self.negative is None:
            raise ValueError("Only a signed histogram keeps the two sides apart.")
        return self.positive[: self.used], self.negative[: self.used]

    def signed_counts(self) -> tuple[np.ndarray, float]:
        """Counts over [-used * width, used * width) in bins of `width`, the negative side
        reversed in front of the positive one, and the low end of that range."""
        positive, negative = self.sides()
        return np.concatenate((negative[::-1], positive)), -self.used * self.width

    @property
    def top(self) -> list[tuple[float, int]]:
        """The values near the largest magnitude (`near_max`) as (position in bins, count),
        ascending; empty without `track_max` or before a non-zero value."""
        if self.near_max is None or self.exponent is None:
            return []
        values, counts = self.near_max.values()
        positions = np.ldexp(values, -self.exponent)
        return [(float(p), int(c)) for p, c in zip(positions, counts, strict=True)]


class NearMax:
    """Exact counts of the magnitudes at most NEAR_MAX_STEPS float steps below the largest.

    Steps are float32's (float64's for float64 data): counts[i] is how many magnitudes have
    the bit pattern `anchor - i`, `anchor` being the largest magnitude's (counts holds only
    as many entries as it needs). A larger maximum moves the anchor up and drops what falls
    out of its window. That is exact whatever the order: a value within the window of the
    overall largest magnitude is within the window of every batch's (or chunk's) largest,
    which is no larger, so every one of them counted all of its copies.
    """

    def __init__(self, kind: type) -> None:
        self.kind = kind
        self.anchor: int | None = None
        self.counts = np.zeros(0, dtype=np.int64)

    @property
    def _ints(self) -> type:
        return np.int64 if self.kind is np.float64 else np.int32

    def add(self, magnitudes: np.ndarray, amax: float) -> None:
        """Count the `magnitudes` (of this kind) in the window; `amax` is their largest."""
        bits = int(np.array(amax, dtype=self.kind).view(self._ints))
        anchor = self._raise(bits)
        if bits < anchor - NEAR_MAX_STEPS:
            return  # all of them below the window
        cut = np.array(max(anchor - NEAR_MAX_STEPS, 0), dtype=self._ints).view(self.kind)
        near = magnitudes[magnitudes >= cut]
        if near.size:
            self._accumulate(np.bincount(anchor - near.view(self._ints)), 0)

    def merge(self, other: NearMax) -> None:
        if other.anchor is not None:
            self._accumulate(other.counts, self._raise(other.anchor) - other.anchor)

    def _raise(self, bits: int) -> int:
        """Move the anchor up to `bits` if that is larger; the anchor."""
        if self.anchor is None:
            self.anchor = bits
        elif bits > self.anchor:
            old, self.counts = self.counts, np.zeros(0, dtype=np.int64)
            shift, self.anchor = bits - self.anchor, bits
            self._accumulate(old, shift)
        return self.anchor

    def _accumulate(self, found: np.ndarray, offset: int) -> None:
        """counts[offset + i] += found[i], within the window."""
        end = min(offset + found.size, NEAR_MAX_STEPS + 1)
        if end <= offset:
            return
        if self.counts.size < end:
            self.counts = np.concatenate((self.counts, np.zeros(end - self.counts.size, np.int64)))
        self.counts[offset:end] += found[: end - offset]

    def values(self) -> tuple[np.ndarray, np.ndarray]:
        """(the magnitudes that occur, ascending, as float64; their counts)."""
        if self.anchor is None:
            return np.empty(0), np.empty(0, dtype=np.int64)
        offsets = np.flatnonzero(self.counts)[::-1]
        bits = (self.anchor - offsets).astype(self._ints)
        return bits.view(self.kind).astype(np.float64), self.counts[offsets]


def _coarsened(counts: np.ndarray, steps: int) -> np.ndarray:
    """Counts in bins 2^steps times as wide (the same number of bins, the top ones empty)."""
    if steps <= 0:
        return counts
    size = counts.size
    merged = np.zeros_like(counts)
    factor = 1 << min(steps, size.bit_length())
    if factor >= size:
        merged[0] = counts.sum()
    else:
        merged[: size // factor] = counts.reshape(size // factor, factor).sum(axis=1)
    return merged


# ---------------------------------------------------------------------------- percentile


def percentile_value(
    counts: np.ndarray, fraction: float, *, width: float, low: float = 0.0
) -> float:
    """The value below which `fraction` (0..1) of the values counted in `counts` lie, bins
    of `width` from `low`.

    Values are taken as spread evenly inside each bin, so the result moves linearly inside
    the bin where the cumulative count reaches ``fraction * total``.
    """
    total = int(counts.sum())
    if total == 0:
        return low
    cumulative = np.cumsum(counts)
    target = min(max(fraction, 0.0), 1.0) * total
    index = int(np.searchsorted(cumulative, target, side="left"))
    index = min(index, counts.size - 1)
    before = float(cumulative[index - 1]) if index else 0.0
    inside = float(counts[index])
    within = (target - before) / inside if inside else 0.0
    return low + (index + min(max(within, 0.0), 1.0)) * width


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
    top: Sequence[tuple[float, int]] = (),
    grid: Grid = "int8",
) -> int:
    """The number of bins k (1..len(counts)) whose right edge, as the clip threshold t of
    symmetric quantization to -qmax..qmax (grid "int8") or to fp8 scaled so that 448 is t
    (grid "fp8"), gives the least expected squared error.

    See `mse_errors` and `mse_errors_fp8`. Scoring one candidate costs O(k), so with more
    than MSE_COARSE_CANDIDATES bins every stride-th candidate is scored first and then every
    one within a stride of the best of those (the error is smooth in k at the scale of a
    few bins: clipping is convex, rounding grows with the step). Ties go to the smallest k
    among those scored.
    """
    n = len(counts)

    def scored(candidates: np.ndarray) -> np.ndarray:
        if grid == "fp8":
            return mse_errors_fp8(counts, top=top, candidates=candidates)
        return mse_errors(counts, qmax, top=top, candidates=candidates)

    stride = max(1, n // MSE_COARSE_CANDIDATES)
    candidates = np.unique(np.append(np.arange(stride, n + 1, stride), n))
    best = int(candidates[np.argmin(scored(candidates))])
    if stride > 1:
        candidates = np.arange(max(1, best - stride), min(n, best + stride) + 1)
        best = int(candidates[np.argmin(scored(candidates))])
    return best


def _mse_setup(
    counts: np.ndarray, top: Sequence[tuple[float, int]], candidates: np.ndarray | None
) -> tuple[np.ndarray, list[tuple[float, float]], np.ndarray, np.ndarray]:
    """(counts as float64, less the point masses of `top`; those masses as (position,
    count); bin indices j = 0..n-1; the candidates k, by default 1..n)."""
    c = np.asarray(counts, dtype=np.float64).copy()
    n = c.size
    if n < 1:
        raise ValueError("The mse method needs at least one bin.")
    masses = []
    for position, count in top:
        if not 0 <= position < n:
            raise ValueError(f"The point mass at {position} lies outside the bins [0, {n}).")
        held = min(float(count), c[int(position)])
        c[int(position)] -= held
        masses.append((float(position), held))
    if candidates is None:
        k = np.arange(1, n + 1, dtype=np.float64)
    else:
        k = np.asarray(candidates, dtype=np.float64)
        if k.size and not (np.all(np.diff(k) > 0) and 1 <= k[0] and k[-1] <= n):
            raise ValueError(f"Candidates must ascend within 1..{n}.")
    return c, masses, np.arange(n, dtype=np.float64), k


def _point_mass_errors(
    masses: Sequence[tuple[float, float]],
    k: np.ndarray,
    rounded: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> np.ndarray:
    """The squared error of the point masses (position, count) for each threshold k:
    (mu - k)^2 where k clips mu, (mu - rounded(mu, k))^2 where k holds it.

    Clipping comes from suffix sums over the masses sorted by position (O(log) per k);
    rounding is computed mass by mass only for the few thresholds above the lowest mass
    (the masses lie within a few bins of the top)."""
    errors = np.zeros(k.size)
    if not masses:
        return errors
    mu, mass = (np.array(column, dtype=np.float64) for column in zip(*sorted(masses), strict=True))
    s0, s1, s2 = _suffix_sums(mass), _suffix_sums(mass * mu), _suffix_sums(mass * mu * mu)
    first = np.searchsorted(mu, k, side="right")  # the masses above k: mu[first:]
    errors += s2[first] - 2 * k * s1[first] + k * k * s0[first]
    holds = np.flatnonzero(k >= mu[0])
    block = max(1, BLOCK_CELLS // mu.size)
    for start in range(0, holds.size, block):
        kk = k[holds[start : start + block]]
        error = (mu[None, :] - rounded(mu, kk)) ** 2
        error[kk[:, None] < mu[None, :]] = 0.0  # clipped: counted above
        errors[holds[start : start + kk.size]] += error @ mass
    return errors


def _clipping_errors(c: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Clipping error for each threshold k: bins j >= k give c_j * ((j - k)^2 + (j - k) + 1/3),
    from suffix sums of c, c*j and c*j^2 (the same for every number grid)."""
    # element i is for k = i + 1 (the callers pass k = j + 1): the sum over j >= i + 1
    s0, s1, s2 = (_suffix_sums(v)[1:] for v in (c, c * j, c * j * j))
    return s2 - (2 * k - 1) * s1 + (k * k - k + 1.0 / 3.0) * s0


def _suffix_sums(values: np.ndarray) -> np.ndarray:
    """out[i] = sum of values[i:], with out[len(values)] = 0."""
    return np.concatenate((np.cumsum(values[::-1])[::-1], [0.0]))


def mse_errors(
    counts: np.ndarray,
    qmax: int = INT8_QMAX,
    *,
    top: Sequence[tuple[float, int]] = (),
    candidates: np.ndarray | None = None,
) -> np.ndarray:
    """Expected total squared error for each clip threshold t = k bins (k = 1..n, or the
    ascending integers `candidates`), bin width 1 (the minimiser does not depend on it);
    element i is the threshold k = i + 1 (or candidates[i]).

    Values are taken as uniform inside each bin, with exact integrals, so bins narrower or
    wider than the quantization step s = t / qmax both come out right:

    - a bin above t contributes its clipping error: the integral of (x - t)^2 over the bin,
      O(1) per candidate from suffix sums of c, c*j and c*j^2;
    - a bin below t its rounding error: the integral of r(x)^2, r(x) = x - s * round(x / s).
      Its antiderivative is F(u) = u s^2 / 12 + phi(u), phi(u) = r^3 / 3 - s^2 r / 12,
      periodic; so the bins below t give s^2 / 12 per value, plus
      sum over 0 < j < k of (c[j-1] - c[j]) * phi(j) (phi vanishes at 0 and at t).

    Each (position, count) of `top` takes `count` of its bin's values out as a point mass
    at that position (`Histogram.top`: the values at and just below the largest
    magnitude), the rest of the bin staying uniform: the mass is clipped by position - k
    by thresholds below it and rounded by the others.

    Raises:
        ValueError: no bins.
    """
    c, masses, j, k = _mse_setup(counts, top, candidates)
    n = c.size
    step = k / qmax
    at = k.astype(np.int64) - 1
    clipping = _clipping_errors(c, j, j + 1)[at]

    # Rounding: bins j < k.
    below = np.cumsum(c)[at]  # sum over j < k of c_j
    rounding = below * step * step / 12.0
    jumps = np.concatenate(([0.0], c[:-1] - c[1:]))  # c[j-1] - c[j] at edge j
    edges = j[1:]
    block = max(1, BLOCK_CELLS // max(n, 1))
    for first in range(0, k.size, block):
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

    def rounded(mu: np.ndarray, kk: np.ndarray) -> np.ndarray:
        s = kk[:, None] / qmax
        return s * np.floor(mu[None, :] / s + 0.5)

    return errors + _point_mass_errors(masses, k, rounded)


def mse_errors_fp8(
    counts: np.ndarray,
    *,
    top: Sequence[tuple[float, int]] = (),
    candidates: np.ndarray | None = None,
) -> np.ndarray:
    """`mse_errors` for the fp8 grid: the expected total squared error for each clip
    threshold t = k bins (k = 1..n, or `candidates`), with values scaled by s = t / 448 and
    rounded to the nearest float8 e4m3fn value (saturating at t).

    Clipping is as for int8. Rounding uses the same exact integral over uniform bins, with the
    grid's step taken per binade: [2^e, 2^(e+1)) has step 2^(e-3) (and [0, 2^-6) step 2^-9),
    and each binade starts on a grid point, so the integral of r(x)^2 from 0 is
    G(x) = (sum over the binades below) + (x - L) step^2 / 12 + phi(x), phi as in
    `mse_errors` (`fp8_rounding_integral`). A bin j < k contributes c_j (G(j+1) - G(j)),
    so rounding(k) = c[k-1] G(k) + sum over 0 < j < k of (c[j-1] - c[j]) G(j), at scale s.

    Raises:
        ValueError: no bins.
    """
    c, masses, j, k = _mse_setup(counts, top, candidates)
    n = c.size
    scale = k / FP8_MAX
    at = k.astype(np.int64) - 1
    clipping = _clipping_errors(c, j, j + 1)[at]

    # G at the threshold itself: scale^3 G_1(448).
    rounding = c[at] * scale**3 * float(fp8_rounding_integral(np.array([FP8_MAX]))[0])
    jumps = np.concatenate(([0.0], c[:-1] - c[1:]))
    edges = j[1:]
    block = max(1, BLOCK_CELLS // max(n, 1))
    for first in range(0, k.size, block):
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

    def rounded(mu: np.ndarray, kk: np.ndarray) -> np.ndarray:
        s = kk[:, None] / FP8_MAX
        grid = np.minimum(mu[None, :] / s, FP8_MAX).astype(np.float32)
        return s * grid.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)

    return errors + _point_mass_errors(masses, k, rounded)


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

"""Range observers for static quantization: the clipping range of one activation, from calibration batches.

A static scheme fixes an activation's scale before deployment. An observer is fed the activation's
values once per calibration batch (`update`) and then answers the clipping range to quantize into
(`range(levels, symmetric)`): `(-c, c)` when symmetric, else `(lo, hi)` with `lo <= 0 <= hi`, so
that zero stays exactly representable. `levels` is the number of steps of a uniform format
(255 for int8, whose symmetric range uses ±127; 15 for int4) or None for a floating format (fp8).

    method        range                                              cost per batch
    absmax        the largest |x| (or min, max) seen                 one min and one max
    percentile    the q-th percentile of |x| (or of x's two tails)   + one histogram
    mse           the clip minimizing the expected squared error     + one histogram

`percentile` and `mse` keep a signed histogram over [-R, R] (`bins` per side). When a batch exceeds
R, R doubles as many times as needed and the old counts merge exactly (2**k old bins per new bin),
so a histogram percentile is within one bin width (`bin_width`) of the exact percentile of all the
data seen, however the data was split into batches (plus the float32 rounding of a value's bin
index, 2**-23 R, for float32 data).

`mse` models the error of clipping at c as the rounding error inside the range plus the clipping
error outside it, with the values spread evenly inside each histogram bin; exact zeros cost nothing
(zero is on every grid). Candidate clips are bin edges: a noise model (step² / 12 per value)
shortlists them in O(bins), and the shortlist, an even grid of edges (the noise model misjudges
steps as wide as most of the data, as int4's are) and then the edges near the best are ranked by
the exact expected error. For `levels=None` it models fp8 (`float_format="e4m3"`: max 448, 3 mantissa
bits; or "e5m2"): each bin's values round on the fp8 grid of its binade (spacing one ulp there).

Limits of the model: it knows each value only to within its bin. A large share of equal nonzero
values (a point mass: say half the data at exactly -0.5) is modelled as spread over its bin, and
its true error depends on where the grid falls next to it: there the chosen clip can be several
percent worse than the best one, and slightly worse than absmax.

All-zero data gives the range (0.0, 0.0); callers map a zero range to scale 1.

Example:
    >>> import numpy as np
    >>> obs = make_observer("percentile", percentile=99.0, name="fc1 input")
    >>> for batch in (np.linspace(-1, 1, 1001), np.linspace(-2, 2, 1001)):
    ...     obs.update(batch)
    >>> lo, hi = obs.range(255, symmetric=True)
    >>> bool(abs(hi - np.percentile(np.abs(np.r_[np.linspace(-1, 1, 1001), np.linspace(-2, 2, 1001)]), 99.0))
    ...      <= obs.bin_width), lo == -hi
    (True, True)
    >>> a = make_observer("absmax"); a.update([-0.5, 3.0]); a.range(255, symmetric=False)
    (-0.5, 3.0)
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from graphopt.errors import GraphoptError


class CalibrationError(GraphoptError, ValueError):
    """Calibration data or options an observer cannot use (non-finite values, no data, bad option)."""


class Observer(Protocol):
    """What the calibration run needs of a range observer."""

    name: str | None

    def update(self, x) -> None:
        """Take one calibration batch: the activation's values, any shape."""

    def range(self, levels: int | None, symmetric: bool) -> tuple[float, float]:
        """The clipping range for a format of `levels` uniform steps (None: floating)."""


class AbsMax:
    """The running min and max: the range that clips nothing."""

    method = "absmax"

    def __init__(self, *, name: str | None = None):
        self.name = name
        self.min = self.max = None
        self.count = 0

    @property
    def absmax(self) -> float:
        _require_data(self)
        return max(-self.min, self.max)

    def update(self, x) -> None:
        values = _as_float_array(x)
        if values.size == 0:
            return
        lo, hi = _finite_min_max(values, _who(self))
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)
        self.count += values.size

    def range(self, levels: int | None, symmetric: bool) -> tuple[float, float]:
        _check_levels(levels)
        _require_data(self)
        if symmetric:
            return -self.absmax, self.absmax
        return min(self.min, 0.0), max(self.max, 0.0)

    def __repr__(self) -> str:
        return f"AbsMax(name={self.name!r}, min={self.min}, max={self.max}, count={self.count})"


class Percentile(AbsMax):
    """The q-th percentile of |x| (symmetric), or the (100-q)-th and q-th percentiles of x."""

    method = "percentile"

    def __init__(self, q: float = 99.99, *, bins: int = 2048, name: str | None = None):
        super().__init__(name=name)
        if not isinstance(q, (int, float)) or not 0 < q <= 100:
            raise CalibrationError(f"{_who(self)}percentile must be in (0, 100], got {q!r}")
        self.q = float(q)
        self.histogram = _Histogram(bins, _who(self))

    @property
    def bin_width(self) -> float:
        """The histogram's bin width: how far a percentile may be from the exact one."""
        return self.histogram.width

    def update(self, x) -> None:
        values = _as_float_array(x)
        if values.size == 0:
            return
        super().update(values)
        self.histogram.add(values, max(-self.min, self.max))

    def range(self, levels: int | None, symmetric: bool) -> tuple[float, float]:
        _check_levels(levels)
        _require_data(self)
        if self.absmax == 0 or self.q == 100:
            return AbsMax.range(self, levels, symmetric)
        h = self.histogram
        if symmetric:
            c = _quantile(h.magnitudes(), h.width, 0.0, self.q, 0.0, self.absmax)
            return -c, c
        lo = _quantile(h.counts, h.width, -h.limit, 100 - self.q, self.min, self.max)
        hi = _quantile(h.counts, h.width, -h.limit, self.q, self.min, self.max)
        return min(lo, 0.0), max(hi, 0.0)

    def __repr__(self) -> str:
        return f"Percentile(q={self.q}, name={self.name!r}, count={self.count})"


class MSE(Percentile):
    """The clip minimizing expected squared error: rounding noise inside, clipping error outside."""

    method = "mse"

    def __init__(self, *, bins: int = 2048, float_format: str = "e4m3", name: str | None = None):
        super().__init__(100.0, bins=bins, name=name)
        if float_format not in FLOAT_FORMATS:
            raise CalibrationError(f"{_who(self)}float_format must be one of {', '.join(FLOAT_FORMATS)}, "
                                   f"got {float_format!r}")
        self.float_format = float_format
        self.zeros = 0

    def update(self, x) -> None:
        values = _as_float_array(x)
        if values.size == 0:
            return
        super().update(values)
        self.zeros += values.size - int(np.count_nonzero(values))

    def range(self, levels: int | None, symmetric: bool) -> tuple[float, float]:
        _check_levels(levels)
        _require_data(self)
        if self.absmax == 0:
            return 0.0, 0.0
        if levels is None:
            if not symmetric:
                raise CalibrationError(f"{_who(self)}floating formats (levels=None) are symmetric; "
                                       "ask for range(None, symmetric=True)")
            c = _best_float_clip(self.histogram, self.zeros, self.absmax, FLOAT_FORMATS[self.float_format])
            return -c, c
        if symmetric:
            c = _best_symmetric_clip(self.histogram, self.zeros, self.absmax, levels)
            return -c, c
        return _best_asymmetric_clip(self.histogram, self.zeros, self.min, self.max, levels)

    def __repr__(self) -> str:
        return f"MSE(name={self.name!r}, count={self.count})"


OBSERVERS = {"absmax": AbsMax, "percentile": Percentile, "mse": MSE}
OPTIONS = {"absmax": {"name"}, "percentile": {"percentile", "q", "bins", "name"},
           "mse": {"bins", "float_format", "name"}}
# (largest finite value, mantissa bits, smallest normal exponent)
FLOAT_FORMATS = {"e4m3": (448.0, 3, -6), "e5m2": (57344.0, 2, -14)}


def make_observer(method: str, **options) -> Observer:
    """A fresh observer for `method` ("absmax", "percentile", "mse") with its options.

    >>> make_observer("percentile", percentile=99.9, name="conv1 input")
    Percentile(q=99.9, name='conv1 input', count=0)
    """
    if method not in OBSERVERS:
        raise CalibrationError(f"unknown calibration method {method!r}; known: {', '.join(OBSERVERS)}")
    unknown = set(options) - OPTIONS[method]
    if unknown:
        raise CalibrationError(f"calibration method {method!r} takes no option {', '.join(sorted(unknown))}; "
                               f"its options: {', '.join(sorted(OPTIONS[method]))}")
    if method == "percentile" and "percentile" in options:
        if "q" in options:
            raise CalibrationError("give the percentile once: percentile= or q=, not both")
        options["q"] = options.pop("percentile")
    return OBSERVERS[method](**options)


# --- input checks ---------------------------------------------------------------------------------

def _who(observer) -> str:
    """The prefix naming an observer in its errors: "fc1 input (percentile observer): "."""
    kind = f"{observer.method} observer"
    return f"{observer.name} ({kind}): " if observer.name else f"{kind}: "


def _as_float_array(x) -> np.ndarray:
    values = np.asarray(x)
    if values.dtype not in (np.float32, np.float64):  # ints, bool, float16, bfloat16 (ml_dtypes)
        values = values.astype(np.float64 if values.dtype.kind in "iub" else np.float32)
    return values.reshape(-1)


def _finite_min_max(values: np.ndarray, who: str) -> tuple[float, float]:
    lo, hi = float(values.min()), float(values.max())  # NaN propagates, so both finite ⇒ all finite
    if not (math.isfinite(lo) and math.isfinite(hi)):
        nan = int(np.count_nonzero(np.isnan(values)))
        pos, neg = int(np.count_nonzero(np.isposinf(values))), int(np.count_nonzero(np.isneginf(values)))
        raise CalibrationError(f"{who}calibration batch has {nan + pos + neg} non-finite values of {values.size} "
                               f"({nan} NaN, {pos} +Inf, {neg} -Inf); calibration data must be finite")
    return lo, hi


def _require_data(observer) -> None:
    if observer.min is None:
        raise CalibrationError(f"{_who(observer)}saw no calibration data; "
                               "call update() with at least one non-empty batch before range()")


def _check_levels(levels) -> None:
    if levels is not None and (isinstance(levels, bool) or not isinstance(levels, (int, np.integer))
                               or levels < 2):
        raise CalibrationError(f"levels must be an integer >= 2 (255 for int8) or None (floating), got {levels!r}")


# --- the histogram --------------------------------------------------------------------------------

class _Histogram:
    """Counts of x over [-limit, limit] in 2 * bins equal bins; bin j holds floor(x / width) == j - bins."""

    def __init__(self, bins: int, who: str):
        if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or not 1 <= bins <= 1 << 20:
            raise CalibrationError(f"{who}bins must be an integer in [1, 2**20], got {bins!r}")
        self.bins, self.who = int(bins), who
        self.limit = 0.0  # 0 until a nonzero value arrives; zeros land in bin `bins` at any width
        self.counts = np.zeros(2 * self.bins, np.int64)

    @property
    def width(self) -> float:
        return self.limit / self.bins

    def add(self, values: np.ndarray, absmax: float) -> None:
        if absmax > self.limit:
            self._grow(absmax)
        if self.limit == 0:
            self.counts[self.bins] += values.size
            return
        if values.dtype == np.float32 and not 1e-30 < self.limit < 1e38:
            values = values.astype(np.float64)      # the limit itself is no float32
        t = values / values.dtype.type(self.limit)   # in [-1, 1]: no overflow for tiny or huge limits
        t *= self.bins
        np.floor(t, out=t)
        j = t.astype(np.int32)
        j += self.bins
        np.clip(j, 0, 2 * self.bins - 1, out=j)     # x == limit lands in the top bin
        self.counts += np.bincount(j, minlength=2 * self.bins)

    def _grow(self, absmax: float) -> None:
        if self.limit == 0:
            self.limit = absmax  # only zeros so far: they stay in bin `bins`
            return
        k = max(1, math.ceil(math.log2(absmax) - math.log2(self.limit)))  # the ratio may overflow
        try:
            while math.ldexp(self.limit, k - 1) >= absmax:  # log2 rounding
                k -= 1
            while math.ldexp(self.limit, k) < absmax:
                k += 1
            limit = math.ldexp(self.limit, k)
        except OverflowError:
            limit = math.inf
        if not math.isfinite(limit):
            raise CalibrationError(f"{self.who}calibration values up to {absmax:g} are too large to "
                                   "histogram; use method='absmax'")
        # floor(x / (2**k w)) == floor(floor(x / w) / 2**k): old bins merge exactly into new ones
        old = np.arange(2 * self.bins) - self.bins
        new = np.right_shift(old, min(k, 62)) + self.bins
        self.counts = np.bincount(new, weights=self.counts, minlength=2 * self.bins).astype(np.int64)
        self.limit = limit

    def magnitudes(self) -> np.ndarray:
        """Counts of |x| over [0, limit] in `bins` bins (the negative half folds exactly)."""
        return self.counts[self.bins:] + self.counts[:self.bins][::-1]


def _quantile(counts: np.ndarray, width: float, start: float, q: float, lo: float, hi: float) -> float:
    """numpy's (linear) q-th percentile, estimated from a histogram whose bin i is
    [start + i width, start + (i + 1) width]: each sorted element is placed evenly within its bin
    (so within one width of where it is), clamped to the known [lo, hi]."""
    n = int(counts.sum())
    position = q / 100 * (n - 1)
    ranks = np.array([math.floor(position), math.ceil(position)])
    cumulative = np.cumsum(counts)
    b = np.searchsorted(cumulative, ranks, side="right")  # the bin holding each ranked element
    before = cumulative[b] - counts[b]
    estimate = start + width * (b + (ranks - before + 0.5) / counts[b])
    estimate = np.clip(estimate, lo, hi)
    return float(estimate[0] + (position - ranks[0]) * (estimate[1] - estimate[0]))


# --- MSE ------------------------------------------------------------------------------------------

def _rounding_integral(t: np.ndarray, step: np.ndarray) -> np.ndarray:
    """∫_0^t (u - round(u / step) step)² du: step³ / 12 per whole step, plus the part-step r³ / 3."""
    n = np.round(t / step)
    r = t - n * step
    return n * step ** 3 / 12 + r ** 3 / 3


def _uniform_error(lo_edges, hi_edges, counts, low, high, step) -> np.ndarray:
    """Expected total squared error of quantizing onto the grid step·ℤ ∩ [low, high] (clipping
    outside), for counts[i] values spread evenly over [lo_edges[i], hi_edges[i]]. low, high and
    step are column vectors of candidates; the result has one total per candidate."""
    a, b = lo_edges[None, :], hi_edges[None, :]
    width = b - a
    inside_lo, inside_hi = np.maximum(a, low), np.minimum(b, high)
    rounding = np.where(inside_hi > inside_lo,
                        _rounding_integral(inside_hi, step) - _rounding_integral(inside_lo, step), 0.0)
    above = np.where(b > high, (b - high) ** 3 - np.maximum(a - high, 0) ** 3, 0.0) / 3
    below = np.where(a < low, (low - a) ** 3 - np.maximum(low - b, 0) ** 3, 0.0) / 3
    return ((rounding + above + below) / width * counts[None, :]).sum(axis=1)


def _spread_counts(counts: np.ndarray, zero_bin: int, zeros: int) -> np.ndarray:
    """Counts of the values spread within their bins: exact zeros are on every grid and cost nothing."""
    spread = counts.astype(np.float64)
    spread[zero_bin] -= zeros
    return spread


def _beyond(counts: np.ndarray, w: float, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For clips at k·w, with counts[i] the values at distance [i w, (i + 1) w] from 0: how many
    lie beyond the clip, and their total squared clipping error Σ n ((center - clip)² + w² / 12)."""
    centers = (np.arange(len(counts)) + 0.5) * w
    suffix = lambda v: np.append(np.cumsum(v[::-1])[::-1], 0.0)  # noqa: E731
    s0, s1, s2 = suffix(counts)[k], suffix(counts * centers)[k], suffix(counts * centers ** 2)[k]
    clip = k * w
    return s0, s2 - 2 * clip * s1 + clip ** 2 * s0 + s0 * w * w / 12


def _argmin(error, candidates: np.ndarray):
    """The candidate (a clip, or a (low, high) row) of least `error`, ranked in chunks so the
    (candidates x bins) tables stay small; ties go to the first in sorted order."""
    candidates = np.unique(candidates, axis=0)
    errors = np.concatenate([error(candidates[n:n + 256]) for n in range(0, len(candidates), 256)])
    return candidates[np.argmin(errors)]


def _best_symmetric_clip(h: _Histogram, zeros: int, absmax: float, levels: int) -> float:
    qmax = levels // 2
    counts = _spread_counts(h.magnitudes(), 0, zeros)
    w = h.width
    edges, mass = np.arange(h.bins)[counts > 0] * w, counts[counts > 0]  # empty bins cost nothing

    def error(clips):  # the exact integral, for each clip
        c = clips[:, None]
        return _uniform_error(edges, edges + w, mass, -c, c, c / qmax)

    # Shortlist with the noise model (step² / 12 per value inside, clipping error outside) over
    # every bin edge up to absmax, in O(bins). The model misjudges steps as wide as much of the
    # data (at int4's 7 steps most values round to 0, at error x², not step² / 12) and may put
    # its minimum far from the true one: so rank its best 64 and an even grid of 128 edges with
    # the exact integral, then every edge within a grid step of the best.
    k = np.arange(1, min(h.bins, math.ceil(absmax / w)) + 1)
    outside, clipping = _beyond(counts, w, k)
    model = (counts.sum() - outside) * (k * w / qmax) ** 2 / 12 + clipping
    stride = max(1, len(k) // 128)
    first = np.union1d(k[np.argsort(model)[:64]], k[::stride])
    clip = _argmin(error, np.append(np.minimum(first * w, absmax), absmax))
    near = np.arange(max(1, math.floor(clip / w) - stride), math.floor(clip / w) + stride + 2)
    return float(_argmin(error, np.append(np.minimum(near * w, absmax), clip)))


def _best_asymmetric_clip(h: _Histogram, zeros: int, lo: float, hi: float, levels: int) -> tuple[float, float]:
    counts = _spread_counts(h.counts, h.bins, zeros)
    w = h.width
    edges, mass = (np.arange(2 * h.bins) - h.bins)[counts > 0] * w, counts[counts > 0]
    lo, hi = min(lo, 0.0), max(hi, 0.0)

    def error(pairs):  # the exact integral, for each (low, high) row
        step = ((pairs[:, 1] - pairs[:, 0]) / levels)[:, None]
        zero_point = np.round(-pairs[:, :1] / step)  # 0 on the grid: the real range shifts to match
        return _uniform_error(edges, edges + w, mass, -zero_point * step, (levels - zero_point) * step, step)

    def ends(i, j):  # rows (low, high) for ends at bin edges -i w and j w, within [lo, hi]
        i, j = np.broadcast_arrays(i, j)
        return np.stack([np.maximum(-i.ravel() * w, lo), np.minimum(j.ravel() * w, hi)], axis=1)

    # Candidate ends at bin edges, low = -i w and high = j w, scored by the noise model on the
    # whole (i, j) table; its best 64, an even 16 x 16 grid of the table and the min-max range
    # are ranked with the exact integral (see _best_symmetric_clip), then each end in turn over
    # the edges within a grid step of it.
    i = np.arange(min(h.bins, math.ceil(-lo / w)) + 1)
    j = np.arange(min(h.bins, math.ceil(hi / w)) + 1)
    low_out, low_err = _beyond(counts[:h.bins][::-1], w, i)
    high_out, high_err = _beyond(counts[h.bins:], w, j)
    inside = counts.sum() - low_out[:, None] - high_out[None, :]
    step = (i[:, None] + j[None, :]) * w / levels
    model = inside * step ** 2 / 12 + low_err[:, None] + high_err[None, :]
    model[0, 0] = np.inf
    best = np.argpartition(model, min(63, model.size - 1), axis=None)[:64]
    si, sj = max(1, len(i) // 16), max(1, len(j) // 16)
    candidates = np.vstack([ends(i[best // len(j)], j[best % len(j)]),
                            ends(i[::si, None], j[None, ::sj]), [[lo, hi]]])
    low, high = _valid_argmin(error, candidates)
    n = round(-low / w)
    lows = np.append(np.maximum(-np.arange(max(0, n - si), n + si + 2) * w, lo), low)
    low, high = _valid_argmin(error, np.column_stack([lows, np.full_like(lows, high)]))
    n = round(high / w)
    highs = np.append(np.minimum(np.arange(max(0, n - sj), n + sj + 2) * w, hi), high)
    low, high = _valid_argmin(error, np.column_stack([np.full_like(highs, low), highs]))
    return float(low), float(high)


def _valid_argmin(error, pairs):
    """_argmin over the (low, high) rows that are a range (high > low)."""
    return _argmin(error, pairs[pairs[:, 1] > pairs[:, 0]])


def _best_float_clip(h: _Histogram, zeros: int, absmax: float, fmt) -> float:
    fmax, mantissa, min_exponent = fmt
    counts = _spread_counts(h.magnitudes(), 0, zeros)
    w = h.width
    top = min(h.bins, math.ceil(absmax / w))
    lo_edges, counts = np.arange(h.bins)[counts > 0] * w, counts[counts > 0]  # empty bins cost nothing
    centers = lo_edges + w / 2
    clips = np.unique(np.append(np.minimum(np.arange(1, top + 1, max(1, top // 512)) * w, absmax), absmax))
    c = clips[:, None]
    scale = c / fmax
    # The spacing of fp numbers around each bin's center, once mapped by scale (subnormals flat).
    exponent = np.maximum(np.floor(np.log2(np.maximum(centers[None, :] / scale, 1e-300))), min_exponent)
    ulp = scale * np.exp2(exponent - mantissa)
    # The exact rounding error on that grid (multiples of ulp), as for the integer formats: the
    # noise model (ulp² / 12 per value) misjudges the few largest values, whose ulp is many bins
    # wide, and with them the clip (often picking one worse than absmax).
    a, b = lo_edges[None, :], lo_edges[None, :] + w
    inside_hi = np.minimum(b, c)
    rounding = np.where(inside_hi > a, _rounding_integral(inside_hi, ulp) - _rounding_integral(a, ulp), 0.0)
    clipping = np.where(b > c, (b - c) ** 3 - np.maximum(a - c, 0) ** 3, 0.0) / 3
    errors = ((rounding + clipping) / w * counts[None, :]).sum(axis=1)
    return float(clips[np.argmin(errors)])

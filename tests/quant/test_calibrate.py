"""graphopt.quant.calibrate: range observers against numpy and against brute force.

- absmax: numpy's min and max, whatever the batches.
- percentile: within one bin width of `np.percentile` of all the data seen, however it was split
  into batches (the histogram doubles its range exactly), for data spanning 1e-40 to 1e35.
- mse: the clip it picks, used as `compute_scale(..., clip=)`, gives a measured quantization error
  no worse than absmax's and within 0.5% of the best clip of a brute-force grid (int8 symmetric and
  asymmetric, int4, fp8 e4m3 and e5m2).
- bad data and bad options: CalibrationError naming the observer and saying what to do.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

from graphopt.quant.calibrate import CalibrationError, make_observer
from graphopt.quant.scheme import FORMATS, Layout, compute_scale, dequantize, quantize

INT8, INT4 = FORMATS["int8"], FORMATS["int4"]
E4M3, E5M2 = FORMATS["float8_e4m3fn"], FORMATS["float8_e5m2"]


def observe(method, batches, **options):
    observer = make_observer(method, **options)
    for batch in batches:
        observer.update(batch)
    return observer


# --- absmax ---------------------------------------------------------------------------------------

@given(seed=st.integers(0, 2**32 - 1), splits=st.integers(1, 6), exponent=st.integers(-40, 35))
def test_absmax_is_numpys_min_and_max(seed, splits, exponent):
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal(257) * 10.0 ** exponent).astype(np.float32)
    observer = observe("absmax", np.array_split(data, splits))
    lo, hi = float(data.min()), float(data.max())
    assert observer.range(255, symmetric=False) == (min(lo, 0.0), max(hi, 0.0))
    c = max(-lo, hi)
    assert observer.range(255, symmetric=True) == (-c, c) == observer.range(None, symmetric=True)
    assert observer.count == data.size


def test_absmax_takes_any_shape_and_dtype_and_skips_empty_batches():
    observer = observe("absmax", [np.zeros((0, 3)), np.array([[1, -7]], np.int32),
                                  jnp.array([2.5], ml_dtypes.bfloat16), np.array([True])])
    assert observer.range(15, symmetric=False) == (-7.0, 2.5) and observer.count == 4


# --- percentile -----------------------------------------------------------------------------------

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), np.dtype(np.int32)]


@st.composite
def batch_sets(draw):
    """(batches, dtype): a few batches of normal data, each at a magnitude some factor (1 to
    1e30, up or down) from the one before, some shifted to one side, some with exact zeros."""
    dtype = draw(st.sampled_from(DTYPES))
    low, high = {"float32": (-40, 35), "float64": (-300, 300), "float16": (-3, 3), "int32": (0, 8)}[dtype.name]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    exponent = draw(st.integers(low, high))
    batches = []
    for _ in range(draw(st.integers(1, 6))):
        factor = draw(st.sampled_from([0.0, 0.0, 0.2, 0.5, 1.0, 3.0, 6.0, 30.0]))   # log10 of the growth
        exponent = min(max(exponent + factor * draw(st.sampled_from([1, -1])), low), high)
        size = draw(st.integers(1, 400))
        values = rng.standard_normal(size) * 10.0 ** exponent
        values += draw(st.sampled_from([0.0, 1.0, -2.0])) * np.abs(values).max()   # lopsided
        values[rng.random(size) < 0.1] = 0.0
        if dtype.kind == "i":
            values = np.clip(np.round(values), -2**31, 2**31 - 1)
        batches.append(values.astype(dtype))
    return batches, dtype


def seen(batches) -> np.ndarray:
    """All the data, as the observers see it (float16 widened to float32), in float64."""
    return np.concatenate([b.astype(np.float32 if b.dtype == np.float16 else b.dtype) for b in batches]) \
        .astype(np.float64)


@settings(max_examples=max(20, settings().max_examples * 2))
@given(case=batch_sets(), q=st.sampled_from([50.0, 90.0, 99.0, 99.9, 99.99, 100.0]),
       bins=st.sampled_from([1, 3, 64, 2048]), regroup=st.integers(1, 4))
def test_percentile_is_within_a_bin_of_numpy_however_the_data_is_batched(case, q, bins, regroup):
    batches, dtype = case
    data = seen(batches)
    # The same data in other batches: all in one, and regrouped in chunks of its original batches.
    splits = [batches, [np.concatenate(batches)], [np.concatenate(batches[i:i + regroup])
                                                   for i in range(0, len(batches), regroup)]]
    for split in splits:
        observer = observe("percentile", split, percentile=q, bins=bins)
        # One bin width, plus the float32 rounding of a value's bin index (2^-23 of the range).
        tolerance = observer.bin_width * (1 + bins * 2.0 ** -20)
        note(f"{len(split)} batches of {[len(b) for b in split]}: bin width {observer.bin_width}")
        lo, hi = observer.range(255, symmetric=True)
        assert lo == -hi and abs(hi - np.percentile(np.abs(data), q)) <= tolerance
        lo, hi = observer.range(255, symmetric=False)
        assert lo <= 0.0 <= hi                                        # zero stays representable
        assert abs(lo - min(np.percentile(data, 100 - q), 0.0)) <= tolerance
        assert abs(hi - max(np.percentile(data, q), 0.0)) <= tolerance
        # The range never passes the data's own ends: the histogram knows min and max exactly.
        assert min(data.min(), 0.0) <= lo and hi <= max(data.max(), 0.0)


def test_percentile_bin_width_follows_the_largest_value_by_doubling():
    observer = observe("percentile", [np.array([1.0, -0.5], np.float32)], bins=4)
    assert observer.bin_width == 0.25
    observer.update(np.array([3.0], np.float32))            # 1 → 2 → 4: two doublings
    assert observer.bin_width == 1.0
    observer.update(np.array([1e30], np.float32))            # still a power-of-two multiple of 1
    assert math.log2(observer.bin_width) == math.ceil(math.log2(1e30 / 4))


def test_percentile_range_can_grow_from_the_smallest_float64_to_near_the_largest():
    observer = observe("percentile", [np.array([5e-324, -5e-324]), np.array([1e300, -2e300])], percentile=50.0)
    lo, hi = observer.range(255, symmetric=True)       # log2(1e300 / 5e-324) overflows: no error
    assert abs(hi - 5e299) <= observer.bin_width and lo == -hi
    with pytest.raises(CalibrationError, match=r"percentile observer: calibration values up to 1.7e\+308 are "
                                               r"too large to histogram; use method='absmax'"):
        observer.update(np.array([1.7e308]))            # the next doubling of the range would be Inf


def test_percentile_of_only_zeros_then_data():
    observer = observe("percentile", [np.zeros(1000), np.zeros(5)], percentile=50.0)
    assert observer.range(255, symmetric=True) == (0.0, 0.0)
    observer.update(np.array([1.0, -1.0]))
    lo, hi = observer.range(255, symmetric=True)
    assert hi <= observer.bin_width                          # the median is still 0


def test_percentile_docstring_example():
    a, b = np.linspace(-1, 1, 1001), np.linspace(-2, 2, 1001)
    observer = observe("percentile", [a, b], percentile=99.0, name="fc1 input")
    lo, hi = observer.range(255, symmetric=True)
    assert abs(hi - np.percentile(np.abs(np.r_[a, b]), 99.0)) <= observer.bin_width and lo == -hi


# --- mse ------------------------------------------------------------------------------------------

TENSOR = Layout((0,))


@functools.partial(jax.jit, static_argnums=(2, 3))
def measured_mse(x, clips, fmt, symmetric):
    """The mean squared quantization error of x for each clip (symmetric: c; else rows (lo, hi)),
    through compute_scale(clip=), quantize and dequantize: what the deployed layer would do."""
    def one(clip):
        scale, zero = compute_scale(x, fmt, TENSOR, symmetric=symmetric,
                                    clip=clip if symmetric else (clip[0], clip[1]))
        back = dequantize(quantize(x, fmt, TENSOR, scale, zero), fmt, TENSOR, scale, zero, jnp.float32)
        return jnp.mean((back - x) ** 2)
    return jax.vmap(one)(jnp.asarray(clips, jnp.float32))


def outlier_data(seed, kind):
    """20000 values in 5 batches: normal or two-sided lognormal, or ReLU-like (exact zeros), with
    a few outliers 30-40x the spread."""
    rng = np.random.default_rng(seed)
    if kind == "lognormal":
        x = rng.lognormal(0, 1, 20000) * rng.choice([-1, 1], 20000)
    else:
        x = rng.standard_normal(20000)
    x[rng.integers(0, x.size, 8)] *= 40
    if kind == "relu":
        x = np.maximum(x, 0) * 3
    return np.array_split(x.astype(np.float32), 5)


# (format, levels, float_format): levels=None asks the float model.
SYMMETRIC_FORMATS = [(INT8, 255, "e4m3"), (INT4, 15, "e4m3"), (E4M3, None, "e4m3"), (E5M2, None, "e5m2")]


@pytest.mark.parametrize("kind", ["normal", "lognormal", "relu"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fmt, levels, float_format", SYMMETRIC_FORMATS,
                         ids=[f[0].name for f in SYMMETRIC_FORMATS])
def test_mse_symmetric_clip_beats_absmax_and_a_brute_force_grid(fmt, levels, float_format, seed, kind):
    batches = outlier_data(seed, kind)
    x = np.concatenate(batches)
    lo, c = observe("mse", batches, float_format=float_format).range(levels, symmetric=True)
    absmax = float(np.abs(x).max())
    assert lo == -c and 0 < c <= absmax
    grid = np.linspace(absmax / 200, absmax, 400)
    at_clip, at_absmax = np.asarray(measured_mse(x, [c, absmax], fmt, True), np.float64)
    best = float(np.min(np.asarray(measured_mse(x, grid, fmt, True))))
    why = f"clip {c} (absmax {absmax}): mse {at_clip}, at absmax {at_absmax}, grid best {best}"
    if fmt is INT8:
        # A handful of outliers: clipping them pays for finer steps everywhere else.
        assert c < absmax and at_clip < at_absmax, why
    elif fmt is INT4:
        # With 7 steps a side, keeping several outliers can beat clipping them: either may win.
        assert at_clip <= at_absmax, why
    else:
        # fp8's steps are relative, so clipping gains little, and the model, which knows each
        # value only to within a bin, may prefer a clip a hair below absmax.
        assert at_clip <= at_absmax * (1 + 1e-3), why
    assert at_clip <= best * (1 + 5e-3), why


@pytest.mark.parametrize("kind", ["normal", "lognormal", "relu"])
@pytest.mark.parametrize("seed", [0, 1])
def test_mse_asymmetric_clip_beats_min_max_and_a_brute_force_grid(seed, kind):
    batches = outlier_data(seed, kind)
    x = np.concatenate(batches)
    lo, hi = observe("mse", batches).range(255, symmetric=False)
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    assert low <= lo <= 0.0 <= hi <= high and (lo, hi) != (low, high)
    ends = np.array([(a, b) for a in np.linspace(low, 0, 40) for b in np.linspace(high / 40, high, 40)])
    at_clip, at_minmax = np.asarray(measured_mse(x, [[lo, hi], [low, high]], INT8, False), np.float64)
    best = float(np.min(np.asarray(measured_mse(x, ends, INT8, False))))
    why = f"clip ({lo}, {hi}) of ({low}, {high}): mse {at_clip}, at min/max {at_minmax}, grid best {best}"
    assert at_clip < at_minmax and at_clip <= best * (1 + 5e-3), why


def test_mse_of_all_zero_data_is_the_zero_range():
    for levels, symmetric in ((255, True), (255, False), (15, True), (None, True)):
        assert observe("mse", [np.zeros(10), -np.zeros(3)]).range(levels, symmetric) == (0.0, 0.0)
    assert observe("absmax", [np.zeros(4)]).range(255, True) == (0.0, 0.0)
    assert observe("percentile", [np.zeros(4)]).range(255, False) == (0.0, 0.0)


def test_mse_without_outliers_keeps_most_of_the_range():
    x = np.random.default_rng(0).uniform(-1, 1, 10000)
    lo, hi = observe("mse", [x]).range(255, symmetric=True)
    assert 0.99 <= hi <= 1.0          # uniform data: clipping anything costs more than it saves


def test_mse_float_formats_are_symmetric_only():
    observer = observe("mse", [np.array([1.0, -2.0])], name="attn input")
    with pytest.raises(CalibrationError, match=r"attn input \(mse observer\): floating formats "
                                               r"\(levels=None\) are symmetric; ask for range\(None"):
        observer.range(None, symmetric=False)


# --- bad data and options -------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["absmax", "percentile", "mse"])
@pytest.mark.parametrize("bad, counts", [(np.nan, "1 NaN, 0 +Inf, 0 -Inf"), (np.inf, "0 NaN, 1 +Inf, 0 -Inf"),
                                          (-np.inf, "0 NaN, 0 +Inf, 1 -Inf")])
def test_non_finite_data_is_rejected_naming_the_observer(method, bad, counts):
    observer = observe(method, [np.array([1.0, -3.0], np.float32)], name="fc2 input")
    for dtype in (np.float32, np.float16, ml_dtypes.bfloat16, np.float64):
        with pytest.raises(CalibrationError, match=rf"fc2 input \({method} observer\): calibration batch has "
                                                   rf"1 non-finite values of 3 \({re.escape(counts)}\); "
                                                   "calibration data must be finite"):
            observer.update(np.array([0.5, bad, 2.0]).astype(dtype))
    # The bad batches left nothing behind.
    assert (observer.min, observer.max, observer.count) == (-3.0, 1.0, 2)
    if method != "absmax":
        assert observer.histogram.counts.sum() == 2
    unnamed = make_observer(method)
    with pytest.raises(CalibrationError, match=rf"^{method} observer: calibration batch has 2 non-finite"):
        unnamed.update([bad, bad, 1.0])


@pytest.mark.parametrize("method", ["absmax", "percentile", "mse"])
def test_range_before_any_data_says_to_call_update(method):
    observer = make_observer(method, name="conv1 input")
    observer.update(np.zeros((2, 0)))                      # an empty batch is no data
    with pytest.raises(CalibrationError, match=rf"conv1 input \({method} observer\): saw no calibration "
                                               r"data; call update\(\)"):
        observer.range(255, symmetric=True)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(CalibrationError, match=r"unknown calibration method 'minmax'; known: absmax, "
                                               r"percentile, mse"):
        make_observer("minmax")


@pytest.mark.parametrize("method, options, match", [
    ("absmax", {"bins": 10}, r"'absmax' takes no option bins; its options: name"),
    ("mse", {"percentile": 99.0}, r"'mse' takes no option percentile; its options: bins, float_format, name"),
    ("percentile", {"percentile": 99.0, "q": 99.0}, r"percentile= or q=, not both"),
    ("percentile", {"percentile": 0}, r"percentile observer: percentile must be in \(0, 100\], got 0"),
    ("percentile", {"percentile": 100.5}, r"in \(0, 100\], got 100.5"),
    ("percentile", {"percentile": float("nan")}, r"got nan"),
    ("percentile", {"percentile": "99"}, r"got '99'"),
    ("percentile", {"bins": 0}, r"bins must be an integer in \[1, 2\*\*20\], got 0"),
    ("mse", {"bins": 2.5}, r"mse observer: bins must be an integer.*got 2.5"),
    ("mse", {"bins": True}, r"got True"),
    ("percentile", {"bins": 2**21}, r"got 2097152"),
    ("mse", {"float_format": "e3m4"}, r"float_format must be one of e4m3, e5m2, got 'e3m4'"),
])
def test_bad_options_are_rejected_with_what_is_allowed(method, options, match):
    with pytest.raises(CalibrationError, match=match):
        make_observer(method, **options)


@pytest.mark.parametrize("levels", [1, 0, -255, 2.5, True, "255"])
def test_bad_levels_are_rejected(levels):
    observer = observe("mse", [np.array([1.0, -2.0])])
    with pytest.raises(CalibrationError, match=r"levels must be an integer >= 2 \(255 for int8\) or None"):
        observer.range(levels, symmetric=True)


def test_calibration_error_is_a_value_error():
    with pytest.raises(ValueError):
        make_observer("percentile", percentile=-1)

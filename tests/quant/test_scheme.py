"""graphopt.quant.scheme: scales, quantize / dequantize, int4 packing, error bounds, bad input.

The round-trip property draws float tensors of random shapes and block layouts (per channel over
one or several axes, per group of 2–256 along a reduced axis) whose blocks are each filled with one
pattern (normal, all zero, constant, one-signed, outliers, 1e-30, subnormal, 1e30, near the dtype's
max, ±0.0 sprinkled in) and checks, for every format and both integer modes, that codes are in the
format's range, nothing non-finite comes back, and |dequantize(quantize(x)) − x| <= error_bound
elementwise, all-zero blocks coming back exactly 0.

Signed zeros: integer formats have one zero, so −0.0 (and a negative value that rounds to 0)
comes back as +0.0; the fp8 formats keep the sign, so −0.0 comes back as −0.0.
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

from graphopt.quant.scheme import (FORMATS, Layout, QuantizationError, Scheme, check_finite, compute_scale,
                                   dequantize, error_bound, pack_int4, quantize, scheme_named, unpack_int4)

F32, F16, BF16 = np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)
INT8, INT4 = FORMATS["int8"], FORMATS["int4"]
E4M3, E5M2 = FORMATS["float8_e4m3fn"], FORMATS["float8_e5m2"]
# (format, symmetric): every mode a tensor can be quantized in.
MODES = [(INT8, True), (INT8, False), (INT4, True), (INT4, False), (E4M3, True), (E5M2, True)]
MODE_IDS = [f"{fmt.name}-{'sym' if sym else 'asym'}" for fmt, sym in MODES]


def round_trip(x, fmt, layout, symmetric=True, dtype=None):
    """(codes, scale, zero point, dequantized x in `dtype` (default x's dtype))."""
    x = np.asarray(x)
    scale, zero = compute_scale(x, fmt, layout, symmetric=symmetric)
    codes = quantize(x, fmt, layout, scale, zero)
    back = dequantize(codes, fmt, layout, scale, zero, x.dtype if dtype is None else dtype, x.shape)
    return np.asarray(codes), scale, zero, np.asarray(back)


def bits(x):
    """The bit patterns of a float array: compares -0.0 and +0.0 as different."""
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def code_values(codes, fmt):
    """The codes as numbers (int4: unpacked)."""
    if fmt.name == "int4":
        return np.asarray(unpack_int4(codes)).astype(np.int64)
    return np.asarray(codes).astype(np.float64 if fmt.is_float else np.int64)


# --- random tensors, block by block ---------------------------------------------------------------

def block_rows(shape, layout):
    """(rows view maker, inverse): a tensor of `shape` as a (blocks, block size) matrix and back."""
    blocked, axes = layout.blocked_shape(shape)
    kept = [a for a in range(len(blocked)) if a not in axes]
    perm = kept + list(axes)
    moved = tuple(blocked[a] for a in perm)
    n_blocks = math.prod(blocked[a] for a in kept)

    def to_rows(x):
        return np.reshape(np.transpose(np.reshape(x, blocked), perm), (n_blocks, -1))

    def from_rows(rows):
        return np.reshape(np.transpose(np.reshape(rows, moved), np.argsort(perm)), shape)
    return to_rows, from_rows


PATTERNS = ("normal", "zero", "constant", "positive", "negative", "outliers", "tiny", "subnormal",
            "huge", "max")


def fill_block(rng, pattern, n, dtype):
    info = np.finfo(dtype)
    tiny = {F16: 1e-3}.get(dtype, 1e-30)                 # small, but normal in the dtype
    huge = {F16: 1e4}.get(dtype, 1e30)
    if pattern == "zero":
        return np.where(rng.random(n) < 0.5, -0.0, 0.0)
    if pattern == "constant":
        return np.full(n, rng.choice([-1, 1]) * 10.0 ** rng.uniform(-3, 3))
    if pattern == "max":   # within a factor 2 of the largest finite value, a tenth exactly ±max
        magnitudes = np.where(rng.random(n) < 0.1, 1.0, rng.uniform(0.5, 1.0, n)) * float(info.max)
        return rng.choice([-1, 1], n) * magnitudes
    if pattern == "subnormal":
        return rng.uniform(-1, 1, n) * float(info.smallest_normal)
    values = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)
    if pattern == "positive":
        values = np.abs(values)
    elif pattern == "negative":
        values = -np.abs(values)
    elif pattern == "outliers":
        values[rng.integers(0, n, 2)] *= 100
    elif pattern == "tiny":
        values *= tiny
    elif pattern == "huge":
        values *= huge
    # Exact signed zeros inside a block: they must stay zero whatever the block's scale.
    return np.where(rng.random(n) < 0.05, np.where(rng.random(n) < 0.5, -0.0, 0.0), values)


@st.composite
def cases(draw, dtypes=(F32,)):
    """(x, layout, patterns per block) for a random shape, layout and fill."""
    dtype = draw(st.sampled_from(dtypes))
    sizes = st.sampled_from([1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 64, 96, 128, 256, 512])
    shape = tuple(draw(st.lists(sizes, min_size=1, max_size=4).filter(lambda s: math.prod(s) <= 4096)))
    ndim = len(shape)
    reduce = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    # Axes may be given negative, as callers may.
    signed = tuple(a - ndim if draw(st.booleans()) else a for a in reduce)
    group_axis = group = None
    if draw(st.booleans()):
        axis = draw(st.sampled_from(signed))
        divisors = [g for g in range(2, 257) if shape[axis] % g == 0]
        if divisors:
            group_axis, group = axis, draw(st.sampled_from(divisors))
    layout = Layout(signed, group_axis, group)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    to_rows, from_rows = block_rows(shape, layout)
    rows = to_rows(np.zeros(shape))
    patterns = rng.choice(PATTERNS, len(rows))
    filled = np.stack([fill_block(rng, p, rows.shape[1], dtype) for p in patterns])
    x = from_rows(np.clip(filled, -float(np.finfo(dtype).max), float(np.finfo(dtype).max))).astype(dtype)
    return x, layout, patterns


# --- the round-trip property ----------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def round_trips(x, layout, modes, out_dtypes):
    """Per mode: (codes, scale, zero point, {out dtype: (dequantized x, its error bound)}), in one
    program: one compilation per example instead of one per operation and mode (the quantize pass
    runs this math under jit too)."""
    results = []
    for fmt, symmetric in modes:
        scale, zero = compute_scale(x, fmt, layout, symmetric=symmetric)
        codes = quantize(x, fmt, layout, scale, zero)
        back = {dtype: (dequantize(codes, fmt, layout, scale, zero, dtype, x.shape),
                        error_bound(x, fmt, layout, symmetric=symmetric, dtype=dtype)) for dtype in out_dtypes}
        results.append((codes, scale, zero, back))
    return results


def check_round_trips(x, layout, patterns, out_dtypes):
    """Every mode's round trip of x, dequantized into each of `out_dtypes`, checked."""
    modes = tuple(m for m in MODES if m[0].name != "int4" or x.shape[-1] % 2 == 0)
    if len(modes) < len(MODES):   # int4 packs pairs along the last axis: odd is an error (at trace time)
        with pytest.raises(QuantizationError, match=r"even last axis, got shape"):
            jax.eval_shape(lambda v: quantize(v, INT4, layout, jnp.ones(layout.scale_shape(x.shape))), x)
    try:
        results = round_trips(x, layout, modes, out_dtypes)
    finally:
        # Every example compiles a program for its own shape, never reused: free it. Each one
        # holds ~80 memory maps, and a long (deep profile) run would pass the kernel's limit
        # (vm.max_map_count, 65530), at which XLA segfaults.
        round_trips.clear_cache()
    for (fmt, symmetric), (codes, scale, zero, back) in zip(modes, results):
        for dtype, (values, bound) in back.items():
            note(f"{fmt.name} symmetric={symmetric} into {dtype}")
            check_round_trip(x, layout, patterns, fmt, symmetric, np.asarray(codes), scale, zero,
                             np.asarray(values), np.asarray(bound, np.float64), dtype)


def check_round_trip(x, layout, patterns, fmt, symmetric, codes, scale, zero, back, bound, out_dtype):
    assert scale.shape == layout.scale_shape(x.shape) and scale.dtype == np.float32
    assert np.all(np.isfinite(scale)) and np.all(np.asarray(scale) > 0)
    if zero is not None:
        assert zero.shape == scale.shape and zero.dtype == np.int8
    assert back.shape == x.shape and back.dtype == out_dtype
    # Codes in the format's range.
    values = code_values(codes, fmt)
    if fmt.is_float:
        assert codes.dtype == fmt.storage and np.all(np.abs(values) <= fmt.qmax)
    else:
        lo = fmt.qmin if not symmetric else -fmt.qmax
        assert values.min(initial=0) >= lo and values.max(initial=0) <= fmt.qmax
        packed = (*x.shape[:-1], x.shape[-1] // 2) if fmt.name == "int4" else x.shape
        assert codes.shape == packed and codes.dtype == fmt.storage
    # Within the bound, never Inf or NaN.
    assert np.all(np.isfinite(back.astype(np.float64)))
    err = np.abs(back.astype(np.float64) - x.astype(np.float64))
    bad = np.argwhere(err > bound)
    assert not bad.size, (f"{len(bad)} elements over the bound; first at {tuple(bad[0])}: x "
                          f"{x[tuple(bad[0])]!r} → {back[tuple(bad[0])]!r}, error {err[tuple(bad[0])]:g} > "
                          f"bound {bound[tuple(bad[0])]:g}")
    # Zeros stay zero; integer formats lose the sign of -0.0, fp8 keeps it.
    to_rows, _ = block_rows(x.shape, layout)
    assert np.all(to_rows(back)[patterns == "zero"] == 0)
    zeros = x == 0
    if fmt.is_float:
        assert np.array_equal(np.signbit(back[zeros]), np.signbit(x[zeros]))
    else:
        assert not np.any(np.signbit(back[zeros]))


@settings(max_examples=max(8, settings().max_examples // 3))
@given(case=cases())
def test_round_trip_is_within_the_error_bound(case):
    x, layout, patterns = case
    note(f"shape {x.shape}, {layout}, blocks {list(patterns)}")
    check_round_trips(x, layout, patterns, (F32,))


@settings(max_examples=max(4, settings().max_examples // 6))
@given(case=cases(dtypes=(BF16, F16)))
def test_round_trip_of_half_precision_inputs_into_their_dtype_and_float32(case):
    x, layout, patterns = case
    note(f"{x.dtype} shape {x.shape}, {layout}, blocks {list(patterns)}")
    check_round_trips(x, layout, patterns, (x.dtype, F32))


@pytest.mark.parametrize("fmt, symmetric", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
def test_extremes_of_each_dtype_come_back_finite(fmt, symmetric, dtype):
    info = np.finfo(dtype)
    big, small = float(info.max), float(info.smallest_subnormal)
    rows = np.array([[big, -big, big, -big],          # the whole range: asymmetric scale must not overflow
                     [-big, big / 2, 1.0, 0.0],
                     [big, 1.0, -0.0, 0.0],
                     [small, -small, 3 * small, 0.0],  # subnormal: may flush to zero, never NaN
                     [1e-30 if dtype != F16 else 1e-4, -1.0, 0.5, 0.25]], np.float64).astype(dtype)
    for row in rows[:, None, :]:   # one row per call: whether 127 * scale overflowed depended on the shape
        _, _, _, back = round_trip(row, fmt, Layout((1,)), symmetric)
        assert np.all(np.isfinite(back.astype(np.float64))), (row, back)
        err = np.abs(back.astype(np.float64) - row.astype(np.float64))
        assert np.all(err <= np.asarray(error_bound(row, fmt, Layout((1,)), symmetric=symmetric), np.float64))


# --- codes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, symmetric", MODES, ids=MODE_IDS)
def test_zero_tensor_round_trips_exactly_with_scale_one(fmt, symmetric):
    x = np.array([[0.0, -0.0], [-0.0, -0.0]], np.float32)
    codes, scale, zero, back = round_trip(x, fmt, Layout((0,)), symmetric)
    assert np.asarray(scale).tolist() == [[1.0, 1.0]]
    assert bits(back).tolist() == bits(x if fmt.is_float else np.zeros_like(x)).tolist()
    if not symmetric:
        assert np.asarray(zero).tolist() == [[fmt.qmin, fmt.qmin]]  # the range [0, 0] starts at qmin


def test_signed_zero_of_integer_formats_is_positive_and_of_fp8_keeps_its_sign():
    x = np.array([-0.0, 0.0, -1e-6, 1.0, -1.0, 0.5], np.float32)
    for fmt, symmetric in MODES:
        _, _, _, back = round_trip(x, fmt, Layout((0,)), symmetric)
        if fmt.is_float:
            assert np.signbit(back[:3]).tolist() == [True, False, True], fmt.name
            if fmt is E4M3:   # -1e-6 / (1 / 448) is below e4m3's smallest subnormal: -0.0
                assert back[2] == 0
        else:
            assert bits(back[:3]).tolist() == [0, 0, 0], fmt.name


@pytest.mark.parametrize("fmt, symmetric", [m for m in MODES if not m[0].is_float], ids=MODE_IDS[:4])
def test_integer_codes_reach_the_ends_of_their_range(fmt, symmetric):
    x = np.array([-3.0, -1.0, 0.0, 2.0, 5.0, 4.0], np.float32)
    values = code_values(round_trip(x, fmt, Layout((0,)), symmetric)[0], fmt)
    if symmetric:   # -3 / (5 / qmax): -76.2 → -76 (int8), -4.2 → -4 (int4)
        assert (values.min(), values.max()) == (round(-3 * fmt.qmax / 5), fmt.qmax)
    else:
        assert (values.min(), values.max()) == (fmt.qmin, fmt.qmax)
    # Symmetric codes never use -128 (int8) / -8 (int4), even for values far beyond the scale.
    scale = jnp.ones((1,), jnp.float32)
    q = code_values(quantize(np.array([-1000.0, 1000.0], np.float32), fmt, Layout((0,)), scale), fmt)
    assert q.tolist() == [-fmt.qmax, fmt.qmax]


def test_fp8_codes_saturate_instead_of_becoming_nan():
    for fmt in (E4M3, E5M2):
        x = np.array([1e6, -1e6, 1.0, 0.0], np.float32)
        scale = jnp.ones((1,), jnp.float32)
        q = np.asarray(quantize(x, fmt, Layout((0,)), scale)).astype(np.float32)
        assert q.tolist() == [fmt.qmax, -fmt.qmax, 1.0, 0.0]


# --- int4 packing ---------------------------------------------------------------------------------

def test_pack_int4_is_a_bijection_between_code_pairs_and_bytes():
    low, high = np.meshgrid(np.arange(-8, 8), np.arange(-8, 8), indexing="ij")
    pairs = np.stack([low.ravel(), high.ravel()], axis=-1).astype(np.int8)   # all 256 pairs
    packed = np.asarray(pack_int4(jnp.asarray(pairs)))
    assert packed.shape == (256, 1) and packed.dtype == np.uint8
    assert sorted(packed.ravel().tolist()) == list(range(256))
    assert np.array_equal(np.asarray(unpack_int4(jnp.asarray(packed))), pairs)
    every_byte = jnp.arange(256, dtype=jnp.uint8)[:, None]
    assert np.array_equal(np.asarray(pack_int4(unpack_int4(every_byte))), np.asarray(every_byte))


def test_pack_int4_puts_the_even_index_in_the_low_nibble():
    assert np.asarray(pack_int4(jnp.array([1, -2, 7, 3], jnp.int8))).tolist() == [0xE1, 0x37]
    assert np.asarray(pack_int4(jnp.array([-8, 7], jnp.int8))).tolist() == [0x78]


@jax.jit
def pack_and_unpack(codes):
    return pack_int4(codes), unpack_int4(pack_int4(codes))


@settings(max_examples=max(5, settings().max_examples // 5))
@given(shape=st.lists(st.integers(1, 6), min_size=0, max_size=3), last=st.integers(1, 8),
       seed=st.integers(0, 2**32 - 1))
def test_unpack_inverts_pack_on_any_shape(shape, last, seed):
    codes = np.random.default_rng(seed).integers(-8, 8, (*shape, 2 * last)).astype(np.int8)
    packed, unpacked = pack_and_unpack(codes)
    pack_and_unpack.clear_cache()     # one program per shape: see check_round_trips
    assert packed.shape == (*shape, last) and packed.dtype == jnp.uint8
    assert np.array_equal(np.asarray(unpacked), codes)
    assert np.array_equal(np.asarray(pack_int4(codes)), np.asarray(packed))  # numpy input alike


@pytest.mark.parametrize("shape", [(3,), (2, 5), (4, 1)])
def test_pack_int4_rejects_an_odd_last_axis(shape):
    with pytest.raises(QuantizationError, match=rf"even last axis.*{re.escape(str(shape))}"):
        pack_int4(jnp.zeros(shape, jnp.int8))


def test_int4_dequantize_needs_the_unpacked_shape():
    x = np.arange(-8, 8, dtype=np.float32).reshape(2, 8)
    codes, scale, zero, back = round_trip(x, INT4, Layout((1,), 1, 4), True)
    assert codes.shape == (2, 4) and back.shape == (2, 8)
    assert np.array_equal(np.asarray(dequantize(codes, INT4, Layout((1,), 1, 4), scale, None, np.float32)), back)


# --- known values ---------------------------------------------------------------------------------

def test_symmetric_int8_scale_is_absmax_over_127_per_channel():
    w = np.array([[1.27, -0.5], [-2.54, 0.25], [0.635, 0.0]], np.float32)   # contract axis 0
    scale, zero = compute_scale(w, INT8, Layout((0,)))
    assert zero is None
    assert np.asarray(scale).tolist() == [[np.float32(2.54) / np.float32(127), np.float32(0.5) / np.float32(127)]]
    codes = np.asarray(quantize(w, INT8, Layout((0,)), scale)).tolist()
    assert codes == [[64, -127], [-127, 64], [32, 0]]   # 1.27 / (2.54 / 127) is 63.5 exactly: ties to 64


def test_rounding_is_to_nearest_ties_to_even():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, 127.5, -127.5], np.float32)
    scale, _ = compute_scale(x, INT8, Layout((0,)), clip=127.0)
    assert np.asarray(scale).tolist() == [1.0]
    codes = np.asarray(quantize(x, INT8, Layout((0,)), scale)).tolist()
    assert codes == [0, 2, 2, 0, -2, -2, 4, 126, 127, -127]
    # fp8 e4m3 near 1 has steps of 1/8: 1.0625 ties to 1.0, 1.1875 to 1.25 (even mantissa).
    scale, _ = compute_scale(x, E4M3, Layout((0,)), clip=448.0)
    y = np.array([1.0625, 1.1875, -1.0625, 448.0, 0.001953125], np.float32)
    assert np.asarray(quantize(y, E4M3, Layout((0,)), scale)).astype(np.float32).tolist() == \
        [1.0, 1.25, -1.0, 448.0, 0.001953125]   # 2**-9: e4m3's smallest subnormal


def test_asymmetric_int8_maps_zero_to_one_range():
    x = (np.arange(256, dtype=np.float32) / np.float32(255))[None, :]        # [0, 1] in 255 steps
    scale, zero = compute_scale(x, INT8, Layout((1,)), symmetric=False)
    assert np.asarray(scale).tolist() == [[np.float32(1) / np.float32(255)]]
    assert np.asarray(zero).tolist() == [[-128]]                            # 0.0 → -128, 1.0 → 127
    codes = np.asarray(quantize(x, INT8, Layout((1,)), scale, zero))
    assert codes.tolist() == [list(range(-128, 128))]
    back = np.asarray(dequantize(codes, INT8, Layout((1,)), scale, zero, np.float32))
    assert back[0, 0] == 0.0 and abs(back[0, -1] - 1.0) <= 1e-6


def test_asymmetric_zero_point_makes_zero_exact():
    x = np.array([-1.0, 0.0, 3.0, 0.1], np.float32)
    scale, zero = compute_scale(x, INT8, Layout((0,)), symmetric=False)
    assert np.asarray(zero).tolist() == [-64]           # round(-128 + 1 / (4 / 255)) = round(-64.25)
    codes = np.asarray(quantize(x, INT8, Layout((0,)), scale, zero))
    assert codes.tolist()[:3] == [-128, -64, 127]
    back = np.asarray(dequantize(codes, INT8, Layout((0,)), scale, zero, np.float32))
    assert back[1] == 0.0


def test_asymmetric_clip_is_a_low_high_pair():
    x = np.array([-5.0, 0.0, 1.0, 2.0], np.float32)
    scale, zero = compute_scale(x, INT8, Layout((0,)), symmetric=False, clip=(-1.0, 2.0))
    assert np.asarray(scale).tolist() == [np.float32(3) / np.float32(255)]
    codes = np.asarray(quantize(x, INT8, Layout((0,)), scale, zero)).tolist()
    assert codes[0] == -128 and codes[-1] == 127       # -5 clips to the range's low end


def test_per_group_scales_have_the_blocked_shape():
    x = np.arange(24, dtype=np.float32).reshape(2, 12) - 11.0
    layout = Layout((1,), group_axis=1, group=4)
    assert layout.blocked_shape(x.shape) == ((2, 3, 4), (2,))
    scale, _ = compute_scale(x, INT8, layout)
    absmax = np.abs(x.reshape(2, 3, 4)).max(axis=2, keepdims=True)
    assert np.asarray(scale).tolist() == (absmax / np.float32(127)).tolist()
    # Several reduced axes, one of them grouped: one scale per (row, group).
    layout = Layout((0, 2), group_axis=2, group=2)
    assert layout.scale_shape((3, 5, 4)) == (1, 5, 2, 1)


def test_docstring_example_values():
    w = np.array([[1.0, -0.5], [0.25, 2.0]], np.float32)
    scale, zero = compute_scale(w, INT8, Layout((0,)))
    assert np.asarray(quantize(w, INT8, Layout((0,)), scale, zero)).tolist() == [[127, -32], [32, 127]]


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, BF16, F16, np.dtype(np.float64)], ids=str)
def test_check_finite_names_the_tensor_and_counts_each_kind(dtype):
    x = np.array([1.0, np.nan, np.inf, -np.inf, -np.inf, 0.0], np.float64).astype(dtype)
    with pytest.raises(QuantizationError) as info:
        check_finite(x, "params/dense/kernel")
    message = str(info.value)
    assert "params/dense/kernel" in message and "4 of 6" in message, message
    assert "1 NaN" in message and "1 +Inf" in message and "2 -Inf" in message, message
    for value, kind in ((np.nan, "1 NaN"), (np.inf, "1 +Inf"), (-np.inf, "1 -Inf")):
        with pytest.raises(QuantizationError, match=re.escape(kind)):
            array = np.asarray if dtype == np.float64 else jnp.asarray   # jax arrays too
            check_finite(array([[0.5, value]], dtype), "w")


def test_check_finite_rejects_float64_beyond_float32_as_quantization_computes_in_float32():
    with pytest.raises(QuantizationError, match=r"w: 2 of 3 values are not finite \(0 NaN, 0 \+Inf, 0 -Inf, "
                                                r"2 beyond float32's range ±3.4e\+38, which quantization"):
        check_finite(np.array([1e300, 1.0, -1e39], np.float64), "w")


def test_check_finite_passes_finite_and_integer_arrays():
    check_finite(np.array([np.finfo(np.float32).max, -0.0, 1e-45], np.float32), "w")
    check_finite(np.array([3e38, -1e-300], np.float64), "w")
    check_finite(np.array([-(2**31)], np.int32), "w")
    check_finite(np.zeros((0, 3), np.float32), "w")


@pytest.mark.parametrize("layout, shape, match", [
    (Layout((0,), 0, 3), (8, 4), r"\(8, 4\).*axis 0 of size 8.*groups of 3.*divides"),
    (Layout((0,), 1, 2), (8, 4), r"\(8, 4\).*group axis 1.*reduced.*add it to reduce_axes"),
    (Layout((2,)), (8, 4), r"\(8, 4\).*reduce axes \(2,\).*out of range.*2 axes"),
    (Layout((-3,)), (8, 4), r"\(8, 4\).*out of range"),
    (Layout((0,), 5, 2), (8, 4), r"\(8, 4\).*group axis 5.*out of range"),
    (Layout((0, -2)), (8, 4), r"\(8, 4\).*repeat"),
    (Layout((0,), 0, 0), (8, 4), r"\(8, 4\).*group.*positive"),
    (Layout((0,), 0, -2), (8, 4), r"group.*positive"),
    (Layout((0,), 0, 2.0), (8, 4), r"group.*int"),
    (Layout((0,), 0, None), (8, 4), r"group_axis 0.*no group"),
])
def test_layout_check_says_what_is_wrong_and_what_to_do(layout, shape, match):
    with pytest.raises(QuantizationError, match=match):
        layout.check(shape, "weight")
    # The math checks its layout too, so the same message reaches a caller of compute_scale.
    with pytest.raises(QuantizationError, match=match):
        compute_scale(np.ones(shape, np.float32), INT8, layout)


def test_layout_check_accepts_good_layouts():
    Layout((0,)).check((8, 4))
    Layout((0, 1), -1, 2).check((8, 4))
    Layout(()).check(())                     # a scalar with one scale
    Layout((-1,), -1, 4).check((3, 4))


def test_scheme_named_lists_the_known_schemes():
    with pytest.raises(QuantizationError, match="unknown quantization scheme 'int3'.*known: int8, int4, "
                                                "int8_dynamic, int8_static, fp8, fp8_e5m2"):
        scheme_named("int3")


@pytest.mark.parametrize("group", [0, 1, 3, -2, 2.5, True, "64"])
def test_scheme_named_rejects_bad_groups(group):
    with pytest.raises(QuantizationError, match=r"int4: group must be an even int >= 2"):
        scheme_named("int4", group=group)


def test_scheme_named_builds_the_documented_table():
    assert scheme_named("int4").group == 128 and scheme_named("int4", group=np.int64(32)).group == 32
    assert scheme_named("int8").describe() == "int8 weights (per channel), float activations"
    assert scheme_named("int8_static", symmetric=False).describe() == \
        "int8 weights (per channel, asymmetric), int8 activations (static)"
    assert scheme_named("fp8").describe() == \
        "float8_e4m3fn weights (per channel), float8_e4m3fn activations (static)"
    assert scheme_named("int8_dynamic").activation_mode == "dynamic"
    assert scheme_named("fp8_e5m2").weights is E5M2
    s = scheme_named("int8")
    assert scheme_named(s) is s and isinstance(s, Scheme) and s.weight_only


@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
def test_float_formats_reject_asymmetric(name):
    with pytest.raises(QuantizationError, match=f"{name}: floating formats are symmetric only"):
        scheme_named(name, symmetric=False)
    fmt = scheme_named(name).weights
    with pytest.raises(QuantizationError, match="floating formats are symmetric only"):
        compute_scale(np.ones((2, 2), np.float32), fmt, Layout((0,)), symmetric=False)

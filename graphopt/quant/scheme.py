"""Quantization formats and schemes, and the math: scales, quantize, dequantize, int4 packing.

A *format* is how one number is stored: `int8`, `int4` (two per byte), `float8_e4m3fn` or
`float8_e5m2`. A *block layout* says which elements share one scale: the `reduce_axes` of the
tensor (a weight's contracting axes give one scale per output channel), optionally split into
groups of `group` consecutive elements along one axis (int4 per-group). A *scheme* says what a
quantized layer does with its weights and its activations:

    scheme           weights                     activations
    int8             int8, per channel           float (weight-only)
    int4             int4, per group (128)       float (weight-only)
    int8_dynamic     int8, per channel           int8 per token, scale computed at run time
    int8_static      int8, per channel           int8 per tensor, scale from calibration
    fp8              e4m3, per channel           e4m3 per tensor, scale from calibration
    fp8_e5m2         e5m2, per channel           e5m2 per tensor, scale from calibration

Symmetric by default (zero maps to 0, the range is ±absmax); `symmetric=False` adds a zero point
for integer formats. Rounding is to nearest, ties to even; values are clipped to the format's range.

Edge cases (the tests pin them down): all-zero blocks get scale 1 and come back exactly 0. Integer
formats have one zero, so -0.0 (and a small negative value rounding to 0) comes back +0.0; fp8
keeps the sign of zero. `dequantize` saturates at its dtype's largest finite value, so tensors
reaching ±float32 max come back finite. XLA on CPU treats float32 subnormals as zero: a block of
only subnormals gets scale 1 and comes back 0 (within `error_bound`, whose steps at scale 1 dwarf
any subnormal).

Example:
    >>> import numpy as np
    >>> w = np.array([[1.0, -0.5], [0.25, 2.0]], np.float32)   # [in, out]: contract axis 0
    >>> layout = Layout(reduce_axes=(0,))
    >>> scale, zero = compute_scale(w, FORMATS["int8"], layout)
    >>> np.asarray(scale).ravel().tolist()                       # absmax / 127 per output column
    [0.007874015718698502, 0.015748031437397003]
    >>> q = quantize(w, FORMATS["int8"], layout, scale, zero)
    >>> np.asarray(q).tolist()
    [[127, -32], [32, 127]]
    >>> bool(np.abs(dequantize(q, FORMATS["int8"], layout, scale, zero, np.float32) - w).max() < 0.008)
    True
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from graphopt.errors import GraphoptError


class QuantizationError(GraphoptError):
    """A tensor or layer that cannot be quantized as asked (non-finite weights, bad layout)."""


@dataclasses.dataclass(frozen=True)
class Format:
    """How one quantized number is stored."""

    name: str
    bits: int
    is_float: bool
    qmin: float          # smallest code (integers) or -max finite value (floats)
    qmax: float

    @property
    def storage(self) -> np.dtype:
        """The dtype of the stored array (int4 packs two codes into one uint8)."""
        if self.name == "int4":
            return np.dtype(np.uint8)
        return np.dtype(jnp.dtype(self.name))

    @property
    def compute(self):
        """The dtype codes are held in before packing (int8 for both integer formats)."""
        return jnp.int8 if not self.is_float else jnp.dtype(self.name)

    def symmetric_max(self) -> float:
        """The largest magnitude a symmetric scale maps absmax to (127 for int8: -128 unused)."""
        return self.qmax if self.is_float else min(-self.qmin, self.qmax)


def _float_format(name: str) -> Format:
    info = jnp.finfo(jnp.dtype(name))
    return Format(name, info.bits, True, -float(info.max), float(info.max))


FORMATS: dict[str, Format] = {
    "int8": Format("int8", 8, False, -128, 127),
    "int4": Format("int4", 4, False, -8, 7),
    "float8_e4m3fn": _float_format("float8_e4m3fn"),
    "float8_e5m2": _float_format("float8_e5m2"),
}


def format_named(name: str) -> Format:
    aliases = {"e4m3": "float8_e4m3fn", "fp8": "float8_e4m3fn", "e5m2": "float8_e5m2"}
    try:
        return FORMATS[aliases.get(name, name)]
    except KeyError:
        raise QuantizationError(f"unknown quantization format {name!r}; known: {', '.join(FORMATS)}") from None


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which elements share a scale: all those along `reduce_axes`; with `group`, only runs of
    `group` consecutive elements along `group_axis` (which must be one of reduce_axes).
    Scales have the *blocked* shape: the tensor's shape with group_axis split into
    (size / group, group), and every reduced axis (the group part of the split one) of size 1."""

    reduce_axes: tuple[int, ...]
    group_axis: int | None = None
    group: int | None = None

    def check(self, shape, what: str = "tensor") -> None:
        """Raise QuantizationError, naming `what` and its shape, if this layout does not fit `shape`."""
        ndim, shape = len(shape), tuple(shape)
        if any(not -ndim <= a < ndim for a in self.reduce_axes):
            raise QuantizationError(f"{what} {shape}: reduce axes {self.reduce_axes} out of range for "
                                    f"{ndim} axes; use axes in [{-ndim}, {ndim})")
        if len({a % ndim for a in self.reduce_axes}) < len(self.reduce_axes):
            raise QuantizationError(f"{what} {shape}: reduce axes {self.reduce_axes} repeat an axis; "
                                    "list each axis once")
        if self.group is None:
            if self.group_axis is not None:
                raise QuantizationError(f"{what} {shape}: group_axis {self.group_axis} with no group; give "
                                        "group= (the group size) or drop group_axis")
            return
        if isinstance(self.group, bool) or not isinstance(self.group, (int, np.integer)) or self.group <= 0:
            raise QuantizationError(f"{what} {shape}: group must be a positive int (the number of elements "
                                    f"sharing a scale), got {self.group!r}")
        if self.group_axis is None or not -ndim <= self.group_axis < ndim:
            raise QuantizationError(f"{what} {shape}: group axis {self.group_axis} out of range for {ndim} "
                                    "axes; give the (reduced) axis the groups run along")
        if self.group_axis % ndim not in {a % ndim for a in self.reduce_axes}:
            raise QuantizationError(f"{what} {shape}: group axis {self.group_axis} must be one of the reduced "
                                    f"axes {self.reduce_axes}; add it to reduce_axes")
        size = shape[self.group_axis]
        if size % self.group:
            raise QuantizationError(f"{what} {shape}: axis {self.group_axis} of size {size} "
                                    f"does not split into groups of {self.group}; choose a group "
                                    "size that divides it (or per-channel scales)")

    def blocked_shape(self, shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(blocked shape of the tensor, axes reduced in the blocked shape)."""
        self.check(shape)
        ndim = len(shape)
        reduce = sorted(a % ndim for a in self.reduce_axes)
        if self.group is None:
            return tuple(shape), tuple(reduce)
        g = self.group_axis % ndim
        blocked = (*shape[:g], shape[g] // self.group, self.group, *shape[g + 1:])
        axes = [a + (a > g) for a in reduce if a != g] + [g + 1]
        return blocked, tuple(sorted(axes))

    def scale_shape(self, shape) -> tuple[int, ...]:
        blocked, axes = self.blocked_shape(shape)
        return tuple(1 if i in axes else d for i, d in enumerate(blocked))


def compute_scale(x, fmt: Format, layout: Layout, *, symmetric: bool = True, clip=None):
    """(scale, zero_point) of `x` for `fmt`, one per block of `layout` (blocked shape, keepdims).

    Symmetric: scale = absmax / symmetric_max, zero point None. Asymmetric (integer formats):
    the range [min(x, 0), max(x, 0)] maps onto [qmin, qmax], zero point an integer in it.
    `clip` (a float or per-block array, > 0) replaces absmax (for asymmetric: a (lo, hi) pair).
    All-zero blocks get scale 1, so they quantize to 0 and back exactly; a block holding NaN gets
    a NaN scale (never a silent 1: the parameter prep rejects non-finite scales, naming the weight). Works on traced values.
    """
    if fmt.is_float and not symmetric:
        raise QuantizationError(f"{fmt.name}: floating formats are symmetric only; drop symmetric=False")
    blocked, axes = layout.blocked_shape(np.shape(x))
    xb = jnp.reshape(jnp.asarray(x), blocked)
    dtype = jnp.promote_types(xb.dtype, jnp.float32)
    xb = xb.astype(dtype)
    if symmetric:
        amax = jnp.max(jnp.abs(xb), axes, keepdims=True) if clip is None else jnp.broadcast_to(
            jnp.asarray(clip, dtype), layout.scale_shape(np.shape(x)))
        scale = amax / jnp.asarray(fmt.symmetric_max(), dtype)
        return jnp.where((scale > 0) | jnp.isnan(scale), scale, jnp.ones_like(scale)), None
    if clip is None:
        lo = jnp.minimum(jnp.min(xb, axes, keepdims=True), 0)
        hi = jnp.maximum(jnp.max(xb, axes, keepdims=True), 0)
    else:
        lo, hi = (jnp.broadcast_to(jnp.asarray(c, dtype), layout.scale_shape(np.shape(x))) for c in clip)
    steps, width = jnp.asarray(fmt.qmax - fmt.qmin, dtype), hi - lo
    # hi - lo overflows for ranges near ±max: then each end is divided alone (and rounded twice).
    scale = jnp.where(jnp.isfinite(width), width / steps, hi / steps - lo / steps)
    scale = jnp.where((scale > 0) | jnp.isnan(scale), scale, jnp.ones_like(scale))
    zero = jnp.clip(jnp.round(fmt.qmin - lo / scale), fmt.qmin, fmt.qmax).astype(jnp.int8)
    return scale, zero


def quantize(x, fmt: Format, layout: Layout, scale, zero_point=None):
    """The codes of `x` in `fmt` (int4: packed two per byte along the last axis), shape of `x`
    (int4: last axis halved). Clips to the format's range: no NaN from overflow."""
    shape = np.shape(x)
    blocked, _ = layout.blocked_shape(shape)
    xb = jnp.reshape(jnp.asarray(x), blocked).astype(scale.dtype) / scale
    if fmt.is_float:
        q = jnp.clip(xb, fmt.qmin, fmt.qmax).astype(fmt.compute)
    else:
        if zero_point is not None:
            xb = xb + zero_point.astype(xb.dtype)
        lo = fmt.qmin if zero_point is not None else -fmt.symmetric_max()
        q = jnp.clip(jnp.round(xb), lo, fmt.qmax).astype(jnp.int8)
    q = jnp.reshape(q, shape)
    return pack_int4(q) if fmt.name == "int4" else q


def dequantize(q, fmt: Format, layout: Layout, scale, zero_point, dtype, shape=None):
    """The values the codes `q` stand for, in `dtype`, shape `shape` (default: q's shape; give it
    for int4, whose stored last axis is half the tensor's). Saturates at `dtype`'s largest finite
    value: a code may stand for a value just beyond it (the scale rounded up, or, with a zero
    point, the grid's end half a step past the range), which must not become ±Inf."""
    if fmt.name == "int4":
        q = unpack_int4(q)
    shape = np.shape(q) if shape is None else tuple(shape)
    blocked, _ = layout.blocked_shape(shape)
    values = jnp.reshape(q, blocked).astype(scale.dtype)
    if zero_point is not None:
        values = values - zero_point.astype(scale.dtype)
    values = values * scale
    if jnp.issubdtype(dtype, jnp.floating):
        limit = min(float(jnp.finfo(dtype).max), float(jnp.finfo(scale.dtype).max))
        values = jnp.clip(values, -limit, limit)
    return jnp.reshape(values, shape).astype(dtype)


def pack_int4(q):
    """int8 codes in [-8, 7] → uint8, two per byte along the last axis (even index low nibble).
    A bijection between pairs of codes and bytes; only the low 4 bits of a code are kept.

    >>> pack_int4(jnp.array([1, -2, 7, 3], jnp.int8)).tolist()
    [225, 55]
    """
    if q.shape[-1] % 2:
        raise QuantizationError(f"int4 packing needs an even last axis, got shape {tuple(q.shape)}")
    nibbles = (q.astype(jnp.int32) & 0xF).astype(jnp.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed):
    """The inverse of `pack_int4` for codes in [-8, 7] (int4's range, with or without zero point).

    >>> unpack_int4(jnp.array([225, 55], jnp.uint8)).tolist()
    [1, -2, 7, 3]
    """
    low, high = packed & 0xF, packed >> 4
    codes = jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    codes = codes.astype(jnp.int8)
    return (codes ^ 8) - 8


def error_bound(x, fmt: Format, layout: Layout, *, symmetric: bool = True, dtype=None):
    """Per-element bound on |dequantize(quantize(x)) - x| for scales from `compute_scale(x)`,
    dequantized into `dtype` (default: x's dtype).

    Integers: half a step (scale / 2). Floats: half an ulp of the scaled value (2^-(mantissa+1)
    relative) or half the smallest subnormal step, whichever is larger. Plus the rounding of
    the scale arithmetic itself (a few f32 ulps of |x|), and of the result into `dtype` (half
    an ulp there: bfloat16 and float16 results add 2^-8 and 2^-11 relative).
    """
    scale, _ = compute_scale(x, fmt, layout, symmetric=symmetric)
    shape = np.shape(x)
    dtype = jnp.result_type(x) if dtype is None else jnp.dtype(dtype)
    blocked, _ = layout.blocked_shape(shape)
    xb = jnp.reshape(jnp.abs(jnp.asarray(x, jnp.float32)), blocked)
    if fmt.is_float:
        info = jnp.finfo(jnp.dtype(fmt.name))
        relative = 2.0 ** -(info.nmant + 1)
        bound = jnp.maximum(xb * relative, scale * float(info.smallest_subnormal) / 2)
    else:  # asymmetric: the rounded zero point may push an extreme value a half step out
        bound = jnp.broadcast_to(scale / 2 if symmetric else scale, blocked)
    bound = bound * (1 + 1e-5) + xb * 4 * float(np.finfo(np.float32).eps)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        out = jnp.finfo(dtype)
        bound = bound + (xb + bound) * 2.0 ** -(out.nmant + 1) + float(out.smallest_subnormal) / 2
    return jnp.reshape(bound, shape)


def check_finite(x, name: str) -> None:
    """Raise QuantizationError naming `name` if the concrete array `x` holds NaN or ±Inf, or values
    beyond the range of the float type quantization computes in (float32 unless x64 is on)."""
    values = np.asarray(x)
    if values.dtype.kind == "V":   # bfloat16, float8 (ml_dtypes): numpy's own tests need a float
        values = values.astype(np.float32)
    if not np.issubdtype(values.dtype, np.floating):
        return
    nan = int(np.count_nonzero(np.isnan(values)))
    pos = int(np.count_nonzero(np.isposinf(values)))
    neg = int(np.count_nonzero(np.isneginf(values)))
    compute = jax.dtypes.canonicalize_dtype(jnp.promote_types(values.dtype, jnp.float32))
    limit = float(jnp.finfo(compute).max)
    big = 0 if float(np.finfo(values.dtype).max) <= limit else \
        int(np.count_nonzero(np.isfinite(values) & (np.abs(values) > limit)))
    if nan + pos + neg + big:
        beyond = f", {big} beyond {compute.name}'s range ±{limit:.3g}, which quantization computes in" if big else ""
        raise QuantizationError(f"{name}: {nan + pos + neg + big} of {values.size} values are not finite "
                                f"({nan} NaN, {pos} +Inf, {neg} -Inf{beyond}); quantization needs finite "
                                "weights (fix or skip this layer with a rule)")


@dataclasses.dataclass(frozen=True)
class Scheme:
    """What a quantized layer stores and computes. Build with `scheme_named`."""

    name: str
    weights: Format
    activations: Format | None = None   # None: weight-only
    activation_mode: str | None = None  # "dynamic" (per token, at run time) or "static" (calibrated)
    group: int | None = None            # weights: per-group scales of this size; None: per channel
    symmetric: bool = True

    @property
    def weight_only(self) -> bool:
        return self.activations is None

    def describe(self) -> str:
        granularity = f"group {self.group}" if self.group else "per channel"
        acts = "float activations" if self.weight_only else \
            f"{self.activations.name} activations ({self.activation_mode})"
        zero = "" if self.symmetric else ", asymmetric"
        return f"{self.weights.name} weights ({granularity}{zero}), {acts}"


SCHEMES = ("int8", "int4", "int8_dynamic", "int8_static", "fp8", "fp8_e5m2")


def scheme_named(name: str, *, group: int | None = None, symmetric: bool = True) -> Scheme:
    """A scheme by name (see the module docstring); `group` for int4 (default 128, 32–256).

    >>> scheme_named("int4").describe()
    'int4 weights (group 128), float activations'
    """
    if isinstance(name, Scheme):
        return name
    int8, e4m3, e5m2 = FORMATS["int8"], FORMATS["float8_e4m3fn"], FORMATS["float8_e5m2"]
    table = {
        "int8": (int8, None, None),
        "int4": (FORMATS["int4"], None, None),
        "int8_dynamic": (int8, int8, "dynamic"),
        "int8_static": (int8, int8, "static"),
        "fp8": (e4m3, e4m3, "static"),
        "fp8_e5m2": (e5m2, e5m2, "static"),
    }
    if name not in table:
        raise QuantizationError(f"unknown quantization scheme {name!r}; known: {', '.join(SCHEMES)}")
    weights, acts, mode = table[name]
    if name == "int4" and group is None:
        group = 128
    if group is not None and not (isinstance(group, (int, np.integer)) and not isinstance(group, bool)
                                  and group >= 2 and group % 2 == 0):
        raise QuantizationError(f"{name}: group must be an even int >= 2 (32–256 is usual), got {group!r}")
    if not symmetric and (weights.is_float):
        raise QuantizationError(f"{name}: floating formats are symmetric only; drop symmetric=False")
    return Scheme(name, weights, acts, mode, None if group is None else int(group), bool(symmetric))


def block_count(shape, layout: Layout) -> int:
    return math.prod(layout.scale_shape(shape))

"""canonicalize: one spelling for equivalent forms, so later rules need one pattern, not many.

    %0 = mul 2.0, %x                                  %0 = mul %x, 2.0
    %1 = sub %0, 1.0                                  %1 = add %0, -1.0
    %2 = div %1, 4.0                                  %2 = mul %1, 0.25
    %3 = broadcast_in_dim[shape=(4,6)] 3.0      →     %3 = mul %2, 3.0
    %4 = mul %2, %3                                   return %3
    %5 = neg %4
    %6 = neg %5
    %7 = broadcast_in_dim[shape=(1,4,6)] %6
    %8 = squeeze[dimensions=(0,)] %7
    return %8

Canonical forms: constants (then scalars) on the right of commutative ops; subtracting a constant
is adding its negation; dividing by a power of two is multiplying by its reciprocal; a broadcast
scalar operand is the scalar; squeeze and expand_dims are reshapes; chains of reshapes,
transposes, broadcasts of a scalar and widening converts collapse; identities (`x + -0.0`,
`x * 1`, `neg(neg(x))`, identity converts, reshapes and transposes, copies) disappear.

Every rule gives bit-identical results, NaN, ±Inf, −0 and subnormals included; each says why next
to it. Look-alikes that are not exact stay out: `x + 0.0 → x` (−0 + 0 = +0), `x / 3 → x * (1/3)`
(1/3 rounds), `x / 2^-127` (a subnormal divisor is flushed to 0 by XLA:CPU), narrowing or
int→float→int convert chains (double rounding; float→int saturates where int→int wraps), and
`z * (1+0j) → z` (Inf·0 = NaN in the imaginary part).

`dots=True` adds DOT_RULES: a dot_general absorbs transposes of its operands and of its result,
so `x @ w`, `einsum("ji,jk->ik", x.T, w)` and `(w.T @ x.T).T` become one dot_general. Same products,
but XLA chooses its kernel, and so the summation order, by the dimension numbers: results can
differ in the last bit (XLA:CPU, a 1×1000 @ 1000×3 matmul). Hence opt-in.

Contract: exact (bit for bit; with dots=True, up to the order of dot_general sums).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from graphopt.pattern import Const, Op, Rule, Var, constant_value, rewrite
from graphopt.pipeline import register_pass


@register_pass("canonicalize", layerwise=True)
def canonicalize(graph, ctx, dots: bool = False):
    """Rewrite equivalent forms to one spelling, bit for bit (see the module docstring).

    `dots=True` also applies DOT_RULES: one dot_general form for every spelling of a matmul. XLA
    may then sum in another order (last-bit differences), so they are opt-in.

    >>> import graphopt, jax.numpy as jnp
    >>> from graphopt.pipeline import run_pipeline
    >>> g = graphopt.trace(lambda x: 2.0 * x - 1.0, jnp.ones(3))
    >>> print(run_pipeline(g, ["canonicalize"]).graph)  # doctest: +ELLIPSIS
    graph <lambda>(%x: f32[3]) {
      %0 = mul %x, 2.0 : f32[3]  ...
      %1 = add %0, -1.0 : f32[3]  ...
      return %1
    }
    """
    ctx.count(rewrite(graph, CANONICAL_RULES + DOT_RULES if dots else CANONICAL_RULES))
    return graph


# --- predicates ----------------------------------------------------------------------------------

SMALL = 1024  # constants inspected by value; larger ones (weights) are never read back to host

# The float dtypes that hold every value (±0, ±Inf, NaN, subnormals) of the key dtype exactly.
_WIDER_FLOATS = {
    "float8_e4m3fn": {"float16", "bfloat16", "float32", "float64"},
    "float8_e5m2": {"float16", "bfloat16", "float32", "float64"},
    "float16": {"float32", "float64"},
    "bfloat16": {"float32", "float64"},
    "float32": {"float64"},
}
_FLOATS = set(_WIDER_FLOATS) | {"float64"}


def _small(shape) -> bool:
    return math.prod(shape) <= SMALL


@functools.cache
def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


@functools.cache
def _is_int(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.integer)


@functools.cache
def _is_complex(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.complexfloating)


@functools.cache
def _smallest_normal(dtype) -> float:
    return float(jnp.finfo(dtype).tiny)


def _is_constant(value) -> bool:
    return value.node is not None and value.node.op.name == "constant"


def _is_additive_identity(c) -> bool:
    """−0.0 for floats (x + −0 = x for every x; +0 would turn −0 into +0), 0 for integers."""
    if _is_float(c.dtype):
        if c.ndim == 0:  # the usual case; numpy's reductions cost more than the test
            value = float(c)
            return value == 0 and math.copysign(1.0, value) < 0
        wide = c.astype(np.float64)
        return bool(np.all(wide == 0) and np.all(np.signbit(wide)))
    return _is_int(c.dtype) and (int(c) == 0 if c.ndim == 0 else bool(np.all(c == 0)))


def _is_one(c) -> bool:
    if not (_is_float(c.dtype) or _is_int(c.dtype)):
        return False
    return c.item() == 1 if c.ndim == 0 else bool(np.all(c == 1))


def _has_exact_reciprocal(c) -> bool:
    """±2^k, normal, with a normal reciprocal 2^−k in the same dtype: x / c and x * (1/c) are then
    the same real number and round the same (subnormal, overflowing and ±0 results included).
    Both must be normal: a backend that flushes subnormal operands (XLA:CPU does) would see
    x / 0 on one side and a finite product on the other."""
    if not _is_float(c.dtype):
        return False
    if c.ndim == 0:  # one answer per scalar: unrolled layers divide by the same constants
        return _scalar_has_exact_reciprocal(c.dtype, c.tobytes())
    return _all_have_exact_reciprocals(c)


@functools.lru_cache(maxsize=1024)
def _scalar_has_exact_reciprocal(dtype, data: bytes) -> bool:
    return _all_have_exact_reciprocals(np.frombuffer(data, dtype).reshape(()))


def _all_have_exact_reciprocals(c) -> bool:
    wide = c.astype(np.float64)
    tiny = _smallest_normal(c.dtype)
    if not np.all(np.isfinite(wide) & (np.abs(wide) >= tiny)):
        return False
    if np.any(np.abs(np.frexp(wide)[0]) != 0.5):  # not a power of two
        return False
    with np.errstate(over="ignore"):
        inverse = 1.0 / wide
    narrow = inverse.astype(c.dtype).astype(np.float64)
    return bool(np.all(narrow == inverse) and np.all(np.abs(inverse) >= tiny))


def _negation_is_exact(dtype) -> bool:
    """x − c = x + (−c): IEEE defines subtraction so; two's complement wraps the same way."""
    return _is_float(dtype) or _is_complex(dtype) or _is_signed_int(dtype)


@functools.cache
def _is_signed_int(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.signedinteger)


def _holds(wide, narrow) -> bool:
    """Whether dtype `wide` represents every value of dtype `narrow` exactly."""
    wide, narrow = np.dtype(wide), np.dtype(narrow)
    if narrow.name in _FLOATS:
        return wide.name in _WIDER_FLOATS.get(narrow.name, ())
    if not _is_int(narrow):
        return False
    lo, hi = int(jnp.iinfo(narrow).min), int(jnp.iinfo(narrow).max)
    if _is_int(wide):
        return jnp.iinfo(wide).min <= lo and hi <= jnp.iinfo(wide).max
    return wide.name in _FLOATS and max(-lo, hi) <= 2 ** (jnp.finfo(wide).nmant + 1)


def _convert_chain_is_exact(c) -> bool:
    """convert(convert(x, A), B) = convert(x, B) when A holds x exactly: both convert the same
    value to B. Not when A is a float and B an int: float→int saturates, int→int wraps."""
    x, a, b = c["x"].type.dtype, c["mid"].type.dtype, c["out"].type.dtype
    if not _holds(a, x):
        return False
    return np.dtype(b).name in _FLOATS or (_is_int(a) and _is_int(b))


def _same_type(name: str):
    return lambda c: c[name].type == c["out"].type


def _same_shape(name: str):
    return lambda c: c[name].type.shape == c["out"].type.shape


def _unsharded(*names: str):
    """The named values' nodes carry no sharding (a rewrite would have to move it)."""
    return lambda c: all(c[n].node.params.get("sharding") is None for n in names)


def _rightness(value) -> int:
    """Operand order of commutative ops: constants last, then scalars, then everything else."""
    return 2 if _is_constant(value) else 1 if value.type.shape == () else 0


def _belongs_on_the_right(c) -> bool:
    # Not complex: with FMA contraction a complex product rounds one of its partial products
    # first, and which one depends on the operand order.
    return _rightness(c["x"]) > _rightness(c["y"]) and not _is_complex(c["x"].type.dtype)


def _is_unit_dim_insertion(c) -> bool:
    """broadcast_in_dim that only inserts size-1 dims (expand_dims) moves no data: a reshape.
    (A scalar's broadcast stays one, for `canonicalize/splat` and `canonicalize/scalar-operand`.)"""
    params, shape = c["out"].node.params, c["x"].type.shape
    dims, out = tuple(params["broadcast_dimensions"]), c["out"].type.shape
    if shape == () or params.get("sharding") is not None or list(dims) != sorted(dims):
        return False
    return (all(out[d] == n for d, n in zip(dims, shape))
            and all(out[d] == 1 for d in range(len(out)) if d not in dims))


def _is_identity(perm) -> bool:
    return tuple(perm) == tuple(range(len(perm)))


# --- replacements --------------------------------------------------------------------------------

def _keep_x(b, x, **_):
    return x


def _constant_like(b, array, like):
    """A constant holding `array` with the dtype and weak type of value `like`. (b.const cannot
    make a weakly typed constant.)"""
    t = like.type
    return b.graph.constant(array, t.dtype, t.weak_type, before=b.before, provenance=b.provenance)


def _add_negated(b, x, c, out):
    with np.errstate(over="ignore"):
        negated = np.asarray(np.negative(constant_value(c)), c.type.dtype)
    return b.modify(out, "add", x, _constant_like(b, negated, c))


def _mul_reciprocal(b, x, c, out):
    inverse = np.asarray(1.0 / constant_value(c).astype(np.float64)).astype(c.type.dtype)
    return b.modify(out, "mul", x, _constant_like(b, inverse, c))


def _swap_operands(b, x, y, out):
    return b.modify(out, out.node.op, y, x, **out.node.params)


def _scalar_operand(b, x, s, bc, out):
    inputs = list(out.node.inputs)
    inputs[1 if inputs[1] is bc else 0] = s  # one operand: x may be the same broadcast
    return b.modify(out, out.node.op, *inputs, **out.node.params)


def _convert_direct(b, x, mid, out):
    return b.modify(out, "convert_element_type", x, **out.node.params)


def _convert_before_broadcast(b, x, bc, out):
    converted = b.op("convert_element_type", x, **out.node.params)
    return b.op("broadcast_in_dim", converted, **bc.node.params)


def _retyped_constant(b, c, out):
    return _constant_like(b, c.node.params["value"], out)  # the same array object, not a copy


def _splat(b, s, out):
    return b.modify(out, "broadcast_in_dim", s, shape=out.type.shape, broadcast_dimensions=())


def _reshape_to(b, x, out):
    return b.modify(out, "reshape", x, new_sizes=out.type.shape)


def _reshape_direct(b, x, out):
    return b.modify(out, "reshape", x, **out.node.params)


def _transpose_direct(b, x, t, out):
    perm = t.node.params["permutation"]
    composed = tuple(perm[i] for i in out.node.params["permutation"])
    return b.modify(out, "transpose", x, **{**t.node.params, "permutation": composed})


def _dot_absorbing(side: int):
    """dot_general(transpose(a, p), y) → dot_general(a, y) with a's dims, when the free dims of a
    keep their order (so the output's dimension order, and every product, stays the same)."""
    def replace(b, x, t, y, out):
        params = out.node.params
        (contract, batch) = ([list(d) for d in pair] for pair in params["dimension_numbers"])
        perm = t.node.params["permutation"]
        free = [i for i in range(len(perm)) if i not in contract[side] and i not in batch[side]]
        if [perm[i] for i in free] != sorted(perm[i] for i in free):
            return None
        contract[side] = [perm[i] for i in contract[side]]
        batch[side] = [perm[i] for i in batch[side]]
        dims = ((tuple(contract[0]), tuple(contract[1])), (tuple(batch[0]), tuple(batch[1])))
        operands = [x, y] if side == 0 else [y, x]
        return b.op("dot_general", *operands, **{**params, "dimension_numbers": dims})
    return replace


def _dot_swapped(b, lhs, rhs, dot, out):
    """transpose(dot(l, r)) that puts r's free dims before l's is dot(r, l): same products."""
    params = dot.node.params
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    nb = len(lb)
    nl = lhs.type.ndim - len(lc) - nb
    nr = rhs.type.ndim - len(rc) - nb
    swapped = (*range(nb), *range(nb + nl, nb + nl + nr), *range(nb, nb + nl))
    if tuple(out.node.params["permutation"]) != swapped or params.get("out_sharding") is not None:
        return None
    precision = params["precision"]
    if isinstance(precision, tuple) and len(precision) == 2:
        precision = precision[::-1]  # (lhs, rhs) precisions follow their operands
    elif not (precision is None or isinstance(precision, jax.lax.Precision)):
        return None  # a DotAlgorithm may treat lhs and rhs differently
    new = b.op("dot_general", rhs, lhs, **{**params, "dimension_numbers": ((rc, lc), (rb, lb)),
                                            "precision": precision})
    return new if new.type == out.type else None


# --- the rules -----------------------------------------------------------------------------------

x, y = Var("x"), Var("y")
BINARY = frozenset({"add", "sub", "mul", "div", "rem", "pow", "max", "min", "atan2", "nextafter",
                    "and", "or", "xor", "eq", "ne", "lt", "le", "gt", "ge"})
# Commuting is bit-exact for these: IEEE add/mul round the same real number, XLA's max/min order
# −0 < +0 and propagate NaN from either side, comparisons and bitwise ops are symmetric.
COMMUTATIVE = frozenset({"add", "mul", "max", "min", "and", "or", "xor", "eq", "ne"})
CONVERT = "convert_element_type"
SHAPE_OPS = frozenset({"reshape", "broadcast_in_dim"})
_transpose = Op("transpose", x, name="t")

CANONICAL_RULES = [
    # Operand order: constants, then scalars, on the right of commutative ops.
    Rule("canonicalize/constant-right", Op(COMMUTATIVE, x, y, name="out"), _swap_operands,
         where=_belongs_on_the_right),
    # Identities. neg flips the sign bit only; x + −0 = x and x * 1 = x for every real float
    # (also −0, NaN, ±Inf, subnormals) and integer; a copy is its operand.
    Rule("canonicalize/neg-neg", Op("neg", Op("neg", x)), _keep_x),
    Rule("canonicalize/add-zero", Op("add", x, Const(where=_is_additive_identity, shape=_small),
                                     name="out"), _keep_x, where=_same_type("x")),
    Rule("canonicalize/mul-one", Op("mul", x, Const(where=_is_one, shape=_small), name="out"),
         _keep_x, where=_same_type("x")),
    Rule("canonicalize/copy", Op("copy", x), _keep_x),
    # x − c → x + (−c); x / 2^k → x * 2^−k. See the predicates for why these are exact.
    Rule("canonicalize/sub-constant", Op("sub", x, Const("c", dtype=_negation_is_exact, shape=_small),
                                         name="out"), _add_negated),
    Rule("canonicalize/div-power-of-two", Op("div", x, Const("c", where=_has_exact_reciprocal,
                                                             shape=_small), name="out"),
         _mul_reciprocal),
    # A broadcast scalar operand of an elementwise op is the scalar itself (lax broadcasts rank-0
    # operands): the op sees the same values. commutative=True lets the broadcast be either
    # operand; the replacement keeps the operand order.
    Rule("canonicalize/scalar-operand",
         Op(BINARY, x, Op("broadcast_in_dim", Var("s", shape=()), name="bc"), commutative=True,
            name="out"), _scalar_operand, where=_same_shape("x")),
    # Converts: identity converts vanish; a widening step before a convert is skipped; converting
    # before broadcasting converts the same values, fewer of them; a convert that only makes a
    # constant strongly typed is that constant.
    Rule("canonicalize/convert-identity", Op(CONVERT, x, name="out"), _keep_x, where=_same_type("x")),
    Rule("canonicalize/convert-convert", Op(CONVERT, Op(CONVERT, x, name="mid"), name="out"),
         _convert_direct, where=_convert_chain_is_exact),
    Rule("canonicalize/convert-before-broadcast",
         Op(CONVERT, Op("broadcast_in_dim", x, single_use=True, name="bc"), name="out"),
         _convert_before_broadcast, where=_unsharded("out")),
    Rule("canonicalize/convert-constant", Op(CONVERT, Op("constant", name="c"), name="out"),
         _retyped_constant, where=lambda c: c["c"].type.strong() == c["out"].type.strong()),
    # Shapes: a reshaped or broadcast splat of a scalar is a splat; squeeze and expand_dims of a
    # non-scalar are reshapes (row-major order unchanged); reshape and transpose chains compose;
    # identities vanish. Pure data movement, so exact.
    Rule("canonicalize/splat", Op(SHAPE_OPS, Op(SHAPE_OPS, Var("s", shape=())), name="out"), _splat,
         where=_unsharded("out")),
    Rule("canonicalize/squeeze-to-reshape", Op("squeeze", x, name="out"), _reshape_to),
    Rule("canonicalize/expand-dims-to-reshape", Op("broadcast_in_dim", x, name="out"), _reshape_to,
         where=_is_unit_dim_insertion),
    Rule("canonicalize/reshape-reshape",
         Op("reshape", Op("reshape", x, params={"dimensions": None}), params={"dimensions": None},
            name="out"), _reshape_direct),
    Rule("canonicalize/reshape-identity", Op("reshape", x, params={"dimensions": None}, name="out"),
         _keep_x, where=_same_type("x")),
    Rule("canonicalize/transpose-transpose", Op("transpose", _transpose, name="out"),
         _transpose_direct),
    Rule("canonicalize/transpose-identity",
         Op("transpose", x, params=lambda p: _is_identity(p["permutation"])), _keep_x),
]

# Matmuls: operands untransposed, output in the dot's own order. Every product is the same, but
# XLA picks its dot kernel, and with it the summation order, by the dimension numbers: on CPU a
# 1×1000 @ 1000×3 matmul differs in the last bit once its transposes are absorbed.
DOT_RULES = [
    Rule("canonicalize/dot-lhs-transpose", Op("dot_general", _transpose, y, name="out"),
         _dot_absorbing(0)),
    Rule("canonicalize/dot-rhs-transpose", Op("dot_general", y, _transpose, name="out"),
         _dot_absorbing(1)),
    Rule("canonicalize/transpose-dot",
         Op("transpose", Op("dot_general", Var("lhs"), Var("rhs"), single_use=True, name="dot"),
            name="out"), _dot_swapped),
]

"""Hypothesis strategies that generate random JAX programs.

The op families programs are drawn from, and the :func:`programs` strategy. Programs
themselves (:class:`~graphopt.random_program.Program`, values, the builder) live in
:mod:`graphopt.random_program`.

A :class:`Program` is an ordinary callable (``program(*program.args)`` runs
it): a short straight-line list of instructions over ~90 ``jax.lax``
primitives, plus example inputs full of awkward values: NaN, ±Inf, −0,
rank-0 and size-0 arrays. It exists to fuzz graphopt's trace → lower round
trip, so it deliberately exercises what a tracer gets wrong: scalar
literals, captured constants, implicit rank-0 broadcasting, Python-scalar
(weakly typed) and nested pytree arguments, nested ``jit`` calls,
``custom_jvp``/``custom_vjp`` functions, ``cond``/``while``/``scan``/
``checkpoint`` regions, inputs returned as outputs, duplicated outputs.

Example::

    from hypothesis import given
    from graphopt.testing import programs, equivalence_check

    @given(programs())
    def test_roundtrip(program):
        equivalence_check(program, *program.args)

Every operand is chosen so that the program is well defined: integer
division guards its divisor, float → int conversions stay in range,
multi-operand sorts are stable, scatters combine rather than overwrite, so
``jax.jit(program)`` is deterministic and any faithful re-expression of it
computes the same bits.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st
from jax import lax

from graphopt.random_program import (
    ANY, BF16, BOOL, F32, FLOATS, I32, NUMERIC, Aval, Lit, Program, _Builder, _INT_MIN, arrays,
)


# ----------------------------------------------------------------------------
# Composite ops that keep programs well defined.

def _safe_div(x, y, *, rem=False):
    # XLA defines x/0 and INT_MIN/-1 for integers, but C-like semantics do not;
    # guard both so the generated programs mean the same thing everywhere.
    if jnp.issubdtype(x.dtype, jnp.integer):
        y = lax.select(lax.eq(y, np.int32(0)), lax.full_like(y, 1), y)
        x = lax.max(x, np.int32(_INT_MIN + 1))
    return lax.rem(x, y) if rem else lax.div(x, y)


_UNARY = {  # name: (function, allowed dtypes)
    **{n: (getattr(lax, n), NUMERIC) for n in ("neg", "abs", "sign", "square")},
    **{n: (getattr(lax, n), FLOATS) for n in (
        "floor", "ceil", "round", "is_finite", "exp", "exp2", "log", "log1p", "expm1", "tanh",
        "logistic", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh",
        "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "erf", "erf_inv", "lgamma", "digamma")},
    "not": (lax.bitwise_not, (I32, BOOL)),
    "population_count": (lax.population_count, (I32,)),
    "clz": (lax.clz, (I32,)),
    "relu": (jax.nn.relu, FLOATS),  # a custom_jvp function
}
_BINARY = {
    **{n: (getattr(lax, n), NUMERIC) for n in ("add", "sub", "mul", "max", "min")},
    **{n: (getattr(lax, n), FLOATS) for n in ("pow", "atan2", "nextafter")},
    "div": (_safe_div, NUMERIC), "rem": (functools.partial(_safe_div, rem=True), NUMERIC),
    **{n: (getattr(lax, n), (I32, BOOL)) for n in ("bitwise_and", "bitwise_or", "bitwise_xor")},
    **{n: (getattr(lax, n), (I32,)) for n in (
        "shift_left", "shift_right_logical", "shift_right_arithmetic")},
    **{n: (getattr(lax, n), ANY) for n in ("eq", "ne")},
    **{n: (getattr(lax, n), NUMERIC) for n in ("lt", "le", "gt", "ge")},
}
_JNP_BINARY = {"add": jnp.add, "multiply": jnp.multiply, "maximum": jnp.maximum,
               "minimum": jnp.minimum, "greater": jnp.greater}
_REDUCE = {  # name: (function, allowed dtypes)
    **{n: (getattr(lax, f"reduce_{n}"), NUMERIC) for n in ("sum", "max", "min", "prod")},
    **{n: (getattr(lax, f"reduce_{n}"), (BOOL,)) for n in ("and", "or")},
}
_CUMULATIVE = ("cumsum", "cumprod", "cummax", "cummin")


def _rank_at_least(n):
    return lambda aval: len(aval.shape) >= n


# ----------------------------------------------------------------------------
# Op families. Each draws its operands/parameters and emits one instruction
# (plus any helper instructions needed to produce operands of the right type);
# it returns None when the drawn program has no suitable operand.

def _unary(b: _Builder):
    name = b.choose(_UNARY)
    fn, dtypes = _UNARY[name]
    if b.coin(8):  # a nested jit call, which graphopt inlines
        return b.emit(f"jit({name})", jax.jit(fn), b.operand(dtypes))
    return b.emit(name, fn, b.operand(dtypes))


def _binary(b: _Builder):
    name = b.choose(_BINARY)
    fn, dtypes = _BINARY[name]
    x = b.operand(dtypes)
    aval = b.avals[x]
    # lax accepts a rank-0 operand next to any shape (implicit scalar broadcast).
    y = b.fit((), aval.dtype) if b.coin(4) else b.fit(aval.shape, aval.dtype)
    return b.emit(name, fn, *((y, x) if b.coin() else (x, y)))


def _jnp_broadcasting(b: _Builder):
    """numpy-style broadcasting between different ranks/size-1 dims via jnp."""
    x = b.operand(NUMERIC, _rank_at_least(1))
    if x is None:
        return None
    shape, dtype = b.avals[x].shape, b.avals[x].dtype
    drop = b.draw(st.integers(0, len(shape)))
    other = tuple(1 if b.coin(3) else d for d in shape[drop:])
    y = b.fit(other, dtype)
    if b.coin(4):
        return b.emit("jnp.where", jnp.where, b.fit(other, BOOL), x, y)
    name = b.choose(_JNP_BINARY)
    return b.emit(f"jnp.{name}", _JNP_BINARY[name], *((y, x) if b.coin() else (x, y)))


def _select_clamp(b: _Builder):
    x = b.operand(NUMERIC)
    shape, dtype = b.avals[x].shape, b.avals[x].dtype
    if b.coin():
        pred = b.fit(() if b.coin(3) else shape, BOOL)
        return b.emit("select_n", lax.select_n, pred, x, b.fit(shape, dtype))
    lo, hi = (b.fit(() if b.coin() else shape, dtype) for _ in range(2))
    return b.emit("clamp", lax.clamp, lo, x, hi)


def _convert_family(b: _Builder):
    kind = b.draw(st.integers(0, 3))
    if kind == 0:  # int bits -> float (may make NaNs with payloads; never the reverse,
        # since NaN payload bits of computed NaNs are not something XLA pins down)
        return b.emit("bitcast_convert_type", lax.bitcast_convert_type, b.operand((I32,)),
                      new_dtype=F32)
    if kind == 1:
        e, m = b.choose([(5, 10), (8, 7), (4, 3), (5, 2)])
        return b.emit("reduce_precision", lax.reduce_precision, b.operand(FLOATS),
                      exponent_bits=e, mantissa_bits=m)
    if kind == 2:
        x = b.operand(NUMERIC)
        lo = -2 if b.avals[x].dtype in FLOATS else 0  # negative int powers are errors
        return b.emit("integer_pow", lax.integer_pow, x, y=b.draw(st.integers(lo, 4)))
    x = b.pick()
    return b.convert(x, b.choose([d for d in ANY if d != b.avals[x].dtype]))


def _reduce(b: _Builder):
    name = b.choose([*_REDUCE, "argmax", "argmin", *_CUMULATIVE])
    if name in _REDUCE:
        fn, dtypes = _REDUCE[name]
        x = b.operand(dtypes)
        axes = tuple(a for a in range(len(b.avals[x].shape)) if b.coin())
        return b.emit(f"reduce_{name}", fn, x, axes=axes)
    x = b.operand(NUMERIC, _rank_at_least(1))
    if x is None:
        return None
    axis = b.draw(st.integers(0, len(b.avals[x].shape) - 1))
    if name in _CUMULATIVE:
        return b.emit(name, getattr(lax, name), x, axis=axis, reverse=b.coin())
    if b.avals[x].shape[axis] == 0:  # argmax of nothing is an error
        return None
    return b.emit(name, getattr(lax, name), x, axis=axis, index_dtype=I32)


def _dot_general(b: _Builder):
    lhs = b.operand(NUMERIC, _rank_at_least(1))
    if lhs is None:
        return None
    shape, dtype = b.avals[lhs].shape, b.avals[lhs].dtype
    contract = b.draw(st.integers(0, len(shape) - 1))
    rest = [d for d in range(len(shape)) if d != contract]
    batch = (b.choose(rest),) if rest and b.coin() else ()
    free = (b.choose([0, 1, 3]),) if b.coin() else ()
    rhs = b.fit(tuple(shape[d] for d in batch) + (shape[contract],) + free, dtype)
    dims = (((contract,), (len(batch),)), (batch, tuple(range(len(batch)))))
    preferred = F32 if dtype == BF16 and b.coin() else None
    return b.emit("dot_general", lax.dot_general, lhs, rhs, dimension_numbers=dims,
                  preferred_element_type=preferred)


def _layout(b: _Builder):
    """transpose / reshape / broadcast_in_dim / expand_dims / squeeze / rev."""
    x = b.pick()
    shape = b.avals[x].shape
    name = b.choose(["transpose", "reshape", "broadcast_in_dim", "expand_dims", "squeeze", "rev"])
    if name == "transpose":
        return b.emit(name, lax.transpose, x, permutation=tuple(
            b.draw(st.permutations(range(len(shape))))))
    if name == "reshape":
        dims = list(shape)
        for _ in range(b.draw(st.integers(1, 2))):
            k = b.draw(st.integers(0, len(dims)))
            if k < len(dims) - 1 and b.coin():  # merge two neighbours
                dims[k:k + 2] = [dims[k] * dims[k + 1]]
            elif k < len(dims) and dims[k] % 2 == 0 and dims[k] > 0:  # split one
                dims[k:k + 1] = [2, dims[k] // 2]
            else:
                dims.insert(k, 1)
        return b.emit(name, lax.reshape, x, new_sizes=tuple(dims))
    if name == "broadcast_in_dim":
        out = [b.choose([1, 2, 3, 0]) if d == 1 and b.coin() else d for d in shape]
        keep = list(range(len(out)))
        for _ in range(b.draw(st.integers(0, 2))):
            k = b.draw(st.integers(0, len(out)))
            out.insert(k, b.choose([2, 1, 3]))
            keep = [i + (i >= k) for i in keep]
        return b.emit(name, lax.broadcast_in_dim, x, shape=tuple(out),
                      broadcast_dimensions=tuple(keep))
    if name == "expand_dims":
        return b.emit(name, lax.expand_dims, x, dimensions=(b.draw(st.integers(0, len(shape))),))
    ones = [d for d, n in enumerate(shape) if n == 1]
    if name == "squeeze":
        return b.emit(name, lax.squeeze, x, dimensions=tuple(d for d in ones if b.coin())) \
            if ones else None
    return b.emit(name, lax.rev, x, dimensions=tuple(d for d in range(len(shape)) if b.coin()))


def _start_indices(b: _Builder, rank: int):
    # Out-of-range starts are clamped by definition; mix literals and traced values.
    return [b.fit((), I32) if b.coin(3) else Lit(np.int32(b.draw(st.integers(-1, 4))))
            for _ in range(rank)]


def _slicing(b: _Builder):
    """slice / dynamic_slice / dynamic_update_slice / concatenate / pad."""
    name = b.choose(["slice", "dynamic_slice", "dynamic_update_slice", "concatenate", "pad"])
    x = b.pick(ANY, _rank_at_least(1))
    if x is None:
        return None
    shape, dtype = b.avals[x].shape, b.avals[x].dtype
    sub = tuple(b.draw(st.integers(0, d)) for d in shape)
    if name == "slice":
        starts = tuple(b.draw(st.integers(0, d - s)) for d, s in zip(shape, sub))
        strides = tuple(b.choose([1, 2]) for _ in shape) if b.coin() else None
        return b.emit(name, lax.slice, x, start_indices=starts,
                      limit_indices=tuple(map(sum, zip(starts, sub))), strides=strides)
    if name == "dynamic_slice":
        return b.emit(name, _dynamic_slice, x, *_start_indices(b, len(shape)), slice_sizes=sub)
    if name == "dynamic_update_slice":
        return b.emit(name, _dynamic_update_slice, x, b.fit(sub, dtype),
                      *_start_indices(b, len(shape)))
    axis = b.draw(st.integers(0, len(shape) - 1))
    if name == "concatenate":
        others = [b.fit(shape[:axis] + (b.choose([1, 2, 0]),) + shape[axis + 1:], dtype)
                  for _ in range(b.draw(st.integers(1, 2)))]
        return b.emit(name, _concatenate, x, *others, dimension=axis)
    config = []
    for d in shape:  # negative padding crops; no dimension may end up negative
        lo, hi = b.draw(st.integers(-2, 2)), b.draw(st.integers(-2, 2))
        interior = b.draw(st.integers(0, 1))
        size = lo + hi + d + max(d - 1, 0) * interior
        config.append((lo, hi, interior) if size >= 0 else (0, 0, interior))
    return b.emit(name, lax.pad, x, b.fit((), dtype), padding_config=tuple(config))


def _dynamic_slice(x, *starts, slice_sizes):
    return lax.dynamic_slice(x, starts, slice_sizes)


def _dynamic_update_slice(x, update, *starts):
    return lax.dynamic_update_slice(x, update, starts)


def _concatenate(*xs, dimension):
    return lax.concatenate(xs, dimension)


def _indexing(b: _Builder):
    """iota / sort / top_k / gather (jnp.take) / scatter (x.at[i].op)."""
    name = b.choose(["iota", "sort", "top_k", "gather", "scatter"])
    if name == "iota":
        shape = tuple(b.choose([1, 2, 3, 0]) for _ in range(b.draw(st.integers(1, 3))))
        return b.emit(name, lax.broadcasted_iota, dtype=b.choose(NUMERIC), shape=shape,
                      dimension=b.draw(st.integers(0, len(shape) - 1)))
    x = b.operand(NUMERIC, _rank_at_least(1))
    if x is None:
        return None
    shape, dtype = b.avals[x].shape, b.avals[x].dtype
    axis = b.draw(st.integers(0, len(shape) - 1))
    if name == "sort":
        if b.coin():  # sort a payload by keys x; stable, so ties are well defined
            return b.emit("sort(keys, values)", _sort_by_key, x, b.fit(shape, b.choose(ANY)),
                          dimension=axis)
        return b.emit(name, lax.sort, x, dimension=axis, is_stable=b.coin())
    if name == "top_k":
        return b.emit(name, _top_k, x, k=b.draw(st.integers(0, shape[-1])), which=b.choose([0, 1]))
    if name == "gather":
        if shape[axis] == 0:  # jnp refuses to index into an empty axis
            return None
        idx = b.fit((b.choose([1, 2, 3, 0]),), I32) if b.coin() else b.operand((I32,))
        return b.emit("gather", _take, x, idx, axis=axis, mode=b.choose(["clip", "fill", "wrap"]))
    if shape[0] == 0:
        return None
    idx = b.fit((b.choose([1, 2, 3, 0]),), I32)  # x.at[idx] indexes axis 0
    upd = b.fit(b.avals[idx].shape + shape[1:], dtype)
    # Only combining scatters: with duplicate indices .set() would be unordered.
    return b.emit("scatter", _scatter, x, idx, upd, kind=b.choose(["add", "mul", "min", "max"]),
                  mode=b.choose(["drop", "clip"]))


def _sort_by_key(keys, values, dimension):
    return lax.sort((keys, values), dimension=dimension, is_stable=True, num_keys=1)[1]


def _top_k(x, k, which):
    return lax.top_k(x, k)[which]


def _take(x, idx, axis, mode):
    return jnp.take(x, idx, axis=axis, mode=mode)


def _scatter(x, idx, upd, kind, mode):
    return getattr(jnp.asarray(x).at[idx], kind)(upd, mode=mode)


# Region bodies for control flow: aval-preserving and defined for every numeric dtype.
_BODIES = {"neg": lax.neg, "abs": lax.abs, "square": lax.square, "sign": lax.sign,
           "double": lambda x: lax.add(x, x)}


def _control_flow(b: _Builder):
    """cond / switch / while / scan / checkpoint / custom_vjp around small bodies."""
    name = b.choose(["cond", "switch", "while", "scan", "checkpoint", "custom_vjp"])
    x = b.operand(NUMERIC)
    shape, dtype = b.avals[x].shape, b.avals[x].dtype
    body, other, third = (b.choose(sorted(_BODIES)) for _ in range(3))
    if name == "cond":
        return b.emit(name, _cond, b.fit((), BOOL), x, true=body, false=other)
    if name == "switch":  # an out-of-range index is clamped by definition
        return b.emit(name, _switch, b.fit((), I32), x, branches=(body, other, third))
    if name == "while":  # the trip count may be data dependent; clamp it to [0, 3]
        return b.emit(name, _while, b.fit((), I32), x, body=body)
    if name == "scan":
        if not shape:
            return None
        return b.emit(name, _scan, b.fit(shape[1:], dtype), x, body=body, reverse=b.coin(),
                      which=b.choose([0, 1]))
    if name == "checkpoint":
        return b.emit(name, _checkpoint, x, body=body, then=other)
    return b.emit(name, _twice, b.operand(FLOATS))


def _cond(pred, x, true, false):
    return lax.cond(pred, _BODIES[true], _BODIES[false], x)


def _switch(index, x, branches):
    return lax.switch(index, [_BODIES[name] for name in branches], x)


def _while(trips, x, body):
    trips = lax.clamp(np.int32(0), trips, np.int32(3))
    step = lambda state: (state[0] + 1, _BODIES[body](state[1]))
    return lax.while_loop(lambda state: state[0] < trips, step, (np.int32(0), x))[1]


def _scan(init, xs, body, reverse, which):
    def step(carry, x):
        return _BODIES[body](lax.add(carry, x)), carry
    return lax.scan(step, init, xs, reverse=reverse)[which]


def _checkpoint(x, body, then):
    return jax.checkpoint(lambda y: _BODIES[then](_BODIES[body](y)))(x)


@jax.custom_vjp
def _twice(x):
    return lax.add(x, x)


_twice.defvjp(lambda x: (_twice(x), None), lambda _, ct: (lax.add(ct, ct),))


OP_FAMILIES: dict[str, Callable[[_Builder], int | None]] = {
    "unary": _unary, "binary": _binary, "jnp_broadcasting": _jnp_broadcasting,
    "select_clamp": _select_clamp, "convert": _convert_family, "reduce": _reduce,
    "dot_general": _dot_general, "layout": _layout, "slicing": _slicing, "indexing": _indexing,
    "control_flow": _control_flow,
}


def _shapes(max_inputs: int) -> st.SearchStrategy[list[tuple[int, ...]]]:
    dim = st.sampled_from([1, 2, 3, 4, 2, 3, 0])  # shrinks towards 1; 0 sometimes
    shape = st.integers(0, 3).flatmap(lambda r: st.tuples(*[dim] * r))
    # Later inputs often share the first input's shape, so elementwise ops
    # find partners without broadcasting.
    return st.lists(st.one_of(st.none(), shape), min_size=0, max_size=max_inputs - 1).flatmap(
        lambda rest: shape.map(lambda first: [first] + [first if s is None else s for s in rest]))


@st.composite
def programs(draw, *, max_ops: int = 8, max_inputs: int = 3, dtypes=ANY,
             families=tuple(OP_FAMILIES)) -> Program:
    """Strategy for random :class:`Program` s.

    Args:
      max_ops: maximum number of drawn operations (helper conversions and
        broadcasts that make operands fit come on top).
      max_inputs: maximum number of positional array arguments (at least 1).
      dtypes: dtypes that inputs may have (ops may convert to others).
      families: which keys of :data:`OP_FAMILIES` to draw operations from.

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, deadline=None)
    ... @given(programs(families=("reduce",)))
    ... def test(p):
    ...     p(*p.args)
    >>> test()
    """
    in_avals = []
    for shape in draw(_shapes(max_inputs)):
        dtype = draw(st.sampled_from(tuple(dtypes)))
        # Rank-0 f32/i32 inputs are sometimes Python scalars: weakly typed in JAX.
        weak = shape == () and dtype in (F32, I32) and draw(st.integers(0, 3)) == 3
        in_avals.append(Aval(shape, dtype, weak))
    b = _Builder(draw, in_avals)
    for _ in range(draw(st.integers(1, max_ops))):
        OP_FAMILIES[draw(st.sampled_from(tuple(families)))](b)
    n = len(b.avals)
    extra = draw(st.lists(st.integers(0, n - 1), max_size=2))
    outputs = draw(st.sampled_from([
        n - 1, (n - 1, *extra), {"out": n - 1, "aux": tuple(extra)}]))
    leaves = [draw(arrays(a.shape, a.dtype)) for a in in_avals]
    leaves = [x.item() if a.weak else x for x, a in zip(leaves, in_avals)]
    # Positional arguments may be pytrees: (x0, {"p0": x1, ...}) or (x0, (x1, ...)).
    nest = draw(st.sampled_from([None, dict, tuple])) if len(leaves) > 1 else None
    if nest is dict:
        args = (leaves[0], {f"p{i}": x for i, x in enumerate(leaves[1:])})
    elif nest is tuple:
        args = (leaves[0], tuple(leaves[1:]))
    else:
        args = tuple(leaves)
    return Program(in_avals, b.instrs, outputs, args)

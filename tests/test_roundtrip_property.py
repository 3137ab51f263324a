"""Property: for random JAX programs, lower(trace(f)) computes exactly what f computes.

The programs come from `graphopt.testing.programs`: code over ~90 lax
primitives, rank-0 and size-0 arrays, NaN/±Inf/−0 inputs, literals, captured
constants, pytree and Python-scalar arguments, nested jit, custom_jvp/vjp and
control-flow regions. Both sides run under jax.jit, so a faithful round trip
compiles to the same HLO and must match bit for bit (NaN payloads aside);
the same holds after vmap and vjp, which the lowered function must support.

Run longer with GRAPHOPT_HYPOTHESIS_PROFILE=deep.
"""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, find, given, settings
from hypothesis.errors import NoSuchExample
from hypothesis import strategies as st

import graphopt
from graphopt.testing import (OP_FAMILIES, CompiledDifferently, assert_matches_reference,
                              equivalence_check, primitives, programs)
from graphopt.random_program import Lit

# Primitives each op family must be able to emit. The coverage test below
# checks every one is actually reachable, so this table cannot rot silently.
FAMILY_PRIMITIVES = {
    "unary": ["neg", "abs", "sign", "square", "floor", "ceil", "round", "is_finite", "exp", "exp2",
              "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "asin", "acos",
              "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "erf",
              "erf_inv", "lgamma", "digamma", "not", "population_count", "clz",
              "custom_jvp_call", "jit"],
    "binary": ["add", "sub", "mul", "max", "min", "pow", "atan2", "nextafter", "div", "rem", "and",
               "or", "xor", "shift_left", "shift_right_logical", "shift_right_arithmetic", "eq",
               "ne", "lt", "le", "gt", "ge"],
    "jnp_broadcasting": ["broadcast_in_dim", "select_n"],
    "select_clamp": ["select_n", "clamp"],
    "convert": ["convert_element_type", "bitcast_convert_type", "reduce_precision", "integer_pow"],
    "reduce": ["reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
               "argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin"],
    "dot_general": ["dot_general"],
    "layout": ["transpose", "reshape", "broadcast_in_dim", "squeeze", "rev"],
    "slicing": ["slice", "dynamic_slice", "dynamic_update_slice", "concatenate", "pad"],
    "indexing": ["iota", "sort", "top_k", "gather", "scatter-add", "scatter-mul", "scatter-min",
                 "scatter-max"],
    "control_flow": ["cond", "while", "scan", "remat2", "custom_vjp_call"],
}

# What JAX raises for a program it cannot transform itself (see the vmap and vjp tests): such a
# program says nothing about graphopt.
JAX_REFUSES = (NotImplementedError, ValueError, TypeError)

# `find` only needs to generate, never to shrink: we want a witness, not a minimal one.
_SEARCH = settings(max_examples=400, phases=[Phase.generate], database=None, deadline=None,
                   suppress_health_check=list(HealthCheck))


@contextlib.contextmanager
def _rejecting(*errors):
    """Rejects the example (hypothesis.assume) if the block raises one of `errors`: used for
    programs JAX itself cannot transform (JAX_REFUSES), and for examples where the two sides
    agree op by op and only XLA's compiled programs differ (CompiledDifferently): such examples
    test JAX or XLA, not graphopt."""
    try:
        yield
    except errors:
        assume(False)


@given(programs(), st.data())
def test_trace_lower_roundtrip_is_exact(program, data):
    # Which arguments count as parameters changes roles and names, never values.
    params = data.draw(st.sampled_from([None, (0,), (len(program.args) - 1,)]), "params_argnums")
    with _rejecting(CompiledDifferently):
        equivalence_check(program, *program.args, params_argnums=params)


# vmap and vjp re-check what the plain round trip covers, plus the transformation
# rules of the lowered program; half the examples are enough for them.
_HALF = settings(max_examples=max(10, settings.default.max_examples // 2))


@_HALF
@given(programs())
def test_roundtrip_commutes_with_vmap(program):
    # Batch every array argument as [x, reversed x]; Python scalars stay unbatched.
    axes = jax.tree.map(lambda x: 0 if isinstance(x, np.ndarray) else None, program.args)
    batched = jax.tree.map(lambda x: np.stack([x, np.flip(x)]) if isinstance(x, np.ndarray) else x,
                           program.args)
    lowered = graphopt.lower(graphopt.trace(program, *program.args))
    vmapped = lambda fn: jax.vmap(fn, in_axes=axes, axis_size=2)
    # JAX itself may be unable to batch the program: in jax 0.10.2 clamp with an unbatched
    # rank-0 operand and a batched bound raises a TypeError in its batching rule.
    with _rejecting(*JAX_REFUSES):
        jax.eval_shape(vmapped(program), *batched)
    with _rejecting(CompiledDifferently):
        assert_matches_reference(vmapped(lowered), vmapped(program), *batched, exact=True)


def _vjp_of_float_args(fn, args):
    """x ↦ the cotangents of fn's float arguments, for all-ones output cotangents."""
    leaves, tree = jax.tree.flatten(args)
    wrt = [i for i, x in enumerate(leaves) if jnp.issubdtype(np.result_type(x), jnp.floating)]

    def pullback(*float_leaves):
        def partial_fn(*xs):
            full = list(leaves)
            for i, x in zip(wrt, xs):
                full[i] = x
            return fn(*jax.tree.unflatten(tree, full))

        out, pull = jax.vjp(partial_fn, *float_leaves)
        return pull(jax.tree.map(_ones_cotangent, out))

    return jax.jit(pullback), [leaves[i] for i in wrt]


def _ones_cotangent(y):
    y = jnp.asarray(y)  # an input returned unchanged may be a Python scalar
    if jnp.issubdtype(y.dtype, jnp.inexact):
        return jnp.ones_like(y)
    return np.zeros(y.shape, jax.dtypes.float0)  # integer outputs have no tangent space


@_HALF
@given(programs())
def test_roundtrip_commutes_with_vjp(program):
    expected_fn, primals = _vjp_of_float_args(program, program.args)
    # JAX itself may be unable to differentiate the program: nextafter has no rule; a while
    # loop with a dynamic trip count has no transpose; and in jax 0.10.2 clamp with a rank-0
    # bound next to a shaped operand, and pad differentiated only through its padding value,
    # raise TypeErrors in their JVP/transpose rules.
    with _rejecting(*JAX_REFUSES):
        expected_fn(*primals)
    lowered = graphopt.lower(graphopt.trace(program, *program.args))
    actual_fn, _ = _vjp_of_float_args(lowered, program.args)
    with _rejecting(CompiledDifferently):
        assert_matches_reference(actual_fn, expected_fn, *primals, exact=True)


def test_families_table_matches_generator():
    assert set(FAMILY_PRIMITIVES) == set(OP_FAMILIES)


def _find_all(strategy, wanted, observe):
    """Draws from `strategy` until `observe` (example -> set of names) has
    reported every name in `wanted`; fails naming the ones never seen."""
    missing = set(wanted)

    def all_seen(example):
        missing.difference_update(observe(example))
        return not missing

    try:
        find(strategy, all_seen, settings=_SEARCH)
    except NoSuchExample:
        pytest.fail(f"never generated: {sorted(missing)}")


@pytest.mark.parametrize("family", sorted(FAMILY_PRIMITIVES))
def test_every_listed_primitive_is_generated(family):
    _find_all(programs(families=(family,)), FAMILY_PRIMITIVES[family],
              lambda p: primitives(p, *p.args))


def test_generator_covers_at_least_30_primitives():
    seen = set()

    def enough(program):
        seen.update(primitives(program, *program.args))
        return len(seen) >= 30

    find(programs(), enough, settings=_SEARCH)


def _leaves(program):
    return [np.asarray(x) for x in jax.tree.leaves(program.args)]


def _floats(program):
    return [x.astype(np.float64) for x in _leaves(program) if x.dtype.kind not in "bi"]


# What the generator must produce somewhere; each predicate looks at one program.
INPUT_FEATURES = {
    "rank-0 array": lambda p: any(x.ndim == 0 for x in _leaves(p)),
    "size-0 array": lambda p: any(x.size == 0 and x.ndim > 0 for x in _leaves(p)),
    "NaN": lambda p: any(np.isnan(x).any() for x in _floats(p)),
    "+Inf": lambda p: any((x == math.inf).any() for x in _floats(p)),
    "-Inf": lambda p: any((x == -math.inf).any() for x in _floats(p)),
    "-0.0": lambda p: any(((x == 0) & np.signbit(x)).any() for x in _floats(p)),
    "bfloat16": lambda p: any(x.dtype.name == "bfloat16" for x in _leaves(p)),
    "bool": lambda p: any(x.dtype == np.bool_ for x in _leaves(p)),
    "int32": lambda p: any(x.dtype == np.int32 for x in _leaves(p)),
    "size-0 result of non-empty inputs": lambda p: (
        any(0 in i.aval.shape for i in p.instrs) and all(x.size for x in _leaves(p))),
    "Python scalar argument": lambda p: any(isinstance(x, float) for x in jax.tree.leaves(p.args)),
    "dict argument": lambda p: any(isinstance(x, dict) for x in p.args),
    "literal operand": lambda p: any(isinstance(a, Lit) for i in p.instrs for a in i.args),
    "captured constant": lambda p: "const" in p.ops,
}


def test_generates_rank0_size0_special_values_and_pytrees():
    _find_all(programs(), INPUT_FEATURES,
              lambda p: {name for name, has in INPUT_FEATURES.items() if has(p)})

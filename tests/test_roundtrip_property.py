"""Property: for random JAX programs, lower(trace(f)) computes exactly what f computes.

The programs come from `graphopt.testing.programs`: straight-line code over
~90 lax primitives, rank-0 and size-0 arrays, NaN/±Inf/−0 inputs, literals,
captured constants, nested jit and custom_jvp calls. Both sides run under
jax.jit, so a faithful round trip compiles to the same HLO and must match
bit for bit (NaN payloads aside).

Run longer with GRAPHOPT_HYPOTHESIS_PROFILE=deep.
"""

import math

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

from graphopt.testing import OP_FAMILIES, equivalence_check, primitives, programs

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

# `find` only needs to generate, never to shrink: we want a witness, not a minimal one.
_SEARCH = settings(max_examples=400, phases=[Phase.generate], database=None, deadline=None,
                   suppress_health_check=list(HealthCheck))


@given(programs(), st.data())
def test_trace_lower_roundtrip_is_exact(program, data):
    # Which arguments count as parameters changes roles and names, never values.
    params = data.draw(st.sampled_from([None, (0,), (len(program.args) - 1,)]), "params_argnums")
    equivalence_check(program, *program.args, params_argnums=params)


def test_families_table_matches_generator():
    assert set(FAMILY_PRIMITIVES) == set(OP_FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILY_PRIMITIVES))
def test_every_listed_primitive_is_generated(family):
    seen = set()

    def covers_all(program):  # accumulates across examples: find stops once all were seen
        seen.update(primitives(program, *program.args))
        return set(FAMILY_PRIMITIVES[family]) <= seen

    find(programs(families=(family,)), covers_all, settings=_SEARCH)


def test_generator_covers_at_least_30_primitives():
    seen = set()

    def enough(program):
        seen.update(primitives(program, *program.args))
        return len(seen) >= 30

    find(programs(), enough, settings=_SEARCH)


def _finds(condition):
    return find(programs(), condition, settings=_SEARCH)


def _leaves(program):
    return [np.asarray(x) for x in jax.tree.leaves(program.args)]


def test_generates_rank0_size0_and_special_values():
    floats = lambda p: [x.astype(np.float64) for x in _leaves(p) if x.dtype.kind not in "bi"]
    _finds(lambda p: any(x.ndim == 0 for x in _leaves(p)))
    _finds(lambda p: any(x.size == 0 and x.ndim > 0 for x in _leaves(p)))
    _finds(lambda p: any(np.isnan(x).any() for x in floats(p)))
    _finds(lambda p: any((x == math.inf).any() for x in floats(p)))
    _finds(lambda p: any((x == -math.inf).any() for x in floats(p)))
    _finds(lambda p: any(((x == 0) & np.signbit(x)).any() for x in floats(p)))
    _finds(lambda p: any(x.dtype.name == "bfloat16" for x in _leaves(p)))
    _finds(lambda p: any(x.dtype == np.bool_ for x in _leaves(p)))
    # Ops whose result is a size-0 array even though the inputs are not.
    _finds(lambda p: any(0 in i.aval.shape for i in p.instrs) and all(x.size for x in _leaves(p)))
    # Python scalars (weakly typed) and nested pytree arguments.
    _finds(lambda p: any(isinstance(x, float) for x in jax.tree.leaves(p.args)))
    _finds(lambda p: any(isinstance(x, dict) for x in p.args))

"""Tests of graphopt.testing itself: a checker that cannot fail checks nothing."""

import math
import re
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings

import graphopt
from graphopt.testing import (TOLERANCES, CompiledDifferently, assert_equivalent,
                              assert_matches_reference, equivalence_check, primitives, programs,
                              tolerance)

F32, BF16 = np.float32, ml_dtypes.bfloat16
nan, inf = math.nan, math.inf


def fails(actual, expected, match=None, **kwargs) -> str:
    with pytest.raises(AssertionError) as info:
        assert_equivalent(actual, expected, **kwargs)
    message = str(info.value)
    if match:
        assert re.search(match, message), message
    return message


# --- values ----------------------------------------------------------------------------------

def test_identical_trees_with_special_values_pass():
    x = np.array([nan, inf, -inf, -0.0, 0.0, 1.5], F32)
    tree = {"a": x, "b": (np.int32(3), np.array([True, False])), "c": jnp.asarray(x, BF16)}
    assert_equivalent(tree, jax.tree.map(np.copy, tree))
    assert_equivalent(tree, jax.tree.map(np.copy, tree), exact=True)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", [F32, BF16, np.float64, np.float16])
def test_nan_position_mismatch_is_caught(dtype, exact):
    a = np.array([1.0, nan, 3.0], dtype)
    fails(a, np.array([1.0, 2.0, 3.0], dtype), r"1 of 3 elements differ.*index \(1,\)", exact=exact)
    fails(np.array([1.0, 2.0, 3.0], dtype), a, r"index \(1,\)", exact=exact)
    # Even a tolerance that would swallow any finite difference does not hide a NaN.
    fails(a, np.array([1.0, 2.0, 3.0], dtype), rtol=1e30, atol=1e30)


def test_nan_payload_and_sign_are_ignored_even_when_exact():
    quiet = np.array([nan], F32)
    other = np.array([0x7FC00001], np.uint32).view(F32)  # another quiet NaN
    assert_equivalent(-quiet, other, exact=True)


def test_negative_zero_differs_only_when_exact():
    assert_equivalent(np.array([-0.0], F32), np.array([0.0], F32))
    fails(np.array([-0.0], F32), np.array([0.0], F32), r"bit-exact.*actual .*-0\.0", exact=True)
    fails(np.array(0.0, BF16), np.array(-0.0, BF16), exact=True)


def test_infinities_must_match_in_sign():
    fails(np.array([inf], F32), np.array([-inf], F32), rtol=1.0, atol=1.0)
    fails(np.array([inf], F32), np.array([3e38], F32), rtol=1.0, atol=1e39)
    fails(np.array([-1e38], F32), np.array([-inf], F32), rtol=1.0, atol=1e39)
    assert_equivalent(np.array([-inf, inf], F32), np.array([-inf, inf], F32), exact=True)


def test_zero_relative_tolerance_with_infinities_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0 × ∞ in the tolerance would be a RuntimeWarning
        assert_equivalent(np.array([inf, 1.0], F32), np.array([inf, 1.0], F32), rtol=0.0, atol=0.0)
        fails(np.array([inf, 1.0], F32), np.array([inf, 2.0], F32), rtol=0.0, atol=0.5)


def test_exact_compares_bits():
    one = np.array([1.0], F32)
    fails(np.nextafter(one, F32(2)), one, exact=True)
    assert_equivalent(np.nextafter(one, F32(2)), one)  # within float32 tolerance


def test_default_tolerance_follows_dtype():
    # A relative error of 4e-3: fine for bfloat16 (8 bits of mantissa), wrong for float32.
    assert_equivalent(np.array([1.0], BF16), np.array([1.0078125], BF16))
    fails(np.array([1.0], F32), np.array([1.004], F32), r"rtol=1e-05, atol=1e-06")
    assert_equivalent(np.array([1.0], F32), np.array([1.000001], F32))
    fails(np.array([1.0]), np.array([1.000001]))  # float64 is tighter still
    assert TOLERANCES[np.dtype(F32)] == (1e-5, 1e-6)


def test_explicit_tolerances_override_dtype_defaults():
    assert_equivalent(np.array([1.0], F32), np.array([1.1], F32), rtol=0.2)
    assert_equivalent(np.array([0.0], F32), np.array([0.01], F32), atol=0.02)
    fails(np.array([1.0], BF16), np.array([1.0078125], BF16), rtol=0.0, atol=0.0)


def test_integers_and_bools_are_always_exact():
    fails(np.array([1, 2], np.int32), np.array([1, 3], np.int32), r"\(exact\).*index \(1,\)",
          rtol=1.0, atol=10.0)
    fails(np.array([True]), np.array([False]))
    assert_equivalent(np.array([2**31 - 1], np.int32), np.array([2**31 - 1], np.int32))


def test_complex_parts_are_compared():
    a = np.array([1 + 1j, 2 + 2j], np.complex64)
    fails(a, np.array([1 + 1j, 2 - 2j], np.complex64), r"1 of 2 elements.*index \(1,\) \(imag\)")
    fails(a, np.array([1 + 1j, complex(nan, 2)], np.complex64), r"index \(1,\) \(real\)")
    assert_equivalent(a, a.copy(), exact=True)


def test_every_float_dtype_has_a_tolerance():
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "float4_e2m1fn"):
        if hasattr(ml_dtypes, name):
            rtol, atol = tolerance(getattr(ml_dtypes, name))
            assert 0 < rtol <= 1 and 0 < atol <= 1, name
    assert tolerance(np.int8) == (0.0, 0.0)
    fp8 = ml_dtypes.float8_e4m3fn
    assert_equivalent(np.array([1.0], fp8), np.array([1.125], fp8))  # one fp8 ulp
    fails(np.array([1.0], fp8), np.array([1.5], fp8))


def test_rank0_and_size0_leaves():
    assert_equivalent(np.zeros((3, 0), F32), np.zeros((3, 0), F32), exact=True)
    fails(np.float32(1.0), np.float32(2.0), r"worst at index \(\): actual np.float32\(1.0\)")
    fails(np.zeros((0,), F32), np.zeros((0, 1), F32), r"shape mismatch")


# --- structure -------------------------------------------------------------------------------

def test_structure_shape_and_dtype_mismatches():
    fails({"a": np.ones(2)}, {"b": np.ones(2)}, r"pytree structure mismatch")
    fails((np.ones(2),), [np.ones(2)], r"pytree structure mismatch")
    fails((np.ones(2), np.ones(2)), (np.ones(2),), r"pytree structure mismatch")
    fails(np.ones((2, 3), F32), np.ones((3, 2), F32), r"shape mismatch")
    fails(np.ones(2, F32), np.ones(2, BF16), r"dtype mismatch: actual float32, expected bfloat16")
    fails(np.ones(2, np.int32), np.ones(2, F32), r"dtype mismatch")


def test_message_names_path_count_index_and_values():
    actual = {"layer": [np.zeros(3, F32), np.array([[1.0, 2.0], [3.0, 9.0]], F32)]}
    expected = {"layer": [np.zeros(3, F32), np.array([[1.0, 2.5], [3.0, 4.0]], F32)]}
    message = fails(actual, expected, err_msg="after pass X")
    assert message.startswith("after pass X")
    assert "1 of 2 leaves differ" in message
    assert "['layer'][1]: 2 of 4 elements differ" in message
    assert "worst at index (1, 1): actual np.float32(9.0), expected np.float32(4.0)" in message


# --- equivalence_check & programs ----------------------------------------------------------

def test_equivalence_check_passes_for_a_faithful_roundtrip():
    graph = equivalence_check(lambda w, x: jnp.tanh(x @ w), jnp.ones((4, 2)), jnp.arange(4.0),
                              params_argnums=0)
    assert [a.role for a in graph.inputs] == ["param", "input"]
    equivalence_check(lambda x, n: x * n, jnp.arange(3.0), 3, static_argnums=1)


def test_equivalence_check_catches_a_wrong_lowering(monkeypatch):
    real_lower = graphopt.lower

    def off_by_one_ulp(graph):
        fn = real_lower(graph)
        return lambda *args: jax.tree.map(lambda y: jnp.nextafter(y, jnp.inf), fn(*args))

    monkeypatch.setattr(graphopt, "lower", off_by_one_ulp)
    with pytest.raises(AssertionError, match="differs from fn") as caught:
        equivalence_check(jnp.sin, jnp.arange(3.0))
    assert caught.type is AssertionError  # the reference is reproducible: the lowering is wrong
    equivalence_check(jnp.sin, jnp.arange(3.0), exact=False)  # one ulp is within tolerance


def test_a_difference_only_xla_makes_is_told_apart():
    # Equal op by op, different compiled: a function that sees whether it is being traced.
    def knows_jit(x):
        try:
            x.sum().item()  # concrete: run op by op
            return x
        except jax.errors.ConcretizationTypeError:
            return x + 1.0

    x = jnp.zeros(3)
    with pytest.raises(CompiledDifferently, match="agree bit for bit"):
        assert_matches_reference(knows_jit, lambda x: x, x, exact=True)
    same = assert_matches_reference(lambda x: x + x, lambda x: x * 2, x + 1, exact=True)
    assert_equivalent(same, x + 2, exact=True)  # the reference's result
    with pytest.raises(AssertionError, match="1 of 1 leaves differ") as caught:  # differs op by op too
        assert_matches_reference(lambda x: x + 2, lambda x: x + 1, x, exact=True)
    assert caught.type is AssertionError


@settings(max_examples=10)
@given(programs())
def test_program_repr_lists_inputs_ops_and_args(program):
    text = repr(program)
    assert text.startswith("Program(")
    assert all(f"= {op}" in text for op in program.ops)
    assert text.count("\n  x") == len(jax.tree.leaves(program.args))  # a line per argument


@settings(max_examples=10)
@given(programs(families=("reduce",), dtypes=(np.dtype(np.int32),)))
def test_programs_respect_family_and_dtype_filters(program):
    assert all(np.asarray(x).dtype.kind == "i" for x in jax.tree.leaves(program.args))
    allowed = {"reduce", "convert_element_type", "cum", "arg", "broadcast_in_dim", "const"}
    assert all(any(op.startswith(a) for a in allowed) for op in program.ops), program.ops
    primitives(program, *program.args)  # and it traces

"""recognize: the pattern combinators and the evaluator of constant-only values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt.pattern import Op, Var
from graphopt.pipeline import run_pipeline
from graphopt.recognize import (AnyOf, Broadcast, Kept, Maybe, Mean, Scalar, constant_array,
                                evaluate_slice, mean_axes, reductions_agree)


def canonical(fn, *args):
    return run_pipeline(graphopt.trace(fn, *args), ["canonicalize", "cse"]).graph


def root(graph):
    return graph.outputs[0]


@pytest.mark.parametrize("fn", [
    lambda: jnp.tril(jnp.ones((5, 7), bool)),
    lambda: jnp.arange(12).reshape(3, 4).T >= 2,
    lambda: jnp.where(jnp.arange(6) % 2 == 0, jnp.arange(6) * 3 - 1, -jnp.arange(6)),
    lambda: jnp.broadcast_to(jnp.arange(4, dtype=jnp.float32), (2, 3, 4)) * 0.5 + 1.0,
    lambda: jnp.sqrt(jnp.float32(64.0)) - jnp.float32(0.5),
    lambda: (jnp.arange(8, dtype=jnp.float32) / 3.0).astype(jnp.int32),  # float→int: JAX's rules
])
def test_constant_array_is_what_jax_computes(fn):
    graph = graphopt.trace(lambda x: (x, fn()), jnp.ones(1))
    got = constant_array(graph.outputs[1])
    want = np.asarray(jax.jit(fn)())
    assert got is not None and got.dtype == want.dtype and np.array_equal(got, want)


def test_constant_array_refuses_values_that_read_inputs():
    graph = graphopt.trace(lambda x: x * 2.0 + jnp.arange(3.0), jnp.ones(3))
    assert constant_array(root(graph)) is None


def test_evaluate_slice_binds_the_given_inputs():
    graph = canonical(lambda m: jnp.transpose(m.reshape(2, 1, 3), (1, 0, 2)) & True, np.ones((2, 3), bool))
    sample = np.array([[True, False, True], [False, False, True]])
    (got,) = evaluate_slice([graph.inputs[0]], [sample], [root(graph)])
    assert np.array_equal(got, sample.reshape(2, 1, 3).transpose(1, 0, 2))
    assert evaluate_slice([], [], [root(graph)]) is None  # the input is not bound


def test_mean_checks_the_count_and_records_the_axes():
    x = np.ones((2, 6), np.float32)
    captures = {}
    assert Mean(Var("x"), name="m").match(root(canonical(lambda x: x.mean(-1), x)), captures, None)
    assert captures["_means"][0][0] == (1,) and mean_axes(captures["m"]) == (1,)
    assert not Mean(Var("x")).match(root(canonical(lambda x: x.sum(-1) / 5.0, x)), {}, None)
    assert not Mean(Var("x")).match(root(canonical(lambda x: x.sum(-1) * 0.2, x)), {}, None)


def test_kept_must_put_the_ones_at_the_reduced_axes():
    x = np.ones((4, 4), np.float32)
    pattern = Op("sub", Var("x"), Kept(Mean(Var("x"))))
    good, bad = {}, {}
    assert pattern.match(root(canonical(lambda x: x - x.mean(1, keepdims=True), x)), good, None)
    assert reductions_agree(good)
    # the row means broadcast along the rows: a reshape to (1, 4) instead of (4, 1)
    assert pattern.match(root(canonical(lambda x: x - x.mean(1).reshape(1, 4), x)), bad, None)
    assert not reductions_agree(bad)


def test_broadcast_accepts_numpy_broadcasting_only():
    x = np.ones((2, 3, 4), np.float32)
    pattern = Op("mul", Var("x"), Broadcast(Var("w")))
    captures = {}
    assert pattern.match(root(canonical(lambda x, w: x * w.reshape(1, 1, 4), x, np.ones(4, np.float32))),
                         captures, None)
    assert captures["w"].type.shape == (4,)
    captures = {}
    assert pattern.match(root(canonical(lambda x, w: x * w[:, None], x, np.ones(3, np.float32))),
                         captures, None)
    assert captures["w"].type.shape == (1, 3, 1)  # [3] → [1,3,1] is not numpy broadcasting: kept out


def test_anyof_maybe_and_scalar():
    x = np.ones(3, np.float32)
    pattern = AnyOf(Op("exp", Var("x")), Maybe("neg", Op("sin", Var("x"))), name="out")
    for fn in (jnp.exp, jnp.sin, lambda v: -jnp.sin(v)):
        captures = {}
        assert pattern.match(root(canonical(fn, x)), captures, None) and "out" in captures
    assert not pattern.match(root(canonical(jnp.cos, x)), {}, None)
    half = Op("mul", Var("x"), Scalar("c", where=lambda v: v == 0.5))
    captures = {}
    assert half.match(root(canonical(lambda v: v * (jnp.sqrt(jnp.float32(4.0)) / 4.0), x)), captures, None)
    assert captures["_c"] == 0.5
    assert not half.match(root(canonical(lambda v: v * 0.25, x)), {}, None)

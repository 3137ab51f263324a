"""graphopt.param_prep: the prep of frozen-weight work, run once per set of weights."""

import jax
import jax.numpy as jnp
import numpy as np

import graphopt
from graphopt.param_prep import PreparedParams
from graphopt.pipeline import run_pipeline


def _folded():
    graph = graphopt.trace(lambda w, x: x @ w.T, jnp.ones((2, 3)), jnp.ones(3), params_argnums=0)
    graph = run_pipeline(graph, ["fold_params"]).graph
    assert graph.prep is not None
    return graph


class _Counting:
    """A prep that counts how often its parameters are computed."""

    def __init__(self, prep):
        self.prep, self.runs = prep, 0
        self.param_leaf_indices, self.arguments = prep.param_leaf_indices, prep.arguments

    def params(self, *args):
        self.runs += 1
        return self.prep.params(*args)


def test_the_prep_runs_once_per_set_of_jax_arrays():
    prep, cache = _Counting(_folded().prep), PreparedParams()
    w, x = jnp.arange(6.0).reshape(2, 3), jnp.ones(3)
    first = cache.arguments(prep, (w, x))
    assert cache.arguments(prep, (w, x + 1))[0] is first[0] and prep.runs == 1
    other = cache.arguments(prep, (w * 2, x))
    assert prep.runs == 2
    np.testing.assert_array_equal(other[0]["w:transpose"], 2 * np.asarray(first[0]["w:transpose"]))
    cache.arguments(prep, (w, x), key="another signature")
    assert prep.runs == 3


def test_numpy_weights_changed_in_place_are_prepared_again():
    prep, cache = _Counting(_folded().prep), PreparedParams()
    w, x = np.ones((2, 3), np.float32), np.ones(3, np.float32)
    before = np.asarray(cache.arguments(prep, (w, x))[0]["w:transpose"])
    w[0, 0] = 5.0  # the same array object, other values
    after = np.asarray(cache.arguments(prep, (w, x))[0]["w:transpose"])
    assert prep.runs == 2 and before[0, 0] == 1.0 and after[0, 0] == 5.0


def test_no_prep_passes_the_arguments_through():
    args = (jnp.ones(2),)
    assert PreparedParams().arguments(None, args) is args


def test_a_compiled_program_prepares_its_weights_once():
    graph = graphopt.trace(lambda w, x: jnp.tanh(x @ w.T), jnp.ones((4, 8)), jnp.ones((2, 8)), params_argnums=0)
    program = graphopt.compile(run_pipeline(graph, "default").graph, target="cpu")
    w, x = jax.random.normal(jax.random.key(0), (4, 8)), jnp.ones((2, 8))
    calls, real = [], program.graph.prep._compiled_fn()  # the jitted prep, counted
    program.graph.prep._compiled["fn"] = lambda *leaves: calls.append(1) or real(*leaves)
    first, second = program(w, x), program(w, x)
    assert len(calls) == 1
    np.testing.assert_allclose(first, np.tanh(np.asarray(x) @ np.asarray(w).T), rtol=1e-5)
    np.testing.assert_array_equal(first, second)

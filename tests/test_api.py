"""@graphopt.optimize: per-signature tracing and caching, .graph, modules, static arguments."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import graphopt
from graphopt.errors import GraphoptError
from graphopt.testing import assert_equivalent


def test_traces_once_per_signature():
    calls = []

    @graphopt.optimize
    def f(x):
        calls.append(x.shape)
        return jnp.tanh(x) * 2

    assert_equivalent(f(jnp.ones(3)), jnp.tanh(jnp.ones(3)) * 2)
    f(jnp.zeros(3))
    assert calls == [(3,)] and len(f.graphs) == 1
    f(jnp.ones((2, 2)))
    assert calls == [(3,), (2, 2)] and len(f.graphs) == 2
    assert str(f.graph.inputs[0].type) == "f32[2,2]"
    assert f.__name__ == "f"


def test_options_and_static_arguments():
    @graphopt.optimize(static_argnums=1, params_argnums=0)
    def f(w, power, x):
        return (x @ w) ** power

    w, x = jnp.ones((3, 2)), jnp.arange(3.0)
    assert_equivalent(f(w, 2, x), (x @ w) ** 2)
    assert_equivalent(f(w, 3, x), (x @ w) ** 3)
    assert len(f.graphs) == 2
    assert [a.role for a in f.graph.inputs] == ["param", "input"]


def test_nnx_module_sees_updated_weights():
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    fast = graphopt.optimize(model)
    x = jnp.ones((1, 2))
    assert_equivalent(fast(x), model(x))
    model.kernel.value = model.kernel.value * 2
    assert_equivalent(fast(x), model(x))
    assert len(fast.graphs) == 1


def test_unknown_pipeline_is_rejected_with_known_names():
    with pytest.raises(GraphoptError, match="unknown pipeline 'fastest'; known: cleanup, default, inference, mixed_precision, none, training"):
        graphopt.optimize(lambda x: x, pipeline="fastest")


def test_jit_false_returns_unjitted_results_and_is_traceable_by_the_user():
    f = graphopt.optimize(lambda x: jnp.sin(x), jit=False)
    assert_equivalent(jax.jit(f)(jnp.ones(2)), jnp.sin(jnp.ones(2)))


def test_an_optimized_model_runs_under_a_users_jit():
    # fuse_attention times its candidate kernels while the pipeline runs, here inside the outer
    # trace: the timing runs must execute eagerly, not be staged into the caller's program.
    from graphopt.demo import DemoConfig, demo_model

    model, variables, tokens = demo_model(DemoConfig(layers=1, seq=8))
    optimized = graphopt.optimize(model.apply, params_argnums=0)
    out = jax.jit(optimized)(variables, tokens)
    assert any(n.op.name == "attention" for n in optimized.graph.walk())
    assert_equivalent(out, model.apply(variables, tokens), rtol=1e-4, atol=1e-5)

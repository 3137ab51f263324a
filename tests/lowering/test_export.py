import jax
import jax.numpy as jnp
from flax import nnx

import graphopt
from graphopt.demo import DemoConfig, demo_model
from graphopt.testing import assert_equivalent


def test_export_for_tpu_cuda_cpu_runs_on_cpu():
    model, variables, tokens = demo_model(DemoConfig(layers=1, seq=16))
    graph = graphopt.trace(model.apply, variables, tokens)
    blob = graphopt.export(graph, platforms=("tpu", "cuda", "cpu"))
    exported = graphopt.deserialize(blob)
    assert exported.platforms == ("tpu", "cuda", "cpu")
    assert_equivalent(exported.call(variables, tokens), jax.jit(model.apply)(variables, tokens))


def test_export_a_function_directly_and_an_nnx_module():
    blob = graphopt.export(lambda x: jnp.cos(x) * 2, jnp.ones(3), platforms=("tpu",))
    assert graphopt.deserialize(blob).platforms == ("tpu",)
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    x = jnp.ones((4, 3))
    exported = graphopt.deserialize(graphopt.export(graphopt.trace(model, x), platforms=("cpu",)))
    # nnx.State cannot be serialized as a pytree: the artifact takes the flat leaves.
    (out,) = exported.call(*jax.tree_util.tree_leaves((nnx.state(model), x)))
    assert_equivalent(out, model(x))

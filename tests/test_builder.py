"""Builder.op fills in the params JAX would give a primitive, also for primitives whose lax
function needs options."""

import jax.numpy as jnp
import numpy as np

import graphopt
from graphopt.builder import Builder


def test_defaults_are_learned_with_the_options_given():
    graph = graphopt.trace(lambda x: jnp.exp(x), jnp.ones(3))
    exp = next(graph.nodes)
    b = Builder(graph, made_by="test")
    converted = b.op("convert_element_type", exp.output, new_dtype=np.dtype(jnp.bfloat16))
    assert converted.type.dtype == jnp.bfloat16 and not converted.type.weak_type
    assert set(converted.node.params) >= {"new_dtype", "weak_type", "sharding"}
    graph.set_outputs([converted])
    graph.verify()
    out = graphopt.lower(graph)(jnp.zeros(3))
    assert out.dtype == jnp.bfloat16 and out.tolist() == [1.0, 1.0, 1.0]

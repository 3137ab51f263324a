"""outline: the region computing some values from others; closed, no escapes, constants copied."""

import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt.ir import Graph
from graphopt.outline import OutlineError, can_outline, interior, outline, replace_with
from graphopt.ops import OpDef
from graphopt.testing import assert_equivalent


def by_op(graph, name):
    return [n for n in graph.nodes if n.op.name == name]


def test_region_copies_the_slice_and_evaluates_the_same():
    g = graphopt.trace(lambda x, y: jnp.tanh(x) * 2.0 + jnp.sin(y), jnp.ones(3), jnp.ones(3))
    (tanh,), (sin,), (add,) = by_op(g, "tanh"), by_op(g, "sin"), by_op(g, "add")
    region = outline([tanh.output, sin.output], [add.output])
    region.verify()
    assert [n.op.name for n in region.nodes if n.op.name != "constant"] == ["mul", "add"]
    assert [a.type for a in region.inputs] == [tanh.output.type, sin.output.type]
    a, b = np.float32([0.5, -1, 2]), np.float32([3, 4, -5])
    assert_equivalent(graphopt.lower(region).flat(a, b)[0], a * np.float32(2) + b,
                      exact=True)
    assert tanh.graph is g and add.graph is g  # the originals stay


def test_not_closed_names_the_input():
    g = graphopt.trace(lambda x, y: x * y, jnp.ones(3), jnp.ones(3))
    (mul,) = by_op(g, "mul")
    with pytest.raises(OutlineError, match="graph input 'y'"):
        outline([g.inputs[0]], [mul.output])
    assert not can_outline([g.inputs[0]], [mul.output])


def test_an_inner_value_read_outside_escapes():
    def fn(x):
        e = jnp.exp(x)
        return e + 1.0, e
    g = graphopt.trace(fn, jnp.ones(3))
    (add,) = by_op(g, "add")
    with pytest.raises(OutlineError, match="exp computes a value that is a graph output"):
        outline([g.inputs[0]], [add.output])
    (exp,) = by_op(g, "exp")
    assert can_outline([g.inputs[0]], [add.output, exp.output])  # as a second output it is fine


def test_constant_only_values_are_copied_even_when_shared():
    def fn(x, y):
        mask = jnp.tril(jnp.ones((3, 3), bool))
        return jnp.where(mask, x, 0.0), jnp.where(mask, y, 1.0)
    g = graphopt.trace(fn, jnp.ones((3, 3)), jnp.ones((3, 3)))
    first = g.outputs[0]
    region = outline([g.inputs[0]], [first])
    assert "iota" in [n.op.name for n in region.nodes]
    assert len(interior([g.inputs[0]], [first])) == len(region)


def test_replace_with_rewires_and_erases_the_outlined_nodes():
    g = graphopt.trace(lambda x: jnp.sin(jnp.exp(x) * 3.0) + x, jnp.ones(3))
    (exp,), (sin,) = by_op(g, "exp"), by_op(g, "sin")
    region = outline([exp.output], [sin.output])
    op = OpDef("outline_test_call", lambda types, params, regions: [v.type for v in regions[0].outputs],
               lambda *args, regions, **_: list(regions[0](*args)), region_names=("body",))
    node = g.add_node(op, [exp.output], {}, [region], before=sin)
    erased = replace_with(node, [sin.output])
    g.verify()
    assert erased == 3  # sin, mul and the 3.0 it read
    assert [n.op.name for n in g.nodes] == ["exp", "outline_test_call", "add"]
    x = np.float32([0.1, -2, 3])
    assert_equivalent(graphopt.lower(g)(x), np.sin(np.exp(x) * 3) + x, exact=False)


def test_values_of_another_graph_are_refused():
    g1 = graphopt.trace(lambda x: jnp.cos(x), jnp.ones(3))
    g2 = Graph()
    with pytest.raises(OutlineError, match="different graphs"):
        outline([g2.add_input(g1.inputs[0].type)], [g1.outputs[0]])

"""outline: the slice computing some values from others moves into a region; closed, no escapes,
shared constants copied."""

import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt.errors import GraphError
from graphopt.ir import Graph
from graphopt.outline import OutlineError, can_outline, outline_into, outline_slice
from graphopt.ops import OpDef
from graphopt.testing import assert_equivalent


def by_op(graph, name):
    return [n for n in graph.nodes if n.op.name == name]


CALL = OpDef("outline_test_call", lambda types, params, regions: [types[0]],
             lambda *args, regions, **_: list(regions[0](*args)), region_names=("body",))


def test_the_slice_moves_into_the_region_and_evaluates_the_same():
    g = graphopt.trace(lambda x, y: jnp.tanh(x) * 2.0 + jnp.sin(y), jnp.ones(3), jnp.ones(3))
    (tanh,), (sin,), (mul,), (add,) = (by_op(g, op) for op in ("tanh", "sin", "mul", "add"))
    node = g.add_node(CALL, [tanh.output, sin.output], {}, before=add)
    region = outline_into(node, [tanh.output, sin.output], [add.output])
    g.verify()
    assert node.regions == (region,) and region.parent is node
    assert [n.op.name for n in region.nodes if n.op.name != "constant"] == ["mul", "add"]
    assert mul.graph is region and add.graph is region  # moved, not copied
    assert [a.type for a in region.inputs] == [tanh.output.type, sin.output.type]
    assert [n.op.name for n in g.nodes] == ["tanh", "sin", "outline_test_call"]
    a, b = np.float32([0.5, -1, 2]), np.float32([3, 4, -5])
    assert_equivalent(graphopt.lower(g)(a, b), np.tanh(a) * np.float32(2) + np.sin(b), exact=True)


def test_not_closed_names_the_input():
    g = graphopt.trace(lambda x, y: x * y, jnp.ones(3), jnp.ones(3))
    (mul,) = by_op(g, "mul")
    with pytest.raises(OutlineError, match="graph input 'y'"):
        outline_slice([g.inputs[0]], [mul.output])
    assert not can_outline([g.inputs[0]], [mul.output])


def test_an_inner_value_read_outside_escapes():
    def fn(x):
        e = jnp.exp(x)
        return e + 1.0, e
    g = graphopt.trace(fn, jnp.ones(3))
    (add,) = by_op(g, "add")
    with pytest.raises(OutlineError, match="exp computes a value that is a graph output"):
        outline_slice([g.inputs[0]], [add.output])
    (exp,) = by_op(g, "exp")
    assert can_outline([g.inputs[0]], [add.output, exp.output])  # as a second output it is fine


def test_shared_constant_only_values_are_copied_the_others_move():
    def fn(x, y):
        mask = jnp.tril(jnp.ones((3, 3), bool))
        return jnp.where(mask, x * 2.0, 0.0), jnp.where(mask, y, 1.0)
    g = graphopt.trace(fn, jnp.ones((3, 3)), jnp.ones((3, 3)))
    first = g.outputs[0]
    order = outline_slice([g.inputs[0]], [first])
    node = g.add_node(CALL, [g.inputs[0]], {}, before=first.node)
    region = outline_into(node, [g.inputs[0]], [first], order)
    g.verify()
    assert "iota" in [n.op.name for n in region.nodes]
    assert "iota" in [n.op.name for n in g.nodes]  # the mask's original stays for the second where
    assert len(region) == len(order)
    (mul,) = [n for n in order if n.op.name == "mul"]
    assert mul.graph is region and first.node.graph is region  # what reads x moved
    x, y = np.arange(9, dtype=np.float32).reshape(3, 3), np.ones((3, 3), np.float32)
    mask = np.tril(np.ones((3, 3), bool))
    out = graphopt.lower(g)(x, y)
    assert_equivalent(out[0], np.where(mask, x * 2, 0), exact=True)
    assert_equivalent(out[1], np.where(mask, y, 1), exact=True)


def test_outline_into_refuses_a_node_with_a_region_or_the_wrong_arity():
    g = graphopt.trace(lambda x: jnp.sin(jnp.exp(x) * 3.0) + x, jnp.ones(3))
    (exp,), (sin,) = by_op(g, "exp"), by_op(g, "sin")
    node = g.add_node(CALL, [exp.output], {}, before=sin)
    outline_into(node, [exp.output], [sin.output])
    with pytest.raises(GraphError, match="already holds a region"):
        outline_into(node, [exp.output], [node.output])
    with pytest.raises(GraphError, match="1 results, 2 values"):
        outline_into(g.add_node(CALL, [exp.output], {}, before=node), [exp.output],
                     [exp.output, exp.output])


def test_values_of_another_graph_are_refused():
    g1 = graphopt.trace(lambda x: jnp.cos(x), jnp.ones(3))
    g2 = Graph()
    with pytest.raises(OutlineError, match="different graphs"):
        outline_slice([g2.add_input(g1.inputs[0].type)], [g1.outputs[0]])

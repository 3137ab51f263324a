"""Graph / Node / Value: building, rewiring, erasing, and the invariants verify() enforces."""

import jax
import numpy as np
import pytest

from graphopt.errors import GraphError
from graphopt.ir import Graph, erase_dead
from graphopt.ops import primitive_op
from graphopt.types import TensorType

F32_3 = TensorType((3,), np.float32)


def _sin_cos_graph():
    g = Graph()
    x = g.add_input(F32_3, path="x")
    s = g.add_node(primitive_op(jax.lax.sin_p), [x])
    c = g.add_node(primitive_op(jax.lax.cos_p), [s.output])
    g.set_outputs([c.output])
    return g, x, s, c


def test_types_come_from_the_shape_rule():
    g = Graph()
    a = g.add_input(TensorType((2, 3), np.float32))
    b = g.add_input(TensorType((3, 5), np.float32))
    node = g.add_node(primitive_op(jax.lax.dot_general_p), [a, b],
                      {"dimension_numbers": (((1,), (0,)), ((), ())), "precision": None,
                       "preferred_element_type": np.dtype(np.float32), "out_sharding": None})
    assert node.output.type == TensorType((2, 5), np.float32)


def test_shape_rule_rejects_bad_inputs_with_the_op_name():
    g = Graph()
    a = g.add_input(TensorType((2, 3), np.float32))
    b = g.add_input(TensorType((4,), np.int32))
    with pytest.raises(GraphError, match="add"):
        g.add_node(primitive_op(jax.lax.add_p), [a, b])


def test_use_lists_are_maintained():
    g, x, s, c = _sin_cos_graph()
    assert list(x.uses) == [(s, 0)]
    assert list(s.output.uses) == [(c, 0)]
    assert list(c.output.uses) == [(None, 0)]
    g.verify()


def test_replace_all_uses_rewires_nodes_and_outputs():
    g, x, s, c = _sin_cos_graph()
    neg = g.add_node(primitive_op(jax.lax.neg_p), [x], before=c)
    g.replace_all_uses(s.output, neg.output)
    assert c.inputs[0] is neg.output and not s.output.uses
    g.replace_all_uses(c.output, neg.output)
    assert g.outputs == [neg.output]
    g.erase(c)
    g.erase(s)
    assert [n.op.name for n in g.nodes] == ["neg"]
    g.verify()


def test_replace_all_uses_refuses_another_type():
    g, x, s, c = _sin_cos_graph()
    conv = g.add_node(primitive_op(jax.lax.convert_element_type_p), [x],
                      {"new_dtype": np.dtype(np.int32), "weak_type": False, "sharding": None})
    with pytest.raises(GraphError, match="type mismatch"):
        g.replace_all_uses(s.output, conv.output)


def test_erase_refuses_a_node_that_is_still_used():
    g, x, s, c = _sin_cos_graph()
    with pytest.raises(GraphError, match="still has 1 use"):
        g.erase(s)


def test_insert_before_and_after_keeps_order():
    g, x, s, c = _sin_cos_graph()
    first = g.add_node(primitive_op(jax.lax.neg_p), [x], before=s)
    middle = g.add_node(primitive_op(jax.lax.abs_p), [s.output], after=s)
    assert list(g.nodes) == [first, s, middle, c]
    assert len(g) == 4
    g.verify()


def test_operands_must_come_from_the_same_graph():
    g, x, *_ = _sin_cos_graph()
    other = Graph()
    with pytest.raises(GraphError, match="another graph"):
        other.add_node(primitive_op(jax.lax.neg_p), [x])


def test_verify_catches_use_before_definition():
    g, x, s, c = _sin_cos_graph()
    # Move the sin node after its user by unlinking it by hand (what a buggy pass might do).
    g._first, s._next, c._prev = c, None, None
    c._next, s._prev, g._last = s, c, s
    with pytest.raises(GraphError, match="used before it is defined"):
        g.verify()


def test_verify_catches_stale_types_and_uses():
    g, x, s, c = _sin_cos_graph()
    s.outputs[0].type = TensorType((3,), np.float16)
    with pytest.raises(GraphError, match="stale output types"):
        g.verify()
    g, x, s, c = _sin_cos_graph()
    c.inputs[0] = x  # edited behind the graph's back
    with pytest.raises(GraphError, match="use lists are out of date"):
        g.verify()


def test_constants_keep_the_given_object():
    g = Graph()
    array = np.arange(4.0, dtype=np.float32)
    value = g.constant(array)
    assert value.node.params["value"] is array
    assert value.type == TensorType((4,), np.float32)


def test_argument_roles_are_checked():
    with pytest.raises(ValueError, match="role"):
        Graph().add_input(F32_3, role="weight")


def test_walk_visits_regions():
    import graphopt

    g = graphopt.trace(lambda x: jax.lax.scan(lambda c, v: (c + jax.numpy.sin(v), c), 0.0, x), np.ones(3, np.float32))
    names = [n.op.name for n in g.walk()]
    assert "scan" in names and "sin" in names
    assert "sin" not in [n.op.name for n in g.nodes]


def test_erase_dead_keeps_nodes_with_readers_and_takes_dead_producers():
    g, x, _, cos = _sin_cos_graph()
    assert erase_dead([cos]) == 0  # a graph output reads it
    g.set_outputs([x])
    assert erase_dead([cos]) == 2 and len(g) == 0  # cos, then sin, which only cos read


def test_modify_changes_a_node_in_place_or_nothing():
    g, x, s, c = _sin_cos_graph()
    former = g.modify(s, primitive_op(jax.lax.exp_p), [x], {})
    assert former == [] and s.op.name == "exp" and c.inputs[0] is s.output and len(g) == 2
    g.verify()
    with pytest.raises(GraphError, match="cannot modify exp into convert_element_type in place"):
        g.modify(s, primitive_op(jax.lax.convert_element_type_p), [x],
                 {"new_dtype": np.dtype(np.float16), "weak_type": False, "sharding": None})
    assert s.op.name == "exp" and s.inputs == [x]  # unchanged
    former = g.modify(c, primitive_op(jax.lax.neg_p), [x], {})  # s loses its reader
    assert former == [s] and erase_dead(former) == 1
    g.verify()


def test_running_totals_follow_links_moves_and_modifications():
    from graphopt.cost import graph_stats

    g, x, s, c = _sin_cos_graph()
    assert graph_stats(g) == (2, 6, 0)
    region = Graph("region")
    region.add_input(F32_3)
    region.move_to_end([s], g)  # the region now holds sin (operands rewired by the caller)
    assert (len(g), len(region), g._plain_flops, region._plain_flops) == (1, 1, 3, 3)
    assert [n.op.name for n in g.nodes] == ["cos"] and list(region.nodes) == [s] and s.graph is region
    with pytest.raises(GraphError, match="belongs to another graph"):
        region.move_to_end([c], region)
    assert c.graph is g and len(g) == 1  # nothing moved


def test_add_copies_chains_a_layer_onto_the_one_before_at_the_insertion_point():
    from graphopt.cost import graph_stats

    g, x, s, c = _sin_cos_graph()
    mapping = {id(x): c.output}  # the copy of sin reads cos: sin, cos, sin, cos
    copies = g.add_copies([s, c], mapping)  # at the end
    assert [n.op.name for n in g.nodes] == ["sin", "cos", "sin", "cos"]
    assert copies[0].inputs == [c.output] and copies[1].inputs == [copies[0].output]
    assert mapping[id(c.output)] is copies[1].output and c.output.users() == [copies[0]]
    g.set_outputs([copies[1].output])
    g.verify()
    assert graph_stats(g) == (4, 12, 0)
    head = g.add_node(primitive_op(jax.lax.neg_p), [x], before=s)
    with g.inserting_before(s):
        (copy,) = g.add_copies([s], {id(x): head.output})  # between neg and the first sin
    assert list(g.nodes)[:3] == [head, copy, s]
    g.verify()
    with pytest.raises(GraphError, match="another graph"):
        Graph().add_copies([s], {})

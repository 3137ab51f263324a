"""cse: before/after on small functions, with the merged graph checked bit for bit.

Each case traces a JAX function, runs `cse` and `dce`, compares the ops left with the expected
ones, and runs the result against the original under jax.jit on inputs with NaN, ±Inf and ±0:
merging nodes changes nothing XLA computes, so the bits must be identical.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import graphopt
from graphopt.ir import Graph
from graphopt.ops import primitive_op
from graphopt.pipeline import run_pipeline
from graphopt.testing import assert_equivalent
from graphopt.types import TensorType

F32 = np.float32
X = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1.5, -2.0, 3.0], F32)
Y = np.array([2.0, -0.0, np.nan, 1.0, -np.inf, 0.5, 7.0, -3.0], F32)


def merged(fn, *args):
    """(graph after cse + dce, what cse fired); asserts the result is fn's, bit for bit."""
    graph = graphopt.trace(fn, *args)
    result = run_pipeline(graph, ["cse", "dce"], debug=True)
    assert_equivalent(jax.jit(graphopt.lower(result.graph))(*args), jax.jit(fn)(*args), exact=True)
    return result.graph, result.report.records[0].fired


def ops(graph):
    return [n.op.name for n in graph.nodes if n.op.name != "constant"]


def test_duplicated_subexpression_becomes_one():
    graph, fired = merged(lambda x: jnp.sin(x) + jnp.sin(x), X)
    assert ops(graph) == ["sin", "add"]
    (add,) = [n for n in graph.nodes if n.op.name == "add"]
    assert add.inputs[0] is add.inputs[1]
    assert fired == {"merged-node": 1}


def test_chains_collapse_in_one_sweep():
    graph, fired = merged(lambda x, y: jnp.exp(jnp.sin(x) * y) - jnp.exp(jnp.sin(x) * y), X, Y)
    assert ops(graph) == ["sin", "mul", "exp", "sub"]
    assert fired == {"merged-node": 3}


def test_commuted_operands_are_not_merged():
    graph, _ = merged(lambda x, y: x * y + y * x, X, Y)
    assert ops(graph) == ["mul", "mul", "add"]


def test_same_operand_order_is_merged():
    graph, _ = merged(lambda x, y: x * y + x * y, X, Y)
    assert ops(graph) == ["mul", "add"]


def test_different_params_are_not_merged():
    graph, _ = merged(lambda x: x ** 2 + x ** 3 + x ** 2, X)
    assert [n.params.get("y") for n in graph.nodes if n.op.name == "integer_pow"] == [2, 3]
    graph, _ = merged(lambda m: m.sum(0)[:2] + m.sum(1) + m.sum(0)[:2], X.reshape(2, 4))
    assert [n.params["axes"] for n in graph.nodes if n.op.name == "reduce_sum"] == [(0,), (1,)]


def test_equal_constants_merge_and_distinct_bits_stay_apart():
    a, b = np.array([1.0, 2.0], F32), np.array([1.0, 2.0], F32)  # equal, distinct objects
    zero, neg_zero = np.zeros(2, F32), np.array([-0.0, -0.0], F32)
    graph, fired = merged(lambda x: x * a + b + zero + neg_zero, X[:2])
    values = [n.params["value"].tolist() for n in graph.nodes if n.op.name == "constant"]
    assert [v for v in values if len(v) == 2] == [[1.0, 2.0], [0.0, 0.0], [-0.0, -0.0]]
    assert [np.signbit(v).tolist() for v in values if len(v) == 2][1:] == [[False] * 2, [True] * 2]
    assert fired == {"merged-constant": 1}


def test_scalar_constants_merge_by_bits_dtype_and_weak_type():
    g = Graph()
    x = g.add_input(TensorType((), np.float32), path="x")
    nan_bits = np.array(0x7FC00001, np.uint32).view(F32)
    values = [g.constant(v, weak_type=w) for v, w in [
        (F32(0.0), False), (F32(-0.0), False), (F32(0.0), False), (F32(0.0), True),
        (F32(np.nan), False), (F32(np.nan), False), (nan_bits, False)]]
    total = x
    for v in values:
        total = g.add_node(primitive_op(lax.add_p), [total, v]).output
    g.set_outputs([total])
    result = run_pipeline(g, ["cse", "dce"], debug=True)
    kept = [(n.params["value"].tobytes(), n.params["weak_type"]) for n in g.nodes
            if n.op.name == "constant"]
    assert len(kept) == 5  # 0.0, -0.0, weak 0.0, NaN, NaN with another payload
    assert result.report.records[0].fired == {"merged-constant": 2}


def test_large_equal_constants_merge_by_content():
    a, b = np.linspace(0, 1, 5000, dtype=F32), np.linspace(0, 1, 5000, dtype=F32)
    c = b.copy()
    c[-1] = -0.0
    graph, fired = merged(lambda x: x * a + x * b + x * c, np.ones(5000, F32))
    assert ops(graph) == ["mul", "add", "mul", "add"]
    assert fired == {"merged-constant": 1, "merged-node": 1}


def test_effects_are_never_merged():
    calls = []

    def shout(x):
        jax.debug.callback(lambda v: calls.append(v), x)
        return x

    graph = graphopt.trace(lambda x: shout(x) + 1, X)
    (callback,) = [n for n in graph.nodes if n.effects]
    # A second callback with the very same params and inputs: pure otherwise, but effectful.
    graph.add_node(callback.op, callback.inputs, callback.params, after=callback,
                   _types=[v.type for v in callback.outputs], _effects=callback.effects)
    run_pipeline(graph, ["cse", "dce"], debug=True)
    assert [n.op.name for n in graph.nodes].count(callback.op.name) == 2
    jax.block_until_ready(jax.jit(graphopt.lower(graph))(X))
    assert len(calls) == 2


def test_stateful_rng_is_not_merged():
    graph = graphopt.trace(
        lambda lo: lax.rng_uniform(lo, 1.0, (3,)) - lax.rng_uniform(lo, 1.0, (3,)), F32(0.0))
    run_pipeline(graph, ["cse", "dce"], debug=True)
    assert ops(graph) == ["rng_uniform", "rng_uniform", "sub"]


def test_cse_runs_inside_regions():
    def body(carry, v):
        return carry + jnp.sin(v) * jnp.sin(v), jnp.cos(v) + jnp.cos(v)

    graph, fired = merged(lambda xs: lax.scan(body, F32(0.0), xs), X)
    (scan,) = [n for n in graph.nodes if n.op.name == "scan"]
    assert ops(scan.regions[0]) == ["sin", "mul", "add", "cos", "add"]
    assert fired == {"merged-node": 2}


def test_region_ops_are_not_merged():
    def body(carry, v):
        return carry + v, carry

    def twice(xs):
        return lax.scan(body, F32(0.0), xs)[0] + lax.scan(body, F32(0.0), xs)[0]

    graph, fired = merged(twice, X)
    assert ops(graph) == ["scan", "scan", "add"]
    assert fired == {}

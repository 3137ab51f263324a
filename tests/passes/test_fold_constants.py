"""fold_constants: before/after on small functions, with the folded graph checked bit for bit.

Each case traces a JAX function, runs `fold_constants` and `dce`, compares the ops left (and the
folded values) with the expected ones, and runs the result against the original under jax.jit on
inputs with NaN, ±Inf and ±0: folded values are XLA's own folding of the same expressions, so the
bits must be identical.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import graphopt
from graphopt import _jax_compat as compat
from graphopt.pipeline import run_pipeline
from graphopt.testing import assert_equivalent

F32 = np.float32
X = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1.5, -2.0, 3.0], F32)
I32 = np.array([-2**31, -7, -1, 0, 1, 2**31 - 1, 5, 9], np.int32)


def folded(fn, *args, spec="fold_constants"):
    """(graph after the pass + dce, what the pass fired); asserts fn's results, bit for bit."""
    graph = graphopt.trace(fn, *args)
    result = run_pipeline(graph, [spec, "dce"], debug=True)
    assert_equivalent(jax.jit(graphopt.lower(result.graph))(*args), jax.jit(fn)(*args), exact=True)
    return result.graph, result.report.records[0]


def ops(graph):
    return [n.op.name for n in graph.nodes]


def made_constants(graph):
    """Constants made by the pass, as (value, type)."""
    return [(n.params["value"], n.output.type) for n in graph.walk()
            if n.op.name == "constant" and n.provenance.made_by == "fold_constants"]


def test_arange_arithmetic_folds_to_one_constant():
    graph, record = folded(lambda x: x + (jnp.arange(8) * 2 + 1), I32)
    assert ops(graph) == ["constant", "add"]
    ((value, type_),) = made_constants(graph)
    assert value.tolist() == [1, 3, 5, 7, 9, 11, 13, 15] and str(type_) == "i32[8]"
    assert record.fired == {"folded-node": 3, "dead-constant": 2}


def test_sqrt_of_a_python_scalar_folds_and_keeps_the_weak_type():
    graph, _ = folded(lambda x: x * jnp.sqrt(2.0), X)
    assert ops(graph) == ["constant", "mul"]
    ((value, type_),) = made_constants(graph)
    assert value.tobytes() == np.sqrt(F32(2.0)).tobytes()
    graph = graphopt.trace(lambda: jnp.sqrt(2.0))
    run_pipeline(graph, ["fold_constants", "dce"], debug=True)
    assert [str(v.type) for v in graph.outputs] == ["f32[]~"]  # still weakly typed


def test_negative_zero_nan_and_infinities_are_kept_bit_for_bit():
    def fn(x):
        zero = jnp.zeros((), F32)
        return x * -zero, x + jnp.log(-1.0 - zero), x - 1.0 / zero, x + -1.0 / zero

    graph, _ = folded(fn, X)
    values = [value for value, _ in made_constants(graph)]
    assert len(values) == 4 and all(v.dtype == F32 and v.shape == () for v in values)
    neg_zero, nan, inf, neg_inf = values
    assert neg_zero == 0 and np.signbit(neg_zero)
    assert np.isnan(nan) and inf == np.inf and neg_inf == -np.inf
    assert [n.op.name for n in graph.nodes if n.op.name != "constant"] == ["mul", "add", "sub", "add"]


def test_transcendentals_fold_to_the_bits_jit_gets():
    # XLA folds tanh/erf/exp of constants with its evaluator; eager kernels differ in the last bit.
    c = np.linspace(-4, 4, 64, dtype=F32)
    x = np.resize(X, 64)
    graph, _ = folded(lambda x: x * jnp.tanh(c) + jax.scipy.special.erf(c) - jnp.exp(c), x)
    assert ops(graph) == ["constant", "mul", "constant", "add", "constant", "sub"]


def test_equal_constant_expressions_become_one_constant_per_graph():
    c1 = np.linspace(-1, 1, 64, dtype=F32).reshape(8, 8)
    c2 = c1.copy()

    def fn(xs):
        inner = lax.scan(lambda c, x: (c + x * jnp.tanh(F32(0.5)), c), np.zeros(8, F32), xs)[0]
        return xs * jnp.tanh(c1) + xs * jnp.tanh(c2) + inner * jnp.tanh(F32(0.5))

    graph, _ = folded(fn, np.resize(X, (8, 8)))
    # Outside: tanh(c1) = tanh(c2) is one constant, and tanh(0.5); inside the scan body, its own.
    top = [n for n in graph.nodes if n.provenance.made_by == "fold_constants"]
    assert [(str(n.output.type), len(n.output.users())) for n in top] == [("f32[8,8]", 2), ("f32[]", 1)]
    (scan,) = [n for n in graph.nodes if n.op.name == "scan"]
    assert [str(n.output.type) for n in scan.regions[0].nodes
            if n.provenance.made_by == "fold_constants"] == ["f32[]"]


def test_broadcast_of_a_scalar_to_a_large_shape_is_not_folded():
    graph, record = folded(lambda x: x + jnp.broadcast_to(F32(1.5), (1024, 1024)),
                           np.ones((1024, 1024), F32))
    assert ops(graph) == ["constant", "broadcast_in_dim", "add"]
    assert record.fired == {"kept-lazy": 1}


def test_broadcast_read_by_nodes_that_stay_is_kept_with_its_input_folded():
    graph, _ = folded(lambda x: x + jnp.full((8,), jnp.sqrt(F32(2.0))), X)
    assert ops(graph) == ["constant", "broadcast_in_dim", "add"]
    ((value, type_),) = made_constants(graph)
    assert str(type_) == "f32[]"


def test_small_results_of_large_lazy_constants_fold():
    graph, _ = folded(lambda x: x + jnp.arange(100_000).sum(), I32)
    assert ops(graph) == ["constant", "add"]
    ((value, _),) = made_constants(graph)
    assert value == np.arange(100_000, dtype=np.int32).sum(dtype=np.int32)


def test_max_bytes_option_limits_what_folds():
    graph, record = folded(lambda x: x + (jnp.arange(8) * 2 + 1), I32,
                           spec="fold_constants(max_bytes=16)")
    assert ops(graph) == ["iota", "constant", "mul", "constant", "add", "add"]
    assert record.fired == {"kept-lazy": 3}


def test_constants_inside_a_scan_body_fold_within_the_body():
    def body(carry, v):
        return carry * jnp.sqrt(F32(3.0)) + v * (jnp.arange(8.0)[3] + 1), carry

    graph, _ = folded(lambda xs: lax.scan(body, F32(1.0), xs), X)
    (scan,) = [n for n in graph.nodes if n.op.name == "scan"]
    assert ops(scan.regions[0]) == ["constant", "mul", "constant", "mul", "add"]
    sqrt3, four = [value.item() for value, _ in made_constants(graph)]
    assert sqrt3 == np.sqrt(F32(3.0)) and four == 4.0


def test_effects_stateful_rng_and_barriers_are_not_folded():
    calls = []

    def fn(x):
        c = jnp.sin(jnp.float32(1.0))
        jax.debug.callback(lambda v: calls.append(v), c)
        u = lax.rng_uniform(F32(0.0), F32(1.0), (2,))
        b = lax.optimization_barrier(jnp.cos(F32(0.5)))
        return x * u[0] + b

    graph = graphopt.trace(fn, X)
    run_pipeline(graph, ["fold_constants", "dce"], debug=True)
    assert [op for op in ops(graph) if op != "constant"] == [
        "debug_callback", "rng_uniform", "optimization_barrier", "slice", "squeeze", "mul", "add"]
    # What they read folds: sin(1.0) and cos(0.5) are constants now.
    np.testing.assert_allclose([v for v, _ in made_constants(graph)], [np.sin(1.0), np.cos(0.5)], 1e-6)
    jax.block_until_ready(jax.jit(graphopt.lower(graph))(X))
    assert len(calls) == 1


def test_random_numbers_from_a_constant_key_fold_without_key_constants():
    graph, _ = folded(lambda x: x * jax.random.normal(jax.random.key(0), (8,)), X)
    assert ops(graph) == ["constant", "mul"]


def test_folds_when_the_pass_runs_under_an_outer_jit():
    optimized = graphopt.optimize(lambda x: x * jnp.tanh(jnp.arange(8.0)), pipeline=["fold_constants"])
    actual = jax.jit(optimized)(X)
    assert ops(optimized.graph) == ["constant", "mul"]
    assert_equivalent(actual, jax.jit(lambda x: x * jnp.tanh(jnp.arange(8.0)))(X), exact=True)


def test_a_node_jax_refuses_to_bind_is_left_and_the_rest_folds(monkeypatch):
    bind = compat.bind

    def picky_bind(primitive, args, params):
        if primitive is lax.sin_p:
            raise ValueError("no sin today")
        return bind(primitive, args, params)

    monkeypatch.setattr(compat, "bind", picky_bind)
    monkeypatch.setattr(importlib.import_module("graphopt.passes.fold_constants"), "_PROGRAMS", {})
    graph = graphopt.trace(lambda x: x + jnp.sin(F32(1.0)) * jnp.cos(F32(2.0)), X)
    record = run_pipeline(graph, ["fold_constants", "dce"], debug=True).report.records[0]
    assert ops(graph) == ["constant", "sin", "constant", "mul", "add"]
    assert "no sin today" in record.notes[0]


@pytest.fixture(scope="module")
def demo():
    from graphopt.demo import DemoConfig, Transformer

    config = DemoConfig(layers=2, seq=16)
    model = Transformer(config)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (config.batch, config.seq), 0, config.vocab)
    # Weights from numpy, not model.init: init compiles every op it runs, which takes seconds.
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), shapes)
    return model, variables, tokens


def test_fold_constants_and_cse_shrink_the_demo_transformer_and_keep_its_bits(demo):
    model, variables, tokens = demo
    graph = graphopt.trace(model.apply, variables, tokens)
    before = sum(1 for _ in graph.walk())
    records = run_pipeline(graph, ["fold_constants", "cse", "dce"], debug=True).report.records
    fold, cse, _ = (r.fired for r in records)
    assert fold["folded-node"] > 0 and cse["merged-node"] > 0
    masks = [type_ for _, type_ in made_constants(graph) if type_.dtype == bool]
    assert len(masks) == 1  # one causal mask for all layers, their broadcasts of it merged
    assert sum(1 for _ in graph.walk()) < before
    assert_equivalent(jax.jit(graphopt.lower(graph))(variables, tokens),
                      jax.jit(model.apply)(variables, tokens), exact=True)


def test_an_equal_constant_program_is_evaluated_once_per_process(monkeypatch):
    fc = importlib.import_module("graphopt.passes.fold_constants")
    runs = []
    real = fc._run_program
    monkeypatch.setattr(fc, "_run_program", lambda *a: runs.append(1) or real(*a))
    monkeypatch.setattr(fc, "_PROGRAMS", {})

    def model(scale):
        return lambda x: x * jnp.sqrt(jnp.arange(4.0) + scale)

    folded = []
    for scale in (1.0, 1.0, 2.0):  # two equal programs (different graphs), then another
        g = run_pipeline(graphopt.trace(model(scale), jnp.ones(4)), ["fold_constants"]).graph
        (constant,) = [n for n in g.nodes if n.op.name == "constant"]
        folded.append(constant.params["value"])
    assert len(runs) == 2
    assert folded[0] is folded[1] and not folded[0].flags.writeable
    np.testing.assert_array_equal(folded[2], np.sqrt(np.arange(4.0, dtype=np.float32) + 2))

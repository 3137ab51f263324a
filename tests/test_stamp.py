"""graphopt.stamp: the layerwise passes run on three layers and the result is copied to the others.
The stamped graph must be the very graph the passes make of the whole one (printed text equal:
the same nodes in the same order, with each layer's own parameters and module paths), with the
same report; where the passes did not treat the layers alike, they run on the whole graph."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt.ops import primitive_named
from graphopt.pipeline import PASSES, register_pass, run_pipeline


def _residual_mlp():
    def net(ws, x):
        for w in ws:
            x = jnp.tanh((x @ w) * 1.0) / 2.0 + x
        return x

    ws = [jax.random.normal(jax.random.PRNGKey(i), (8, 8)) for i in range(12)]
    return graphopt.trace(net, ws, jnp.ones((2, 8)), params_argnums=0)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4)(h, h, mask=mask)
        return x + nn.Dense(32)(nn.gelu(nn.Dense(64)(nn.LayerNorm()(x))))


class _Decoder(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(50, 32)(tokens)
        mask = nn.make_causal_mask(tokens)  # made once, read by every layer
        for i in range(10):
            x = _Block(name=f"layers_{i}")(x, mask)
        return nn.LayerNorm()(x)


class _ConvBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        # A residual block of two alike halves (its ops recur every half a block), and relu is a
        # custom_jvp call: a region with its own derivative rule in every layer.
        y = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3))(x)))
        y = nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3))(y))
        return nn.relu(x + y)


class _Cnn(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3))(x)
        for i in range(10):
            x = _ConvBlock(name=f"blocks_{i}")(x)
        return x.mean((1, 2))


def _linen(model, x):
    variables = model.init(jax.random.PRNGKey(0), x)
    return graphopt.trace(model.apply, variables, x, params_argnums=0)


MODELS = {
    "residual_mlp": _residual_mlp,
    "linen_decoder": lambda: _linen(_Decoder(), jnp.zeros((2, 16), jnp.int32)),
    "linen_cnn_batchnorm": lambda: _linen(_Cnn(), jnp.ones((2, 8, 8, 3))),
}


def _both(graph, pipeline="default"):
    plain = run_pipeline(graph.clone()[0], pipeline, stamp_min_nodes=None, debug=True)
    stamped = run_pipeline(graph.clone()[0], pipeline, stamp_min_nodes=0, debug=True)
    return plain, stamped


def _rows(report):
    return [(r.name, r.nodes, r.flops, r.bytes, dict(r.fired)) for r in report.records if r.name != "stamp_layers"]


@pytest.mark.parametrize("name", MODELS)
def test_stamped_graph_and_report_are_those_of_the_whole_graph(name):
    graph = MODELS[name]()
    plain, stamped = _both(graph)
    stamp = [r for r in stamped.report.records if r.name == "stamp_layers"]
    assert len(stamp) == 1 and stamp[0].fired["stamped-layer"] >= 6
    assert stamp[0].nodes[0] == stamp[0].nodes[1]  # the count the rows predict is the count made
    assert str(stamped.graph) == str(plain.graph)
    assert _rows(stamped.report) == _rows(plain.report)


def test_each_copy_has_its_layers_parameters_and_module_path():
    graph = MODELS["linen_decoder"]()
    _, stamped = _both(graph)
    attention = [n for n in stamped.graph.nodes if n.op.name == "attention"]
    assert [n.provenance.module_path.split("/")[1] for n in attention] == [f"layers_{i}" for i in range(10)]
    params = [{a.path for v in n.inputs for a in [v] if v.node is None and a.role == "param"}
              for n in stamped.graph.nodes if n.op.name == "linear"]
    assert len({frozenset(p) for p in params}) == len(params)  # no two linears read the same weights


def test_stamped_program_computes_what_the_model_does():
    model = _Decoder()
    tokens = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 50
    variables = model.init(jax.random.PRNGKey(0), tokens)
    graph = graphopt.trace(model.apply, variables, tokens, params_argnums=0)
    result = run_pipeline(graph, "default", stamp_min_nodes=0)
    assert any(r.name == "stamp_layers" for r in result.report.records)
    from graphopt.param_prep import prepare

    got = graphopt.lower(result.graph)(*prepare(result.graph, variables, tokens))
    np.testing.assert_allclose(got, model.apply(variables, tokens), rtol=2e-5, atol=2e-5)


def _scaled_tanh(scale):
    """tanh with a false derivative, scale times the input's tangent: every layer computes alike,
    but a layer given another layer's derivative rule shows in the gradient."""
    @jax.custom_jvp
    def act(x):
        return jnp.tanh(x)

    act.defjvp(lambda primals, tangents: (jnp.tanh(primals[0]), scale * tangents[0]))
    return act


def test_each_copy_keeps_its_layers_derivative_rule():
    activations = [_scaled_tanh(float(i + 1)) for i in range(12)]

    def net(ws, x):
        for w, act in zip(ws, activations):
            x = act(x @ w) + x
        return x.sum()

    ws = [jax.random.normal(jax.random.PRNGKey(i), (8, 8)) * 0.1 for i in range(12)]
    x = jnp.linspace(-1.0, 1.0, 16).reshape(2, 8)
    graph = graphopt.trace(net, ws, x, params_argnums=0)
    plain, stamped = _both(graph, ["canonicalize", "cse", "dce"])
    assert any(r.name == "stamp_layers" for r in stamped.report.records)
    assert str(stamped.graph) == str(plain.graph)
    gradient = jax.grad(graphopt.lower(stamped.graph), argnums=(0, 1))(ws, x)
    expected = jax.grad(net, argnums=(0, 1))(ws, x)
    for got, want in zip(jax.tree.leaves(gradient), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_graph_given_is_left_as_it_was():
    graph = _residual_mlp()
    before = str(graph)
    result = run_pipeline(graph, ["canonicalize", "cse"], stamp_min_nodes=0)
    assert any(r.name == "stamp_layers" for r in result.report.records)
    assert str(graph) == before and result.graph is not graph


@pytest.fixture
def every_other_tanh():
    """A pass that says it is layerwise but is not: it rewrites every other tanh node
    (tanh(x) → neg(neg(tanh(x)))), so neighbouring layers come out unlike."""
    neg = primitive_named("neg")

    @register_pass("test_every_other_tanh", layerwise=True)
    def every_other_tanh(graph, ctx):
        for node in [n for n in graph.nodes if n.op.name == "tanh"][::2]:
            readers = list(node.output.uses)
            once = graph.add_node(neg, [node.output], after=node)
            twice = graph.add_node(neg, [once.output], after=once)
            for reader, i in readers:
                reader.set_input(i, twice.output)
            ctx.count({"rewritten": 1})
        return graph

    yield "test_every_other_tanh"
    del PASSES["test_every_other_tanh"]


def test_passes_that_treat_layers_unlike_run_on_the_whole_graph(every_other_tanh):
    graph = _residual_mlp()
    plain, stamped = _both(graph, [every_other_tanh, "dce"])
    assert not any(r.name == "stamp_layers" for r in stamped.report.records)
    assert str(stamped.graph) == str(plain.graph)
    assert stamped.report.records[0].fired["rewritten"] == 6


def test_small_graphs_and_validated_runs_are_not_stamped():
    graph = _residual_mlp()  # 60-odd nodes, under the default threshold
    assert not any(r.name == "stamp_layers" for r in run_pipeline(graph.clone()[0], ["cse"]).report.records)
    from graphopt.validate import Validator

    validated = run_pipeline(graph.clone()[0], ["cse"], validator=Validator(), stamp_min_nodes=0)
    assert [r.name for r in validated.report.records] == ["cse"]

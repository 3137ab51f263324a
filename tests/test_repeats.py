"""graphopt.repeats: the unrolled layers of a traced model, found exactly: which nodes each instance
holds, which parameters it reads, what it passes on; and where a run of alike layers ends."""

import jax
import jax.numpy as jnp

import graphopt
from graphopt.repeats import find_repeat

W = jnp.ones((4, 4))
X = jnp.ones((2, 4))


def _residual(ws, x, shifts=None):
    for i, w in enumerate(ws):
        x = jnp.tanh(x @ w) + x
        if shifts is not None:
            x = x + shifts[i]
    return x


def _trace(fn, layers=10):
    return graphopt.trace(fn, [W] * layers, X, params_argnums=0)


def test_finds_every_layer_with_its_parameters_and_what_it_passes_on():
    r = find_repeat(_trace(_residual))
    assert (r.start, r.period, r.count) == (0, 3, 10)
    assert [[a.path for a in params] for params in r.params] == [[str(i)] for i in range(10)]
    assert [n.op.name for n in r.instance(4)] == ["dot_general", "tanh", "add"]
    assert r.exits == [(2, 0)]  # the residual stream, read by the next layer and returned by the last


def test_the_first_layer_counts_though_it_reads_the_graph_input():
    g = _trace(lambda ws, x: _residual(ws, jnp.sin(x)))
    r = find_repeat(g)
    assert (r.start, r.count) == (1, 10)
    assert r.instance(0)[0].inputs[0].node.op.name == "sin"


def test_a_layer_with_another_constant_ends_the_run_and_minus_zero_is_another_constant():
    shifts = [0.0] * 12
    shifts[7] = -0.0  # x + -0.0 keeps -0 where x + 0.0 gives +0: not the same layer
    g = _trace(lambda ws, x: _residual(ws, x, shifts), layers=12)
    r = find_repeat(g)
    layers = {int(a.path) for params in r.params for a in params}
    # layers 1-6: layer 0 also holds the node of the literal 0.0, which the others read from it
    assert layers == set(range(1, 7))


def test_tied_weights_map_to_themselves():
    g = graphopt.trace(lambda w, x: _residual([w] * 9, x), W, X, params_argnums=0)
    r = find_repeat(g)
    assert r.count == 9 and all(params == r.params[0] for params in r.params)


def test_a_suffix_reading_an_earlier_layer_is_not_a_repeat():
    def keeps_layer_three(ws, x):
        outputs = []
        for w in ws:
            x = jnp.tanh(x @ w) + x
            outputs.append(x)
        return x + outputs[3]

    assert find_repeat(_trace(keeps_layer_three)) is None


def test_too_few_layers_or_none_at_all():
    assert find_repeat(_trace(_residual, layers=3)) is None
    assert find_repeat(graphopt.trace(lambda x: jnp.sin(x) * jnp.cos(x) + 1.0, X)) is None


def test_a_mask_made_once_is_read_by_every_layer_as_the_same_value():
    def masked(ws, x):
        mask = jnp.tril(jnp.ones((4, 4), bool))
        for w in ws:
            x = jnp.tanh(x @ jnp.where(mask, w, 0.0)) + x
        return x

    r = find_repeat(_trace(masked))
    assert r.count == 10
    masks = {id(n.inputs[0]) for k in range(r.count) for n in r.instance(k) if n.op.name == "select_n"}
    assert len(masks) == 1  # the one mask, outside every layer


def test_layers_holding_regions_repeat_when_their_regions_compute_alike():
    def clipped(bounds):
        def net(ws, x):
            for w, bound in zip(ws, bounds):
                x = jax.nn.relu(x @ w) + jax.checkpoint(lambda y, b=bound: jnp.minimum(y, b))(x)
            return x
        return net

    r = find_repeat(_trace(clipped([1.0] * 10)))  # relu: custom_jvp; checkpoint: remat
    assert (r.start, r.count) == (0, 10)
    assert [n.op.name for n in r.instance(3) if n.regions] == ["custom_jvp_call", "remat"]
    bounds = [1.0] * 10
    bounds[6] = 2.0  # the remat region of layer 6 computes another thing: the run stops there
    r = find_repeat(_trace(clipped(bounds)))
    assert {int(a.path) for params in r.params for a in params} == set(range(6))

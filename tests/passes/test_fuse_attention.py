"""fuse_attention: decisions by (injected, deterministic) timings, the static table, the cache,
and the lowered graph against the original within the contract bound, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt import nn_ops
from graphopt.ir import Graph
from graphopt.passes import fuse_attention as fa
from graphopt.pipeline import PASSES, PassSpec, run_pipeline
from graphopt.types import TensorType
from graphopt.validate import compare


def handwritten(q, k, v, mask):
    """Causal attention as a model writes it (BTNH, GQA by repeating kv heads, -1e9 fill)."""
    k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) / float(np.sqrt(q.shape[-1]))
    keep = jnp.logical_and(mask, jnp.tril(jnp.ones(scores.shape[-2:], bool)))
    scores = jnp.where(keep, scores, -1e9)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), v)


def inputs(t=6, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((2, t, 4, 8)), np.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, t, 2, 8)), np.float32) for _ in range(2))
    mask = jnp.asarray(rng.random((2, 1, t, t)) < 0.8)
    return [q, k, v, mask]


def attention_graph(arrays, count=1):
    """`count` attention nodes over the same inputs, each holding `handwritten` as decomposition."""
    g = Graph()
    q, k, v, mask = (g.add_input(TensorType(a.shape, a.dtype)) for a in arrays)
    region_types = [x.type for x in (q, k, v, mask)]
    outs = [nn_ops.attention_node(g, q, k, v, mask=mask, is_causal=True, mask_value=-1e9,
                                  decomposition=nn_ops.decomposition(handwritten, region_types))
            for _ in range(count)]
    g.set_outputs(outs)
    g.verify()
    return g


def run_pass(g, **options):
    result = run_pipeline(g, [PassSpec("fuse_attention", options=options)], debug=True)
    return result.graph, result.report.records[0]


def implementations_of(g):
    return [n.params["implementation"] for n in g.walk() if n.op.name == "attention"]


class FakeTimer:
    def __init__(self, times):
        self.times, self.calls = times, []

    def __call__(self, node, names):
        self.calls.extend(names)
        return {name: self.times[name] for name in names}


@pytest.mark.parametrize("times, expected", [
    ({None: (1.0, 100 << 20), "xla": (1.03, 40 << 20)}, "xla"),  # as fast within 5%, under half the memory
    ({None: (1.0, 100 << 20), "xla": (1.03, 60 << 20)}, None),   # not half
    ({None: (1.0, 100 << 20), "xla": (1.2, 10 << 20)}, None),    # slower than noise: never, whatever it saves
    ({None: (1.0, None), "xla": (1.0, 10 << 20)}, None),         # the decomposition's memory unknown
])
def test_memory_decides_between_kernels_as_fast_as_the_decomposition(times, expected):
    g, record = run_pass(attention_graph(inputs()), timer=FakeTimer(times))
    assert implementations_of(g) == [expected]
    if expected:
        assert any("-> xla (as fast within 5%; temporaries 40 MiB instead of 100 MiB)" in note
                   for note in record.notes), record.notes


def test_layers_sharing_one_mask_are_measured_once():
    # After cse both layers read one causal mask; outlining copies it into the first layer's
    # decomposition (the second still reads it) and moves it into the last one's, so the two
    # regions list the same ops in another order. Same attention: one measurement.
    def two_layers(x):
        for _ in range(2):
            s = jnp.einsum("btnh,bsnh->bnts", x, x) / 8.0
            s = jnp.where(jnp.tril(jnp.ones((6, 6), bool)), s, -1e9)
            x = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), x)
        return x

    g = graphopt.trace(two_layers, jnp.ones((1, 6, 2, 8)))
    g = run_pipeline(g, ["canonicalize", "cse", "raise_ops"]).graph
    assert len([n for n in g.nodes if n.op.name == "attention"]) == 2
    timer = FakeTimer({None: 1.0, "xla": 0.5})
    g, record = run_pass(g, timer=timer)
    assert timer.calls == [None, "xla"] and implementations_of(g) == ["xla", "xla"]


@pytest.mark.parametrize("xla_time, expected", [
    (0.5, "xla"),    # clearly faster: taken
    (0.97, None),    # within the 5% margin: noise, the decomposition stays
    (2.0, None),     # slower: never taken
])
def test_measured_choice(xla_time, expected):
    g = attention_graph(inputs(), count=2)
    timer = FakeTimer({None: 1.0, "xla": xla_time})
    g, record = run_pass(g, timer=timer)
    assert implementations_of(g) == [expected, expected]
    assert timer.calls == [None, "xla"]  # two identical nodes: measured once
    assert record.fired == {f"fuse_attention/{expected or 'decomposition'}": 2}
    assert any(f"-> {expected or 'decomposition'}" in note and "decomposition 1e+03 ms" in note
               for note in record.notes), record.notes
    assert all(len(n.regions) == 1 for n in g.nodes if n.op.name == "attention")  # kept


def test_a_kernel_that_fails_to_compile_is_skipped():
    def timer(node, names):
        return {name: NotImplementedError("no such shape") if name == "xla" else 1.0 for name in names}

    g, record = run_pass(attention_graph(inputs()), timer=timer)
    assert implementations_of(g) == [None]
    assert any("xla failed to compile, skipped: NotImplementedError" in n for n in record.notes)


def test_static_choice_never_picks_xla_on_cpu_and_cudnn_on_gpu():
    g, record = run_pass(attention_graph(inputs()), measure=False)
    assert implementations_of(g) == [None]
    # cuDNN takes f16/bf16 with head dim <= 128: an f32 node stays, a bf16 one is lowered to cudnn.
    g, record = run_pass(attention_graph(inputs()), backend="gpu")
    assert implementations_of(g) == [None]
    assert any("cudnn not supported: dtype f32" in n for n in record.notes)
    assert any("cannot measure for backend 'gpu'" in n for n in record.notes)
    bf16 = [a.astype(jnp.bfloat16) if a.dtype == np.float32 else a for a in inputs()]
    g, _ = run_pass(attention_graph(bf16), backend="gpu")
    assert implementations_of(g) == ["cudnn"]


def test_nodes_already_lowered_are_left_alone():
    g = attention_graph(inputs())
    g, _ = run_pass(g, timer=FakeTimer({None: 1.0, "xla": 0.1}))
    timer = FakeTimer({None: 1.0, "xla": 0.1})
    g, record = run_pass(g, timer=timer)
    assert implementations_of(g) == ["xla"] and timer.calls == [] and not record.fired


def test_measurements_are_cached_per_shape(monkeypatch):
    calls = []
    monkeypatch.setattr(fa.implementations, "measure", lambda node, names, repeats, temp_bytes: calls.extend(names)
                        or {name: 2.0 if name is None else 1.0 for name in names})
    monkeypatch.setattr(fa, "_MEASURED", {})
    run_pass(attention_graph(inputs()))
    run_pass(attention_graph(inputs()))
    assert calls == [None, "xla"]  # the second graph's node has the same key
    run_pass(attention_graph(inputs(t=5)))
    assert calls == [None, "xla", None, "xla"]


class Measured:
    """The real timer, recording what it measured."""

    def __call__(self, node, names):
        self.times = fa.implementations.measure(node, names, repeats=3)
        return self.times


@pytest.mark.parametrize("timer", [FakeTimer({None: 1.0, "xla": 0.5}), Measured()], ids=["xla", "measured"])
def test_lowered_graph_matches_the_original_within_the_bound(timer):
    arrays = inputs()
    g = attention_graph(arrays)
    before = jax.jit(graphopt.lower(g.clone()[0]).flat)
    after_graph, record = run_pass(g, timer=timer)
    after = jax.jit(graphopt.lower(after_graph).flat)
    result = compare(after(*arrays), before(*arrays), PASSES["fuse_attention"].contract)
    assert result.problem is None, result.problem
    if isinstance(timer, Measured):  # real timings on this machine: a kernel only if 5% faster
        (chosen,) = implementations_of(after_graph)
        faster = timer.times["xla"] < 0.95 * timer.times[None]
        assert chosen == ("xla" if faster else None), (timer.times, record.notes)

    def loss(f):
        return jax.jit(jax.grad(lambda q, k, v, m: (f(q, k, v, m)[0] ** 2).sum(), argnums=(0, 1, 2)))

    grads = compare(jax.tree.leaves(loss(graphopt.lower(after_graph).flat)(*arrays)),
                    jax.tree.leaves(loss(graphopt.lower(attention_graph(arrays)).flat)(*arrays)),
                    PASSES["fuse_attention"].contract)
    assert grads.problem is None, grads.problem


def test_fully_masked_rows_keep_their_values():
    arrays = inputs()
    arrays[3] = arrays[3].at[0, 0, 2].set(False)  # row 2 of batch 0 sees no key
    g = attention_graph(arrays)
    expected = jax.jit(graphopt.lower(g.clone()[0]).flat)(*arrays)
    g, _ = run_pass(g, timer=FakeTimer({None: 1.0, "xla": 0.5}))
    assert implementations_of(g) == ["xla"]
    actual = jax.jit(graphopt.lower(g).flat)(*arrays)
    assert compare(actual, expected, PASSES["fuse_attention"].contract).problem is None


@pytest.mark.skipif("raise_ops" not in PASSES, reason="needs the raise_ops pass")
@pytest.mark.parametrize("model", ["flax", "dot_product_attention"])
def test_raised_attention_through_the_kernel_matches_the_model(model):
    import flax.linen as nn

    from graphopt.frameworks import adapt

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, 16))
    if model == "flax":
        layer = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)
        variables = layer.init(jax.random.PRNGKey(1), x, x)
        mask = nn.make_attention_mask(jnp.arange(10) < jnp.array([[10], [3]]), jnp.arange(10) < 7)
        mask = mask.at[1, 0, 2].set(False)  # a fully masked row, filled with finfo.min by flax
        fn, args = (lambda v, x, m: layer.apply(v, x, x, mask=m)), (variables, x, mask)
    else:
        q, k, v = (jax.random.normal(jax.random.PRNGKey(i), s) for i, s in
                   enumerate([(2, 8, 4, 16), (2, 8, 2, 16), (2, 8, 2, 16)]))
        fn, args = (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)), (q, k, v)
    g = graphopt.trace(fn, *args)
    before = g.clone()[0]
    timer = FakeTimer({None: 1.0, "xla": 0.5})
    after = run_pipeline(g, ["canonicalize", "cse", "raise_ops", PassSpec("fuse_attention", options={"timer": timer})],
                         debug=True).graph
    assert implementations_of(after) == ["xla"]
    flat = adapt(fn, args, None).args
    contract = PASSES["fuse_attention"].contract
    result = compare(jax.tree.leaves(jax.jit(graphopt.lower(after))(*flat)),
                     jax.tree.leaves(jax.jit(fn)(*args)), contract)
    assert result.problem is None, result.problem
    # All gradients as one vector: some are exactly 0 in exact arithmetic (the key bias: softmax
    # ignores a per-row constant), rounding noise on both sides, meaningless relative to itself.
    loss = lambda f: jax.jit(lambda *a: jnp.concatenate([g.ravel() for g in jax.tree.leaves(
        jax.grad(lambda *a: (jax.tree.leaves(f(*a))[0] ** 2).sum())(*a))]))
    grads = compare([loss(graphopt.lower(after))(*flat)], [loss(graphopt.lower(before))(*flat)], contract)
    assert grads.problem is None and grads.error < 1e-5, grads

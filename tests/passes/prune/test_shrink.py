"""shrink: the pruned graph computes the masked reference, on every architecture pruning supports.

Each case traces a model (plain JAX, Flax linen, Flax nnx, Equinox), analyzes its channel
dependencies, removes a random part of every prunable group and compares the shrunk graph on the
sliced parameters with `masked_graph` (the unpruned graph with those channels zeroed at their
exits) on the full ones. Then: gradients through the lowered shrunk graph, requests that cannot be
carried out, and random MLP / convolution / attention stacks (hypothesis).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import graphopt
from graphopt.passes.prune.deps import PruneError, analyze
from graphopt.passes.prune.masked import masked_graph
from graphopt.passes.prune.shrink import shrink, take
from graphopt.testing import assert_equivalent
from prune_cases import B, C, CASES, T, assert_exact, attention, conv, linen_cnn, mlp, normal, prune, run_fast


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["half", "one"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_shrunk_graph_computes_the_masked_reference(name, keep):
    fn, args, params_argnums = CASES[name]()
    pruned = prune(fn, *args, keep=keep, params_argnums=params_argnums)
    assert pruned.deps.groups, "nothing to prune: the case tests nothing"
    assert pruned.slices, "no parameter shrank"
    assert_exact(pruned, rtol=2e-2 if name == "bf16_mlp" else 1e-4)


def test_shrunk_parameters_and_slices():
    fn, args, _ = mlp()
    pruned = prune(fn, *args, keep={"w1:1": [0, 5, 11], "w2:1": [6]}, params_argnums=0)
    shapes = {a.path: a.type.shape for a in pruned.graph.params()}
    assert shapes == {"b1": (3,), "b2": (1,), "w1": (C, 3), "w2": (3, 1), "w3": (1, 3)}
    paths = [a.path for a in pruned.graph.inputs]
    sliced = {paths[i]: [(axis, index.tolist()) for axis, index in s] for i, s in pruned.slices.items()}
    assert sliced == {"b1": [(0, [0, 5, 11])], "b2": [(0, [6])], "w1": [(1, [0, 5, 11])],
                      "w2": [(0, [0, 5, 11]), (1, [6])], "w3": [(0, [6])]}


def test_take_leaves_its_input_alone():
    w = np.arange(12.0).reshape(3, 4)
    assert take(w, [(0, np.array([2])), (1, np.array([0, 3]))]).tolist() == [[8.0, 11.0]]
    assert w.shape == (3, 4) and w[2, 0] == 8.0


def test_keeping_every_channel_changes_nothing():
    fn, args, _ = linen_cnn()
    graph = graphopt.trace(fn, *args)
    deps = analyze(graph)
    small, slices = shrink(deps, {g.name: np.arange(g.size) for g in deps.groups})
    assert slices == {}
    assert [n.op.name for n in small.nodes] == [n.op.name for n in graph.nodes]
    types = lambda g: [v.type for n in g.nodes for v in n.outputs]
    assert types(small) == types(graph)


def test_keep_is_sorted_and_deduplicated():
    fn, args, _ = mlp()
    deps = analyze(graphopt.trace(fn, *args, params_argnums=0))
    _, slices_a = shrink(deps, {"w1:1": [7, 2, 2, 9]})
    _, slices_b = shrink(deps, {"w1:1": np.array([2, 7, 9])})
    assert {i: [(axis, k.tolist()) for axis, k in s] for i, s in slices_a.items()} == \
           {i: [(axis, k.tolist()) for axis, k in s] for i, s in slices_b.items()}


def test_unpruned_parts_of_a_graph_with_a_scan_shrink_exactly():
    """A scan (no pruning rule) blocks what flows through it; the rest of the model still prunes
    and the loop is copied as it is."""
    p = {"w1": normal(0, (C, 6)), "w2": normal(1, (6, 3)), "u": normal(2, (3, 3), 0.5)}

    def fn(p, x):
        h = jax.nn.relu(x @ p["w1"]) @ p["w2"]
        carry, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ p["u"]), None), h, None, length=3)
        return carry

    pruned = prune(fn, p, normal(3, (B, C)), keep={"w1:1": [1, 4]}, params_argnums=0)
    assert [g.name for g in pruned.deps.groups] == ["w1:1"]
    assert "scan" in [n.op.name for n in pruned.graph.nodes]
    assert_exact(pruned)
    with pytest.raises(PruneError, match="scan has no pruning rule"):
        shrink(pruned.deps, {"u:1": [0]})


def test_an_opaque_op_and_an_effect_are_copied():
    """custom_linear_solve has no shape rule in graphopt (an opaque op) and debug.print an effect:
    pruning leaves both as they are."""
    p = {"w1": normal(0, (C, 6)), "w2": normal(1, (6, 3))}

    def fn(p, x):
        solved = jax.lax.custom_linear_solve(lambda v: 2.0 * v, x[0, :3], lambda mv, b: b / 2.0,
                                             symmetric=True)
        jax.debug.print("x sums to {}", x.sum())
        return jax.nn.relu(x @ p["w1"]) @ p["w2"] + solved

    pruned = prune(fn, p, normal(2, (B, C)), keep={"w1:1": [0, 2, 3]}, params_argnums=0)
    ops = {n.op.name: n for n in pruned.graph.nodes}
    assert ops["custom_linear_solve"].op.kind == "opaque"
    assert ops["debug_print"].effects
    assert_exact(pruned)


# --- gradients -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mlp", "checkpointed_mlp", "custom_jvp_exit", "linen_cnn", "linen_remat",
                                  "linen_transformer", "nnx_model"])
def test_gradients_through_the_shrunk_graph_are_the_masked_ones(name):
    """d loss / d kept parameter: the same through the lowered shrunk graph as through the masked
    reference (relu's custom_jvp call is inlined where its shapes change)."""
    fn, args, params_argnums = CASES[name]()
    pruned = prune(fn, *args, params_argnums=params_argnums)
    def calls(graph):  # the operand types of every custom-derivative call
        return {tuple(v.type for v in n.inputs) for n in graph.walk()
                if n.op.name in ("custom_jvp_call", "custom_vjp_call")}
    assert calls(pruned.graph) <= calls(pruned.deps.graph), "a call traced for other shapes is left"

    def gradients(graph, leaves):
        lowered = graphopt.lower(graph)
        params_at = graph.param_argnums[0]

        def loss(params, args):
            args = list(args)
            args[params_at] = params
            return sum(jnp.sum(jnp.square(out)) for out in jax.tree_util.tree_leaves(lowered(*args)))

        args = jax.tree_util.tree_unflatten(graph.in_tree, leaves)
        return jax.tree_util.tree_leaves(run_fast(jax.grad(loss), args[params_at], args))

    actual = gradients(pruned.graph, pruned.small_leaves)
    full = gradients(masked_graph(pruned.deps, pruned.keep), pruned.leaves)
    params = [a.index for a in pruned.graph.inputs if a.role == "param"]
    expected = [take(g, pruned.slices.get(i, [])) for i, g in zip(params, full)]
    for a, e, i in zip(actual, expected, params):
        scale = float(np.max(np.abs(e), initial=1.0))
        assert_equivalent(np.asarray(a), e, rtol=1e-4, atol=1e-4 * scale,
                          err_msg=pruned.graph.inputs[i].path)


# --- requests that cannot be carried out -----------------------------------------------------------

@pytest.fixture(scope="module")
def mlp_deps():
    fn, args, _ = mlp()
    return analyze(graphopt.trace(fn, *args, params_argnums=0))


@pytest.mark.parametrize("keep, message", [
    ({"w1:1": []}, r"would remove every channel of w1:1 \(12 channels; b1:0, w1:1, w2:0\); keep at least"),
    ({"w1:1": [3, 12]}, r"kept channels of w1:1 must lie in \[0, 12\), got \[3, 12\]"),
    ({"w1:1": [-1, 3]}, r"must lie in \[0, 12\), got \[-1, 3\]"),
    ({"w1:1": np.ones(12, bool)}, r"must be integer indices, got bool .*np.flatnonzero"),
    ({"w1:1": [0.0, 1.0]}, r"must be integer indices, got float64"),
    ({"w9:1": [0]}, r"no prunable group named 'w9:1'\. Prunable groups: w1:1, w2:1\."),
    ({"w3:1": [0]}, r"no prunable group named 'w3:1'\. It is blocked: w3:1: it reaches a model output\."),
    ({"w1:0": [0]}, r"It is blocked: w1:0: it comes from model input x\."),
])
def test_impossible_requests_are_errors_naming_the_group(mlp_deps, keep, message):
    with pytest.raises(PruneError, match=message):
        shrink(mlp_deps, keep)
    with pytest.raises(PruneError, match=message):  # the reference checks the same way
        masked_graph(mlp_deps, keep)


# --- random stacks (hypothesis) ------------------------------------------------------------------

EXAMPLES = max(5, settings().max_examples // 5)
ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jnp.tanh, "none": lambda h: h}


def _random_keep(data, deps) -> dict:
    return {g.name: data.draw(st.sets(st.integers(0, g.size - 1), min_size=1), g.name) for g in deps.groups}


def _check_random_keep(data, fn, args):
    graph = graphopt.trace(fn, *args, params_argnums=0)
    keep = _random_keep(data, analyze(graph))
    assert_exact(prune(fn, *args, keep=keep, params_argnums=0))


@settings(max_examples=EXAMPLES)
@given(widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       activations=st.lists(st.sampled_from(sorted(ACTIVATIONS)), min_size=3, max_size=3),
       bias=st.booleans(), residual=st.booleans(), data=st.data())
def test_random_mlp_stacks_prune_exactly(widths, activations, bias, residual, data):
    sizes = [4, *widths, 3]
    p = [{"w": normal(i, (a, b)), "b": normal(10 + i, (b,))}
         for i, (a, b) in enumerate(zip(sizes, sizes[1:]))]

    def fn(p, x):
        h = x
        for i, layer in enumerate(p):
            out = h @ layer["w"] + (layer["b"] if bias else 0)
            if i + 1 < len(p):
                out = ACTIVATIONS[activations[i]](out)
            h = h + out if residual and out.shape == h.shape else out
        return h
    _check_random_keep(data, fn, (p, normal(20, (B, 4))))


@settings(max_examples=EXAMPLES)
@given(channels=st.lists(st.integers(1, 5), min_size=1, max_size=3), kernel=st.sampled_from([1, 3]),
       depthwise=st.booleans(), pool=st.sampled_from(["none", "max", "avg"]), data=st.data())
def test_random_conv_stacks_prune_exactly(channels, kernel, depthwise, pool, data):
    sizes = [2, *channels]
    p = {"convs": [normal(i, (kernel, kernel, a, b)) for i, (a, b) in enumerate(zip(sizes, sizes[1:]))],
         "dw": normal(8, (3, 3, 1, sizes[-1])), "dense": normal(9, (sizes[-1] * 4, 3))}

    def fn(p, x):
        h = x
        for w in p["convs"]:
            h = jax.nn.relu(conv(h, w))
        if depthwise:
            h = jnp.tanh(conv(h, p["dw"], groups=h.shape[-1]))
        if pool != "none":
            window = jax.lax.max if pool == "max" else jax.lax.add
            init = -jnp.inf if pool == "max" else 0.0
            h = jax.lax.reduce_window(h, init, window, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        else:
            h = h[:, ::2, ::2, :]
        return h.reshape(h.shape[0], -1) @ p["dense"]
    _check_random_keep(data, fn, (p, normal(20, (2, 4, 4, 2))))


@settings(max_examples=EXAMPLES)
@given(kv_heads=st.integers(1, 3), group=st.integers(1, 2), head_size=st.integers(1, 3),
       qkv=st.sampled_from(["separate", "fused_slice", "fused_split"]), hidden=st.integers(1, 6),
       data=st.data())
def test_random_attention_stacks_prune_exactly(kv_heads, group, head_size, qkv, hidden, data):
    heads = kv_heads * group
    q_size, kv_size = heads * head_size, kv_heads * head_size
    p = {"wq": normal(0, (C, q_size)), "wk": normal(1, (C, kv_size)), "wv": normal(2, (C, kv_size)),
         "wqkv": normal(3, (C, q_size + 2 * kv_size)), "wo": normal(4, (q_size, C)),
         "w1": normal(5, (C, hidden)), "w2": normal(6, (hidden, C)), "out": normal(7, (C, 3))}

    def fn(p, x):
        if qkv == "separate":
            q, k, v = (x @ p[w] for w in ("wq", "wk", "wv"))
        elif qkv == "fused_slice":
            fused = x @ p["wqkv"]
            q, k, v = fused[..., :q_size], fused[..., q_size:q_size + kv_size], fused[..., q_size + kv_size:]
        else:
            q, k, v = jnp.split(x @ p["wqkv"], [q_size, q_size + kv_size], axis=-1)
        k, v = (jnp.repeat(a.reshape(B, T, kv_heads, head_size), group, axis=2) for a in (k, v))
        o = attention(q.reshape(B, T, heads, head_size), k, v, causal=True)
        h = x + o.reshape(B, T, q_size) @ p["wo"]
        h = h + jax.nn.relu(h @ p["w1"]) @ p["w2"]
        return h @ p["out"]
    _check_random_keep(data, fn, (p, normal(20, (B, T, C))))

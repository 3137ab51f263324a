import jax
import jax.numpy as jnp

import graphopt
from graphopt import cost
from graphopt.cost import graph_flops


def test_conv_flops():
    x = jnp.ones((1, 8, 8, 3))
    k = jnp.ones((3, 3, 3, 16))
    g = graphopt.trace(lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")), x, k)
    assert graph_flops(g) == (2 * (8 * 8 * 16) * (3 * 3 * 3), True)


def test_grouped_conv_flops():
    x = jnp.ones((1, 8, 8, 4))
    k = jnp.ones((3, 3, 2, 8))  # 2 groups: 2 input features per group
    g = graphopt.trace(lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2), x, k)
    assert graph_flops(g)[0] == 2 * (8 * 8 * 8) * (3 * 3 * 2)


def test_scan_multiplies_and_while_is_a_lower_bound():
    x = jnp.ones((10, 4))
    g = graphopt.trace(lambda x: jax.lax.scan(lambda c, v: (c + v, None), jnp.zeros(4), x)[0], x)
    assert graph_flops(g) == (40, True)
    g = graphopt.trace(lambda x: jax.lax.while_loop(lambda v: v.sum() < 10, lambda v: v * 2, x), x[0])
    flops, exact = graph_flops(g)
    assert not exact and flops == 4 + 4 + 1  # one body (mul) + one cond (reduce_sum, lt)


def _walked_stats(graph):
    """graph_stats the slow way: every node visited (what the running totals must equal)."""
    from graphopt.cost import ELEMENTWISE, plain_flops
    from graphopt.ops import CONSTANT

    def flops(g):
        total, exact = 0, True
        for node in g.nodes:
            if node.regions:
                counts = [flops(r) for r in node.regions]
                count, count_exact = cost._region_flops(node, counts)
            else:
                count, count_exact = plain_flops(node), node.op.kind != "opaque"
            total, exact = total + count, exact and count_exact
        return total, exact

    nodes = sum(1 for _ in graph.walk())
    constants = sum(n.output.type.nbytes for n in graph.walk() if n.op is CONSTANT)
    assert ELEMENTWISE  # the import is used
    return nodes, flops(graph)[0], cost.param_stats(graph)[1] + constants


def test_running_totals_match_a_full_walk_after_every_pass():
    from graphopt.pipeline import run_pipeline

    def layer(x, p):
        h = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)
        q, k, v = jnp.split(h @ p["qkv"], 3, axis=-1)
        probs = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / 4.0, axis=-1)
        h = x + jnp.einsum("bts,bsd->btd", probs, v) @ p["out"]
        return h + jax.nn.gelu(h @ p["up"] + 1.0) @ p["down"]

    def fn(params, x):
        x = layer(layer(x, params), params)
        return jax.lax.scan(lambda c, row: (c + jnp.tanh(row).sum(), None), 0.0, x[0])[0] + x

    rng = jax.random.split(jax.random.key(0), 4)
    params = {"qkv": jax.random.normal(rng[0], (16, 48)), "out": jax.random.normal(rng[1], (16, 16)),
              "up": jax.random.normal(rng[2], (16, 32)), "down": jax.random.normal(rng[3], (32, 16))}
    graph = graphopt.trace(fn, params, jnp.ones((2, 8, 16)), params_argnums=0)
    assert cost.graph_stats(graph) == _walked_stats(graph)
    for name in ("canonicalize", "fold_constants", "cse", "fold_batchnorm", "raise_ops",
                 "fuse_attention", "fold_params", "dce", "autocast"):
        graph = run_pipeline(graph, [name]).graph
        assert cost.graph_stats(graph) == _walked_stats(graph), name
        copy, _ = graph.clone()
        assert cost.graph_stats(copy) == _walked_stats(graph)
    assert any(n.regions for n in graph.nodes)  # the sweep went into regions

import jax
import jax.numpy as jnp

import graphopt
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

"""Which groups may lose every channel (a layer on a residual branch), and that removing them is exact."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt.lowering.emit import evaluate
from graphopt.passes.prune.deps import PruneError, analyze
from graphopt.passes.prune.masked import masked_graph
from graphopt.passes.prune.residual import removable_groups
from graphopt.passes.prune.shrink import shrink, take


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4, name="attn")(h, h)
        h = nn.Dense(64, name="up")(nn.LayerNorm()(x))
        return x + nn.Dense(16, name="down")(nn.gelu(h)) * 0.5


@pytest.fixture(scope="module")
def block():
    model, x = Block(), jax.random.normal(jax.random.key(1), (2, 8, 16))
    variables = model.init(jax.random.key(0), x)
    deps = analyze(graphopt.trace(model.apply, variables, x, params_argnums=0))
    return model, variables, x, deps


def test_residual_branches_are_removable_and_attention_scores_are_not(block):
    _, _, _, deps = block
    removable = {g.name for g in deps.groups if g.removable}
    assert removable == removable_groups(deps)
    assert removable == {"params/up/kernel:1", "params/attn/key/kernel:1", "params/attn/value/kernel:2"}
    # the query/key head dimension feeds the softmax: emptied, attention would be uniform, not gone
    assert "params/attn/key/kernel:2" in {g.name for g in deps.groups}


def test_removing_whole_layers_is_exact(block):
    model, variables, x, deps = block
    keep = {"params/up/kernel:1": [], "params/attn/key/kernel:1": []}
    small, slices = shrink(deps, keep)
    leaves = jax.tree_util.tree_leaves((variables, x))
    out = evaluate(small, [take(leaf, slices[i]) if i in slices else leaf for i, leaf in enumerate(leaves)])[0]
    zeroed = jax.tree.map(np.array, variables)
    zeroed["params"]["down"]["kernel"][:] = 0
    zeroed["params"]["attn"]["out"]["kernel"][:] = 0
    np.testing.assert_allclose(out, model.apply(zeroed, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, evaluate(masked_graph(deps, keep), leaves)[0], rtol=1e-6, atol=1e-6)
    assert graphopt.cost.graph_flops(small)[0] < 0.2 * graphopt.cost.graph_flops(deps.graph)[0]


def test_a_layer_without_a_skip_connection_keeps_a_channel():
    p = {"up": jnp.ones((4, 8)), "down": jnp.ones((8, 4)), "out": jnp.ones((4, 2))}
    fn = lambda p, x: jnp.tanh(jax.nn.relu(x @ p["up"]) @ p["down"]) @ p["out"]  # noqa: E731
    deps = analyze(graphopt.trace(fn, p, jnp.ones((2, 4)), params_argnums=0))
    assert not any(g.removable for g in deps.groups)
    with pytest.raises(PruneError, match="only a layer on a residual branch can be removed whole"):
        shrink(deps, {"up:1": []})


def test_a_residual_that_depends_on_the_branch_is_not_a_skip():
    p = {"up": jnp.ones((4, 8)), "down": jnp.ones((8, 4))}

    def fn(p, x):
        y = jax.nn.relu(x @ p["up"]) @ p["down"]
        return jnp.sum(y + jnp.sin(y), axis=-1)

    deps = analyze(graphopt.trace(fn, p, jnp.ones((2, 4)), params_argnums=0))
    assert removable_groups(deps) == set()

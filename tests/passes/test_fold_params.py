"""fold_params: parameter-only work moves to the prep graph, once; results and gradients of the
rest are unchanged; the user's arrays are untouched; the size guard keeps expanding values lazy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import graphopt
from graphopt.pipeline import run_pipeline
from graphopt.testing import assert_equivalent


FREE_LAYOUT = {"reshape", "squeeze", "expand_dims"}


def _weight_only_nodes(graph, *, free_layout: bool = False) -> int:
    """Nodes computed from parameters and constants only (some parameter among them; constants
    may be computed, 1/sqrt(8) say).

    `free_layout=False` leaves out reshapes of a parameter itself: XLA does those as a bitcast,
    for free, so fold_params keeps them in the graph; every other weight-only node does work.
    """
    derived = {id(a) for a in graph.params()}
    constant = set()  # values computed from constants only
    count = 0
    for node in graph.nodes:
        if all(id(v) in constant for v in node.inputs):
            constant.update(id(v) for v in node.outputs)
            continue
        inputs_ok = all(id(v) in derived or id(v) in constant for v in node.inputs)
        if inputs_ok and any(id(v) in derived for v in node.inputs):
            derived.update(id(v) for v in node.outputs)
            is_free = node.op.name in FREE_LAYOUT and all(v.node is None for v in node.inputs)
            count += free_layout or not is_free
    return count


class LoRADense(nn.Module):
    features: int
    rank: int = 2

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        a = self.param("lora_a", nn.initializers.normal(0.1), (x.shape[-1], self.rank))
        b = self.param("lora_b", nn.initializers.normal(0.1), (self.rank, self.features))
        scale = self.param("scale", nn.initializers.ones, (self.features,))
        merged = (kernel + a @ b) * scale  # LoRA merge and a per-channel scale: weight-only work
        return x @ merged


class Block(nn.Module):
    """A transformer block with weight-only computations in several places."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        h = nn.SelfAttention(num_heads=2, qkv_features=16)(h)
        x = x + h
        h = LoRADense(32, name="up")(nn.LayerNorm()(x))
        w_std = self.param("down", nn.initializers.lecun_normal(), (32, 16))
        w_std = (w_std - w_std.mean(0)) / (w_std.std(0) + 1e-5)  # weight standardization
        return x + jax.nn.gelu(h) @ w_std


def _block():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 16))
    variables = Block().init(jax.random.PRNGKey(0), x)
    return Block(), variables, x


def test_removes_every_weight_only_node_from_a_transformer_block():
    model, variables, x = _block()
    graph = graphopt.trace(model.apply, variables, x)
    before = _weight_only_nodes(graph)
    free = _weight_only_nodes(graph, free_layout=True) - before
    assert before >= 10 and free >= 4  # LoRA dot + add + scale, standardization; bias/scale reshapes
    result = run_pipeline(graph, ["fold_params"], debug=True)
    assert _weight_only_nodes(result.graph) == 0
    assert _weight_only_nodes(result.graph, free_layout=True) == free  # reshapes of params stay
    assert result.report.records[0].fired["folded-node"] == before
    args = graphopt.prepare(result.graph, variables, x)
    assert_equivalent(jax.jit(graphopt.lower(result.graph))(*args), jax.jit(model.apply)(variables, x))
    # the merged LoRA weight is one parameter named after the base kernel
    assert "params/up/kernel:mul" in args[0]


def test_users_arrays_are_never_modified_and_prep_runs_per_weights():
    model, variables, x = _block()
    snapshot = jax.tree_util.tree_map(np.array, variables)
    fast = graphopt.optimize(model.apply)
    # The prepared weights come from a separate XLA program (rounding of the standardization may
    # differ in the last bits): equal within float32 rounding of reordered arithmetic.
    assert_equivalent(fast(variables, x), model.apply(variables, x), rtol=1e-4, atol=1e-5)
    assert fast.graph.prep is not None
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, snapshot)
    # new weights (same signature): the prep runs again, the compiled graph is reused
    doubled = jax.tree_util.tree_map(lambda a: a * 2, variables)
    assert_equivalent(fast(doubled, x), model.apply(doubled, x), rtol=1e-4, atol=1e-4)
    assert len(fast.graphs) == 1


def test_expanding_values_stay_in_the_graph():
    def f(bias, x):
        return x + jnp.broadcast_to(bias, x.shape)  # a broadcast would grow the weights 64x

    bias, x = jnp.arange(4.0), jnp.ones((64, 4))
    graph = graphopt.trace(f, bias, x, params_argnums=0)
    result = run_pipeline(graph, ["fold_params"])
    assert [a.path for a in result.graph.params()] == ["bias"]
    assert "broadcast_in_dim" in [n.op.name for n in result.graph.nodes]
    assert result.graph.prep is None


def test_max_growth_allows_materializing_a_wider_dtype():
    def f(w, x):
        return x @ w.astype(jnp.float32)

    w, x = jnp.ones((4, 4), jnp.bfloat16), jnp.ones((2, 4))
    kept = run_pipeline(graphopt.trace(f, w, x, params_argnums=0), ["fold_params"]).graph
    assert "convert_element_type" in [n.op.name for n in kept.nodes]
    folded = run_pipeline(graphopt.trace(f, w, x, params_argnums=0), ["fold_params(max_growth=2)"]).graph
    assert "convert_element_type" not in [n.op.name for n in folded.nodes]
    assert_equivalent(graphopt.lower(folded)(*graphopt.prepare(folded, w, x)), f(w, x), exact=True)


def test_running_twice_composes_prep_and_keeps_argument_positions():
    def f(x, w, scale):
        return (x @ w.T) * scale.sum()

    x, w, scale = jnp.ones((3, 4)), jnp.arange(8.0).reshape(2, 4), jnp.ones(5)
    graph = graphopt.trace(f, x, w, scale, params_argnums=(1, 2))
    graph = run_pipeline(graph, ["fold_params", "fold_params"], debug=True).graph
    args = graphopt.prepare(graph, x, w, scale)
    assert len(args) == 2 and isinstance(args[1], dict)  # x stays first; params become one dict
    assert_equivalent(graphopt.lower(graph)(*args), f(x, w, scale))


def test_gradients_with_respect_to_inputs_are_unchanged():
    model, variables, x = _block()
    graph = run_pipeline(graphopt.trace(model.apply, variables, x), ["fold_params"]).graph
    args = graphopt.prepare(graph, variables, x)
    lowered = graphopt.lower(graph)
    grad = jax.grad(lambda x: lowered(args[0], x).sum())(x)
    assert_equivalent(grad, jax.grad(lambda x: model.apply(variables, x).sum())(x), rtol=1e-4, atol=1e-5)


def test_weights_scaled_by_constant_expressions_are_precomputed():
    """A weight times a value computed from constants only (1/sqrt(d), as fold_batchnorm leaves
    a folded attention scale): the prep computes both, the graph keeps one dot."""
    def fn(params, x):
        return x @ (params["w"] * (1.0 / jnp.sqrt(jnp.float32(8.0))))

    params = {"w": jnp.arange(12.0).reshape(3, 4)}
    x = jnp.ones((2, 3))
    graph = graphopt.trace(fn, params, x, params_argnums=0)
    assert _weight_only_nodes(graph) == 1  # w * (1 / sqrt(8)), the scale computed from constants
    result = run_pipeline(graph, ["fold_params", "dce"])
    assert [n.op.name for n in result.graph.nodes] == ["dot_general"]
    assert result.report.records[0].fired["new-param"] == 1
    args = graphopt.prepare(result.graph, params, x)
    assert_equivalent(jax.jit(graphopt.lower(result.graph))(*args), jax.jit(fn)(params, x), exact=True)


def test_a_weight_read_by_an_effect_is_handed_in_as_a_parameter():
    """A node with effects and no outputs (a debug callback) stays in the graph; the derived
    value it reads crosses into it as a new parameter, read there by the dot as well."""
    seen = []

    def fn(params, x):
        scaled = params["w"].T * 2.0
        jax.debug.callback(lambda a: seen.append(np.asarray(a)), scaled)
        return x @ scaled

    params, x = {"w": jnp.arange(6.0).reshape(2, 3)}, jnp.ones((4, 3))
    graph = graphopt.trace(fn, params, x, params_argnums=0)
    result = run_pipeline(graph, ["fold_params", "dce"], debug=True)
    assert [n.op.name for n in result.graph.nodes] == ["debug_callback", "dot_general"]
    assert [a.path for a in result.graph.params()] == ["w:mul"]
    args = graphopt.prepare(result.graph, params, x)
    assert_equivalent(graphopt.lower(result.graph)(*args), fn(params, x), exact=True)
    np.testing.assert_array_equal(seen[-1], np.arange(6.0).reshape(2, 3).T * 2.0)

"""masked_graph: the reference pruning is checked against, checked itself against the model.

Zeroing a channel where a contraction reads it is zeroing the rows of the weight it meets there,
so the masked graph must compute the original model with those rows zeroed: an oracle that owes
nothing to the dependency analysis. Then: masks as graph inputs (what Taylor importance
differentiates), exits inside calls (custom_jvp, remat) and the masks' types.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import graphopt
from graphopt.lowering.emit import evaluate
from graphopt.passes.prune.deps import analyze
from graphopt.passes.prune.masked import masked_graph
from graphopt.testing import assert_equivalent
from prune_cases import (B, C, CASES, D, G, KV, custom_jvp_exit, flat_leaves, keep_fraction, linen_cnn, mlp,
                         normal, run_fast)


def _masked_outputs(fn, args, keep, params_argnums=0):
    deps = analyze(graphopt.trace(fn, *args, params_argnums=params_argnums))
    reference = masked_graph(deps, keep)
    reference.verify()
    return run_fast(lambda leaves: evaluate(reference, leaves), flat_leaves(fn, args, params_argnums))


def _zero_rows(array, axis: int, kept) -> np.ndarray:
    """`array` with every index along `axis` but `kept` set to 0."""
    out = np.array(array)
    dropped = np.setdiff1d(np.arange(out.shape[axis]), kept)
    index = [slice(None)] * out.ndim
    index[axis] = dropped
    out[tuple(index)] = 0
    return out


def _assert_close(actual, expected):
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        assert_equivalent(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5 * float(np.max(np.abs(e))))


# --- the masked graph is the model with the consumers' rows zeroed --------------------------------

def test_mlp_channels_masked_are_the_next_layers_rows_zeroed():
    fn, (p, x), _ = mlp()
    keep = {"w1:1": [0, 3, 4, 10], "w2:1": [2]}
    zeroed = dict(p, w2=_zero_rows(p["w2"], 0, keep["w1:1"]), w3=_zero_rows(p["w3"], 0, keep["w2:1"]))
    _assert_close(_masked_outputs(fn, (p, x), keep), [fn(zeroed, x)])


def test_cnn_channels_masked_are_the_next_kernels_inputs_zeroed():
    """Conv_0's channels meet Conv_1's kernel (input axis 2); Conv_1's, once flattened with the
    4 x 4 positions, meet rows c, c+6, c+12, ... of Dense_1."""
    fn, (variables, x), _ = linen_cnn()
    keep = {"params/Conv_0/kernel:3": [1, 5], "params/Conv_1/kernel:3": [0, 4]}
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    params["Conv_1"]["kernel"] = _zero_rows(params["Conv_1"]["kernel"], 2, keep["params/Conv_0/kernel:3"])
    rows = [r for r in range(96) if r % 6 in keep["params/Conv_1/kernel:3"]]
    params["Dense_1"]["kernel"] = _zero_rows(params["Dense_1"]["kernel"], 0, rows)
    _assert_close(_masked_outputs(fn, (variables, x), keep, None), [fn({"params": params}, x)])


def test_attention_heads_masked_are_the_output_projections_rows_zeroed():
    """heads_transposed merges heads as [D, H]: head h owns rows d * H + h of wo. A head-size
    channel of q and k masked is that column of wq zeroed (q·k loses that term)."""
    fn, (p, x), _ = CASES["heads_transposed"]()
    heads, qk_size = "wk:1", "wk:1#2"
    keep = {heads: [0, 2], qk_size: [1]}
    zeroed = dict(p, wo=_zero_rows(p["wo"], 0, [d * 4 + h for d in range(3) for h in keep[heads]]),
                  wq=_zero_rows(p["wq"], 1, [h * 3 + 1 for h in range(4)]))
    _assert_close(_masked_outputs(fn, (p, x), keep), [fn(zeroed, x)])


def test_a_kv_head_masked_is_its_query_groups_output_rows_zeroed():
    fn, (p, x), _ = CASES["gqa_repeat"]()
    deps = analyze(graphopt.trace(fn, p, x, params_argnums=0))
    kv_heads = next(g for g in deps.groups if g.size == KV)
    zeroed = dict(p, wo=_zero_rows(p["wo"], 0, range(G * D, 2 * G * D)))  # query heads G..2G-1 stay
    _assert_close(_masked_outputs(fn, (p, x), {kv_heads.name: [1]}), [fn(zeroed, x)])


def test_keeping_everything_is_the_model_bit_for_bit():
    fn, args, _ = CASES["linen_transformer"]()
    graph = graphopt.trace(fn, *args)
    deps = analyze(graph)
    leaves = flat_leaves(fn, args)
    reference = masked_graph(deps, {g.name: np.arange(g.size) for g in deps.groups})
    assert_equivalent(run_fast(lambda l: evaluate(reference, l), leaves),
                      run_fast(lambda l: evaluate(graph, l), leaves), exact=True)


def test_an_exit_of_several_groups_is_masked_once():
    """Dense_1 reads Conv_1's channels flattened with the positions: one mask, not one per group."""
    fn, args, _ = linen_cnn()
    deps = analyze(graphopt.trace(fn, *args))
    reference = masked_graph(deps, keep_fraction(deps, 0.5))
    made = [n for n in reference.nodes if n.provenance.made_by == "prune.masked" and n.op.name == "mul"]
    exits = {(id(n), operand, axis) for g in deps.groups for n, operand, axis in g.exits}
    assert len(made) == len(exits) == 3


def test_the_graph_analyzed_is_left_alone():
    fn, args, _ = mlp()
    deps = analyze(graphopt.trace(fn, *args, params_argnums=0))
    before = str(deps.graph)
    masked_graph(deps, {"w1:1": [0]})
    masked_graph(deps, inputs=True)
    assert str(deps.graph) == before


# --- masks as inputs -----------------------------------------------------------------------------

def test_mask_inputs_follow_the_groups():
    fn, args, _ = mlp()
    deps = analyze(graphopt.trace(fn, *args, params_argnums=0))
    graph = masked_graph(deps, inputs=True)
    graph.verify()
    masks = graph.inputs[len(deps.graph.inputs):]
    assert [(a.path, a.role, str(a.type)) for a in masks] == [("mask/w1:1", "input", "f32[12]"),
                                                             ("mask/w2:1", "input", "f32[7]")]
    leaves = flat_leaves(fn, args, 0)
    ones = [np.ones(12, np.float32), np.ones(7, np.float32)]
    _assert_close(evaluate(graph, leaves + ones), evaluate(deps.graph, leaves))
    keep = {"w1:1": [1, 2], "w2:1": [0, 6]}
    vectors = [np.isin(np.arange(g.size), keep[g.name]).astype(np.float32) for g in deps.groups]
    _assert_close(evaluate(graph, leaves + vectors), evaluate(masked_graph(deps, keep), leaves))


def test_the_gradient_with_respect_to_a_mask_is_the_first_order_taylor_term():
    """y = (h * m) @ w2, so d sum(y) / d m_c = sum_b h[b, c] * sum_j w2[c, j]."""
    p, x = {"w1": normal(0, (C, 6)), "w2": normal(1, (6, 3))}, normal(2, (B, C))
    fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
    deps = analyze(graphopt.trace(fn, p, x, params_argnums=0))
    graph = masked_graph(deps, inputs=True)
    leaves = flat_leaves(fn, (p, x), 0)
    grad = jax.grad(lambda m: jnp.sum(evaluate(graph, leaves + [m])[0]))(np.ones(6, np.float32))
    h = np.tanh(x @ p["w1"])
    np.testing.assert_allclose(grad, h.sum(0) * p["w2"].sum(1), rtol=1e-5)


# --- exits inside calls ------------------------------------------------------------------------------

def _plain_custom_jvp_exit(p, x):
    """custom_jvp_exit without the custom_jvp: the same function, differentiated through."""
    return jax.nn.relu(jnp.tanh(x @ p["w1"]) @ p["w2"]) @ p["w3"]


@pytest.mark.parametrize("name", ["custom_jvp_exit", "checkpointed_mlp", "linen_remat"])
def test_an_exit_inside_a_call_is_masked_where_masks_can_reach_it(name):
    """With masks as inputs the mask must reach into the call's body, which sees only its own
    inputs: the call is inlined, and the result is the model's."""
    fn, args, params_argnums = CASES[name]()
    deps = analyze(graphopt.trace(fn, *args, params_argnums=params_argnums))
    inner = [g for g in deps.groups if any(n.graph is not deps.graph for n, _, _ in g.exits)]
    assert inner, "no exit inside a call: the case tests nothing"
    graph = masked_graph(deps, inputs=True)
    graph.verify()
    leaves = flat_leaves(fn, args, params_argnums)
    ones = [np.ones(g.size, np.float32) for g in deps.groups]
    _assert_close(evaluate(graph, leaves + ones), evaluate(deps.graph, leaves))


def test_a_custom_derivative_around_an_exit_does_not_hide_the_mask_from_gradients():
    """custom_jvp_exit's derivative rule was written for the unmasked function: the masked
    reference differentiates through the masked body instead, like the plain function's."""
    fn, (p, x), _ = custom_jvp_exit()
    keep = {"w1:1": [0, 3, 7], "w2:1": [1, 2]}

    def param_gradients(fn):
        graph = masked_graph(analyze(graphopt.trace(fn, p, x, params_argnums=0)), keep)
        lowered = graphopt.lower(graph)
        return jax.grad(lambda p: jnp.sum(lowered(p, x) ** 2))(p)
    _assert_close(param_gradients(fn), param_gradients(_plain_custom_jvp_exit))


# --- mask types --------------------------------------------------------------------------------------

def test_masks_take_the_operands_dtype():
    fn, args, _ = CASES["bf16_mlp"]()
    deps = analyze(graphopt.trace(fn, *args, params_argnums=0))
    for graph in (masked_graph(deps, {"w1:1": [0, 1]}), masked_graph(deps, inputs=True)):
        graph.verify()
        made = [n for n in graph.nodes if n.provenance.made_by == "prune.masked" and n.op.name == "mul"]
        assert [str(n.output.type) for n in made] == ["bf16[2,12]"]


def test_a_weakly_typed_operand_keeps_its_weak_type():
    """Python-scalar parameters broadcast stay weakly typed: the mask must not change the type
    the contraction reads."""
    def fn(p, x):
        v = lax.broadcast_in_dim(p["s"], (2, 3), ())  # weak f32[2, 3]
        w = lax.broadcast_in_dim(p["t"], (3, 2), ())
        return v @ w + (v + p["b"]) @ p["c"] + x

    p = {"s": 2.0, "t": 0.5, "b": normal(0, (3,)), "c": normal(1, (3, 2))}
    x = normal(2, (2, 2))
    deps = analyze(graphopt.trace(fn, p, x, params_argnums=0))
    assert [g.name for g in deps.groups] == ["b:0"]
    for graph in (masked_graph(deps, {"b:0": [0, 2]}), masked_graph(deps, inputs=True)):
        graph.verify()
    mask = np.float32([1, 0, 1])
    v = np.full((2, 3), 2.0, np.float32)
    expected = (v * mask) @ np.full((3, 2), 0.5, np.float32) + ((v + p["b"]) * mask) @ p["c"] + x
    _assert_close(_masked_outputs(fn, (p, x), {"b:0": [0, 2]}), [expected])

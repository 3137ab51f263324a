"""deps.analyze: which parameters land in which group, on which axis, and why the rest is blocked.

Small models state the coupling they create (residual adds, attention heads through reshapes, fused
projections split by slices, grouped-query attention, depthwise convolutions, normalizations), and
the tests compare the groups `analyze` finds, and the reasons it gives for the blocked dimensions,
with the expected ones. Random programs check that the analysis never fails on an op it does not
know, and the FLOP estimate is checked against the shrunk graph's count.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import graphopt
from graphopt.cost import graph_flops
from graphopt.passes.prune.deps import PruneError, analyze, estimate_flops, flops_weights
from graphopt.passes.prune.shrink import shrink
from graphopt.pipeline import run_pipeline
from graphopt.testing import programs
from prune_cases import (B, C, CASES, D, G, KV, conv, concat_branches, depthwise_conv, fused_qkv_reshape,
                         fused_qkv_slice, fused_qkv_split, gqa_grouped, gqa_repeat, keep_fraction, linen_cnn,
                         linen_norms, linen_transformer, mlp, normal)


def _deps(case):
    fn, args, params_argnums = case() if callable(case) else case
    return analyze(graphopt.trace(fn, *args, params_argnums=params_argnums))


def _structure(deps) -> dict:
    """{group name: (size, sorted {(parameter path, axis)})}."""
    return {g.name: (g.size, sorted({(a.path, axis) for a, axis in g.params})) for g in deps.groups}


def _blocked(deps) -> dict:
    return {name: reasons for name, _, reasons in deps.blocked}


def _plain(fn, p, *inputs):
    return analyze(graphopt.trace(fn, p, *inputs, params_argnums=0))


# --- what lands in a group -------------------------------------------------------------------------

def test_a_hidden_layer_is_one_group_from_its_producer_to_its_consumer():
    deps = _deps(mlp)
    assert _structure(deps) == {
        "w1:1": (12, [("b1", 0), ("w1", 1), ("w2", 0)]),
        "w2:1": (7, [("b2", 0), ("w2", 1), ("w3", 0)]),
    }
    (node, operand, axis), = deps.group("w1:1").exits
    assert (node.op.name, operand, axis) == ("dot_general", 0, 1)
    assert node.inputs[1].node is None and node.inputs[1].path == "w2"  # h @ w2 reads it


def test_the_residual_stream_is_one_group_across_layers():
    deps = _deps(CASES["residual_chain"])
    width = deps.group("layers/0/b:1")
    assert (width.size, sorted({(a.path, axis) for a, axis in width.params})) == (6, [
        ("layers/0/a", 0), ("layers/0/b", 1), ("layers/1/a", 0), ("layers/1/b", 1),
        ("layers/2/a", 0), ("layers/2/b", 1), ("out", 0), ("w0", 1)])
    assert len(width.exits) == 4  # three layers and the head read the stream


def test_a_shared_square_weight_holds_the_group_on_both_axes():
    deps = _deps(CASES["shared_weight"])
    assert _structure(deps) == {"w:1": (6, [("out", 0), ("w", 0), ("w", 1), ("w0", 1)])}


def test_transformer_groups_and_the_blocked_residual_width():
    deps = _deps(linen_transformer)
    for block in ("Block_0", "Block_1"):
        attn = f"params/{block}/MultiHeadDotProductAttention_0"
        structure = _structure(deps)
        assert structure[f"{attn}/key/kernel:1"] == (4, sorted([  # heads: q, k, v and the output
            (f"{attn}/{m}/kernel", 1) for m in ("query", "key", "value")] + [
            (f"{attn}/{m}/bias", 0) for m in ("query", "key", "value")] + [(f"{attn}/out/kernel", 0)]))
        assert structure[f"{attn}/key/kernel:2"] == (4, sorted([  # head size of q and k
            (f"{attn}/key/bias", 1), (f"{attn}/key/kernel", 2),
            (f"{attn}/query/bias", 1), (f"{attn}/query/kernel", 2)]))
        assert structure[f"{attn}/value/kernel:2"] == (4, sorted([  # head size of v
            (f"{attn}/out/kernel", 1), (f"{attn}/value/bias", 1), (f"{attn}/value/kernel", 2)]))
        assert structure[f"params/{block}/Dense_1/kernel:1"] == (32, sorted([
            (f"params/{block}/Dense_0/kernel", 0), (f"params/{block}/Dense_1/bias", 0),
            (f"params/{block}/Dense_1/kernel", 1)]))
    assert len(deps.groups) == 8
    blocked = _blocked(deps)
    width = blocked["params/Block_0/MultiHeadDotProductAttention_0/out/kernel:2"]
    for norm in ("Block_0/LayerNorm_0", "Block_0/LayerNorm_1", "Block_1/LayerNorm_0", "LayerNorm_0"):
        assert any(r.startswith("reduce_sum reduces over it") and f"Transformer/{norm}," in r for r in width)
    assert blocked["params/Embed_0/embedding:0"] == ["gather has no pruning rule (Transformer/Embed_0)"]
    assert blocked["params/Dense_0/kernel:1"] == ["it reaches a model output"]


def test_model_inputs_and_outputs_are_blocked():
    blocked = _blocked(_deps(mlp))
    assert blocked == {"w1:0": ["it comes from model input x"], "w3:1": ["it reaches a model output"]}


def test_attention_heads_through_a_reshape():
    """[B,T,H*D] -> [B,T,H,D]: the projection's axis is heads x head size; merging back as
    [D,H] before the output projection reads the same two dimensions in the other order."""
    deps = _deps(CASES["heads_transposed"])
    assert _structure(deps) == {
        "wk:1": (4, [("wk", 1), ("wo", 0), ("wq", 1), ("wv", 1)]),   # heads
        "wk:1#2": (3, [("wk", 1), ("wq", 1)]),                        # head size of q and k
        "wv:1": (3, [("wo", 0), ("wv", 1)]),                          # head size of v
    }
    heads, qk_size = deps.group("wk:1"), deps.group("wk:1#2")
    wq = next(a for a in deps.graph.inputs if a.path == "wq")
    wo = next(a for a in deps.graph.inputs if a.path == "wo")
    keep = {id(heads.dim): np.array([1]), id(qk_size.dim): np.array([0, 2])}
    assert deps.kept(deps.dims[id(wq)][1], keep).tolist() == [3, 5]          # head 1 of [H, D]
    assert deps.kept(deps.dims[id(wo)][0], {id(heads.dim): np.array([1])}).tolist() == [1, 5, 9]  # [D, H]


@pytest.mark.parametrize("case", [gqa_repeat, gqa_grouped])
def test_a_kv_head_and_its_query_group_prune_together(case):
    deps = _deps(case)
    kv_heads = next(g for g in deps.groups if g.size == KV)
    assert sorted({(a.path, axis) for a, axis in kv_heads.params}) == [
        ("wk", 1), ("wo", 0), ("wq", 1), ("wv", 1)]
    per_group = next(g for g in deps.groups if g.size == G)  # the i-th query head of every group
    assert sorted({(a.path, axis) for a, axis in per_group.params}) == [("wo", 0), ("wq", 1)]
    # Removing KV head 0 removes query heads 0..G-1: what is left of wq is KV head 1's query group.
    _, slices = shrink(deps, {kv_heads.name: [1]})
    index = {a.path: a.index for a in deps.graph.inputs}
    assert dict(slices[index["wq"]])[1].tolist() == list(range(G * D, 2 * G * D))
    assert dict(slices[index["wk"]])[1].tolist() == list(range(D, 2 * D))
    assert dict(slices[index["wo"]])[0].tolist() == list(range(G * D, 2 * G * D))


def test_a_fused_qkv_projection_splits_into_the_three_projections_groups():
    """Slicing q, k, v out of one projection, or jnp.split, gives the same groups; reshaping it
    to [..., 3, H, D] instead makes q, k and v share their head and head-size dimensions."""
    sliced, split = _structure(_deps(fused_qkv_slice)), _structure(_deps(fused_qkv_split))
    assert sliced == split == {
        "wo:1": (8, [("w2", 0), ("wo", 1)]),
        "wqkv:1": (4, [("bqkv", 0), ("wo", 0), ("wqkv", 1)]),  # heads, shared by q, k and v
        "wqkv:1#2": (3, [("bqkv", 0), ("wqkv", 1)]),            # head size of q and k
        "wqkv:1#3": (3, [("bqkv", 0), ("wo", 0), ("wqkv", 1)]),  # head size of v
    }
    deps = _deps(fused_qkv_split)
    wqkv = next(a for a in deps.graph.inputs if a.path == "wqkv")
    qk_size = deps.group("wqkv:1#2")
    kept = deps.kept(deps.dims[id(wqkv)][1], {id(qk_size.dim): np.array([0])})
    assert kept.tolist() == [0, 3, 6, 9, 12, 15, 18, 21] + list(range(24, 36))  # q's and k's first

    reshaped = _structure(_deps(fused_qkv_reshape))
    assert reshaped == {
        "wo:1": (8, [("w2", 0), ("wo", 1)]),
        "wqkv:1": (4, [("bqkv", 0), ("wo", 0), ("wqkv", 1)]),
        "wqkv:1#2": (3, [("bqkv", 0), ("wo", 0), ("wqkv", 1)]),
    }


def test_two_branches_concatenated_are_two_groups():
    assert _structure(_deps(concat_branches)) == {"a:1": (6, [("a", 1), ("w", 0)]),
                                                  "b:1": (5, [("b", 1), ("w", 0)])}


def test_depthwise_convolution_carries_the_channel_through():
    deps = _deps(depthwise_conv)
    assert _structure(deps) == {"dw:3": (8, [("b", 0), ("dw", 3), ("w1", 3), ("w2", 2)])}
    assert "it is a spatial axis of a convolution" in _blocked(deps)["dw:0"][0]


def test_a_grouped_convolution_is_blocked():
    p = {"w1": normal(0, (3, 3, 2, 8)), "gw": normal(1, (3, 3, 4, 8)), "w2": normal(2, (1, 1, 8, 4))}
    deps = _plain(lambda p, x: conv(jax.nn.relu(conv(jax.nn.relu(conv(x, p["w1"])), p["gw"], groups=2)),
                                     p["w2"]), p, normal(3, (2, 6, 6, 2)))
    assert deps.groups == []
    assert "a grouped convolution (feature_group_count=2)" in _blocked(deps)["gw:3"][0]


def test_a_flattened_convolution_output_prunes_rows_of_the_dense_layer():
    deps = _deps(linen_cnn)
    assert _structure(deps)["params/Conv_1/kernel:3"] == (6, [
        ("params/Conv_1/bias", 0), ("params/Conv_1/kernel", 3), ("params/Dense_1/kernel", 0)])
    blocked = _blocked(deps)  # the spatial factors of the flattened axis
    for factor in ("params/Dense_1/kernel:0", "params/Dense_1/kernel:0#2"):
        (reason,) = blocked[factor]
        assert reason.startswith("reduce_window_max pools over it at reduce_window_max (CNN, prune_cases.py:")
    dense = next(a for a in deps.graph.inputs if a.path == "params/Dense_1/kernel")
    channels = deps.group("params/Conv_1/kernel:3")
    kept = deps.kept(deps.dims[id(dense)][0], {id(channels.dim): np.array([2])})
    assert kept.tolist() == list(range(2, 96, 6))  # channel 2 at each of the 4 x 4 positions


def test_normalization_parameters_join_their_channels():
    """BatchNorm's statistics and affine parameters go with the channel; GroupNorm makes its
    groups the unit (within a group, its statistics block)."""
    deps = _deps(linen_norms)
    structure = _structure(deps)
    assert structure["params/Conv_0/kernel:3"] == (8, [
        ("batch_stats/BatchNorm_0/mean", 0), ("batch_stats/BatchNorm_0/var", 0),
        ("params/BatchNorm_0/bias", 0), ("params/BatchNorm_0/scale", 0),
        ("params/Conv_0/bias", 0), ("params/Conv_0/kernel", 3), ("params/Conv_1/kernel", 2)])
    assert structure["params/Conv_1/kernel:3"][0] == 4  # GroupNorm(num_groups=4) of 8 channels
    assert _blocked(deps)["params/Conv_1/kernel:3#2"][0].startswith(
        "reduce_sum reduces over it at reduce_sum (Model/GroupNorm_0,")


# --- what blocks ------------------------------------------------------------------------------------

P = {"w1": normal(0, (C, 6)), "w2": normal(1, (6, 3)), "w3": normal(2, (3, 3))}
X = normal(3, (B, C))


@pytest.mark.parametrize("reader, reason", [
    (lambda h: jnp.max(h, -1, keepdims=True), "reduce_max reduces over it"),
    (lambda h: jax.nn.softmax(h, -1)[:, :3], "reduce_max reduces over it"),
    (lambda h: jnp.cumsum(h, -1)[:, :3], "cumsum accumulates along it"),
    (lambda h: jnp.take(h, jnp.array([0, 2, 4]), axis=1), "gather has no pruning rule"),
    (lambda h: h[:, ::2], "a strided slice"),
    (lambda h: jnp.pad(h, ((0, 0), (1, 0)))[:, :3], "pad has no pruning rule"),
    (lambda h: h[:, ::-1][:, :3], "rev has no pruning rule"),
    (lambda h: (h + jnp.arange(6.0))[:, :3], "iota counts along it"),
    (lambda h: h.reshape(B, 2, 3)[:, :, 1:].reshape(B, 4)[:, :3], "a slice [0:3] cuts across its parts"),
])
def test_a_reader_other_than_a_contraction_blocks_the_channels(reader, reason):
    """The hidden channels go to w2 (a contraction) and to one more reader that is not one."""
    def fn(p, x):
        h = jax.nn.relu(x @ p["w1"])
        return (h @ p["w2"] + reader(h)) @ p["w3"]
    deps = _plain(fn, P, X)
    assert "w1:1" not in [g.name for g in deps.groups]
    assert any(r.startswith(reason) for r in _blocked(deps)["w1:1"]), _blocked(deps)["w1:1"]


def test_one_dimension_split_two_ways_is_blocked():
    p = {"w1": normal(0, (C, 12)), "w2": normal(1, (12, 3))}

    def fn(p, x):
        h = x @ p["w1"]
        a = h.reshape(B, 2, 6).sum(1)[:, :3]
        b = h.reshape(B, 3, 4).sum(1)[:, :3]
        return h @ p["w2"] + a + b
    assert any("split two ways (2x6 and 3x4)" in r for r in _blocked(_plain(fn, p, X))["w1:1"])


def test_a_scan_blocks_what_flows_through_it():
    p = {"w1": normal(0, (C, 6)), "u": normal(1, (6, 6)), "w2": normal(2, (6, 3))}

    def fn(p, x):
        h = jax.nn.relu(x @ p["w1"])
        h, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ p["u"]), None), h, None, length=2)
        return h @ p["w2"]
    deps = _plain(fn, p, X)
    assert deps.groups == []
    assert any(r.startswith("scan has no pruning rule") for r in _blocked(deps)["w1:1"])


def test_an_empty_concatenation_operand_is_ignored():
    """A zero-size operand of a concatenation carries no channel (and must not make a dimension
    contain itself)."""
    p = {"w1": normal(0, (C, 6)), "w2": normal(1, (6, 3))}

    def fn(p, x):
        h = jax.nn.relu(x @ p["w1"])
        return (jnp.concatenate([h, jnp.zeros((B, 0))], -1) + h) @ p["w2"]
    assert _structure(_plain(fn, p, X)) == {"w1:1": (6, [("w1", 1), ("w2", 0)])}


def test_empty_slices_and_reshapes_carry_no_channel():
    """h[:, 2:2] takes nothing from h's channels: it must not cut them in two (nor a reshape of
    it fail to match factors that are not there)."""
    p = {"w1": normal(0, (C, 6)), "w2": normal(1, (6, 3))}

    def fn(p, x):
        h = jax.nn.relu(x @ p["w1"])
        return h @ p["w2"] + jnp.sum(h[:, 2:2].reshape(0, B))
    assert _structure(_plain(fn, p, X)) == {"w1:1": (6, [("w1", 1), ("w2", 0)])}


def test_a_parameter_no_contraction_reads_is_not_a_group():
    p = {"w1": normal(0, (C, 6)), "scale": normal(1, (3,))}
    deps = _plain(lambda p, x: (x @ p["w1"])[:, :3] * p["scale"], p, X)
    assert deps.groups == []
    assert _blocked(deps)["w1:1"] == ["it reaches a model output"]


def test_a_graph_whose_parameters_are_prepared_is_refused():
    """After fold_params the graph's parameters are computed from the user's: pruning them would
    leave a graph the user's parameters no longer fit."""
    fn, args, _ = mlp()
    graph = run_pipeline(graphopt.trace(fn, *args, params_argnums=0), ["fold_params"]).graph
    with pytest.raises(PruneError, match="prune the traced graph, before fold_params"):
        analyze(graph)


def test_unknown_and_blocked_group_names_are_errors_that_say_what_exists():
    deps = _deps(mlp)
    with pytest.raises(PruneError, match=r"no prunable group named 'w4:1'\. Prunable groups: w1:1, w2:1\."):
        deps.group("w4:1")
    with pytest.raises(PruneError, match=r"It is blocked: w1:0: it comes from model input x\."):
        deps.group("w1:0")


# --- FLOPs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mlp", "linen_cnn", "linen_transformer", "fused_qkv_split",
                                  "concat_branches", "shared_weight", "gqa_repeat", "depthwise_conv",
                                  "checkpointed_mlp"])
def test_estimated_flops_are_the_shrunk_graphs(name):
    """A fused projection sliced in three, or two branches concatenated, shrink by a sum of their
    parts, not a product; a weight with the group on both axes by its square."""
    fn, args, params_argnums = CASES[name]()
    graph = graphopt.trace(fn, *args, params_argnums=params_argnums)
    deps = analyze(graph)
    rows, sizes = flops_weights(deps), [g.size for g in deps.groups]
    assert estimate_flops(rows, sizes, sizes) == graph_flops(graph)[0]
    keep = keep_fraction(deps, 0.5)
    small, _ = shrink(deps, keep)
    assert estimate_flops(rows, sizes, [len(keep[g.name]) for g in deps.groups]) == pytest.approx(
        graph_flops(small)[0], rel=1e-12)


# --- random programs -------------------------------------------------------------------------------

@settings(max_examples=max(10, settings().max_examples // 2))
@given(programs(max_ops=10), st.data())
def test_analysis_of_random_programs_never_fails_and_shrinking_keeps_the_signature(program, data):
    """Every argument a parameter, so that contractions between them form groups; any op without a
    rule (loops, gathers, sorts, ...) blocks, and shrinking keeps the outputs' types."""
    graph = graphopt.trace(program, *program.args, params_argnums=tuple(range(len(program.args))))
    deps = analyze(graph)
    names = [g.name for g in deps.groups] + [name for name, _, _ in deps.blocked]
    assert len(names) == len(set(names))
    for group in deps.groups:
        assert group.params and group.exits and not group.dim.blocked and group.size > 1
    keep = {g.name: data.draw(st.sets(st.integers(0, g.size - 1), min_size=1), g.name) for g in deps.groups}
    small, _ = shrink(deps, keep)
    small.verify()
    assert [v.type for v in small.outputs] == [v.type for v in graph.outputs]

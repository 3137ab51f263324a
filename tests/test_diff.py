"""Graph diffs: nodes paired by what they compute, changes grouped by module path and by pass."""

import jax
import jax.numpy as jnp

import graphopt
from graphopt.diff import TOP_LEVEL, diff
from graphopt.pipeline import run_pipeline
from models import blocks


def _block_graph():
    fn, args = blocks.make()
    return graphopt.trace(fn, *args)


def test_exact_text_of_a_small_diff():
    before = graphopt.trace(lambda x: jnp.exp(-(-x)) * 2.0, jnp.ones(3))
    after = run_pipeline(before.clone()[0], ["canonicalize", "dce"]).graph
    assert diff(before, after).format(show_source=False) == "\n".join([
        "diff <lambda>: 4 → 2 nodes (2 removed, 0 added)",
        "by module",
        f"  {TOP_LEVEL}  −2",
        "    − neg : f32[3]  ×2",
    ])


def test_groups_by_module_and_by_pass():
    before = _block_graph()
    after = run_pipeline(before.clone()[0], "default").graph
    d = diff(before, after)
    groups = d.by_module
    # LayerNorm's primitives are gone from Block/ln; one layer_norm node stands for them
    assert [n.op.name for n in groups["Block/ln"].added] == ["layer_norm"]
    assert {n.op.name for n in groups["Block/ln"].removed} >= {"reduce_sum", "rsqrt", "sub"}
    assert [n.op.name for n in groups["Block/up"].added] == ["linear"]
    assert [n.op.name for n in groups["Block/down"].added] == ["linear"]
    assert {n.op.name for n in groups["Block"].added} == {"gelu"}
    by_pass = d.by_pass
    assert sorted(n.op.name for n in by_pass["raise_ops"]) == ["gelu", "layer_norm", "linear", "linear"]
    assert all(n.provenance.made_by.startswith(name) for name, nodes in by_pass.items() for n in nodes)
    # every removed or added node is in exactly one module group
    assert sum(len(c.removed) for c in groups.values()) == len(d.removed)
    assert sum(len(c.added) for c in groups.values()) == len(d.added)
    lines = d.format(show_source=False).splitlines()
    assert lines[:2] == ["diff Block.apply: 33 → 5 nodes (32 removed, 4 added)", "added by pass"]
    rules = lines[2].removeprefix("  raise_ops +4 (").removesuffix(")")
    assert sorted(rules.split(", ")) == ["gelu-tanh ×1", "layer-norm ×1", "linear ×2"]
    assert lines[3:5] == ["by module", "  Block/ln    −18 +1"]
    assert "    + layer_norm[axes=(2,) epsilon=9.999999974752427e-07 has_bias=True has_scale=True] : f32[2,4,16]  " \
           "# by raise_ops/layer-norm" in lines


def test_kept_moved_and_rewired_nodes_are_not_changes():
    def one(x):
        return jnp.sin(x), jnp.cos(x)

    def other(x):
        c = jnp.cos(x)
        return jnp.sin(x), c

    d = diff(graphopt.trace(one, jnp.ones(3)), graphopt.trace(other, jnp.ones(3)))
    assert not d and d.removed == [] and d.added == []
    assert str(d).splitlines()[-1] == "no changes"
    # exp kept, its operand rewired from -(-x) to x
    d = diff(graphopt.trace(lambda x: jnp.exp(-(-x)), jnp.ones(3)), graphopt.trace(jnp.exp, jnp.ones(3)))
    assert [n.op.name for n in d.removed] == ["neg", "neg"] and d.added == []


def test_changed_inputs_are_listed():
    before = graphopt.trace(lambda w, x: x @ w.T, jnp.ones((2, 3)), jnp.ones(3), params_argnums=0)
    after = run_pipeline(before.clone()[0], ["fold_params"]).graph
    d = diff(before, after)
    assert [a.path for a in d.inputs_removed] == ["w"]
    assert [a.path for a in d.inputs_added] == ["w:transpose"]
    assert [n.op.name for n in d.removed] == ["transpose"]
    lines = d.format(show_source=False).splitlines()
    assert lines[1:4] == ["inputs", "  − %w: f32[2,3] param", "  + %w:transpose: f32[3,2] param"]


def test_regions_are_compared_node_by_node():
    def body(c, v):
        return c + jnp.exp(-(-v)), None

    def scanned(c, xs):
        return jax.lax.scan(body, c, xs)[0]

    before = graphopt.trace(scanned, jnp.ones(3), jnp.ones((4, 3)))
    after = run_pipeline(before.clone()[0], ["canonicalize", "dce"]).graph
    d = diff(before, after)
    assert [n.op.name for n in d.removed] == ["neg", "neg"]
    assert all(n.graph.parent is not None for n in d.removed)  # they were in the scan body


def test_html_view():
    before = _block_graph()
    after = run_pipeline(before.clone()[0], "default").graph
    html = diff(before, after)._repr_html_()
    assert html.startswith("<div>") and "Block/ln" in html and "layer_norm" in html and "raise_ops" in html


def test_graph_diff_and_notebook_views_are_hooked_up():
    import jax.numpy as jnp

    import graphopt

    g = graphopt.trace(lambda x: jnp.sin(x) / 2.0, jnp.ones(3))
    before, _ = g.clone()
    after = graphopt.run_pipeline(g, ["canonicalize", "dce"])
    d = before.diff(after.graph)
    assert d.removed and d.added
    assert "sin" in before._repr_html_() and "<table" in after.report._repr_html_()

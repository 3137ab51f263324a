"""The text listing and the summary."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import graphopt


def test_listing_reads_like_a_program():
    def f(w, x):
        return jnp.tanh(x @ w) * 2.0

    g = graphopt.trace(f, jnp.ones((4, 2)), jnp.ones((3, 4)), params_argnums=0)
    from graphopt.show import format_graph

    assert format_graph(g, show_source=False) == "\n".join([
        "graph f(%w: f32[4,2] param, %x: f32[3,4]) {",
        "  %0 = dot_general[dimension_numbers=(((1,),(0,)),((),())) preferred_element_type=f32] %x, %w : f32[3,2]",
        "  %1 = tanh[accuracy] %0 : f32[3,2]".replace("[accuracy]", _tanh_params(g)),
        "  %2 = mul %1, 2.0 : f32[3,2]",
        "  return %2",
        "}",
    ])


def _tanh_params(g):
    tanh = next(n for n in g.nodes if n.op.name == "tanh")
    shown = {k: v for k, v in tanh.params.items() if v is not None}
    return "" if not shown else "[" + " ".join(f"{k}={v}" for k, v in sorted(shown.items())) + "]"


def test_listing_shows_regions_module_paths_and_sources():
    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jax.lax.scan(lambda c, v: (c + nn.Dense(3, name="cell")(v), None), x[0], x)[0]

    x = jnp.ones((5, 3))
    model = Scanned()
    variables = model.init(jax.random.PRNGKey(0), x)
    text = str(graphopt.trace(model.apply, variables, x))
    assert "scan[" in text and "  body(" in text
    assert "# Scanned/cell" in text and "test_show.py:" in text


def test_summary_counts():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8)(nn.Dense(16)(x))

    x = jnp.ones((2, 4))
    variables = Net().init(jax.random.PRNGKey(0), x)
    summary = graphopt.trace(Net().apply, variables, x).summary()
    assert summary.params == 4 * 16 + 16 + 16 * 8 + 8
    assert summary.param_bytes == 4 * summary.params
    assert summary.op_counts["dot_general"] == 2
    assert summary.flops == 2 * 2 * 4 * 16 + 2 * 16 + 2 * 2 * 16 * 8 + 2 * 8
    text = str(summary)
    assert "dot_general" in text and "FLOPs" in text and "parameters" in text


def test_listing_without_decompositions_and_with_a_long_header():
    from graphopt.pipeline import run_pipeline
    from graphopt.show import format_graph

    class Norm(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.LayerNorm(name="a_rather_long_module_name_for_the_norm")(x)

    x = jnp.ones((2, 8))
    variables = Norm().init(jax.random.PRNGKey(0), x)
    g = run_pipeline(graphopt.trace(Norm().apply, variables, x), ["canonicalize", "raise_ops", "dce"]).graph
    assert format_graph(g, show_source=False, decompositions=False) == "\n".join([
        "graph Norm.apply(",
        "    %params/a_rather_long_module_name_for_the_norm/bias: f32[8] param,",
        "    %params/a_rather_long_module_name_for_the_norm/scale: f32[8] param,",
        "    %x: f32[2,8]) {",
        "  %0 = layer_norm[axes=(1,) epsilon=9.999999974752427e-07 has_bias=True has_scale=True] %x, "
        "%params/a_rather_long_module_name_for_the_norm/scale, %params/a_rather_long_module_name_for_the_norm/bias "
        ": f32[2,8]",
        "  return %0",
        "}",
    ])
    assert "decomposition(" in format_graph(g)


def _check_html(text: str) -> list[str]:
    """Tags balance; returns the text content."""
    from html.parser import HTMLParser

    class Checker(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack, self.data = [], []

        def handle_starttag(self, tag, attrs):
            if tag != "br":
                self.stack.append(tag)

        def handle_endtag(self, tag):
            assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"

        def handle_data(self, data):
            self.data.append(data)

    checker = Checker()
    checker.feed(text)
    checker.close()
    assert checker.stack == []
    assert "<script" not in text and "http" not in text  # self-contained
    return checker.data


def test_html_views():
    from graphopt.pipeline import run_pipeline
    from graphopt.show import graph_html, report_html, summary_html

    g = graphopt.trace(lambda x: -(-jnp.tanh(x)) * 2.0, jnp.ones(3))
    assert g.summary()._repr_html_() == summary_html(g.summary())
    data = _check_html(summary_html(g.summary()))
    assert "<lambda>" in data and "tanh" in data and "nodes" in data
    result = run_pipeline(g, ["canonicalize", "dce"])
    data = _check_html(report_html(result.report))
    assert data[:1] == ["graphopt pipeline"] and "canonicalize" in data and "dce" in data
    assert any("neg-neg" in d for d in data)
    data = "".join(_check_html(graph_html(result.graph)))
    assert "graph <lambda>(%x: f32[3]) {" in data and "%0 = tanh %x" in data
    assert "&lt;lambda&gt;" in graph_html(result.graph)  # escaped


def test_treescope_renders_a_graph_by_module():
    treescope = pytest.importorskip("treescope")
    from models import blocks

    fn, args = blocks.make()
    graph = graphopt.run_pipeline(graphopt.trace(fn, *args), "default").graph
    text = treescope.render_to_text(graph)
    assert text.startswith("Graph(") and "nodes by module={'Block/ln': ['%0 = layer_norm" in text
    assert "'x: f32[2,4,16]'" in text and "Block/down" in text

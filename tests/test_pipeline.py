"""The pass manager: specs, registry errors, enable/disable, debug verification, the report."""

import jax
import jax.numpy as jnp
import pytest

import graphopt
from graphopt.errors import GraphoptError
from graphopt.testing import assert_equivalent
from graphopt.pipeline import (PASSES, PIPELINES, PassSpec, approximate, parse_spec, register_pass,
                               resolve, run_pipeline)


@pytest.fixture
def temporary_pass():
    names = []

    def make(name, fn, **kwargs):
        register_pass(name, **kwargs)(fn)
        names.append(name)
        return fn

    yield make
    for name in names:
        PASSES.pop(name, None)


def test_parse_spec():
    assert parse_spec("cse") == PassSpec("cse")
    assert parse_spec("quantize(int8, weight_only)") == PassSpec("quantize", ("int8", "weight_only"))
    assert parse_spec("prune(ratio=0.3, rules=['a', 'b'], name=x)") == PassSpec(
        "prune", (), {"ratio": 0.3, "rules": ["a", "b"], "name": "x"})
    with pytest.raises(GraphoptError, match="cannot parse pass spec"):
        parse_spec("not a pass(")


def test_unknown_pass_and_pipeline_list_the_known_ones():
    with pytest.raises(GraphoptError, match=r"unknown pass 'fold_everything'; known passes: .*cse.*dce"):
        resolve(["fold_everything"])
    with pytest.raises(GraphoptError, match=r"unknown pipeline 'fastest'; known: cleanup, default, inference"):
        resolve("fastest")
    with pytest.raises(GraphoptError, match="cannot disable unknown pass"):
        resolve("inference", disable=["nope"])


def test_named_pipelines_and_disable():
    assert [i.name for i, _ in resolve("inference")] == list(PIPELINES["inference"])
    assert "fold_params" not in [i.name for i, _ in resolve("training")]
    assert [i.name for i, _ in resolve("cleanup", disable=["cse", "fold_params"])] == [
        "fold_constants", "canonicalize", "dce"]
    assert "autocast" not in PIPELINES["inference"] and "autocast" in PIPELINES["mixed_precision"]


@pytest.mark.parametrize("pipeline", ["cleanup", "inference", "training"])
def test_constants_fold_before_canonicalize_sees_them(pipeline):
    # sqrt(64.0) is a constant expression: folded first, the division by it is a division by 8.0,
    # which canonicalize turns into a product by 0.125 (exact: a power of two).
    g = graphopt.trace(lambda x: x / jnp.sqrt(64.0), jnp.ones(3))
    out = run_pipeline(g, pipeline).graph
    assert [n.op.name for n in out.nodes if n.op.name != "constant"] == ["mul"]
    x = jnp.array([1.0, -0.0, jnp.inf])
    assert_equivalent(jax.jit(graphopt.lower(out))(x), jax.jit(lambda x: x / jnp.sqrt(64.0))(x), exact=True)


def test_options_reach_the_pass_and_the_report_counts(temporary_pass):
    seen = {}

    def scale_pass(graph, ctx, factor, *, note="none"):
        seen.update(factor=factor, note=note)
        ctx.count({"test/scaled": 2})
        ctx.note(f"factor {factor}")
        return graph

    temporary_pass("test_scale", scale_pass, contract=approximate(1e-2))
    g = graphopt.trace(lambda x: jnp.sin(x) + jnp.cos(x), jnp.ones(3))
    result = run_pipeline(g, ["test_scale(3, note='hi')", PassSpec("dce")])
    assert seen == {"factor": 3, "note": "hi"}
    first = result.report.records[0]
    assert (first.name, first.contract, first.fired["test/scaled"], first.notes) == (
        "test_scale", "approximate(0.01)", 2, ["factor 3"])
    assert first.nodes == (3, 3) and first.flops[0] == 9
    text = str(result.report)
    assert "test_scale" in text and "approximate(0.01)" in text and "test/scaled×2" in text


def test_report_table_keeps_every_word_and_shows_error_only_when_measured():
    g = graphopt.trace(lambda x: jnp.sin(x) / 2.0 + jnp.cos(x) * 1.0, jnp.ones((3, 4)))
    report = run_pipeline(g, ["canonicalize", "dce"]).report
    text = str(report)
    header = text.splitlines()[2]
    assert "rules fired" in header and "error" not in header  # no validation ran
    rules = [f"{k.removeprefix('canonicalize/')}×{v}" for k, v in report.records[0].fired.items()]
    assert rules and all(rule in text for rule in rules)  # one per line, none cropped
    report.records[0].error = 1.5e-7
    assert "error" in str(report).splitlines()[2] and "1.5e-07" in str(report)


def test_arrow_writes_a_shared_unit_once():
    from graphopt.pipeline import _arrow, size_str

    assert _arrow(3 * 2**20, 4 * 2**20, size_str) == "3 → 4 MiB"
    assert _arrow(512, 4 * 2**20, size_str) == "512 B → 4 MiB"
    assert _arrow(5, 5) == "5" and _arrow(1000, 2000) == "1,000 → 2,000"


def test_debug_mode_verifies_after_every_pass(temporary_pass):
    def corrupt(graph, ctx):
        sin = next(n for n in graph.nodes if n.op.name == "sin")
        sin.inputs[0] = graph.inputs[0]  # behind the graph's back: use lists now stale
        return graph

    temporary_pass("test_corrupt", corrupt)
    g = graphopt.trace(lambda x: jnp.sin(jnp.cos(x)), jnp.ones(3))
    run_pipeline(g, ["test_corrupt"])  # not noticed without debug
    g = graphopt.trace(lambda x: jnp.sin(jnp.cos(x)), jnp.ones(3))
    with pytest.raises(GraphoptError, match="use lists are out of date"):
        run_pipeline(g, ["test_corrupt"], debug=True)


def test_a_pass_must_return_the_graph(temporary_pass):
    temporary_pass("test_forgets", lambda graph, ctx: None)
    with pytest.raises(GraphoptError, match="returned None"):
        run_pipeline(graphopt.trace(jnp.sin, jnp.ones(2)), ["test_forgets"])


def test_plain_functions_are_passes_too():
    calls = []

    def count_nodes(graph, ctx):
        calls.append(len(graph))
        return graph

    run_pipeline(graphopt.trace(jnp.sin, jnp.ones(2)), [count_nodes])
    assert calls == [1]


def test_duplicate_registration_is_an_error(temporary_pass):
    temporary_pass("test_twice", lambda graph, ctx: graph)
    with pytest.raises(GraphoptError, match="already registered"):
        register_pass("test_twice")(lambda graph, ctx: graph)

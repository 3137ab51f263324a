"""Translation validation: a wrong pass is caught, named down to the first diverging node, and
reverted (or raised on); bisect finds it in a pipeline; approximate passes are held to their bound;
the comparison is NaN-, ±Inf- and ±0-aware.

The wrong passes here are registered for one test only (the `register` fixture removes them), so
the pass property tests never see them.
"""

import inspect
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import graphopt
from graphopt.builder import Builder
from graphopt.errors import SignatureError, ValidationError, ValidationWarning
from graphopt.frameworks import adapt
from graphopt.pipeline import EXACT, PASSES, PIPELINES, approximate, register_pass, run_pipeline
from graphopt.testing import programs
from graphopt.validate import Validator, bisect, compare


@pytest.fixture
def register():
    """`register(name, contract)(fn)` registers a test pass until the end of the test."""
    names = []

    def add(name, contract=EXACT):
        def decorate(fn):
            register_pass(name, contract=contract)(fn)
            names.append(name)
            return fn
        return decorate

    yield add
    for name in names:
        PASSES.pop(name, None)


def _replace_ops(graph, op_name, made_by, build):
    """Replace every `op_name` node's output by `build(builder, node)`."""
    for node in list(graph.nodes):
        if node.op.name == op_name:
            new = build(Builder(graph, before=node, made_by=made_by), node)
            graph.replace_all_uses(node.output, new)
            graph.erase(node)
    return graph


@pytest.fixture
def exp_to_exp2(register):
    """A wrong pass: exp(x) → exp2(x)."""
    @register("test_exp_to_exp2")
    def exp_to_exp2(graph, ctx):
        return _replace_ops(graph, "exp", "test_exp_to_exp2",
                            lambda b, node: b.op("exp2", node.inputs[0], **node.params))
    return "test_exp_to_exp2"


def model(x):
    y = jnp.exp(x)
    return jnp.sin(y) * 2  # the first node that diverges under exp → exp2


def _line_of(fn, text: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


def _ops(graph):
    return [n.op.name for n in graph.nodes]


X = jnp.linspace(-1.0, 1.0, 8)


def test_wrong_pass_is_reverted_with_a_warning_naming_pass_and_node(exp_to_exp2):
    graph = graphopt.trace(model, X)
    before = _ops(graph)
    with pytest.warns(ValidationWarning) as caught:
        result = run_pipeline(graph, ["dce", exp_to_exp2, "dce"], validator=Validator([(X,)]))
    message = str(caught.pop(ValidationWarning).message)
    assert f"pass '{exp_to_exp2}'" in message
    assert f"first diverging node: sin (test_validate.py:{_line_of(model, 'jnp.sin')})" in message
    assert f"operand 0 now reads exp2 (test_validate.py:{_line_of(model, 'jnp.exp')}, " \
           f"made by {exp_to_exp2}), was exp" in message
    assert "max relative error" in message and "reverted" in message
    assert _ops(result.graph) == before
    record = result.report.records[1]
    assert record.name == exp_to_exp2 and record.status.startswith("reverted: differs at sin")
    assert record.error > 0.01
    assert [r.status for r in result.report.records[::2]] == ["ok", "ok"]
    np.testing.assert_array_equal(jax.jit(graphopt.lower(result.graph))(X), jax.jit(model)(X))


def test_raise_mode_raises_with_pass_node_and_error(exp_to_exp2):
    graph = graphopt.trace(model, X)
    with pytest.raises(ValidationError, match="first diverging node: sin") as caught:
        run_pipeline(graph, [exp_to_exp2], validator=Validator(on_mismatch="raise"))
    assert caught.value.pass_name == exp_to_exp2
    assert caught.value.node.startswith("sin (test_validate.py:")
    assert caught.value.error > 0.01


def test_bisect_finds_exactly_the_wrong_pass(exp_to_exp2):
    result = bisect(model, X, pipeline=["dce", exp_to_exp2, "dce"])
    assert result.pass_name == exp_to_exp2
    assert result.node.startswith("sin (test_validate.py:")
    assert result.error > 0.01
    assert result.report.splitlines()[:2] == [f"bisect: dce → {exp_to_exp2} → dce", "  dce: ok, error 0"]


def test_bisect_takes_a_graph_and_leaves_it_alone(exp_to_exp2):
    graph = graphopt.trace(model, X)
    before = str(graph)
    assert bisect(graph, pipeline=[exp_to_exp2]).pass_name == exp_to_exp2
    assert str(graph) == before


def test_bisect_names_a_pass_that_makes_an_invalid_graph(register):
    @register("test_out_of_order")
    def out_of_order(graph, ctx):  # reads the last node's result before the first node: not SSA
        last, first = list(graph.nodes)[-1], next(graph.nodes)
        b = Builder(graph, before=first, made_by=ctx.name)
        graph.set_outputs([*graph.outputs, b.op("neg", last.output)])
        return graph

    result = bisect(model, X, pipeline=["dce", "test_out_of_order"])
    assert result.pass_name == "test_out_of_order" and result.error is None
    assert "made an invalid graph" in result.report


def test_bisect_of_a_correct_pipeline_names_no_pass():
    result = bisect(lambda x: jnp.tanh(x) + jnp.cos(x) * 0, X, pipeline=["dce", "dce"])
    assert (result.pass_name, result.node) == (None, None)
    assert result.report.endswith("every pass keeps the results (max relative error 0)")


def test_approximate_pass_within_its_bound_is_accepted_and_its_error_recorded(register):
    def scale_outputs(graph, ctx):  # multiplies every result by 1.001: relative error 1e-3
        b = Builder(graph, made_by=ctx.name)
        graph.set_outputs([b.op("mul", v, b.const(1.001, like=v)) for v in graph.outputs])
        return graph

    register("test_scale_loose", approximate(1e-2))(scale_outputs)
    register("test_scale_tight", approximate(1e-4))(scale_outputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loose = run_pipeline(graphopt.trace(model, X), ["test_scale_loose"], validator=Validator())
    record = loose.report.records[0]
    assert record.status == "ok" and 0.9e-3 < record.error < 1.1e-3
    assert _ops(loose.graph)[-1] == "mul"  # kept
    with pytest.warns(ValidationWarning, match=r"relative error 0.001 exceeds the contract's bound 0.0001"):
        tight = run_pipeline(graphopt.trace(model, X), ["test_scale_tight"], validator=Validator())
    assert tight.report.records[0].status.startswith("reverted")


@pytest.fixture
def neg_to_sub(register):
    """A wrong pass: -x → 0 - x, which turns −0 results (x = +0) into +0."""
    @register("test_neg_to_sub")
    def neg_to_sub(graph, ctx):
        return _replace_ops(graph, "neg", "test_neg_to_sub",
                            lambda b, node: b.op("sub", b.const(0.0, like=node.inputs[0]), node.inputs[0]))
    return "test_neg_to_sub"


def test_negative_zero_becoming_positive_is_caught_under_exact(neg_to_sub):
    graph = graphopt.trace(lambda x: -x, jnp.ones(6))
    with pytest.warns(ValidationWarning) as caught:  # random inputs hold +0 (and −0, NaN, ±Inf)
        result = run_pipeline(graph, [neg_to_sub], validator=Validator())
    message = str(caught.pop(ValidationWarning).message)
    assert "NaN, ±Inf, ±0 must match" in message and "after 0.0, before -0.0" in message
    # No kept node differs; the output is computed by the node the pass made.
    assert "graph output 0 does, computed by sub (" in message and "made by test_neg_to_sub" in message
    assert _ops(result.graph) == ["neg"]


def test_negative_zero_is_caught_on_user_inputs_alone(neg_to_sub):
    graph = graphopt.trace(lambda x: -x, jnp.ones(2))
    with pytest.warns(ValidationWarning, match="user input set 0"):
        run_pipeline(graph, [neg_to_sub], validator=Validator([(jnp.array([1.0, 0.0]),)], random_inputs=0))


def test_special_values_catch_fast_math_rewrites(register):
    @register("test_sub_self")
    def sub_self(graph, ctx):  # x - x → 0: right for every finite x (−0 too), wrong for NaN and ±Inf
        def zero(b, node):
            return b.op("broadcast_in_dim", b.const(0.0, like=node.output), shape=node.output.type.shape,
                        broadcast_dimensions=(), sharding=None)
        return _replace_ops(graph, "sub", "test_sub_self", zero)

    graph = graphopt.trace(lambda x: jnp.tanh(x - x), jnp.ones(8))
    with pytest.warns(ValidationWarning, match=r"random input set 1 \(with −0, \+0, NaN, ±Inf\)"):
        run_pipeline(graph, ["test_sub_self"], validator=Validator())


def test_a_graph_that_no_longer_runs_is_reverted(register):
    @register("test_broken")
    def broken(graph, ctx):  # exp2 with a bad param: its shape rule accepts it, its lowering not
        return _replace_ops(graph, "exp", "test_broken",
                            lambda b, node: b.op("exp2", node.inputs[0], accuracy="not an accuracy"))

    with pytest.warns(ValidationWarning, match="the graph after the pass fails to run"):
        result = run_pipeline(graphopt.trace(model, X), ["test_broken"], validator=Validator())
    assert result.report.records[0].error == math.inf


def test_unchanged_graph_is_not_run_again():
    graph = graphopt.trace(lambda x: jnp.sin(x), X)
    validator = Validator()
    result = run_pipeline(graph, ["dce", "dce"], validator=validator)
    assert [(r.status, r.error) for r in result.report.records] == [("ok", 0.0), ("ok", 0.0)]
    assert result.graph is graph and validator.records == result.report.records


def test_builtin_pipeline_on_a_model_with_params_validates_every_pass():
    def mlp(params, x):
        w, b = params["w"], params["b"]
        h = jnp.tanh(x @ (w.T * 0.5) + b)  # weight-only work: fold_params moves it to the prep graph
        return jnp.maximum(h, -h) / 3.0 + (x.sum() - x.sum())

    params = {"w": jnp.arange(12.0).reshape(3, 4) / 10, "b": jnp.ones(3)}
    x = jnp.linspace(-2, 2, 4)
    graph = graphopt.trace(mlp, params, x, params_argnums=0)
    pipeline = [name for name in PIPELINES["inference"] if name in PASSES]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ValidationWarning)
        result = run_pipeline(graph, pipeline, validator=Validator([(params, x)]))
    for record in result.report.records:
        assert record.status == "ok" and record.error is not None, record
        assert not any(note.startswith("not validated") for note in record.notes), record.notes
    if "fold_params" in pipeline:
        assert result.graph.prep is not None  # validated through the prep graph


@pytest.fixture(scope="module")
def copy_outputs():
    """A right pass that changes the graph: every output goes through a `copy`."""
    def copy_outputs(graph, ctx):
        b = Builder(graph, made_by=ctx.name)
        graph.set_outputs([b.op("copy", v) for v in graph.outputs])
        return graph

    register_pass("test_copy_outputs")(copy_outputs)
    yield "test_copy_outputs"
    PASSES.pop("test_copy_outputs", None)


@settings(max_examples=max(5, settings().max_examples // 5))
@given(program=programs(), data=st.data())
def test_right_passes_are_accepted_on_random_programs(copy_outputs, program, data):
    """No false alarms: regions, weak scalars, bools, size-0 arrays, NaN/±Inf/−0 inputs, params
    moved into a prep graph by fold_params."""
    params = data.draw(st.sampled_from([None, (0,)]), "params_argnums")
    graph = graphopt.trace(program, *program.args, params_argnums=params)
    note(str(graph))
    validator = Validator([adapt(program, program.args, params).args], on_mismatch="raise")
    result = run_pipeline(graph, ["fold_params", copy_outputs], validator=validator)
    assert result.report.records[-1].error is not None


def test_user_inputs_of_the_wrong_signature_are_refused():
    graph = graphopt.trace(model, X)
    with pytest.raises(SignatureError, match=r"user input set 0 does not match"):
        run_pipeline(graph, ["dce"], validator=Validator([(jnp.ones(3),)]))
    with pytest.raises(SignatureError, match=r"user input set 1 does not match"):
        run_pipeline(graph, ["dce"], validator=Validator([(X,), (X, X)]))


def test_optimize_verify_reverts_a_wrong_pass_and_stays_correct(exp_to_exp2):
    f = graphopt.optimize(model, pipeline=["dce", exp_to_exp2], verify=True)
    with pytest.warns(ValidationWarning, match=exp_to_exp2):
        out = f(X)
    np.testing.assert_array_equal(out, jax.jit(model)(X))
    assert "exp2" not in _ops(f.graph)


def test_optimize_verify_with_example_inputs(exp_to_exp2):
    f = graphopt.optimize(model, pipeline=[exp_to_exp2], verify=[(X,), (jnp.ones(2),)])
    validator = f._validator(f._call_args((X,))[0], (X,))
    assert len(validator.user_inputs) == 1  # the (2,) example has another signature
    with pytest.warns(ValidationWarning, match="user input set 0"):
        f(X)
    with pytest.raises(TypeError, match="verify must be"):
        graphopt.optimize(model, verify="yes")


@pytest.mark.parametrize("actual, expected, exact_ok", [
    ([np.float32([1.0, 2.0])], [np.float32([1.0, 2.0 + 1e-6])], True),        # within rtol
    ([np.float32([1.0, 2.0])], [np.float32([1.0, 2.1])], False),
    ([np.float32([np.nan, 1.0])], [np.float32([np.nan, 1.0])], True),        # NaN = NaN
    ([np.float32([np.nan, 1.0])], [np.float32([1.0, 1.0])], False),
    ([np.float32([np.inf])], [np.float32([-np.inf])], False),
    ([np.float32([-0.0])], [np.float32([0.0])], False),
    ([np.int32([1, 2])], [np.int32([1, 3])], False),                         # ints: exact
    ([jnp.bfloat16([1.0])], [jnp.bfloat16([1.0078125])], True),              # bf16 tolerance
    ([np.float32([1.0])], [np.float64([1.0])], False),                       # dtype
    ([np.float32([1.0])], [np.float32([[1.0]])], False),                     # shape
    ([np.float32([])], [np.float32([])], True),
])
def test_compare_under_exact(actual, expected, exact_ok):
    assert (compare(actual, expected, EXACT).problem is None) == exact_ok


def test_compare_error_is_relative_to_the_largest_finite_value():
    result = compare([np.float32([10.0, 0.1, np.nan])], [np.float32([10.0, 0.0, np.nan])], approximate(0.02))
    assert result.problem is None and math.isclose(result.error, 0.01, rel_tol=1e-5)
    assert "exceeds" in compare([np.float32([10.5])], [np.float32([10.0])], approximate(0.02)).problem
    assert "NaN and ±Inf" in compare([np.float32([np.inf])], [np.float32([1.0])], approximate(1.0)).problem

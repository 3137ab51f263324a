"""autocast: matmuls and convolutions get bfloat16 operands with float32 accumulation; norms,
softmax, reductions and transcendentals stay float32; types and results (within the bound) are
kept; fold_params halves the weight bytes; gradients still flow."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt.cost import graph_bytes
from graphopt.errors import GraphoptError
from graphopt.pipeline import approximate, run_pipeline
from graphopt.passes.autocast import BOUND, PRECISION_SENSITIVE
from graphopt.validate import Validator, compare

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared models
from models import linen_models, nnx_models  # noqa: E402

BF16, F32 = np.dtype(jnp.bfloat16), np.dtype(np.float32)
INFERENCE = ["canonicalize", "fold_constants", "autocast", "fold_params", "cse", "dce"]
MATMULS = {"dot_general", "conv_general_dilated"}


def _run(case, pipeline=INFERENCE):
    graph = graphopt.trace(case.target, *case.trace_args, **case.trace_kwargs)
    reference = graph.clone()[0]
    return reference, run_pipeline(graph, pipeline, debug=True)


def _error(reference, graph, args) -> float:
    expected = jax.jit(graphopt.lower(reference))(*args)
    actual = jax.jit(graphopt.lower(graph))(*graphopt.prepare(graph, *args))
    result = compare(jax.tree.leaves(actual), jax.tree.leaves(expected), approximate(BOUND))
    assert result.problem is None, result.problem
    return result.error


def _walk(graph):
    return list(graph.walk())


@pytest.mark.parametrize("make", [linen_models.make_mlp, linen_models.make_cnn_bn,
                                  linen_models.make_encoder_padmask, nnx_models.make_mlp],
                         ids=["linen-mlp", "linen-cnn", "linen-encoder", "nnx-mlp"])
def test_matmuls_run_in_bf16_with_f32_accumulation_and_outputs_keep_their_types(make):
    case = make()
    reference, result = _run(case)
    graph = result.graph
    assert [v.type for v in graph.outputs] == [v.type for v in reference.outputs]
    matmuls = [n for n in _walk(graph) if n.op.name in MATMULS]
    assert matmuls and all(v.type.dtype == BF16 for n in matmuls for v in n.inputs)
    assert all(n.params["preferred_element_type"] == F32 and n.output.type.dtype == F32 for n in matmuls)
    # everything else computes in float32: norms (reductions, rsqrt), softmax (exp, reduce_max), gelu
    sensitive = [n for n in _walk(graph) if n.op.name in PRECISION_SENSITIVE]
    assert sensitive and all(v.type.dtype != BF16 for n in sensitive for v in n.inputs + list(n.outputs))
    assert _error(reference, graph, case.args) < BOUND


@pytest.mark.parametrize("make", [linen_models.make_mlp, linen_models.make_encoder_padmask],
                         ids=["mlp", "encoder"])
def test_fold_params_halves_the_weight_bytes(make):
    case = make()
    reference, result = _run(case)
    kernels = [a for a in result.graph.params() if "kernel" in a.path]
    assert kernels and all(a.type.dtype == BF16 for a in kernels)
    _, float32 = _run(case, [p for p in INFERENCE if p != "autocast"])
    before, after = graph_bytes(float32.graph), graph_bytes(result.graph)
    assert result.report.records[-1].bytes[1] == after
    kernel_bytes = sum(a.type.nbytes for a in reference.params() if "kernel" in a.path)
    assert after == before - kernel_bytes // 2  # kernels halve; biases, scales, embeddings stay f32
    prep_ops = {n.op.name for n in result.graph.prep.graph.nodes}
    assert "convert_element_type" in prep_ops


def test_translation_validation_measures_the_error_within_the_bound():
    case = linen_models.make_encoder_padmask()
    graph = graphopt.trace(case.target, *case.trace_args)
    result = run_pipeline(graph, INFERENCE, validator=Validator([case.args]))
    record = next(r for r in result.report.records if r.name == "autocast")
    assert record.status == "ok" and 1e-4 < record.error < BOUND
    assert any("run in bfloat16" in note for note in record.notes)


def test_optimize_with_verify_keeps_the_pass():
    case = linen_models.make_mlp()
    fast = graphopt.optimize(case.target, pipeline=INFERENCE, verify=True)
    out = fast(*case.trace_args)
    expected = jax.jit(case.fn)(*case.args)
    assert np.abs(out - expected).max() <= BOUND * np.abs(expected).max()
    assert any(a.type.dtype == BF16 for a in fast.graph.params())  # not reverted by validation


def test_gradients_flow_through_the_casts():
    case = linen_models.make_mlp()
    graph = graphopt.trace(case.target, *case.trace_args)
    reference = graph.clone()[0]
    graph = run_pipeline(graph, ["canonicalize", "autocast", "cse", "dce"], debug=True).graph
    loss = lambda g: lambda v, x: jnp.sum(graphopt.lower(g)(v, x) ** 2)
    expected = jax.grad(loss(reference))(*case.args)
    actual = jax.grad(loss(graph))(*case.args)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == F32  # float32 master weights get float32 gradients
        assert np.abs(a - e).max() <= 4 * BOUND * np.abs(e).max()  # two matmuls per layer backward


def test_elementwise_option_without_round_trips_between_cast_ops():
    def f(w, x):
        h = (x @ w) * 2.0 + x[:, :3]
        return jnp.exp(h - 1.0)

    w, x = jnp.ones((4, 3)), jnp.linspace(-1, 1, 8).reshape(2, 4)
    graph = graphopt.trace(f, w, x, params_argnums=0)
    reference = graph.clone()[0]
    result = run_pipeline(graph, ["canonicalize", "autocast(elementwise=True)"], debug=True)
    fired = result.report.records[1].fired
    assert fired["autocast/elementwise"] == 3
    converts = [n for n in result.graph.nodes if n.op.name == "convert_element_type"]
    assert not any(n.inputs[0].node in converts for n in converts)  # no bf16 → f32 → bf16 trips
    assert not any(n.op.name == "constant" and n.output.type.dtype == F32 and n.output.uses
                   for n in result.graph.nodes)  # constants operands were converted at once
    ops = {n.op.name: n for n in result.graph.nodes}
    assert ops["mul"].output.type.dtype == BF16 and ops["add"].output.type.dtype == BF16
    assert ops["exp"].inputs[0].type.dtype == F32  # exp stays float32
    _error(reference, result.graph, (w, x))


def test_options_choose_dtype_and_ops():
    def f(w, k, x):
        y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME")
        return y.reshape(2, -1) @ w

    w, k, x = jnp.ones((4 * 5 * 5, 3)), jnp.ones((4, 2, 3, 3)), jnp.ones((2, 2, 5, 5))
    graph = run_pipeline(graphopt.trace(f, w, k, x, params_argnums=(0, 1)),
                         ["autocast(compute_dtype='float16', keep_f32=('conv_general_dilated',))"]).graph
    conv = next(n for n in graph.nodes if n.op.name == "conv_general_dilated")
    dot = next(n for n in graph.nodes if n.op.name == "dot_general")
    assert conv.inputs[0].type.dtype == F32 and dot.inputs[1].type.dtype == np.float16
    with pytest.raises(GraphoptError, match="exp stay float32"):
        run_pipeline(graphopt.trace(f, w, k, x), ["autocast(ops=('dot_general', 'exp'))"])
    with pytest.raises(GraphoptError, match="compute_dtype must be one of"):
        run_pipeline(graphopt.trace(f, w, k, x), ["autocast(compute_dtype='int8')"])


def test_float64_and_low_precision_graphs_are_left_alone():
    with jax.enable_x64(True):
        graph = graphopt.trace(lambda a, b: a @ b, np.ones((2, 3)), np.ones((3, 2)))
        assert not run_pipeline(graph, ["autocast"]).report.records[0].fired
    graph = graphopt.trace(lambda a, b: a @ b, jnp.ones((2, 3), BF16), jnp.ones((3, 2), BF16))
    assert not run_pipeline(graph, ["autocast"]).report.records[0].fired


def test_nan_inf_and_negative_zero_survive_the_cast():
    x = np.float32([[np.nan, 1.0, 2.0], [np.inf, 0.5, -1.0], [-0.0, -0.0, -0.0]])
    w = np.float32([[1.0], [2.0], [3.0]])
    graph = graphopt.trace(lambda w, x: x @ w, w, x, params_argnums=0)
    expected = jax.jit(graphopt.lower(graph.clone()[0]))(w, x)
    graph = run_pipeline(graph, ["autocast"]).graph
    actual = np.asarray(jax.jit(graphopt.lower(graph))(w, x))
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    np.testing.assert_array_equal(actual[1:], expected[1:])  # the Inf row, the zero row
    np.testing.assert_array_equal(np.signbit(actual), np.signbit(expected))


# --- graphopt's semantic ops ---------------------------------------------------------------------

nn_ops = pytest.importorskip("graphopt.nn_ops")


def _composite_graph():
    from graphopt.ir import Graph
    from graphopt.types import TensorType

    g = Graph()
    t = lambda *s: TensorType(s, F32)
    x, w, b = g.add_input(t(2, 4, 8)), g.add_input(t(8, 8), "param", "w"), g.add_input(t(8), "param", "b")
    h = nn_ops.linear_node(g, x, w, b)
    q = h.node.graph.add_node(graphopt.ops.primitive_named("reshape"), [h],
                              {"new_sizes": (2, 4, 2, 4), "dimensions": None, "sharding": None}).output
    a = nn_ops.attention_node(g, q, q, q)
    n = nn_ops.layer_norm_node(g, a, axes=(-2, -1))
    g.set_outputs([nn_ops.softmax_node(g, n, axes=-1)])
    g.in_tree = jax.tree_util.tree_structure((0, 0, 0))
    g.verify()
    return g


def test_linear_and_attention_run_low_softmax_and_norms_stay_f32():
    graph = _composite_graph()
    reference = graph.clone()[0]
    result = run_pipeline(graph, ["autocast"], debug=True)
    assert dict(result.report.records[0].fired) == {"autocast/linear": 1, "autocast/attention": 1}
    ops = {n.op.name: n for n in result.graph.nodes}
    assert [v.type.dtype for v in ops["linear"].inputs] == [BF16, BF16, F32]
    assert ops["linear"].output.type.dtype == F32
    assert all(v.type.dtype == BF16 for v in ops["attention"].inputs)
    assert ops["layer_norm"].inputs[0].type.dtype == F32 and ops["softmax"].inputs[0].type.dtype == F32
    rng = np.random.default_rng(0)
    args = [rng.normal(size=v.type.shape).astype(np.float32) for v in reference.inputs]
    expected = jax.jit(graphopt.lower(reference).flat)(*args)
    actual = jax.jit(graphopt.lower(result.graph).flat)(*args)
    assert compare(actual, expected, approximate(BOUND)).problem is None


def test_after_raise_ops_composites_are_cast_and_keep_their_flops():
    """The place in the pipeline: after raise_ops (linear, attention cast whole; norms, softmax
    kept whole), before fuse_attention and fold_params."""
    from graphopt.pipeline import PASSES

    if "raise_ops" not in PASSES:
        pytest.skip("raise_ops is not registered")
    case = linen_models.make_encoder_padmask()
    order = ["canonicalize", "fold_constants", "raise_ops", "autocast", "fold_params", "cse", "dce"]
    reference, result = _run(case, order)
    record = result.report.records[order.index("autocast")]
    assert record.fired["autocast/linear"] == 9 and record.fired["autocast/attention"] == 2
    assert record.flops[0] == record.flops[1]  # each cast composite's decomposition: its reference
    kept = [n for n in result.graph.nodes if n.op.name in ("layer_norm", "softmax", "gelu")]
    assert kept and all(v.type.dtype == F32 for n in kept for v in n.inputs)
    assert _error(reference, result.graph, case.args) < BOUND


def test_a_composite_with_a_chosen_kernel_is_left_alone():
    from graphopt.ir import Graph
    from graphopt.types import TensorType

    g = Graph()
    q = g.add_input(TensorType((2, 4, 2, 4), F32))
    g.set_outputs([nn_ops.attention_node(g, q, q, q, implementation="xla")])
    assert not run_pipeline(g, ["autocast"]).report.records[0].fired  # its kernel took f32 inputs


def test_decomposition_regions_of_kept_composites_stay_f32():
    from graphopt.ir import Graph
    from graphopt.types import TensorType

    g = Graph()
    x = g.add_input(TensorType((2, 8), F32))
    region = nn_ops.decomposition(lambda v: jax.nn.softmax(v * 2.0 - 1.0, axis=-1), [x.type])
    g.set_outputs([nn_ops.softmax_node(g, x, decomposition=region)])  # (a region of any form)
    result = run_pipeline(g, ["autocast(elementwise=True)"], debug=True)
    assert not result.report.records[0].fired  # the region's mul and sub stay float32
    inner = [n for n in result.graph.walk() if n.graph is not result.graph]
    assert {"mul", "sub"} <= {n.op.name for n in inner}
    assert all(v.type.dtype == F32 for n in inner for v in n.outputs)

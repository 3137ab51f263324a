"""fold_batchnorm: every BatchNorm spelling folds into its conv/matmul; after fold_params no BN
arithmetic runs on activations; results stay within the bound; the cases that must not fold don't."""

import sys
import warnings
from pathlib import Path

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt.pattern import explain
from graphopt.pipeline import run_pipeline
from graphopt.testing import assert_equivalent
from graphopt.validate import Validator, compare
from graphopt.passes.fold_batchnorm import BOUND, RULES
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared models
from models import linen_models, nnx_models, numpy_init  # noqa: E402

PIPELINE = ["canonicalize", "fold_constants", "fold_batchnorm", "fold_params", "cse", "dce"]
BN_OPS = {"sub", "mul", "div", "rsqrt", "sqrt"}
LINEAR = {"conv_general_dilated", "dot_general"}


def _optimized(fn, *args, params_argnums=None, pipeline=PIPELINE):
    graph = graphopt.trace(fn, *args, params_argnums=params_argnums)
    reference = graph.clone()[0]
    result = run_pipeline(graph, pipeline, debug=True)
    return reference, result


def _activation_bn_ops(graph) -> list[str]:
    """BN-like arithmetic left between a linear op and its next non-affine reader."""
    left = []
    for node in graph.nodes:
        if node.op.name in LINEAR:
            value = node.output
            while len(value.uses) == 1 and value.users() and value.users()[0].op.name in BN_OPS | {"add"}:
                user = value.users()[0]
                if user.op.name in BN_OPS:
                    left.append(user.op.name)
                value = user.output
    return left


def _check_close(reference, graph, *args):
    expected = jax.jit(graphopt.lower(reference))(*args)
    actual = jax.jit(graphopt.lower(graph))(*graphopt.prepare(graph, *args))
    result = compare(jax.tree.leaves(actual), jax.tree.leaves(expected), graphopt.pipeline.approximate(BOUND))
    assert result.problem is None, result.problem
    return result.error


def _fired(result) -> dict:
    return dict(result.report.records[PIPELINE.index("fold_batchnorm")].fired)


@pytest.mark.parametrize("make", [linen_models.make_cnn_bn, nnx_models.make_cnn_bn], ids=["linen", "nnx"])
def test_framework_cnn_folds_every_batchnorm(make):
    case = make()
    reference, result = _optimized(case.target, *case.trace_args, **case.trace_kwargs)
    fired = _fired(result)
    assert fired["fold_batchnorm/scale-into-kernel"] == 2 and fired["fold_batchnorm/scale-through-bias"] == 2
    assert _activation_bn_ops(reference) == ["sub", "mul"] * 2  # per BatchNorm: (y − mean)·s + beta
    assert _activation_bn_ops(result.graph) == []
    ops = [n.op.name for n in result.graph.nodes]
    assert ops.count("conv_general_dilated") == 2 and "rsqrt" not in ops and "sub" not in ops
    # the weight-side work (W·s, the merged bias) runs in the prep graph, once per weights
    prep_ops = [n.op.name for n in result.graph.prep.graph.nodes]
    assert prep_ops.count("rsqrt") == 2 and "mul" in prep_ops
    assert _check_close(reference, result.graph, *case.args) < 1e-5


def test_hand_written_channel_first_with_division_folds():
    def f(p, x):
        y = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
        c = lambda v: v[:, None, None]
        return (y - c(p["mean"])) / jnp.sqrt(c(p["var"]) + 1e-5) * c(p["gamma"]) + c(p["beta"])

    rng = np.random.default_rng(0)
    p = {"w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "mean": rng.normal(size=4).astype(np.float32),
         "var": rng.uniform(0.5, 2, 4).astype(np.float32), "gamma": rng.normal(size=4).astype(np.float32),
         "beta": rng.normal(size=4).astype(np.float32)}
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    snapshot = jax.tree.map(np.copy, p)
    reference, result = _optimized(f, p, x, params_argnums=0)
    assert _fired(result)["fold_batchnorm/divide-as-multiply"] == 1
    assert [n.op.name for n in result.graph.nodes] == ["conv_general_dilated", "add"]
    _check_close(reference, result.graph, p, x)
    jax.tree.map(np.testing.assert_array_equal, p, snapshot)  # the user's arrays are untouched


class DenseBN(nn.Module):
    use_bias: bool

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, use_bias=self.use_bias)(x)
        return nn.BatchNorm(use_running_average=True)(x)


@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_batchnorm_folds_with_and_without_bias(use_bias):
    x = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
    model = DenseBN(use_bias)
    variables = numpy_init(jax.eval_shape(model.init, jax.random.key(0), x), seed=2)
    reference, result = _optimized(model.apply, variables, x)
    assert [n.op.name for n in result.graph.nodes] == ["dot_general", "add"]
    _check_close(reference, result.graph, variables, x)


def test_belongs_before_raise_ops():
    """raise_ops makes `dot + bias` a linear node, which the rules do not look into: fold first."""
    from graphopt.pipeline import PASSES

    if "raise_ops" not in PASSES:
        pytest.skip("raise_ops is not registered")
    x = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
    model = DenseBN(True)
    variables = numpy_init(jax.eval_shape(model.init, jax.random.key(0), x), seed=2)
    order = ["canonicalize", "fold_batchnorm", "raise_ops", "fold_params", "dce"]
    reference, result = _optimized(model.apply, variables, x, pipeline=order)
    assert [n.op.name for n in result.graph.nodes] == ["linear"]  # matmul, folded BN bias
    _check_close(reference, result.graph, variables, x)


def test_weight_as_the_left_operand_of_a_dot():
    def f(p, x):  # W @ xᵀ, as equinox's Linear writes it: output features come from the lhs
        y = jnp.einsum("oi,bi->ob", p["w"], x)
        return (y - p["mean"][:, None]) * p["s"][:, None]

    rng = np.random.default_rng(11)
    p = {"w": rng.normal(size=(4, 6)).astype(np.float32), "mean": rng.normal(size=4).astype(np.float32),
         "s": rng.normal(size=4).astype(np.float32)}
    x = rng.normal(size=(3, 6)).astype(np.float32)
    reference, result = _optimized(f, p, x, params_argnums=0)
    assert _fired(result)["fold_batchnorm/scale-into-kernel"] == 1
    assert _activation_bn_ops(result.graph) == []
    _check_close(reference, result.graph, p, x)


class ResBlock(nn.Module):
    train: bool = False

    @nn.compact
    def __call__(self, x):
        bn = lambda: nn.BatchNorm(use_running_average=not self.train, momentum=0.5)
        h = nn.relu(bn()(nn.Conv(8, (3, 3), use_bias=False)(x)))
        h = bn()(nn.Conv(8, (3, 3), use_bias=False)(h))
        shortcut = bn()(nn.Conv(8, (1, 1), use_bias=False)(x))
        return nn.relu(h + shortcut)


def test_residual_block_after_a_few_training_steps():
    x = np.random.default_rng(2).normal(size=(4, 8, 8, 3)).astype(np.float32)
    variables = ResBlock().init(jax.random.key(0), x)
    params, stats = variables["params"], variables["batch_stats"]

    def loss(params, stats, batch):
        out, update = ResBlock(train=True).apply({"params": params, "batch_stats": stats}, batch,
                                                 mutable=["batch_stats"])
        return jnp.mean((out - 1.0) ** 2), update["batch_stats"]

    for step in range(3):  # real steps: running statistics and trained affines, as training leaves them
        grads, stats = jax.grad(loss, has_aux=True)(params, stats, x * (1 + step) + step)
        params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
    variables = {"params": params, "batch_stats": stats}
    reference, result = _optimized(ResBlock().apply, variables, x)
    assert _fired(result)["fold_batchnorm/scale-into-kernel"] == 3
    assert _activation_bn_ops(result.graph) == []
    assert _check_close(reference, result.graph, variables, x) < 1e-5


@pytest.mark.parametrize("groups", [2, 8], ids=["grouped", "depthwise"])
def test_grouped_and_depthwise_convs_fold_correctly(groups):
    model = nn.Sequential([nn.Conv(16, (3, 3), feature_group_count=groups),
                           nn.BatchNorm(use_running_average=True)])
    x = np.random.default_rng(3).normal(size=(2, 6, 6, 8)).astype(np.float32)
    variables = numpy_init(jax.eval_shape(model.init, jax.random.key(0), x), seed=4)
    reference, result = _optimized(model.apply, variables, x)
    assert _fired(result)["fold_batchnorm/scale-into-kernel"] == 1
    _check_close(reference, result.graph, variables, x)


def test_batch_grouped_conv_folds_correctly():
    def f(p, x):  # batch_group_count: the convolution of weight gradients
        y = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "VALID", batch_group_count=2,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y * p["s"] + p["t"]

    rng = np.random.default_rng(10)
    p = {"w": rng.normal(size=(3, 3, 3, 4)).astype(np.float32), "s": rng.normal(size=4).astype(np.float32),
         "t": rng.normal(size=4).astype(np.float32)}
    x = rng.normal(size=(4, 6, 6, 3)).astype(np.float32)
    reference, result = _optimized(f, p, x, params_argnums=0)
    # the bias's reshape of a parameter stays: XLA does it for free (see fold_params)
    assert [n.op.name for n in result.graph.nodes] == ["conv_general_dilated", "reshape", "add"]
    _check_close(reference, result.graph, p, x)


def test_equinox_batchnorm_in_inference_mode():
    class M(eqx.Module):
        conv: eqx.nn.Conv2d
        bn: eqx.nn.BatchNorm

        def __init__(self, key):
            self.conv = eqx.nn.Conv2d(3, 4, 3, padding=1, key=key)
            self.bn = eqx.nn.BatchNorm(4, axis_name="batch", inference=True, mode="ema")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, state = eqx.nn.make_with_state(M)(jax.random.key(0))
    arrays, static = eqx.partition((model, state), eqx.is_array)
    arrays = jax.tree.map(lambda a: a + 0.5 if a.dtype == jnp.float32 else a, arrays)

    def run(arrays, x):
        m, s = eqx.combine(arrays, static)
        return jax.vmap(lambda xi: m.bn(m.conv(xi), s)[0], axis_name="batch")(x)

    x = np.random.default_rng(5).normal(size=(2, 3, 5, 5)).astype(np.float32)
    reference, result = _optimized(run, arrays, x, params_argnums=0)
    assert [n.op.name for n in result.graph.nodes] == ["conv_general_dilated", "add"]
    _check_close(reference, result.graph, arrays, x)


# --- what must not fold --------------------------------------------------------------------------

def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


W = np.random.default_rng(6).normal(size=(3, 3, 2, 4)).astype(np.float32)
X = np.random.default_rng(7).normal(size=(1, 5, 5, 2)).astype(np.float32)


def _fold_only(fn, *args, params_argnums=0):
    graph = graphopt.trace(fn, *args, params_argnums=params_argnums)
    result = run_pipeline(graph, ["canonicalize", "fold_batchnorm"], debug=True)
    return result.graph, dict(result.report.records[1].fired)


def test_scale_along_a_spatial_axis_does_not_fold():
    s = np.random.default_rng(8).normal(size=(1, 5, 1, 1)).astype(np.float32)
    graph, fired = _fold_only(lambda p, x: _conv(x, p["w"]) * p["s"], {"w": W, "s": s}, X)
    assert fired == {}
    mul = next(n for n in graph.nodes if n.op.name == "mul")
    assert "where" in explain(RULES[0], mul)


def test_conv_result_used_twice_does_not_fold():
    def f(p, x):
        y = _conv(x, p["w"])
        return p["s"] * y, y  # scale first: explain() reports the other operand order

    graph, fired = _fold_only(f, {"w": W, "s": np.ones(4, np.float32)}, X)
    assert fired == {}
    mul = next(n for n in graph.nodes if n.op.name == "mul")
    assert "uses; the rule needs one" in explain(RULES[0], mul)


def test_scale_depending_on_an_input_does_not_fold():
    graph, fired = _fold_only(lambda p, x, s: s * _conv(x, p["w"]), {"w": W}, X, np.ones(4, np.float32))
    assert fired == {}
    mul = next(n for n in graph.nodes if n.op.name == "mul")
    assert "not computed from parameters" in explain(RULES[0], mul)


def test_weights_that_are_inputs_and_half_precision_do_not_fold():
    _, fired = _fold_only(lambda s, x, w: _conv(x, w) * s, np.ones(4, np.float32), X, W)
    assert fired == {}
    half = {"w": W.astype(jnp.bfloat16), "s": np.ones(4, jnp.bfloat16)}
    _, fired = _fold_only(lambda p, x: _conv(x, p["w"]) * p["s"], half, X.astype(jnp.bfloat16))
    assert fired == {}


def test_constant_weights_and_scale_do_not_fold():
    """W·s of constants only would run on every call: fold_params moves parameter work only."""
    weights = jnp.asarray(W)
    _, fired = _fold_only(lambda x: _conv(x, weights) * 2.0, X, params_argnums=None)
    assert fired == {}


def test_nan_and_inf_inputs_keep_their_positions():
    def f(p, x):
        return ((x @ p["w"]) - p["mean"]) * p["s"] + p["beta"]

    rng = np.random.default_rng(9)
    p = {"w": rng.normal(size=(6, 4)).astype(np.float32), "mean": rng.normal(size=4).astype(np.float32),
         "s": np.float32([0.5, -2.0, 0.0, 3.0]), "beta": rng.normal(size=4).astype(np.float32)}
    x = rng.normal(size=(5, 6)).astype(np.float32)
    x[1, 2], x[3, 0], x[4, 5] = np.nan, np.inf, -np.inf
    reference, result = _optimized(f, p, x, params_argnums=0)
    assert _activation_bn_ops(result.graph) == []
    expected = jax.jit(graphopt.lower(reference))(p, x)
    actual = jax.jit(graphopt.lower(result.graph))(*graphopt.prepare(result.graph, p, x))
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(expected))
    assert_equivalent(actual, expected, rtol=BOUND, atol=BOUND)


def test_translation_validation_accepts_the_fold_and_reports_its_error():
    case = linen_models.make_cnn_bn()
    graph = graphopt.trace(case.target, *case.trace_args)
    validator = Validator([case.args])
    result = run_pipeline(graph, PIPELINE, validator=validator)
    record = next(r for r in result.report.records if r.name == "fold_batchnorm")
    assert record.status == "ok" and 0 < record.error < 1e-5

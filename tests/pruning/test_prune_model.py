"""graphopt.prune end to end: exact against zeroed consumer rows, targets met, iterative rounds,
recovery, save/load, reports, and errors for models or requests that cannot be pruned."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt.cost import graph_flops
from graphopt.passes.prune.deps import PruneError
from graphopt.pruning import load, prune


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(64, name="up")(x))
        return nn.Dense(4, name="down")(h) + nn.Dense(4, name="skip")(x)


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    x = jax.random.normal(jax.random.key(1), (8, 16))
    return model, model.init(jax.random.key(0), x), x


def test_pruned_model_equals_the_model_with_consumer_rows_zeroed(mlp):
    model, variables, x = mlp
    before = jax.tree.map(np.array, variables)
    pruned = prune(model.apply, variables, x, ratio=0.5, params_argnums=0, measure=False)
    kept = pruned.keep["params/up/kernel:1"]
    assert len(kept) == 32 and pruned.params["params"]["up"]["kernel"].shape == (16, 32)
    zeroed = jax.tree.map(np.array, variables)
    dropped = np.setdiff1d(np.arange(64), kept)
    zeroed["params"]["down"]["kernel"][dropped] = 0
    np.testing.assert_allclose(pruned(x), model.apply(zeroed, x), rtol=1e-5, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, variables, before)  # the user's arrays are untouched


def test_a_flops_target_is_met_on_a_transformer():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm()(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=4)(h, h)
            return x + nn.Dense(32)(nn.relu(nn.Dense(128)(nn.LayerNorm()(x))))

    model, x = Block(), jax.random.normal(jax.random.key(2), (2, 8, 32))
    variables = model.init(jax.random.key(0), x)
    pruned = prune(model.apply, variables, x, flops=0.4, params_argnums=0, measure=False)
    original = graphopt.trace(model.apply, variables, x, params_argnums=0)
    assert graph_flops(pruned.graph)[0] <= 0.6 * graph_flops(original)[0]
    assert pruned(x).shape == x.shape
    flops = pruned.report.totals["flops"]
    assert flops == (graph_flops(original)[0], graph_flops(pruned.graph)[0])


def test_rounds_compound_and_replay_from_the_kept_indices(mlp, tmp_path):
    model, variables, x = mlp
    calls = []

    def recover(m):
        calls.append(m.params["params"]["up"]["kernel"].shape)
        return m.params

    pruned = prune(model.apply, variables, x, ratio=0.75, steps=2, multiple=1, recover=recover,
                   params_argnums=0, measure=False)
    assert calls == [(16, 32), (16, 16)]  # 1 - 0.25**0.5 = 50% per round
    assert np.all(np.diff(pruned.keep["params/up/kernel:1"]) > 0)
    pruned.save(tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors", model.apply, variables, x, params_argnums=0)
    np.testing.assert_array_equal(loaded(x), pruned(x))
    jax.tree.map(np.testing.assert_array_equal, loaded.params, pruned.params)


def test_load_rejects_other_files(mlp, tmp_path):
    from safetensors.numpy import save_file

    model, variables, x = mlp
    save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(PruneError, match="not a pruned model saved by graphopt"):
        load(tmp_path / "other.safetensors", model.apply, variables, x, params_argnums=0)


def test_distillation_recovers_the_unpruned_outputs(mlp):
    model, variables, x = mlp
    pruned = prune(model.apply, variables, x, ratio=0.75, params_argnums=0, measure=False)
    teacher = lambda xb: model.apply(variables, xb)  # noqa: E731
    batches = [jax.random.normal(jax.random.key(i), (32, 16)) for i in range(4)]
    gap = lambda m: float(jnp.mean((m(x) - teacher(x)) ** 2))  # noqa: E731
    tuned = pruned.distill(teacher, batches, steps=150, loss="mse", learning_rate=3e-3)
    assert gap(tuned) < 0.5 * gap(pruned)
    assert tuned.graph is pruned.graph and tuned.keep is pruned.keep


def test_report_lists_groups_layers_and_totals(mlp):
    model, variables, x = mlp
    error = lambda m: float(jnp.mean(jnp.abs(m(x) - model.apply(variables, x))))  # noqa: E731
    pruned = prune(model.apply, variables, x, ratio=0.5, params_argnums=0, evaluate=error)
    report = pruned.report
    assert report.metric[0] == 0.0 and report.metric[1] == pytest.approx(error(pruned))
    assert report.groups == [("params/up/kernel:1", 64, 32)]
    rows = {r.path: r for r in report.layers}
    assert rows["params/up/kernel"].params == (1024, 512) and rows["params/skip/kernel"].params == (64, 64)
    assert rows["params/down/kernel"].flops == (2 * 8 * 64 * 4, 2 * 8 * 32 * 4)
    assert report.speedup is not None and report.speedup > 0
    text = str(report)
    assert "params/up/kernel:1" in text and "64 → 32" in text and "measured speed" in text and "metric 0 →" in text


def test_models_that_cannot_be_pruned_say_why():
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    with pytest.raises(PruneError, match="nothing in this model can be pruned exactly: .*w:1: it reaches a model output"):
        prune(fn, {"w": jnp.ones((4, 3))}, jnp.ones((2, 4)), ratio=0.5, params_argnums=0)
    with pytest.raises(PruneError, match="params_argnums"):
        prune(fn, {"w": jnp.ones((4, 3))}, jnp.ones((2, 4)), ratio=0.5)


def test_calibrated_importances_run_through_prune(mlp):
    model, variables, x = mlp
    batches = [(jax.random.normal(jax.random.key(i), (8, 16)), jnp.arange(8) % 4) for i in range(2)]
    loss = lambda out, b: -jnp.mean(jax.nn.log_softmax(out)[jnp.arange(8), b[1]])  # noqa: E731
    for importance, extra in (("wanda", {}), ("taylor", {"loss": loss})):
        pruned = prune(model.apply, variables, x, ratio=0.5, importance=importance, calibration=batches,
                       inputs=lambda b: b[0], params_argnums=0, measure=False, **extra)
        assert pruned.params["params"]["down"]["kernel"].shape == (32, 4)
    with pytest.raises(PruneError, match="calibration batch gives 2 input arrays"):
        prune(model.apply, variables, x, ratio=0.5, importance="wanda", calibration=batches,
              params_argnums=0, measure=False)


def test_the_pruned_graph_runs_through_the_inference_pipeline(mlp):
    model, variables, x = mlp
    pruned = prune(model.apply, variables, x, ratio=0.5, params_argnums=0, measure=False)
    optimized = graphopt.run_pipeline(pruned.graph, "inference").graph
    args = graphopt.prepare(optimized, *pruned.arguments((x,)))
    np.testing.assert_allclose(jax.jit(graphopt.lower(optimized))(*args), pruned(x), rtol=1e-5, atol=1e-6)


def test_load_takes_abstract_arguments(mlp, tmp_path):
    model, variables, x = mlp
    pruned = prune(model.apply, variables, x, ratio=0.5, params_argnums=0, measure=False)
    pruned.save(tmp_path / "m.safetensors")
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    loaded = load(tmp_path / "m.safetensors", model.apply, abstract, x, params_argnums=0)
    np.testing.assert_array_equal(loaded(x), pruned(x))
    other = MLP()
    wide = jax.eval_shape(other.init, jax.random.key(0), jnp.ones((8, 32)))
    with pytest.raises(PruneError, match="saved from another model"):
        load(tmp_path / "m.safetensors", other.apply, wide, jnp.ones((8, 32)), params_argnums=0)


def test_layers_true_removes_a_weak_residual_block_whole(tmp_path):
    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(3):
                x = x + nn.Dense(16, name=f"down{i}")(nn.relu(nn.Dense(64, name=f"up{i}")(x)))
            return nn.Dense(4, name="head")(x)

    model, x = Stack(), jax.random.normal(jax.random.key(1), (8, 16))
    variables = jax.tree.map(np.array, model.init(jax.random.key(0), x))
    for name in ("up1", "down1"):  # block 1 barely contributes
        variables["params"][name]["kernel"] *= 1e-3
    pruned = prune(model.apply, variables, x, flops=0.3, layers=True, normalize=False, multiple=16,
                   params_argnums=0, measure=False)
    assert pruned.keep["params/up1/kernel:1"].size == 0
    assert pruned.params["params"]["up1"]["kernel"].shape == (16, 0)
    assert "0 (layer removed)" in str(pruned.report)
    zeroed = jax.tree.map(np.array, variables)
    zeroed["params"]["down1"]["kernel"][:] = 0
    for name, index in pruned.keep.items():
        layer = name.split("/")[1].replace("up", "down")
        zeroed["params"][layer]["kernel"][np.setdiff1d(np.arange(64), index)] = 0
    np.testing.assert_allclose(pruned(x), model.apply(zeroed, x), rtol=1e-5, atol=1e-5)
    pruned.save(tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors", model.apply, variables, x, params_argnums=0)
    np.testing.assert_array_equal(loaded(x), pruned(x))
    without = prune(model.apply, variables, x, flops=0.3, normalize=False, multiple=16, params_argnums=0,
                    measure=False)
    assert all(index.size for index in without.keep.values())


def test_heads_go_one_at_a_time_and_dimensions_in_multiples():
    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm()(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64, name="attn")(h, h)
            return x + nn.Dense(32, name="down")(nn.relu(nn.Dense(128, name="up")(x)))

    model, x = Attn(), jax.random.normal(jax.random.key(2), (2, 8, 32))
    variables = model.init(jax.random.key(0), x)
    pruned = prune(model.apply, variables, x, ratio=0.3, scope="local", multiple=8, params_argnums=0,
                   measure=False)
    sizes = {name: after for name, _, after in pruned.report.groups}
    assert sizes["params/attn/key/kernel:1"] == 3     # heads span 16 elements each: 30% of 4 -> 1 head
    assert sizes["params/attn/key/kernel:2"] == 16    # head dims in steps of 8: 30% of 16 -> none
    assert sizes["params/up/kernel:1"] == 96          # 30% of 128 = 38.4 -> 32 in steps of 8
    assert pruned(x).shape == x.shape

"""The sharding pass: Megatron plans from the dataflow, constraints, errors, and (on 8 simulated
CPU devices, in a subprocess: tests/sharding/check_8_devices.py) equal outputs and no more
collectives than a hand-written Megatron sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import graphopt
from graphopt.sharding import ShardingError, make_plan, param_memory, plan_model
from graphopt.passes.shard import shard_graph

SHARDING_TESTS = Path(__file__).resolve().parents[1] / "sharding"
sys.path.insert(0, str(SHARDING_TESTS))
import shard_models  # noqa: E402

MESHES = ["1x8", "2x4", "4x2", "8x1"]


def run_checks(*flags) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    done = subprocess.run([sys.executable, str(SHARDING_TESTS / "check_8_devices.py"), *flags], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["devices"] == 8
    assert not results["errors"], "\n".join(results["errors"])
    return results


@pytest.fixture(scope="module")
def on_8_devices():
    return run_checks()


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@pytest.fixture(scope="module")
def demo():
    return shard_models.demo()


# --- plans (no devices needed) ----------------------------------------------------------------------

def test_demo_transformer_plan_is_megatron(demo):
    model, variables, tokens = demo
    plan = plan_model(model.apply, _abstract(variables), _abstract(tokens), mesh="2x4")
    layer = "params/block_0"
    assert plan[f"{layer}/attn/query/kernel"] == P(None, "model", None)   # [d, heads, head_dim]
    assert plan[f"{layer}/attn/key/kernel"] == P(None, "model", None)
    assert plan[f"{layer}/attn/value/kernel"] == P(None, "model", None)
    assert plan[f"{layer}/attn/query/bias"] == P("model", None)
    assert plan[f"{layer}/attn/out/kernel"] == P("model", None, None)     # [heads, head_dim, d]
    assert plan[f"{layer}/attn/out/bias"] == P(None)
    assert plan[f"{layer}/up/kernel"] == P(None, "model")
    assert plan[f"{layer}/up/bias"] == P("model")
    assert plan[f"{layer}/down/kernel"] == P("model", None)
    assert plan[f"{layer}/down/bias"] == P(None)
    assert plan[f"{layer}/ln_attn/scale"] == P(None)
    assert plan["params/head/kernel"] == P(None, "model")                   # vocab-parallel LM head
    assert plan["params/embed/embedding"] == P(None, None)
    assert plan["tokens"] == P("data", None)
    reasons = {e.path: e.reason for e in plan.entries}
    assert reasons[f"{layer}/up/kernel"].startswith("column-parallel")
    assert reasons[f"{layer}/down/kernel"].startswith("row-parallel")
    assert "row-parallel" in reasons[f"{layer}/down/bias"]
    assert "embedding" in reasons["params/embed/embedding"]
    assert "column-parallel" in str(plan) and "per device" in str(plan)


def test_pairs_come_from_dataflow_not_names():
    # Names that say nothing; the second dot reads the first through an activation.
    p = {"a": jnp.ones((8, 32)), "b": jnp.ones((32, 8)), "c": jnp.ones((8, 4))}
    fn = lambda p, x: (jnp.tanh(x @ p["a"]) @ p["b"]) @ p["c"]  # noqa: E731
    plan = plan_model(fn, p, jnp.ones((4, 8)), mesh="1x4", params_argnums=0)
    assert (plan["a"], plan["b"], plan["c"]) == (P(None, "model"), P("model", None), P(None, "model"))


def test_gqa_splits_kv_heads_only_when_model_divides_them():
    scaling = shard_models.scaling_module()
    config = scaling.Config(layers=1, d_model=64, ffn=128, heads=8, kv_heads=2, vocab=128, dtype="float32")
    shapes, tokens = scaling.param_shapes(config), jax.ShapeDtypeStruct((4, 8), jnp.int32)
    fn = lambda p, t: scaling.decoder(p, t, config)  # noqa: E731
    split = plan_model(fn, shapes, tokens, mesh="4x2", params_argnums=0)
    assert [split[f"layers/0/{k}"] for k in ("wq", "wk", "wv", "wo")] == [
        P(None, "model"), P(None, "model"), P(None, "model"), P("model", None)]
    kept = plan_model(fn, shapes, tokens, mesh="2x4", params_argnums=0)
    assert [kept[f"layers/0/{k}"] for k in ("wq", "wk", "wv", "wo")] == [
        P(None, "model"), P(None, None), P(None, None), P("model", None)]
    assert "K/V replicated" in kept.entry("layers/0/wk").reason
    assert (kept["layers/0/w_gate"], kept["layers/0/w_up"], kept["layers/0/w_down"]) == (
        P(None, "model"), P(None, "model"), P("model", None))


def test_fsdp_splits_the_largest_remaining_axis_over_data(demo):
    model, variables, tokens = demo
    plan = plan_model(model.apply, variables, tokens, mesh="4x2", fsdp=True)
    assert plan["params/block_0/up/kernel"] == P("data", "model")        # [64, 256]: 64 is left
    assert plan["params/block_0/down/kernel"] == P("model", "data")
    assert plan["params/embed/embedding"] == P("data", None)            # [256, 64]: the larger
    assert "FSDP" in plan.entry("params/block_0/up/kernel").reason
    plain = plan_model(model.apply, variables, tokens, mesh="4x2")
    assert param_memory(plan).per_device < param_memory(plain).per_device / 3


def test_rules_override_the_automatic_choice(demo):
    model, variables, tokens = demo
    plan = plan_model(model.apply, variables, tokens, mesh="2x4",
                      rules=[(r"attn/.*/kernel", P()), (r"up/kernel", P("model", None))])
    assert plan["params/block_0/attn/query/kernel"] == P(None, None, None)
    assert plan["params/block_0/up/kernel"] == P("model", None)
    assert plan["params/block_0/down/kernel"] == P("model", None)          # automatic
    assert plan.entry("params/block_0/up/kernel").reason.startswith("rule 'up/kernel'")


def test_mesh_that_does_not_divide_is_a_clear_error(demo):
    model, variables, tokens = demo
    with pytest.raises(ShardingError) as err:
        plan_model(model.apply, variables, tokens, mesh="1x3")       # 8 heads over 3
    message = str(err.value)
    assert "params/block_0/attn" in message and "model=3" in message and "8 heads" in message
    assert "rules=[(" in message and "P()" in message
    with pytest.raises(ShardingError, match=r"batch size 8 .* data=3"):
        plan_model(model.apply, variables, tokens, mesh="3x1")
    with pytest.raises(ShardingError, match=r"rule 'up/kernel' splits params/block_0/up/kernel axis 1 \(size 256\)"):
        plan_model(model.apply, variables, tokens, mesh="1x3", rules=[(r"attn", P()), (r"up/kernel", P(None, "model")),
                                                                       (r"up/bias|down/kernel", P())])
    with pytest.raises(ShardingError, match="mesh axes must be"):
        plan_model(model.apply, variables, tokens, mesh={"batch": 2})


def test_per_device_bytes_on_abstract_shapes():
    w = {"up": jax.ShapeDtypeStruct((1024, 4096), jnp.bfloat16), "down": jax.ShapeDtypeStruct((4096, 1024), jnp.bfloat16)}
    fn = lambda w, x: jax.nn.gelu(x @ w["up"]) @ w["down"]  # noqa: E731
    plan = plan_model(fn, w, jax.ShapeDtypeStruct((64, 1024), jnp.bfloat16), mesh="16x16", params_argnums=0)
    memory = param_memory(plan)
    assert memory.total == 2 * 1024 * 4096 * 2
    assert memory.per_param["up"] == (1024 * 256 * 2, 1024 * 4096 * 2)
    fsdp = param_memory(plan_model(fn, w, jax.ShapeDtypeStruct((64, 1024), jnp.bfloat16), mesh="16x16",
                                   params_argnums=0, fsdp=True))
    assert fsdp.per_device == memory.per_device // 16


def test_pass_pins_layer_outputs_where_megatron_does():
    p = shard_models.mlp_params()
    graph = graphopt.trace(shard_models.mlp, p, jnp.ones((4, 32)), params_argnums=0)
    graph, plan = shard_graph(graph, {"data": 1, "model": 1})
    graph.verify()
    pins = [n for n in graph.nodes if n.op.name == "sharding_constraint"]
    assert [n.params["sharding"].spec for n in pins] == [P("data", "model"), P("data", None)]
    assert [n.inputs[0].node.op.name for n in pins] == ["add", "add"]   # after the bias adds
    assert graph.metadata["sharding"]["specs"]["w1"] == [None, "model"]
    lowered = jax.jit(graphopt.lower(graph))(p, jnp.ones((4, 32)))
    assert jnp.allclose(lowered, shard_models.mlp(p, jnp.ones((4, 32))), rtol=1e-5, atol=1e-6)


def test_traced_sharding_constraints_lower_back():
    mesh = graphopt.sharding.device_mesh("1x1")
    sharding = jax.sharding.NamedSharding(mesh, P("data"))
    graph = graphopt.trace(lambda x: jax.lax.with_sharding_constraint(jnp.sin(x), sharding), jnp.ones(4))
    assert [n.op.name for n in graph.nodes] == ["sin", "sharding_constraint"]
    assert list(graph.nodes)[1].params["sharding"] == sharding
    assert jax.jit(graphopt.lower(graph))(jnp.zeros(4)).tolist() == [0.0] * 4


# --- 8 simulated devices ----------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["demo", "mlp"])
def test_outputs_equal_the_unsharded_model_on_every_mesh(on_8_devices, model):
    for mesh in MESHES:
        result = on_8_devices[model][mesh]
        assert result["equal"], (mesh, result)


@pytest.mark.parametrize("model", ["demo", "mlp"])
def test_no_more_collectives_than_hand_written_megatron(on_8_devices, model):
    checked = 0
    for mesh in MESHES:
        result = on_8_devices[model][mesh]
        if "megatron" in result:
            checked += 1
            for kind, count in result["graphopt"].items():
                assert count <= result["megatron"][kind], (mesh, kind, result)
    assert checked
    # Megatron's forward: one all-reduce per attention block and per MLP, nothing else.
    expected = 2 if model == "demo" else 1
    for mesh in ("1x8", "2x4", "4x2"):
        assert on_8_devices[model][mesh]["graphopt"] == {
            "all-reduce": expected, "all-gather": 0, "reduce-scatter": 0, "all-to-all": 0, "collective-permute": 0}
    assert sum(on_8_devices[model]["8x1"]["graphopt"].values()) == 0    # pure data parallelism
    assert on_8_devices["demo"]["2x4"]["megatron_equal"] if model == "demo" else True


def test_a_jax_mesh_is_taken_by_axis_name(on_8_devices):
    assert on_8_devices["mesh_order"] == {"names": ["data", "model"], "shape": [2, 4], "transposed": True}


def test_sharded_call_places_copies_and_keeps_user_arrays(on_8_devices):
    assert on_8_devices["user_arrays_unchanged"]
    assert on_8_devices["demo"]["2x4"]["out_spec"] == "P('data', None, 'model')"   # logits split by vocab


def test_gqa_with_replicated_kv_runs_equal(on_8_devices):
    result = on_8_devices["gqa"]["2x4"]
    assert result["equal"], result
    assert result["specs"]["wk"] == "P(None, None)" and result["specs"]["wq"] == "P(None, 'model')"
    assert result["collectives"]["all-reduce"] == 2 and result["collectives"]["all-gather"] == 0


def test_fsdp_and_rule_override_run_equal(on_8_devices):
    fsdp, rule = on_8_devices["fsdp"], on_8_devices["rule"]
    assert fsdp["equal"] and rule["equal"], (fsdp, rule)
    assert fsdp["bytes"] < fsdp["bytes_without"] / 3
    assert fsdp["collectives"]["all-gather"] > 0          # FSDP gathers weights where they are used
    assert rule["w1"] == "P(None, None)" and rule["placed_replicated"] and rule["w2"] == "P('model', None)"


@pytest.mark.slow
def test_every_mesh_and_model_on_8_devices():
    results = run_checks("--slow")
    for model in ("demo", "mlp", "gqa"):
        for mesh in MESHES:
            result = results[model][mesh]
            assert result["equal"], (model, mesh, result)
            for kind, count in result.get("graphopt", {}).items():
                assert count <= result["megatron"][kind], (model, mesh, kind)
    assert results["nnx"]["equal"]
    assert results["nnx"]["specs"]["up/kernel"] == "P(None, 'model')"
    assert results["nnx"]["specs"]["down/kernel"] == "P('model', None)"

"""The sharding checks that need 8 devices, run in their own process; prints one JSON object.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding/check_8_devices.py [--slow]

tests/passes/test_shard.py runs this once per test session module and asserts on the results: the
rest of the test suite keeps its single CPU device. Each check records what it measured (errors,
specs, collective counts); the asserting is the test's.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import graphopt  # noqa: E402
from graphopt.sharding import count_collectives  # noqa: E402
from graphopt.testing import assert_equivalent  # noqa: E402

import shard_models  # noqa: E402

MESHES = ["1x8", "2x4", "4x2", "8x1"]
# All-reduces sum partial products in another order than one device does.
RTOL, ATOL = 1e-4, 1e-5


def compare(actual, expected) -> dict:
    error = float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))))
    try:
        assert_equivalent(actual, expected, rtol=RTOL, atol=ATOL)
        return {"error": error, "equal": True}
    except AssertionError as err:
        return {"error": error, "equal": False, "why": str(err)[:500]}


def hlo_collectives(jitted, args) -> dict:
    return count_collectives(jitted.lower(*args).compile().as_text())


def check_demo(results, meshes, megatron_meshes):
    model, variables, tokens = shard_models.demo()
    expected = jax.jit(model.apply)(variables, tokens)
    before = jax.tree_util.tree_map(lambda x: x.sharding, variables)
    for mesh in meshes:
        # 2x4 as a jax Mesh (JAX's default axis types: Explicit, which graphopt re-makes as Auto).
        given = jax.make_mesh((2, 4), ("data", "model")) if mesh == "2x4" else mesh
        sharded = graphopt.shard(model.apply, variables, tokens, mesh=given)
        out = sharded(variables, tokens)
        results["demo"][mesh] = {**compare(out, expected), "graphopt": sharded.report.collectives,
                                 "out_spec": str(out.sharding.spec)}
        if mesh in megatron_meshes:
            megatron, placed = shard_models.demo_megatron(model, variables, tokens, sharded.mesh)
            results["demo"][mesh].update(megatron=hlo_collectives(megatron, placed),
                                         megatron_equal=compare(megatron(*placed), expected)["equal"])
    after = jax.tree_util.tree_map(lambda x: x.sharding, variables)
    results["user_arrays_unchanged"] = before == after


def check_mlp(results, meshes, megatron_meshes):
    params, x = shard_models.mlp_params(), jax.random.normal(jax.random.PRNGKey(3), (16, 32))
    expected = jax.jit(shard_models.mlp)(params, x)
    for mesh in meshes:
        sharded = graphopt.shard(shard_models.mlp, params, x, mesh=mesh, params_argnums=0)
        results["mlp"][mesh] = {**compare(sharded(params, x), expected), "graphopt": sharded.report.collectives,
                                "specs": {k: str(v) for k, v in sharded.plan.specs().items()}}
        if mesh in megatron_meshes:
            megatron, placed = shard_models.mlp_megatron(params, x, sharded.mesh)
            results["mlp"][mesh]["megatron"] = hlo_collectives(megatron, placed)


def check_nnx(results):
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(32, 128, rngs=rngs)
            self.down = nnx.Linear(128, 32, rngs=rngs)

        def __call__(self, x):
            return self.down(jax.nn.relu(self.up(x)))

    module = MLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(4), (8, 32))
    expected = module(x)
    sharded = graphopt.shard(module, x, mesh="2x4")
    results["nnx"] = {**compare(sharded(x), expected), "specs": {k: str(v) for k, v in sharded.plan.specs().items()}}


def check_gqa(results, meshes):
    scaling = shard_models.scaling_module()
    config = scaling.Config(layers=1, d_model=64, ffn=128, heads=8, kv_heads=2, vocab=128, dtype="float32")
    params = scaling.init_params(config, jax.random.PRNGKey(5))
    tokens = jax.random.randint(jax.random.PRNGKey(6), (8, 8), 0, config.vocab)
    fn = lambda p, t: scaling.decoder(p, t, config)  # noqa: E731
    expected = jax.jit(fn)(params, tokens)
    for mesh in meshes:
        sharded = graphopt.shard(fn, params, tokens, mesh=mesh, params_argnums=0)
        results["gqa"][mesh] = {**compare(sharded(params, tokens), expected),
                                "specs": {k: str(sharded.plan[f"layers/0/{k}"]) for k in ("wq", "wk", "wv", "wo")},
                                "collectives": sharded.report.collectives}


def check_fsdp_and_rules(results):
    model, variables, tokens = shard_models.demo()
    expected = jax.jit(model.apply)(variables, tokens)
    fsdp = graphopt.shard(model.apply, variables, tokens, mesh="4x2", fsdp=True)
    plain = graphopt.sharding.plan_model(model.apply, variables, tokens, mesh="4x2")
    results["fsdp"] = {**compare(fsdp(variables, tokens), expected),
                       "bytes": fsdp.report.memory.per_device, "bytes_without": graphopt.sharding.param_memory(plain).per_device,
                       "up_kernel": str(fsdp.plan["params/block_0/up/kernel"]),
                       "collectives": fsdp.report.collectives}
    params, x = shard_models.mlp_params(), jax.random.normal(jax.random.PRNGKey(3), (16, 32))
    rule = graphopt.shard(shard_models.mlp, params, x, mesh="2x4", params_argnums=0, rules=[(r"^w1$", P())])
    placed = rule.place(params, x)
    results["rule"] = {**compare(rule(params, x), jax.jit(shard_models.mlp)(params, x)),
                       "w1": str(rule.plan["w1"]), "w2": str(rule.plan["w2"]),
                       "placed_replicated": bool(placed[0]["w1"].sharding.is_fully_replicated)}


def check_mesh_order(results):
    devices = np.asarray(jax.devices()).reshape(4, 2)
    mesh = graphopt.sharding.device_mesh(jax.sharding.Mesh(devices, ("model", "data")))
    results["mesh_order"] = {"names": list(mesh.axis_names), "shape": list(mesh.devices.shape),
                             "transposed": bool((mesh.devices == devices.T).all())}


def main(slow: bool) -> dict:
    results = {"devices": jax.device_count(), "demo": {}, "mlp": {}, "gqa": {}, "errors": [], "seconds": {}}
    megatron = MESHES if slow else ["2x4"]
    checks = [("demo", lambda: check_demo(results, MESHES, megatron)),
              ("mlp", lambda: check_mlp(results, MESHES, megatron)),
              ("gqa", lambda: check_gqa(results, MESHES if slow else ["2x4"])),
              ("fsdp_and_rules", lambda: check_fsdp_and_rules(results)),
              ("mesh_order", lambda: check_mesh_order(results))]
    if slow:
        checks.append(("nnx", lambda: check_nnx(results)))
    for name, check in checks:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            check()
        except Exception:  # reported, so the test shows the traceback instead of a missing key
            results["errors"].append(f"{name}: {traceback.format_exc()}")
        results["seconds"][name] = (round(time.perf_counter() - start, 2), round(time.process_time() - cpu, 2))
    return results


if __name__ == "__main__":
    print(json.dumps(main("--slow" in sys.argv)))

"""graphopt.sharding's small parts: mesh sizes, per-device shapes, HLO collective counting."""

import jax
import jax.numpy as jnp
import pytest

from graphopt.sharding import ShardingError, count_collectives, mesh_sizes, plan_model
from graphopt.sharding.plan import per_device_shape
from graphopt.sharding.report import plan_table

HLO = """
ENTRY %main {
  %all-reduce.1 = f32[8,64]{1,0} all-reduce(f32[8,64]{1,0} %dot.2), channel_id=1, replica_groups={{0,1}}
  %all-gather-start.3 = (f32[4], f32[8]) all-gather-start(f32[4]{0} %p), dimensions={0}
  %all-gather-done.3 = f32[8]{0} all-gather-done((f32[4], f32[8]) %all-gather-start.3)
  %reduce-scatter = f32[4]{0} reduce-scatter(f32[8]{0} %x), dimensions={0}
  %cp = f32[4]{0} collective-permute(f32[4]{0} %y), source_target_pairs={{0,1}}
  %fusion = f32[4]{0} fusion(f32[4]{0} %all-reduce.1), kind=kLoop
}
"""


def test_count_collectives_counts_instructions_not_names():
    assert count_collectives(HLO) == {"all-reduce": 1, "all-gather": 1, "reduce-scatter": 1,
                                      "all-to-all": 0, "collective-permute": 1}


def test_mesh_sizes():
    assert mesh_sizes("4x2") == {"data": 4, "model": 2}
    assert mesh_sizes({"data": 8}) == {"data": 8, "model": 1}
    for bad in ("4 by 2", {"tensor": 2}, {"data": 0}, 8):
        with pytest.raises(ShardingError):
            mesh_sizes(bad)


def test_per_device_shape_rounds_up_like_xla_padding():
    sizes = {"data": 4, "model": 2}
    assert per_device_shape((10, 6), ("data", "model"), sizes) == (3, 3)
    assert per_device_shape((8, 6), (("data", "model"), None), sizes) == (1, 6)
    assert per_device_shape((8,), (), sizes) == (8,)


def test_plan_table_lists_every_input_with_its_reason():
    w = {"up": jax.ShapeDtypeStruct((8, 32), jnp.float32), "down": jax.ShapeDtypeStruct((32, 8), jnp.float32)}
    plan = plan_model(lambda w, x: jax.nn.relu(x @ w["up"]) @ w["down"], w,
                      jax.ShapeDtypeStruct((4, 8), jnp.float32), mesh="2x4", params_argnums=0)
    table = plan_table(plan)
    assert table.splitlines()[0].startswith("sharding plan: mesh data=2 x model=4")
    assert "(·, model)" in table and "column-parallel" in table and "row-parallel" in table
    assert "batch (axis 0, 4) split over data" in table


def test_a_weight_holding_one_dimension_on_two_axes_is_replicated_not_split_twice():
    # x @ w @ w: w's output features are the next layer's input features, so both of w's axes hold
    # the same tensor-parallel dimension; P('model', 'model') is not a sharding.
    w, x = jax.ShapeDtypeStruct((16, 16), jnp.float32), jax.ShapeDtypeStruct((4, 16), jnp.float32)
    plan = plan_model(lambda w, x: jnp.tanh(jnp.tanh(x @ w) @ w), w, x, mesh="1x4", params_argnums=0)
    assert tuple(plan["w"]) == (None, None)
    assert "axes [0, 1] all hold one tensor-parallel dimension" in plan.entry("w").reason
    assert any("hold(s) it on more than one axis" in note for note in plan.notes)

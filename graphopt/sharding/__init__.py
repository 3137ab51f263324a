"""graphopt.sharding: tensor (Megatron) + data parallelism for XLA's SPMD partitioner.

graphopt writes no runtime of its own: it chooses a PartitionSpec per parameter and model input
from the graph's dataflow, pins activations with sharding constraints, and lets XLA partition.

    sharded = graphopt.shard(fn, *args, mesh="2x4" | {"data": 2, "model": 4} | jax Mesh,
                             params_argnums=None, pipeline="default", rules=[(regex, P(...))],
                             fsdp=False)
    sharded(*args)            # like fn; parameters placed once per set of weights (jax.device_put)
    sharded.place(*args)      # the placed arguments of sharded.jitted (the user's arrays untouched)
    sharded.plan              # Plan: path -> PartitionSpec (plan[path]) with a reason per input
    sharded.report            # plan table, per-device parameter bytes, collectives in compiled HLO
    plan_model(fn, *args, mesh=...)   # the plan only, from jax.ShapeDtypeStructs: no devices needed
    param_memory(plan)        # per-device parameter bytes of a plan (abstract shapes)

The mesh axes are named 'data' and 'model'. Parts: `analysis` (tensor-parallel dimensions from
the dataflow), `plan` (specs, rules, FSDP, divisibility errors), `passes/shard.py` (the pass:
constraints on activations), `report`, `api`.
"""

from graphopt.sharding.api import Sharded, plan_model, shard
from graphopt.sharding.mesh import ShardingError, device_mesh, mesh_sizes
from graphopt.sharding.plan import Entry, Plan, make_plan
from graphopt.sharding.report import ShardingReport, count_collectives, param_memory

__all__ = ["Entry", "Plan", "Sharded", "ShardingError", "ShardingReport", "count_collectives", "device_mesh",
           "make_plan", "mesh_sizes", "param_memory", "plan_model", "shard"]

"""`graphopt.shard`: trace, plan the sharding, pin activations, optimize, lower, jit with shardings.

Example (8 devices: on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts):
    >>> import graphopt, jax, jax.numpy as jnp
    >>> from graphopt.demo import DemoConfig, demo_model
    >>> model, variables, tokens = demo_model(DemoConfig(layers=1, seq=8, heads=8, width=64, batch=8))
    >>> sharded = graphopt.shard(model.apply, variables, tokens, mesh="2x4")  # doctest: +SKIP
    >>> sharded(variables, tokens).shape                                      # doctest: +SKIP
    (8, 8, 256)
    >>> print(sharded.report)                                                 # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable

import jax

from graphopt.errors import GraphoptError
from graphopt.frameworks import adapt
from graphopt.ir import Graph
from graphopt.lowering.emit import lower
from graphopt.pipeline import PipelineSpec, run_pipeline
from graphopt.sharding.mesh import device_mesh
from graphopt.sharding.plan import Plan, make_plan
from graphopt.sharding.report import ShardingReport, count_collectives, param_memory
from graphopt.trace import trace


def shard(fn: Callable, *args, mesh, params_argnums=None, pipeline: PipelineSpec = "default",
          rules=(), fsdp: bool = False) -> "Sharded":
    """Shard a model over `mesh` (tensor + data parallelism) and return a callable `Sharded`.

    Args:
        fn: a function, a Flax linen `module.apply`, an nnx or Equinox module (as `graphopt.trace`).
        args: example arguments (arrays or `jax.ShapeDtypeStruct`s).
        mesh: a `jax.sharding.Mesh` with axes ('data', 'model'), or sizes ({"data": 2, "model": 4}
            or "2x4") laid over the first devices.
        params_argnums: which arguments hold parameters (the framework's default if None).
        pipeline: the graphopt pipeline run after sharding; `fold_params` is left out (its prep
            would make new parameters whose placement XLA, not the plan, would choose).
        rules: [(path regex, PartitionSpec)], overriding the automatic plan (first match wins).
        fsdp: also split each parameter's largest remaining axis over 'data'.
    """
    return Sharded(fn, args, mesh, params_argnums, pipeline, rules, fsdp)


def plan_model(fn: Callable, *args, mesh, params_argnums=None, rules=(), fsdp: bool = False) -> Plan:
    """The sharding plan of a model, from abstract arguments too (`jax.ShapeDtypeStruct`s): no
    devices and no arrays needed.

    >>> import jax, jax.numpy as jnp
    >>> w = {"up": jax.ShapeDtypeStruct((1024, 4096), jnp.bfloat16),
    ...      "down": jax.ShapeDtypeStruct((4096, 1024), jnp.bfloat16)}
    >>> x = jax.ShapeDtypeStruct((64, 1024), jnp.bfloat16)
    >>> plan = plan_model(lambda w, x: jax.nn.gelu(x @ w["up"]) @ w["down"], w, x, mesh="16x16",
    ...                   params_argnums=0)
    >>> plan["up"], param_memory(plan).per_device
    (P(None, 'model'), 1048576)
    """
    graph = trace(fn, *args, params_argnums=params_argnums)
    return make_plan(graph, mesh, fsdp=fsdp, rules=rules)


class Sharded:
    """A model sharded by `graphopt.shard`. Call it like the model (an nnx / Equinox module: with
    the call's arguments only). `.plan`, `.graph`, `.mesh`, `.report`, `.place(*args)`."""

    def __init__(self, fn, args, mesh, params_argnums, pipeline, rules, fsdp):
        self.fn, self.params_argnums = fn, params_argnums
        from graphopt.passes.shard import shard_graph  # passes/shard.py imports this package

        self.mesh = device_mesh(mesh)
        graph = trace(fn, *args, params_argnums=params_argnums)
        graph, self.plan = shard_graph(graph, self.mesh, rules=rules, fsdp=fsdp)
        disable = ("fold_params",)
        self.pipeline_report = None
        if pipeline:
            result = run_pipeline(graph, pipeline, disable=disable)
            graph, self.pipeline_report = result.graph, result.report
        if graph.prep is not None:
            raise GraphoptError("the pipeline made a parameter prep graph (fold_params, quantize): the sharded "
                                "model takes the user's parameters as they are; drop that pass from the pipeline")
        self.graph: Graph = graph
        self.shardings = [jax.sharding.NamedSharding(self.mesh, e.partition_spec) for e in self.plan.entries]
        in_shardings = jax.tree_util.tree_unflatten(graph.in_tree, self.shardings)
        self.jitted = jax.jit(lower(graph), in_shardings=tuple(in_shardings))
        self._params = None  # (the user's parameter leaves, their placed copies)
        self._report = None
        self._hlo = None

    def place(self, *args) -> tuple:
        """The traced function's arguments put on the mesh (`jax.device_put` with each input's
        NamedSharding: new arrays, the user's are not modified). Parameters are placed once per
        set of parameter arrays."""
        flat, tree = jax.tree_util.tree_flatten(self._call_args(args))
        is_param = [e.role == "param" for e in self.plan.entries]
        if len(flat) != len(is_param):
            raise GraphoptError(f"expected {len(is_param)} array leaves (as traced), got {len(flat)}")
        params = [x for x, p in zip(flat, is_param) if p]
        if self._params is None or len(self._params[0]) != len(params) or any(
                a is not b for a, b in zip(self._params[0], params)):
            placed = jax.device_put(params, [s for s, p in zip(self.shardings, is_param) if p])
            self._params = (params, placed)
        placed_params = iter(self._params[1])
        inputs = [x for x, p in zip(flat, is_param) if not p]
        placed_inputs = iter(jax.device_put(inputs, [s for s, p in zip(self.shardings, is_param) if not p]))
        out = [next(placed_params) if p else next(placed_inputs) for p in is_param]
        return tuple(jax.tree_util.tree_unflatten(tree, out))

    def __call__(self, *args):
        return self.jitted(*self.place(*args))

    def _call_args(self, args: tuple) -> tuple:
        return adapt(self.fn, args, self.params_argnums).args

    @property
    def report(self) -> ShardingReport:
        """Plan table, per-device parameter bytes, and the compiled program's collectives."""
        if self._report is None:
            self._report = ShardingReport(self.plan, param_memory(self.plan), count_collectives(self.hlo()))
        return self._report

    def lower(self):
        """`jax.stages.Lowered` of the sharded program on abstract arguments (each input's shape,
        dtype and NamedSharding): no arrays needed, and the mesh's devices may be compile-only."""
        abstract = [jax.ShapeDtypeStruct(e.shape, e.dtype, sharding=s)
                    for e, s in zip(self.plan.entries, self.shardings)]
        return self.jitted.lower(*jax.tree_util.tree_unflatten(self.graph.in_tree, abstract))

    def hlo(self) -> str:
        """The compiled program's HLO text (compiled once)."""
        if self._hlo is None:
            self._hlo = self.lower().compile().as_text()
        return self._hlo

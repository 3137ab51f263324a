"""shard: tensor + data parallelism for XLA's SPMD partitioner (Megatron-style), from the dataflow.

graphopt writes no runtime: it chooses a PartitionSpec for every parameter and model input
(`graphopt.sharding.plan`) and pins the activations where Megatron pins them, with
`sharding_constraint` nodes (what `jax.lax.with_sharding_constraint` traces to), so the lowered
program tells XLA's SPMD partitioner the layout and the partitioner inserts the collectives.

    %h = dot_general %x, %up                 %h  = dot_general %x, %up          # up: P(None, 'model')
    %g = gelu %h                       →     %h' = sharding_constraint[P('data', None, 'model')] %h
    %y = dot_general %g, %down               %g  = gelu %h'
                                             %y  = dot_general %g, %down        # down: P('model', None)
                                             %y' = sharding_constraint[P('data', None, None)] %y

The constraint after a column-parallel layer keeps its output split by features (no
communication before the row-parallel layer); the one after a row-parallel layer makes its
output whole over `model`, which is where the partial sums are all-reduced: one all-reduce per
MLP and per attention block in the forward pass, as in Megatron. Constraints follow a layer's
bias add, so `raise_ops` still makes one `linear` of the dot and the bias.

Trade-offs: only the top-level graph is sharded (a loop over layers, `scan`, keeps its weights
replicated over `model`); a fused QKV kernel (one concatenated axis) is not split; FSDP memory is
saved at the price of an all-gather of each weight where it is used.

Contract: exact (sharding changes where values live, not what is computed; the partitioner's
all-reduces may sum in another order).

Example:
    >>> import graphopt, jax, jax.numpy as jnp
    >>> p = {"up": jnp.ones((4, 16)), "down": jnp.ones((16, 4))}
    >>> g = graphopt.trace(lambda p, x: jax.nn.relu(x @ p["up"]) @ p["down"], p, jnp.ones((2, 4)),
    ...                    params_argnums=0)
    >>> g, plan = shard_graph(g, {"data": 1, "model": 1})
    >>> [tuple(c.params["sharding"].spec) for c in g.nodes if c.op.name == "sharding_constraint"]
    [('data', 'model'), ('data', None)]
"""

from __future__ import annotations

import jax

from graphopt.ir import Graph
from graphopt.pipeline import register_pass
from graphopt.sharding.analysis import analyze
from graphopt.sharding.mesh import device_mesh
from graphopt.sharding.plan import Plan, make_plan
from graphopt.trace import inline_function


def shard_graph(graph: Graph, mesh, *, rules=(), fsdp: bool = False) -> tuple[Graph, Plan]:
    """Plan `graph`'s sharding on `mesh` and insert the activation constraints (in place).

    `mesh`: a `jax.sharding.Mesh` with axes 'data' and 'model', or sizes (`{"data": 2,
    "model": 4}`, '2x4') for the first devices. Returns the graph and the `Plan`; the plan is
    also kept, JSON-able, in `graph.metadata["sharding"]`.
    """
    analysis = analyze(graph)
    plan = make_plan(graph, mesh, fsdp=fsdp, rules=rules, analysis=analysis)
    jax_mesh = device_mesh(mesh)
    specs = {e.path: e.spec for e in plan.entries}
    for layer in analysis.layers:
        spec = specs.get(layer.param.path)
        if spec is None or "model" not in spec:
            continue
        split = {id(analysis.lead(layer.param, a)) for a, entry in enumerate(spec) if entry == "model"}
        out = layer.output
        out_spec = []
        for axis in range(out.type.ndim):
            dim = id(analysis.lead(out, axis))
            out_spec.append("model" if dim in split else "data" if dim in analysis.batch else None)
        if out_spec.count("data") > 1:  # a batch dimension seen twice: keep the first
            out_spec = [s if s != "data" or i == out_spec.index("data") else None for i, s in enumerate(out_spec)]
        _constrain(graph, out, jax.sharding.NamedSharding(jax_mesh, jax.sharding.PartitionSpec(*out_spec)))
    graph.metadata["sharding"] = {"mesh": plan.mesh, "fsdp": plan.fsdp,
                                  "specs": {e.path: list(e.spec) for e in plan.entries}}
    return graph, plan


def _constrain(graph: Graph, value, sharding) -> None:
    node = value.node
    provenance = node.provenance.derived("shard")
    with graph.inserting_before(node._next):
        (pinned,) = inline_function(graph, lambda x: jax.lax.with_sharding_constraint(x, sharding),
                                    [value], {}, provenance)
    graph.replace_all_uses(value, pinned)
    pinned.node.set_input(0, value)


@register_pass("shard")
def shard(graph, ctx, mesh="1x1", rules=(), fsdp: bool = False):
    """Tensor (Megatron) + data parallelism: parameter specs and activation sharding constraints."""
    # Without a mesh: one device, where the plan and the constraints change nothing (the pass can
    # be tried in any pipeline); `shard(mesh='2x4')` in a pipeline spec, or graphopt.shard, to use it.
    graph, plan = shard_graph(graph, mesh, rules=rules, fsdp=fsdp)
    for note in plan.notes:
        ctx.note(note)
    ctx.count({"constraint": sum(1 for n in graph.nodes if n.op.name == "sharding_constraint")})
    return graph

"""Export: a graph (or model) → a serialized `jax.export` artifact for any set of platforms.

Lowering for a platform needs no device of that kind, so a CPU machine can export for TPU and
CUDA. The artifact is JAX's own serialization format (StableHLO plus calling convention); load it
with `deserialize` and `.call(...)` it with the traced arguments.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> blob = graphopt.export(lambda x: jnp.cos(x) + 1, jnp.zeros(3), platforms=("tpu", "cpu"))
    >>> graphopt.deserialize(blob).call(jnp.zeros(3)).tolist()
    [2.0, 2.0, 2.0]
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from jax import export as jax_export

from graphopt.ir import Graph
from graphopt.lowering.emit import lower


def export(graph_or_fn: Graph | Callable, *example_args, platforms: Sequence[str] = ("tpu", "cuda", "cpu"),
           params_argnums=None) -> bytearray:
    """Serialize the lowered graph for `platforms`.

    Args:
        graph_or_fn: a Graph, or a model to trace first with `example_args`.
        example_args: for a Graph, optional (its input types are used); for a model, required.
        platforms: any of "tpu", "cuda", "rocm", "cpu"; the artifact runs on each.

    Returns:
        The bytes of a `jax.export.Exported`; see `deserialize`. It takes the traced arguments,
        or, when their pytree holds types jax.export cannot serialize (e.g. an nnx `State`),
        their flat leaves: `exported.call(*jax.tree.leaves(args))`, returning a list of leaves.
    """
    if isinstance(graph_or_fn, Graph):
        graph = graph_or_fn
    else:
        from graphopt.trace import trace

        graph = trace(graph_or_fn, *example_args, params_argnums=params_argnums)
    lowered, platforms = lower(graph), tuple(platforms)
    exported = jax_export.export(jax.jit(lowered), platforms=platforms)(*input_specs(graph))
    try:
        return exported.serialize()
    except ValueError:
        # The argument pytree has node types jax.export cannot serialize (nnx.State, custom
        # classes): export the flat calling convention instead, leaves in and leaves out.
        flat_specs = jax.tree_util.tree_leaves(input_specs(graph))
        return jax_export.export(jax.jit(lowered.flat), platforms=platforms)(*flat_specs).serialize()


def deserialize(blob: bytes | bytearray) -> jax_export.Exported:
    """Load an artifact made by `export`; call it with `.call(*args)`."""
    return jax_export.deserialize(bytearray(blob))


def input_specs(graph: Graph) -> tuple:
    """The graph's arguments as `jax.ShapeDtypeStruct`s, in the traced pytree structure."""
    leaves = [jax.ShapeDtypeStruct(a.type.shape, a.type.dtype, weak_type=a.type.weak_type)
              for a in graph.inputs]
    if graph.in_tree is None:
        return tuple(leaves)
    return tuple(jax.tree_util.tree_unflatten(graph.in_tree, leaves))

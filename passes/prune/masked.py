"""The masked reference of structured pruning: the unpruned graph with channels zeroed at the exits.

A group's channels reach the model's outputs only through its exits (contractions over the
group's axis, see `passes/prune/deps.py`). Multiplying each exit's operand by a 0/1 mask over that
axis removes exactly the pruned channels' terms from the sums, which is what the shrunk graph
computes: `masked_graph(deps, keep)` is the reference that tests compare the pruned graph against
(the exactness check of the dependency analysis).

With `inputs=True` the masks are graph inputs instead (one float vector per group, in
`deps.groups` order, appended after the graph's inputs): the gradient of a loss with respect to a
group's mask at all-ones is the first-order Taylor estimate of what removing each channel costs.

    before:  %y = dot_general %h, %w2
    after:   %m = broadcast_in_dim <mask over h's axis 1>   %hm = mul %h, %m   %y = dot_general %hm, %w2

Example:
    >>> import graphopt, jax, jax.numpy as jnp, numpy as np
    >>> from graphopt.passes.prune.deps import analyze
    >>> p = {"w1": jnp.ones((4, 16)), "w2": jnp.ones((16, 3))}
    >>> g = graphopt.trace(lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"], p, jnp.ones((2, 4)),
    ...                    params_argnums=0)
    >>> ref = masked_graph(analyze(g), {"w1:1": np.arange(8)})
    >>> graphopt.lower(ref)(p, jnp.ones((2, 4)))[0].tolist()
    [32.0, 32.0, 32.0]
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from graphopt.builder import Builder
from graphopt.passes.prune.deps import Dependencies
from graphopt.types import TensorType


def masked_graph(deps: Dependencies, keep: dict | None = None, *, inputs: bool = False):
    """A copy of `deps.graph` whose exits read their operand times a 0/1 channel mask: constants
    keeping `keep[name]` of each named group, or (with `inputs=True`) one mask input per group."""
    keep = keep or {}
    graph, mapping = deps.graph.clone()
    groups = deps.groups if inputs else [deps.group(name) for name in keep]
    masks = {}
    for group in groups:
        if inputs:
            masks[id(group.dim)] = graph.add_input(TensorType((group.size,), np.float32), "input",
                                                   f"mask/{group.name}")
        else:
            vector = np.zeros(group.size, np.float32)
            vector[np.asarray(keep[group.name])] = 1
            masks[id(group.dim)] = vector
    done = set()
    for group in groups:
        for node, operand, axis in group.exits:
            if (id(node), operand, axis) in done:
                continue  # an exit of several groups (a flattened axis) is masked once for all
            done.add((id(node), operand, axis))
            dim = deps.dims[id(node.inputs[operand])][axis]
            copy = mapping[id(node)]
            value = copy.inputs[operand]
            b = Builder(copy.graph, before=copy, made_by="prune.masked")
            if inputs:
                order = [masks[id(g.dim)] for g in deps.groups]
                keys = [id(g.dim) for g in deps.groups]
                vector = b.jax(lambda *m: _axis_mask(deps, dim, dict(zip(keys, m)), jnp), *order)
            else:
                vector = b.const(_axis_mask(deps, dim, masks, np), dtype=value.type.dtype)
            if vector.type.dtype != value.type.dtype:
                vector = b.op("convert_element_type", vector, new_dtype=value.type.dtype, weak_type=False)
            mask = b.op("broadcast_in_dim", vector, shape=value.type.shape, broadcast_dimensions=(axis,),
                        sharding=None)
            copy.set_input(operand, b.op("mul", value, mask))
    return graph


def _axis_mask(deps: Dependencies, dim, masks: dict, xp):
    """The mask over an axis: its group's mask, or the outer product / concatenation of its parts'."""
    dim = dim.find()
    if id(dim) in masks:
        return masks[id(dim)]
    if dim.parts is None:
        return xp.ones(dim.size, np.float32)
    kind, parts = dim.parts
    vectors = [_axis_mask(deps, p, masks, xp) for p in parts]
    if kind == "concat":
        return xp.concatenate(vectors)
    out = vectors[0]
    for v in vectors[1:]:
        out = (out[:, None] * v[None, :]).reshape(-1)
    return out

"""The masked reference of structured pruning: the unpruned graph with channels zeroed at the exits.

A group's channels reach the model's outputs only through its exits (contractions over the
group's axis, see `passes/prune/deps.py`). Multiplying each exit's operand by a 0/1 mask over that
axis removes exactly the pruned channels' terms from the sums, which is what the shrunk graph
computes: `masked_graph(deps, keep)` is the reference that tests compare the pruned graph against
(the exactness check of the dependency analysis).

An exit inside a call (custom_jvp/custom_vjp, remat) has the call inlined first: the call's
derivative rule knows nothing of the mask, and its body sees only its own inputs.

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
    kept = {} if inputs else deps.resolve(keep or {})
    graph, mapping = deps.graph.clone()
    groups = deps.groups if inputs else list(kept)
    masks = {}
    for group in groups:
        if inputs:
            masks[id(group.dim)] = graph.add_input(TensorType((group.size,), np.float32), "input",
                                                   f"mask/{group.name}")
        else:
            vector = np.zeros(group.size, np.float32)
            vector[kept[group]] = 1
            masks[id(group.dim)] = vector
    done = set()
    for group in groups:
        for node, operand, axis in group.exits:
            if (id(node), operand, axis) in done:
                continue  # an exit of several groups (a flattened axis) is masked once for all
            done.add((id(node), operand, axis))
            dim = deps.dims[id(node.inputs[operand])][axis]
            copy = _lifted(graph, mapping, node)
            value = copy.inputs[operand]
            b = Builder(copy.graph, before=copy, made_by="prune.masked")
            if inputs:
                order = [masks[id(g.dim)] for g in deps.groups]
                keys = [id(g.dim) for g in deps.groups]
                vector = b.jax(lambda *m: _axis_mask(deps, dim, dict(zip(keys, m)), jnp), *order)
            else:
                vector = b.const(_axis_mask(deps, dim, masks, np), dtype=value.type.dtype)
            if (vector.type.dtype, vector.type.weak_type) != (value.type.dtype, value.type.weak_type):
                vector = b.op("convert_element_type", vector, new_dtype=value.type.dtype,  # so the product
                              weak_type=value.type.weak_type, sharding=None)  # has the operand's type
            mask = b.op("broadcast_in_dim", vector, shape=value.type.shape, broadcast_dimensions=(axis,),
                        sharding=None)
            copy.set_input(operand, b.op("mul", value, mask))
    return graph


def _lifted(graph, mapping: dict, node):
    """The copy of `node`, with the calls around it (custom_jvp/vjp, remat) inlined first: a call's
    derivative rule was traced without the mask, and its body sees only its own inputs."""
    while mapping[id(node)].graph is not graph:
        call = mapping[id(node)].graph.parent
        while call.graph is not graph:
            call = call.graph.parent
        copies = _inline(call)
        for key, value in mapping.items():
            mapping[key] = copies.get(id(value), value)
    return mapping[id(node)]


def _inline(call) -> dict:
    """Splice a call's body into its graph in place of the call; {id(body node or value): copy}."""
    (body,) = call.regions
    graph = call.graph
    copies = {id(a): v for a, v in zip(body.inputs, call.inputs)}
    for node in body.nodes:
        new = graph.add_node(node.op, [copies[id(v)] for v in node.inputs], node.params, node.regions,
                             node.provenance, before=call, _types=[v.type for v in node.outputs],
                             _effects=node.effects)
        copies[id(node)] = new
        copies.update((id(old), value) for old, value in zip(node.outputs, new.outputs))
    for old, inner in zip(call.outputs, body.outputs):
        graph.replace_all_uses(old, copies[id(inner)])
    graph.erase(call)
    return copies


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

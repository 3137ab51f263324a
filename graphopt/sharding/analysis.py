"""Which dimensions of a traced graph are tensor-parallel: found from the dataflow, not from names.

Every axis of every value gets a dimension (the union-find of `passes/prune/dims.py`, with the
per-op coupling rules of `passes/prune/rules.py`), so the hidden features of an MLP are one
dimension from the up projection's output axis to the down projection's input axis, and the
attention heads are one dimension from the Q/K/V kernels through both attention einsums (where
they are a batch dimension) to the output projection. A *weight dot* is a dot_general one of
whose operands is computed from parameters only; its weight's free axes *produce* dimensions,
its contracted axes *consume* them.

A dimension is tensor-parallel (Megatron's split) when a weight produces it and a weight
consumes it, no reduction other than those contractions runs over it (layer norm, softmax) and
no activation x activation dot contracts it (the head size inside attention: splitting it would
need an all-reduce of the scores). Heads (a batch dimension of an activation dot) are preferred
over the per-head features that the V and output projections also share. For a flattened axis
(`[d, heads * head_dim]` kernels, grouped-query heads `kv_heads x group`) the outermost factor
counts: splitting an axis in `n` contiguous blocks splits its outermost factor.

Example:
    >>> import graphopt, jax, jax.numpy as jnp
    >>> p = {"up": jnp.ones((4, 16)), "down": jnp.ones((16, 4))}
    >>> g = graphopt.trace(lambda p, x: jax.nn.relu(x @ p["up"]) @ p["down"], p, jnp.ones((2, 4)),
    ...                    params_argnums=0)
    >>> a = analyze(g)
    >>> [(d.size, sorted(path for path, _ in a.holders[id(d)])) for d in a.tensor_parallel]
    [(16, ['down', 'up'])]
"""

from __future__ import annotations

import dataclasses

from graphopt.ir import Argument, Graph, Node, Value
from graphopt.param_derived import largest_source, param_derived_values
from graphopt.passes.prune.dims import Dim, unify
from graphopt.passes.prune.rules import analyze_nodes


@dataclasses.dataclass(eq=False)
class WeightDot:
    """A dot_general with a parameter-derived operand: a layer."""

    node: Node
    weight: int                    # operand index of the weight side
    param: Argument                # the parameter the weight mainly comes from
    output: Value                  # the layer's output: the dot's, or its bias add's
    free: list[int]                # the weight operand's free (output feature) axes
    contracted: list[int]          # ... and contracted (input feature) axes
    bias: Argument | None = None   # the parameter added to the dot's output, if any


@dataclasses.dataclass
class Analysis:
    dims: dict                     # id(value) -> [Dim per axis]
    layers: list[WeightDot]
    tensor_parallel: list[Dim]     # chosen order: heads first, then graph order
    head_like: set                 # ids of the atoms of an activation x activation dot's batch dims
    batch: set                     # ids of the leading dims of the model inputs' axis 0
    to_output: set                 # ids of dims that reach a model output
    holders: dict                  # id(dim) -> [(param path, axis)] whose axis leads with it

    def lead(self, value: Value, axis: int) -> Dim:
        return lead(self.dims[id(value)][axis])

    def atoms(self, value: Value, axis: int) -> list[Dim]:
        return atoms(self.dims[id(value)][axis])


def lead(dim: Dim) -> Dim:
    """The outermost factor of a dimension (itself unless it is a product)."""
    dim = dim.find()
    while dim.parts is not None and dim.parts[0] == "product":
        dim = dim.parts[1][0].find()
    return dim


def atoms(dim: Dim) -> list[Dim]:
    """A product dimension's factors, outermost first, flattened (a concatenation is one atom)."""
    dim = dim.find()
    if dim.parts is None or dim.parts[0] != "product":
        return [dim]
    return [a for part in dim.parts[1] for a in atoms(part)]


def analyze(graph: Graph) -> Analysis:
    """Find the weight dots and the tensor-parallel dimensions of `graph` (module docstring)."""
    dims = {id(a): [Dim(n) for n in a.type.shape] for a in graph.inputs}
    analyze_nodes(graph, dims)
    _follow_gathers(graph, dims)
    derived, _ = param_derived_values(graph)
    layers, produced, consumed = [], {}, {}
    head_like, act_contracted = set(), set()
    for node in graph.nodes:
        if node.op.name != "dot_general":
            continue
        (contract, batch_dims) = node.params["dimension_numbers"]
        sides = [id(v) in derived for v in node.inputs]
        if sides == [False, False]:
            for operand, axes in enumerate(batch_dims):
                head_like.update(id(x) for a in axes for x in atoms(dims[id(node.inputs[operand])][a]))
            for a in contract[0]:
                act_contracted.update(id(x) for x in atoms(dims[id(node.inputs[0])][a]))
            continue
        if sides == [True, True]:
            continue  # parameters only: fold_params' business, not a layer
        weight = sides.index(True)
        value = node.inputs[weight]
        free = [a for a in range(value.type.ndim) if a not in contract[weight] and a not in batch_dims[weight]]
        layer = WeightDot(node, weight, largest_source(value), _layer_output(node, derived),
                          free, list(contract[weight]))
        layer.bias = _bias(layer)
        layers.append(layer)
        for a in free:
            d = lead(dims[id(value)][a])
            produced[id(d)] = d
        for a in layer.contracted:
            d = lead(dims[id(value)][a])
            consumed[id(d)] = d
    batch = {id(lead(dims[id(a)][0])) for a in graph.inputs if a.role == "input" and a.type.ndim}
    to_output = {id(x) for v in graph.outputs for d in dims[id(v)] for x in atoms(d)}
    holders: dict[int, list] = {}
    for arg in graph.params():
        for axis, d in enumerate(dims[id(arg)]):
            holders.setdefault(id(lead(d)), []).append((arg.path, axis))
    candidates = [d for key, d in produced.items() if key in consumed and key not in act_contracted
                  and key not in batch and not d.find().blocked and d.size > 1]
    candidates.sort(key=lambda d: (id(d) not in head_like, d.serial))
    return Analysis(dims, layers, candidates, head_like, batch, to_output, holders)


def _follow_gathers(graph: Graph, dims: dict) -> None:
    """An embedding lookup's output keeps the indices' axes (the batch): tie them, which the
    pruning rules do not (a gather blocks pruning, but must not lose the batch dimension)."""
    for node in graph.nodes:
        if node.op.name != "gather" or len(node.inputs) != 2:
            continue
        offset = set(node.params["dimension_numbers"].offset_dims)
        out_axes = [a for a in range(node.outputs[0].type.ndim) if a not in offset]
        index_axes = dims[id(node.inputs[1])][:-1]  # the last axis holds the index vector
        if len(out_axes) == len(index_axes):
            for a, d in zip(out_axes, index_axes):
                unify(dims[id(node.outputs[0])][a], d, "at an embedding lookup")


def _bias(layer: WeightDot) -> Argument | None:
    if layer.output is layer.node.outputs[0]:
        return None
    for value in layer.output.node.inputs:
        while value.node is not None and len(value.node.inputs) == 1 and value is not layer.node.outputs[0]:
            value = value.node.inputs[0]
        if isinstance(value, Argument) and value.role == "param":
            return value
    return None


# Ops that carry a dot's result to the layer's output unchanged in layout: a bias is added after
# a broadcast, maybe a convert.
_BIAS_ADD = frozenset({"add"})


def _layer_output(node: Node, derived: dict) -> Value:
    """The dot's output, or the output of the bias add that is its only reader."""
    out = node.outputs[0]
    users = out.users()
    if len(users) == 1 and users[0].op.name in _BIAS_ADD and len(out.uses) == 1:
        other = [v for v in users[0].inputs if v is not out]
        if other and all(id(v) in derived for v in other) and users[0].outputs[0].type.shape == out.type.shape:
            return users[0].outputs[0]
    return out

"""Outlining: the nodes that compute some values from others, moved into a region of a new node.

A composite op (attention, layer_norm, ...) holds the primitives it was recognized from as its
region. `outline_into(node, inputs, outputs)` makes the readers of `outputs` read `node`'s results
and moves the nodes between `inputs` and `outputs` into a new region held by `node`: its inputs
are `node`'s operands (same types, same order), its body those nodes, its outputs `outputs`.

    %0 = reduce_max[axes=(1,)] %x                     %6 = softmax %x
    %1 = reshape[new_sizes=(3,1)] %0                    decomposition(%arg0) {
    %2 = sub %x, %1                  outline_into(        %0 = reduce_max[axes=(1,)] %arg0
    %3 = exp %2                        softmax, [%x],     %1 = reshape[new_sizes=(3,1)] %0
    %4 = reduce_sum[axes=(1,)] %3      [%5])              %2 = sub %arg0, %1
    %5 = div %3, %4                  →                    ...
                                                          return %5
                                                        }

The nodes move (no copies are made: recognizing the ops of a 100k-node model would otherwise
copy most of it). What may be outlined: the backward slice of the outputs, cut at the inputs.
Two conditions keep the rewrite exact and the graph valid:

- closed: every graph input (argument) the outputs depend on is one of `inputs`, and no node in
  the slice has effects (a callback cannot be duplicated or moved into a region);
- no escapes: a value computed inside, other than an output, is read by nothing outside; else
  the op would hide a value others still need, and computing it twice would duplicate work.
  Exception: values computed from constants only (a literal, an iota, a causal mask built from
  iotas, `sqrt(64.0)`) that others read too are copied into the region and the originals stay:
  they cost nothing at run time (XLA folds them) and every layer of a model may share one mask.

`outline_slice` checks both and returns the nodes that would move (raising `OutlineError` saying
which value is to blame); `can_outline` answers without raising, for matchers that try several
candidates.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> g = graphopt.trace(lambda x: jnp.tanh(x) * 2.0 + 1.0, jnp.ones(3))
    >>> tanh, *_, add = g.nodes   # tanh, constant, mul, constant, add
    >>> op = graphopt.ops.OpDef("example_region", lambda types, params, regions: [types[0]],
    ...                         lambda x, *, regions: list(regions[0](x)), region_names=("body",))
    >>> node = g.add_node(op, [tanh.output], {}, before=add)
    >>> print(outline_into(node, [tanh.output], [add.output]))  # doctest: +ELLIPSIS
    graph decomposition(%arg0: f32[3]) {
      %0 = mul %arg0, 2.0 : f32[3]  # ...
      %1 = add %0, 1.0 : f32[3]  # ...
      return %1
    }
    >>> [n.op.name for n in g.nodes]
    ['tanh', 'example_region']
    >>> can_outline([], [node.output])
    False
"""

from __future__ import annotations

from typing import Sequence

from graphopt.errors import GraphError
from graphopt.ir import Argument, Graph, Node, Value


class OutlineError(GraphError):
    """The values cannot be outlined: the slice is not closed, or an inner value escapes."""


class Slice(list):
    """What `outline_slice` returns: the nodes to outline in program order, those computed from
    constants only (`constant_only`), and all of them (`inside`, each mapped to True)."""

    constant_only: set[Node]
    inside: dict[Node, bool]


def outline_slice(inputs: Sequence[Value], outputs: Sequence[Value]) -> Slice:
    """The nodes between `inputs` and `outputs` in program order, checked (see the module
    docstring): raises OutlineError if the slice reads a graph input that is not in `inputs`,
    holds a node with effects, or computes a value (not an output, not constant-only) that is
    read outside."""
    order = _slice(inputs, outputs)
    produced = set(outputs)  # nodes and values hash by identity
    inside, constant_only = order.inside, order.constant_only
    for node in order:
        if node in constant_only:
            continue  # copied where others read it: no escape
        for value in node.outputs:
            if value.uses and value not in produced:
                for reader, _ in value.uses:
                    if reader not in inside:  # None (a graph output) is not
                        where = "is a graph output" if reader is None else f"is read by {reader.op.name}"
                        raise OutlineError(f"cannot outline: {node.op.name} computes a value that "
                                           f"{where} outside the outlined nodes; keep it or "
                                           "outline it too", reader if reader is not None else node)
    return order


def can_outline(inputs: Sequence[Value], outputs: Sequence[Value]) -> bool:
    """Whether `outline_slice(inputs, outputs)` (and so `outline_into`) would succeed."""
    try:
        outline_slice(inputs, outputs)
    except OutlineError:
        return False
    return True


def outline_into(node: Node, inputs: Sequence[Value], outputs: Sequence[Value],
                 order: Slice | None = None, *, name: str = "decomposition") -> Graph:
    """Make every reader of `outputs[i]` read `node.outputs[i]`, then move the slice between
    `inputs` (node's operands) and `outputs` into a new region, `node`'s only one; returns it.

    `order` is `outline_slice(inputs, outputs)` if the caller has it. `node` must lie after the
    inputs and before the outputs' first readers (inserted just before the last node of the
    slice does). Its region must be what its op expects: the caller checks the types first.
    """
    if order is None:
        order = outline_slice(inputs, outputs)
    if len(node.outputs) != len(outputs):
        raise GraphError(f"outline_into: {node.op.name} has {len(node.outputs)} results, "
                         f"{len(outputs)} values to replace", node)
    if node.regions:
        raise GraphError(f"outline_into: {node.op.name} already holds a region", node)
    graph = node.graph
    for old, new in zip(outputs, node.outputs):
        graph.replace_all_uses(old, new)
    region = Graph(name)
    mapping: dict[Value, Value] = {}  # a value outside -> the region's value standing for it
    for value in inputs:
        arg = region.add_input(value.type, "input", _path(value))
        mapping.setdefault(value, arg)  # the same operand twice: a second input, unused
    copied = _copied(order)
    moving = order
    if copied:  # copied first: copies never read a moved node (_copied copies their producers)
        moving = []
        for inner in order:
            if inner not in copied:
                moving.append(inner)
                continue
            copy = region.add_copy(inner, [mapping.get(v, v) for v in inner.inputs])
            mapping.update(zip(inner.outputs, copy.outputs))
    region.move_to_end(moving, graph)
    get = mapping.get
    for inner in moving:
        operands = inner.inputs
        for i, value in enumerate(operands):
            moved = get(value)
            if moved is not None:  # an operand or a copy: the same type
                del value.uses[(inner, i)]
                operands[i] = moved
                moved.uses[(inner, i)] = None
    region.set_outputs([get(v, v) for v in outputs])
    graph.set_regions(node, [region])
    return region


# --- helpers -------------------------------------------------------------------------------------

def _slice(inputs: Sequence[Value], outputs: Sequence[Value]) -> Slice:
    """Nodes between `inputs` and `outputs`, in a topological (program) order."""
    if not outputs:
        raise OutlineError("cannot outline: no outputs")
    graph = outputs[0].graph
    for value in (*inputs, *outputs):
        if value.graph is not graph:
            raise OutlineError("cannot outline: the values belong to different graphs")
    stop = set(inputs)  # values and nodes hash by identity
    order = Slice()
    # Iterative post-order DFS: producers of operands before the node. state: node -> False once
    # its operands are pushed, True once it is in `order`. A node goes into `order` after its
    # producers, so whether it is computed from constants only is known then.
    state: dict[Node, bool] = {}
    constant_only: set[Node] = set()
    stack: list[Node] = []
    for value in reversed(outputs):
        if value not in stop:
            stack.append(_producer(value, None))
    while stack:
        node = stack[-1]
        done = state.get(node)
        if done is not None:
            stack.pop()
            if not done:
                state[node] = True
                order.append(node)
                for v in node.inputs:
                    if v.node not in constant_only or v in stop:  # None (an argument) is not in it
                        break
                else:
                    constant_only.add(node)
            continue
        state[node] = False
        if node.effects:
            raise OutlineError(f"cannot outline: {node.op.name} has effects "
                               f"({', '.join(sorted(map(str, node.effects)))})", node)
        for value in reversed(node.inputs):
            if value not in stop:
                producer = _producer(value, node)
                if producer not in state:
                    stack.append(producer)
    order.inside, order.constant_only = state, constant_only
    return order


def _producer(value: Value, reader: Node | None) -> Node:
    if value.node is None:
        raise OutlineError(f"cannot outline: the result depends on graph input {_path(value)!r}, "
                           "which is not an operand", reader)
    return value.node


def _copied(order: Slice) -> set[Node]:
    """The constant-only nodes of the slice read by something that stays outside (once the
    outputs' readers are rewired): they are copied into the region, the originals stay."""
    constant_only = order.constant_only
    if not constant_only:
        return constant_only
    moving = order.inside
    copied: set[Node] = set()
    for node in reversed(order):  # readers first: a reader that stays keeps its operands
        if node not in constant_only:
            continue
        for value in node.outputs:  # plain loops: this runs for every op raise_ops raises
            for reader, _ in value.uses:
                if reader not in moving or reader in copied:  # None (a graph output) is not in it
                    copied.add(node)
                    break
    return copied


def _path(value: Value) -> str:
    return value.path if isinstance(value, Argument) else ""

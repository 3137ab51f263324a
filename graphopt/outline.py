"""Outlining: the nodes that compute some values from others, copied out as a region sub-graph.

A composite op (attention, layer_norm, ...) holds the primitives it was recognized from as its
region: `outline(inputs, outputs)` builds that region. Its inputs are the op's operands (same
types, same order), its body a copy of every node between them and the outputs, its outputs the
op's results. `replace_with(node, outputs)` then makes the readers of the outputs read the new
node's results and erases what became dead.

    %0 = reduce_max[axes=(1,)] %x                     graph(%arg0) {
    %1 = reshape[new_sizes=(3,1)] %0                    %0 = reduce_max[axes=(1,)] %arg0
    %2 = sub %x, %1                  outline([%x],      %1 = reshape[new_sizes=(3,1)] %0
    %3 = exp %2                      →  [%5])           %2 = sub %arg0, %1
    %4 = reduce_sum[axes=(1,)] %3                       ...
    %5 = div %3, %4                                     return %5
                                                      }

What may be outlined: the backward slice of the outputs, cut at the inputs. Two conditions keep
the rewrite exact and the graph valid:

- closed: every graph input (argument) the outputs depend on is one of `inputs`, and no node in
  the slice has effects (a callback cannot be duplicated or moved into a region);
- no escapes: a value computed inside, other than an output, is read by nothing outside; else
  the op would hide a value others still need, and computing it twice would duplicate work.
  Exception: values computed from constants only (a literal, an iota, a causal mask built from
  iotas, `sqrt(64.0)`) are copied into the region and the originals stay for their other readers:
  they cost nothing at run time (XLA folds them) and every layer of a model may share one mask.

Either failure raises `OutlineError` saying which value is to blame; `can_outline` answers
without raising, for matchers that try several candidates.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> g = graphopt.trace(lambda x: jnp.tanh(x) * 2.0 + 1.0, jnp.ones(3))
    >>> tanh, *_, add = g.nodes   # tanh, constant, mul, constant, add
    >>> region = outline([tanh.output], [add.output])
    >>> print(region)  # doctest: +ELLIPSIS
    graph decomposition(%arg0: f32[3]) {
      %0 = mul %arg0, 2.0 : f32[3]  # ...
      %1 = add %0, 1.0 : f32[3]  # ...
      return %1
    }
    >>> outline([], [add.output])
    Traceback (most recent call last):
    ...
    graphopt.outline.OutlineError: cannot outline: the result depends on graph input 'x', which is not an operand
      at node tanh (...)
"""

from __future__ import annotations

from typing import Sequence

from graphopt.errors import GraphError
from graphopt.ir import Argument, Graph, Node, Value, erase_dead


class OutlineError(GraphError):
    """The values cannot be outlined: the slice is not closed, or an inner value escapes."""


def outline(inputs: Sequence[Value], outputs: Sequence[Value], *, name: str = "decomposition") -> Graph:
    """The region computing `outputs` from `inputs` (see the module docstring). The original
    nodes are left in place; the region holds copies.

    Raises OutlineError if the slice reads a graph input that is not in `inputs`, holds a node
    with effects, or computes a value (not an output, not constant-only) that is read outside.
    """
    order = _slice(inputs, outputs)
    _check_no_escapes(order, inputs, outputs)
    region = Graph(name)
    mapping: dict[int, Value] = {}
    for value in inputs:
        if id(value) not in mapping:
            mapping[id(value)] = region.add_input(value.type, "input", _path(value))
        else:  # the same operand twice: a second region input, unused
            region.add_input(value.type, "input", _path(value))
    for node in order:
        regions = [r.clone()[0] for r in node.regions]
        copy = region.add_node(node.op, [mapping[id(v)] for v in node.inputs], node.params, regions,
                               node.provenance, _types=[v.type for v in node.outputs],
                               _effects=node.effects)
        for old, new in zip(node.outputs, copy.outputs):
            mapping[id(old)] = new
    region.set_outputs([mapping[id(v)] for v in outputs])
    return region


def can_outline(inputs: Sequence[Value], outputs: Sequence[Value]) -> bool:
    """Whether `outline(inputs, outputs)` would succeed."""
    try:
        _check_no_escapes(_slice(inputs, outputs), inputs, outputs)
    except OutlineError:
        return False
    return True


def interior(inputs: Sequence[Value], outputs: Sequence[Value]) -> list[Node]:
    """The nodes `outline` would copy, in program order (the slice, cut at the inputs)."""
    return _slice(inputs, outputs)


def replace_with(node: Node, outputs: Sequence[Value]) -> int:
    """Make every reader of `outputs[i]` read `node.outputs[i]`, then erase the nodes that became
    dead (the outlined ones; constant-only values still read elsewhere stay). Returns how many
    nodes were erased. `node` must come after the inputs and before the outputs' first readers:
    insert it just before the last node of the slice, or after it."""
    if len(node.outputs) != len(outputs):
        raise GraphError(f"replace_with: {node.op.name} has {len(node.outputs)} results, "
                         f"{len(outputs)} values to replace", node)
    graph = node.graph
    for old, new in zip(outputs, node.outputs):
        graph.replace_all_uses(old, new)
    return erase_dead([v.node for v in outputs if v.node is not None])


# --- helpers -------------------------------------------------------------------------------------

def _slice(inputs: Sequence[Value], outputs: Sequence[Value]) -> list[Node]:
    """Nodes between `inputs` and `outputs`, in a topological (program) order."""
    if not outputs:
        raise OutlineError("cannot outline: no outputs")
    graph = outputs[0].graph
    for value in list(inputs) + list(outputs):
        if value.graph is not graph:
            raise OutlineError("cannot outline: the values belong to different graphs")
    stop = {id(v) for v in inputs}
    seen: set[int] = set()
    order: list[Node] = []
    # Iterative post-order DFS: children (producers of operands) before the node.
    stack: list[tuple[Node, bool]] = []
    for value in reversed(list(outputs)):
        if id(value) in stop:
            continue
        if value.node is None:
            raise OutlineError(f"cannot outline: the result depends on graph input "
                               f"{_path(value)!r}, which is not an operand")
        stack.append((value.node, False))
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.effects:
            raise OutlineError(f"cannot outline: {node.op.name} has effects "
                               f"({', '.join(sorted(map(str, node.effects)))})", node)
        stack.append((node, True))
        for value in reversed(node.inputs):
            if id(value) in stop:
                continue
            if value.node is None:
                raise OutlineError(f"cannot outline: the result depends on graph input "
                                   f"{_path(value)!r}, which is not an operand", node)
            if id(value.node) not in seen:
                stack.append((value.node, False))
    return order


def _check_no_escapes(order: list[Node], inputs: Sequence[Value], outputs: Sequence[Value]) -> None:
    inside = {id(n) for n in order}
    stop = {id(v) for v in inputs}
    produced_outputs = {id(v) for v in outputs}
    constant_only: set[int] = set()
    for node in order:  # program order: operands' producers come first
        if all(id(v) not in stop and v.node is not None and id(v.node) in constant_only
               for v in node.inputs):
            constant_only.add(id(node))
    for node in order:
        if id(node) in constant_only:
            continue
        for value in node.outputs:
            if id(value) in produced_outputs:
                continue
            for reader, _ in value.uses:
                if reader is None or id(reader) not in inside:
                    where = "is a graph output" if reader is None else f"is read by {reader.op.name}"
                    raise OutlineError(f"cannot outline: {node.op.name} computes a value that "
                                       f"{where} outside the outlined nodes; keep it or outline it "
                                       "too", reader if reader is not None else node)


def _path(value: Value) -> str:
    return value.path if isinstance(value, Argument) else ""

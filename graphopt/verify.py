"""Graph.verify(): the IR's invariants, checked after every pass in tests and debug mode.

Checked, recursively through regions:
- the node list is well linked and every node belongs to the graph;
- SSA order: every operand is a graph input or the output of an earlier node of the same graph;
- use lists are exactly the operand and output positions that read each value;
- every node's output types equal its op's shape rule applied to its input types (opaque ops
  excepted), so no type is stale;
- graph outputs are values of the graph.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> graphopt.trace(jnp.sin, jnp.ones(3)).verify()
"""

from __future__ import annotations

from collections import Counter

from graphopt.errors import GraphError


def verify_graph(graph) -> None:
    defined = {id(a) for a in graph.inputs}
    expected_uses: Counter = Counter()
    for i, arg in enumerate(graph.inputs):
        if arg.graph is not graph or arg.index != i:
            raise GraphError(f"input {i} ({arg.path or 'unnamed'}) is not registered with this graph")
    count, prev = 0, None
    for node in graph.nodes:
        count += 1
        if node.graph is not graph or node._prev is not prev:
            raise GraphError("node list is corrupt (node linked into the wrong graph)", node)
        prev = node
        for i, value in enumerate(node.inputs):
            if id(value) not in defined:
                raise GraphError(f"operand {i} of {node.op.name} is used before it is defined "
                                 "(or comes from another graph)", node)
            expected_uses[(id(value), id(node), i)] += 1
        _check_types(node)
        for region in node.regions:
            if region.parent is not node:
                raise GraphError("region's parent link does not point at its node", node)
            verify_graph(region)
        for value in node.outputs:
            if value.node is not node:
                raise GraphError("output value does not point back at its node", node)
            defined.add(id(value))
    if count != len(graph):
        raise GraphError(f"graph length {len(graph)} disagrees with its {count} linked nodes")
    for i, value in enumerate(graph.outputs):
        if id(value) not in defined:
            raise GraphError(f"graph output {i} is not defined in this graph")
        expected_uses[(id(value), None, i)] += 1
    _check_uses(graph, expected_uses)


def _check_types(node) -> None:
    try:
        inferred = node.op.infer(node.input_types, node.params, node.regions)
    except Exception as err:
        raise GraphError(f"{node.op.name}: shape rule rejects the inputs: {err}", node) from err
    if inferred is None:
        return  # opaque: types were fixed by the trace
    actual = [v.type for v in node.outputs]
    if list(inferred) != actual:
        raise GraphError(f"{node.op.name}: stale output types {list(map(str, actual))}; its shape rule "
                         f"gives {list(map(str, inferred))}", node)


def _check_uses(graph, expected: Counter) -> None:
    values = list(graph.inputs)
    for node in graph.nodes:
        values.extend(node.outputs)
    actual: Counter = Counter()
    for value in values:
        for user, i in value.uses:
            actual[(id(value), None if user is None else id(user), i)] += 1
    if actual != expected:
        missing = expected - actual
        extra = actual - expected
        raise GraphError(f"use lists are out of date: {len(missing)} missing and {len(extra)} "
                         "stale entries (edit graphs through Graph methods only)")

"""fold_params: precompute, once, everything that depends only on frozen parameters.

    graph(%W: f32[d,d] param, %A: f32[d,r] param, %B: f32[r,d] param, %x) {      graph(%W+AB: f32[d,d] param, %x) {
      %0 = dot_general %A, %B          # LoRA update                            %0 = dot_general %x, %W+AB
      %1 = add %W, %0                  # merged weight                          return %0
      %2 = dot_general %x, %1                                                 }
      return %2                                                               prep(%W, %A, %B) { return add %W, dot %A %B }
    }

Parameters are runtime arguments to XLA, so it recomputes weight transposes, reshapes, scale
products and LoRA merges on every call; graphopt knows which inputs are frozen weights and moves
that work into the graph's `ParamPrep`, run once per set of weights. The values that cross from
the parameter-only part into the rest (the frontier) become new parameters, named after the
parameter they come from (`params/dense/kernel:transpose`).

Trade-off: a frontier value is materialized only if it is no larger than the parameters it is
computed from (a broadcast of a bias to the batch shape stays in the graph: folding it would grow
the weights); `max_growth` relaxes that. Nodes with effects or regions and opaque nodes stay.

Contract: exact (the same operations run, only earlier).
"""

from __future__ import annotations

import jax

from graphopt.ir import Graph
from graphopt.param_derived import param_derived_values, param_name, unique_name
from graphopt.param_prep import ParamPrep
from graphopt.pipeline import register_pass


@register_pass("fold_params")
def fold_params(graph, ctx, max_growth: float = 1.0):
    """Move parameter-only computations into the parameter prep graph."""
    if not graph.params() or not graph.param_argnums:
        return graph
    derived, _ = param_derived_values(graph)
    frontier = _frontier(derived, max_growth)
    if not frontier:
        return graph
    _check_unique_paths(graph)
    prep, prep_values = _prep_for(graph)
    nodes = _derived_nodes(derived)
    _replace_frontier(graph, frontier, prep_values)
    _move_to_prep(graph, nodes, prep, prep_values)
    _finish(graph, prep, prep_values)
    ctx.count({"folded-node": len(nodes), "new-param": len(frontier)})
    return graph


# Layout changes XLA performs for free (a bitcast of the buffer): precomputing them gains nothing.
_FREE_LAYOUT = frozenset({"reshape", "squeeze", "expand_dims"})


def _frontier(derived, max_growth) -> list:
    """Derived node outputs read by non-derived nodes or returned, worth materializing, in
    program order.

    A value too large to materialize, or a free layout change of a parameter, keeps its node in
    the graph (`_stay`), which makes that node's derived operands read from the graph: they are
    looked at again, until none is kept.
    """
    found: set[int] = set()
    pending = [value for value, _ in derived.values()]
    while pending:
        keep = []
        for value in pending:
            entry = derived.get(id(value))
            if value.node is None or entry is None or id(value) in found or not _read_outside(value, derived):
                continue  # an original parameter (already an input), or not derived any more
            too_big = value.type.nbytes > max_growth * entry[1]
            free = value.node.op.name in _FREE_LAYOUT and all(v.node is None for v in value.node.inputs
                                                             if id(v) in derived)
            if too_big or free:
                keep.append(value.node)
            else:
                found.add(id(value))
        pending = [operand for node in keep for operand in _stay(node, derived)]
    return [value for value, _ in derived.values() if id(value) in found]


def _read_outside(value, derived) -> bool:
    """Whether a graph output or a node that stays in the graph reads `value`. A node's outputs
    are derived all or none, so its first tells; a node without outputs (effects) stays."""
    for user, _ in value.uses:
        if user is None or not user.outputs or id(user.outputs[0]) not in derived:
            return True
    return False


def _stay(node, derived) -> list:
    """Take `node` out of `derived`, and the derived nodes that read it, in turn (they now read a
    value computed in the graph); returns the operands of all these, which the graph now reads."""
    stack, operands = [node], []
    while stack:
        node = stack.pop()
        if id(node.outputs[0]) not in derived:
            continue  # already taken out
        for value in node.outputs:
            del derived[id(value)]
            stack.extend(user for user, _ in value.uses if user is not None and user.outputs
                         and id(user.outputs[0]) in derived)
        operands.extend(node.inputs)
    return operands


def _prep_for(graph):
    """The prep graph (the old prep's clone, or a new one) and the map id(graph value) -> prep
    value, holding the parameters so far."""
    params = graph.params()
    if graph.prep is None:
        prep = Graph("param_prep")
        outputs = [prep.add_input(p.type, "param", p.path) for p in params]
    else:
        prep, _ = graph.prep.graph.clone()
        outputs = list(prep.outputs)
    return prep, {id(p): v for p, v in zip(params, outputs)}


def _move_to_prep(graph, nodes, prep, prep_values) -> None:
    """Move the derived nodes, in program order, from the graph to the end of the prep. Once the
    frontier reads new parameters, only derived nodes read them (`_frontier` made every value a
    node that stays reads part of it). Their operands that stay (parameters, constants) are
    replaced by the prep's own (`_in_prep`: constants are copied first, as other nodes may read
    them)."""
    prep_values.update((id(v), v) for node in nodes for v in node.outputs)
    rewire = []
    for node in nodes:
        for i, value in enumerate(node.inputs):
            new = prep_values.get(id(value))
            if new is None:
                new = _in_prep(value, prep, prep_values)
            if new is not value:
                rewire.append((node, i, new))
    prep.move_to_end(nodes, graph)
    for node, i, new in rewire:
        node.set_input(i, new)


def _in_prep(value, prep, prep_values):
    """The prep's copy of `value`: a derived value's, or a copy of the constants (and the
    constant-only nodes) it is computed from."""
    found = prep_values.get(id(value))
    if found is None:
        node = value.node
        inputs = [_in_prep(v, prep, prep_values) for v in node.inputs]
        copy = prep.add_copy(node, inputs)
        prep_values.update(zip(map(id, node.outputs), copy.outputs))
        found = prep_values[id(value)]
    return found


def _replace_frontier(graph, frontier, prep_values) -> None:
    taken = {a.path for a in graph.inputs}
    for value in frontier:
        path = unique_name(param_name(value), taken)
        arg = graph.add_input(value.type, "param", path)
        prep_values[id(arg)] = value  # moved into the prep by _move_to_prep
        graph.replace_all_uses(value, arg)


def _derived_nodes(derived) -> list:
    """The derived nodes in program order (`derived` was filled in program order). A node's
    outputs are derived all or none: its first output stands for it."""
    return [value.node for value, _ in derived.values() if value.node is not None and value.index == 0]


def _check_unique_paths(graph) -> None:
    paths = [p.path for p in graph.params()]
    if len(set(paths)) != len(paths):
        raise ValueError("fold_params needs unique parameter paths; got duplicates")


def _finish(graph, prep, prep_values) -> None:
    """Drop unused params, order params by path (the new dict argument), rebuild in_tree and prep."""
    graph.remove_inputs([a for a in graph.params() if not a.uses])
    old_prep = graph.prep
    params = sorted(graph.params(), key=lambda a: a.path)
    children = graph.in_tree.children()
    counts = [c.num_leaves for c in children]
    first = graph.param_argnums[0]
    # Non-parameter leaves keep their order, grouped by their top-level argument.
    others, position = {}, 0
    inputs = [a for a in graph.inputs if a.role != "param"]
    for i, count in enumerate(counts):
        if i in graph.param_argnums:
            continue
        others[i], position = inputs[position:position + count], position + count
    order, new_children = [], []
    for i, child in enumerate(children):
        if i == first:
            order += params
            new_children.append(jax.tree_util.tree_structure({a.path: 0 for a in params}))
        elif i not in graph.param_argnums:
            order += others[i]
            new_children.append(child)
    graph.reorder_inputs(order)
    prep.set_outputs([prep_values[id(a)] for a in params])
    if old_prep is None:
        original_tree = graph.in_tree
        param_indices, index = [], 0
        for i, count in enumerate(counts):
            if i in graph.param_argnums:
                param_indices += range(index, index + count)
            index += count
        old = (original_tree, tuple(param_indices), tuple(graph.param_argnums))
    else:
        old = (old_prep.original_in_tree, old_prep.param_leaf_indices, old_prep.param_argnums)
    graph.prep = ParamPrep(prep, old[0], old[1], old[2], tuple(a.path for a in params))
    graph.in_tree = jax.tree_util.treedef_tuple(new_children)
    graph.param_argnums = (first,)

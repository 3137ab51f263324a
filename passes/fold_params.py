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
    derived, constant = param_derived_values(graph)
    frontier = _frontier(graph, derived, constant, max_growth)
    if not frontier:
        return graph
    _check_unique_paths(graph)
    prep, prep_values = _extend_prep(graph, derived)
    _replace_frontier(graph, frontier, prep_values)
    moved = _erase_folded(graph, derived)
    _finish(graph, prep, prep_values)
    ctx.count({"folded-node": moved, "new-param": len(frontier)})
    return graph


# Layout changes XLA performs for free (a bitcast of the buffer): precomputing them gains nothing.
_FREE_LAYOUT = frozenset({"reshape", "squeeze", "expand_dims"})


def _frontier(graph, derived, constant, max_growth) -> list:
    """Derived node outputs read by non-derived nodes or returned, worth materializing.

    A value too large to materialize, or a free layout change of a parameter, keeps its node in
    the graph, which makes that node's derived inputs the frontier instead; repeat until stable.
    """
    while True:
        frontier, keep = [], []
        for value, source_bytes in list(derived.values()):
            if value.node is None:
                continue  # an original parameter: already an input
            if not _read_outside(value, derived):
                continue
            too_big = value.type.nbytes > max_growth * source_bytes
            free = value.node.op.name in _FREE_LAYOUT and all(v.node is None for v in value.node.inputs
                                                             if id(v) in derived)
            (keep if too_big or free else frontier).append(value)
        if not keep:
            return frontier
        for value in keep:
            for out in value.node.outputs:
                derived.pop(id(out), None)
        _drop_orphans(derived, constant)


def _read_outside(value, derived) -> bool:
    """Whether a graph output or a node that stays in the graph reads `value`."""
    return any(user is None or not all(id(out) in derived for out in user.outputs)
               for user, _ in value.uses)


def _drop_orphans(derived, constant) -> None:
    # A derived node whose derived users were all removed may itself now be a frontier: nothing to
    # do here, _frontier recomputes. But a node whose *inputs* were removed is no longer derived.
    changed = True
    while changed:
        changed = False
        for key, (value, _) in list(derived.items()):
            node = value.node
            if node is not None and any(id(v) not in derived and id(v) not in constant for v in node.inputs):
                del derived[key]
                changed = True


def _extend_prep(graph, derived):
    """The prep graph (old prep extended, or a new one) and the map id(graph value) -> prep value."""
    params = graph.params()
    if graph.prep is None:
        prep = Graph("param_prep")
        outputs = [prep.add_input(p.type, "param", p.path) for p in params]
    else:
        prep, mapping = graph.prep.graph.clone()
        outputs = list(prep.outputs)
    prep_values = {id(p): v for p, v in zip(params, outputs)}
    for node in _derived_nodes(derived):
        inputs = [_in_prep(value, prep, prep_values) for value in node.inputs]
        copy = prep.add_copy(node, inputs)
        for old, new in zip(node.outputs, copy.outputs):
            prep_values[id(old)] = new
    return prep, prep_values


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
        prep_values[id(arg)] = prep_values[id(value)]
        graph.replace_all_uses(value, arg)


def _derived_nodes(derived) -> list:
    """The nodes all of whose outputs are derived, in program order (`derived` was filled in
    program order)."""
    nodes, seen = [], set()
    for value, _ in derived.values():
        node = value.node
        if node is not None and node not in seen:
            seen.add(node)
            if all(id(v) in derived for v in node.outputs):
                nodes.append(node)
    return nodes


def _erase_folded(graph, derived) -> int:
    """Erase the folded nodes (now unused), readers first; returns how many."""
    erased = 0
    for node in reversed(_derived_nodes(derived)):
        if not any(v.uses for v in node.outputs):
            graph.erase(node)
            erased += 1
    return erased


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

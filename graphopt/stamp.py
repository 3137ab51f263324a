"""Optimize three of K repeated layers, copy the third to the others.

An unrolled model of K identical layers makes every pass do the same work K times. For the passes
registered `layerwise` (what they do to a layer depends on that layer and the values it reads, not
on how many layers there are), `run_layerwise` runs them on two excerpts of the graph instead: the
prefix, the first two or three instances (graphopt.repeats) and the suffix. It then copies the
third instance's optimized nodes K - 3 times, each copy reading its own parameters and the copy
before it:

    excerpt, optimized:                  result:
      prefix'                              prefix'
      layer 0'   -> boundary 0             layer 0'
      layer 1'   -> boundary 1             layer 1'
      layer 2'   -> boundary 2             layer 2'
      suffix'                              layer 2' with layer 3's parameters, reading layer 2'
                                           ... K - 4 more copies
                                           suffix', reading the last copy

A `layer_boundary` node ends each instance in the excerpts: it passes on the values the next
instance (or the suffix) reads, and it has an effect, so no pass moves, merges or looks through it;
what lies between two boundaries is one instance's optimized nodes. The repeat detector puts the
boundaries where the fewest values cross (at a layer boundary only the residual stream crosses),
so the rewrites it keeps from being made are those that would span two layers.

Each copy keeps its own layer's module paths and rules: a custom_jvp call's derivative rule is a
function object per call, which the passes neither compare nor change (graphopt.repeats).

Checked, and else the passes run on the whole graph as usual: layer 2' must equal layer 1' node
for node (up to parameters, rules and the instance they read), so the passes did treat the
instances alike and layer 2' is what they make of any later one; the passes must not change the
graph's inputs or metadata. The report gives the whole graph's counts: the three-instance excerpt's plus K - 3 times
what its third instance adds over the two-instance excerpt; a `stamp_layers` row gives the time
the detection, the excerpts and the copies took, and the node count it made (equal to the count
the rows predict).

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> from graphopt.pipeline import run_pipeline
    >>> def net(ws, x):
    ...     for w in ws:
    ...         x = jnp.tanh((x @ w) * 1.0) + x
    ...     return x
    >>> g = graphopt.trace(net, [jnp.ones((4, 4))] * 12, jnp.ones((2, 4)), params_argnums=0)
    >>> stamped = run_pipeline(g.clone()[0], ["canonicalize"], stamp_min_nodes=0)
    >>> [(r.name, r.nodes, dict(r.fired)) for r in stamped.report.records]
    [('canonicalize', (49, 36), {'canonicalize/mul-one': 12}), ('stamp_layers', (36, 36), {'stamped-layer': 8})]
    >>> str(stamped.graph) == str(run_pipeline(g, ["canonicalize"], stamp_min_nodes=None).graph)
    True
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

from graphopt.cost import graph_stats
from graphopt.ir import Graph, Node
from graphopt.ops import OpDef
from graphopt.repeats import Repeat, find_repeat, node_params_key, rules

# The fewest repeated instances worth stamping: the excerpts hold five in all, and copying is
# cheaper than optimizing only when many copies are made.
MIN_COUNT = 8


class _Boundary(OpDef):
    """Passes its operands on unchanged; its effect keeps passes from moving, merging or folding it."""

    def effects(self, in_types, params):
        return _BOUNDARY_EFFECTS


class _BoundaryEffect:
    def __repr__(self):
        return "layer boundary"


_BOUNDARY_EFFECTS = frozenset({_BoundaryEffect()})
BOUNDARY = _Boundary("layer_boundary", lambda in_types, params, regions: list(in_types),
                     lambda *args, regions: list(args))


def run_layerwise(graph: Graph, passes, run, *, min_nodes: int) -> tuple[Graph, list] | None:
    """Run `passes` (all layerwise) over `graph` by stamping its repeated layer; None when the
    graph has fewer than `min_nodes` nodes, no repeat of MIN_COUNT instances, or the passes did
    not treat the instances alike. `run(graph, passes)` runs passes without stamping and returns
    a PipelineResult. The given graph is not changed."""
    if len(graph) < min_nodes:
        return None
    start = time.perf_counter()
    repeat = find_repeat(graph, min_count=MIN_COUNT)
    if repeat is None:
        return None
    seconds = time.perf_counter() - start
    small, _ = excerpt(graph, repeat, 2)
    three, boundaries = excerpt(graph, repeat, 3)
    inputs, metadata = list(three.inputs), dict(three.metadata)
    result_two, result = run(small, passes), run(three, passes)
    start = time.perf_counter()
    out = result.graph
    if out is not three or three.inputs != inputs or three.metadata != metadata:
        return None
    params = [[out.inputs[a.index] for a in instance] for instance in repeat.params]
    instances = _instances(out, boundaries)
    same = {id(x): y for x, y in zip(boundaries[0].outputs, boundaries[1].outputs)}
    same.update((id(x), y) for x, y in zip(params[1], params[2]))
    if not _alike(instances[1], instances[2], same):
        return None
    template = set(map(id, instances[2]))
    template = [n for n in out.nodes if id(n) in template]
    own_rules = _own_rules(repeat, template)
    if own_rules is None:
        return None
    _stamp(out, repeat, template, boundaries, params, own_rules)
    records = _extrapolated(result_two.report.records, result.report.records, repeat.count)
    seconds += time.perf_counter() - start
    after = graph_stats(out)
    records.append(_stamp_record(records[-1], after, seconds, repeat))
    return out, records


def excerpt(graph: Graph, repeat: Repeat, m: int) -> tuple[Graph, list[Node]]:
    """The graph with only the first `m` instances of `repeat`, each followed by a boundary node,
    and the suffix reading the last of them; every input kept. Returns it and the boundaries."""
    out = Graph(graph.name)
    out.in_tree, out.out_tree = graph.in_tree, graph.out_tree
    out.param_argnums, out.prep, out.metadata = graph.param_argnums, graph.prep, dict(graph.metadata)
    mapping = {id(a): out.add_input(a.type, a.role, a.path) for a in graph.inputs}
    boundaries = []
    out.add_copies(repeat.nodes[:repeat.start], mapping)
    for k in range(m):
        out.add_copies(repeat.instance(k), mapping)
        exits = repeat.exit_values(k)
        boundary = out.add_node(BOUNDARY, [mapping[id(v)] for v in exits])
        boundaries.append(boundary)
        mapping.update(zip(map(id, exits), boundary.outputs))
    # The suffix reads the last instance; here that is instance m - 1.
    mapping.update(zip(map(id, repeat.exit_values(repeat.count - 1)), boundaries[-1].outputs))
    out.add_copies(repeat.nodes[repeat.end:], mapping)
    out.set_outputs([mapping[id(v)] for v in graph.outputs])
    return out, boundaries


def _instances(graph: Graph, boundaries: list[Node]) -> list[list[Node]]:
    """Per boundary, the nodes it depends on and no boundary before it does, operands first (see
    _operands_first)."""
    outside: set[int] = set()
    found = []
    for boundary in boundaries:
        mine = _operands_first(boundary.inputs, outside)
        found.append(mine)
        outside.update(map(id, mine))
        outside.add(id(boundary))
    return found


def _operands_first(roots, outside: set[int]) -> list[Node]:
    """The nodes `roots` depend on, not entering `outside`, each after its operands (depth first,
    operands in order): an order that depends only on how they are wired, so two alike instances
    list alike nodes at the same places, wherever passes put them in the graph."""
    order, seen = [], set()
    stack = [(v.node, False) for v in reversed(roots) if v.node is not None]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in seen or id(node) in outside:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((v.node, False) for v in reversed(node.inputs) if v.node is not None)
    return order


def _alike(a: list[Node], b: list[Node], same: dict) -> bool:
    """Whether nodes `b` compute what nodes `a` do: the same ops, params, types and regions, in
    the same order, each operand read where `same` (id of a's value → b's) maps it, or else the
    very same value. Extends `same` with a's outputs."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if (x.op is not y.op or len(x.inputs) != len(y.inputs) or _params_differ(x, y)
                or [v.type for v in x.outputs] != [v.type for v in y.outputs]
                or len(x.regions) != len(y.regions) or not all(map(_same_region, x.regions, y.regions))):
            return False
        if any(same.get(id(u), u) is not w for u, w in zip(x.inputs, y.inputs)):
            return False
        same.update(zip(map(id, x.outputs), y.outputs))
    return True


def _params_differ(x: Node, y: Node) -> bool:
    if x.params is y.params:
        return False
    key = node_params_key(x)
    return key is None or key != node_params_key(y)


def _same_region(a: Graph, b: Graph) -> bool:
    if len(a.inputs) != len(b.inputs) or any(x.type != y.type for x, y in zip(a.inputs, b.inputs)):
        return False
    same = {id(x): y for x, y in zip(a.inputs, b.inputs)}
    return (len(a.outputs) == len(b.outputs)
            and _alike(_operands_first(a.outputs, set()), _operands_first(b.outputs, set()), same)
            and all(same.get(id(x), x) is y for x, y in zip(a.outputs, b.outputs)))


def _own_rules(repeat: Repeat, template: list[Node]) -> list[dict] | None:
    """Per instance k, {id(instance 2's rule): instance k's} for the rules (derivative rules of
    custom_jvp calls: see repeats.node_params_key) at the same place; None when the template holds
    a rule that is not instance 2's, which could then not be given to each copy."""
    places = [(j, rules(node)) for j, node in enumerate(repeat.instance(2))]
    places = [(j, found) for j, found in places if found]
    kept = {id(rule) for _, found in places for rule in found}
    if not all(id(rule) in kept for node in template for rule in rules(node)):
        return None
    own = [{} for _ in range(repeat.count)]
    if places:  # most models have no rules: skip the walk over every instance
        for k in range(repeat.count):
            nodes = repeat.instance(k)
            for j, found in places:
                own[k].update(zip(map(id, found), rules(nodes[j])))
    return own


def _stamp(graph: Graph, repeat: Repeat, template: list[Node], boundaries: list[Node], params,
           own_rules: list[dict]) -> None:
    """Copy `template` (instance 2) for instances 3 .. count-1 after the last boundary, each copy
    with its instance's parameters, module paths and rules; the suffix then reads the last copy,
    and every boundary goes."""
    last = boundaries[-1]
    readers = [(value, list(value.uses)) for value in last.outputs]
    paths = _module_paths(repeat)
    with_rules = [bool(rules(node)) for node in template]
    with graph.inserting_before(last._next):
        previous = last
        for k in range(3, repeat.count):
            mapping = {id(x): y for x, y in zip(boundaries[1].outputs, previous.outputs)}
            mapping.update((id(x), y) for x, y in zip(params[2], params[k]))
            rename, own = paths[k], own_rules[k]
            for new, has_rules in zip(graph.add_copies(template, mapping), with_rules):
                if rename or (own and has_rules):
                    _make_own(new, rename, own if has_rules else {})
            previous = graph.add_node(BOUNDARY, [mapping[id(v)] if id(v) in mapping else v for v in last.inputs])
            boundaries.append(previous)
    outputs = list(graph.outputs)
    for value, uses in readers:
        new = previous.outputs[value.index]
        for user, i in uses:
            if user is None:
                outputs[i] = new
            else:
                user.set_input(i, new)
    graph.set_outputs(outputs)
    for boundary in boundaries:
        for out, value in zip(boundary.outputs, boundary.inputs):
            graph.replace_all_uses(out, value)
        graph.erase(boundary)


def _make_own(node: Node, rename: dict, own_rules: dict) -> None:
    """Give the copy of a node, and the nodes of its regions, their own instance's module paths
    and rules."""
    nodes = [node, *(m for region in node.regions for m in region.walk())] if node.regions else (node,)
    for n in nodes:
        path = n.provenance.module_path
        if path in rename:
            n.provenance = n.provenance.moved(rename[path])
        if own_rules:
            for name, value in n.params.items():
                if id(value) in own_rules:
                    n.params[name] = own_rules[id(value)]


def _module_paths(repeat: Repeat) -> list[dict]:
    """Per instance k, instance 2's module paths → instance k's, where they differ (Flax names
    layers `layers_0`, `layers_1`, ...); the copies of instance 2 take their own instance's."""
    template = repeat.instance(2)
    found = []
    for k in range(repeat.count):
        paths = {}
        for a, b in zip(template, repeat.instance(k)):
            if a.provenance.module_path != b.provenance.module_path:
                paths[a.provenance.module_path] = b.provenance.module_path
        found.append(paths)
    return found


def _extrapolated(two: list, three: list, count: int) -> list:
    """The records the passes would give on the whole graph: the three-instance excerpt's plus
    count - 3 times what its third instance adds, boundaries not counted. Seconds are those spent
    on both excerpts."""
    def whole(x2, x3, boundaries2=0, boundaries3=0):
        x2, x3 = x2 - boundaries2, x3 - boundaries3
        return x3 + (count - 3) * (x3 - x2)

    records = []
    for r2, r3 in zip(two, three):
        fired = Counter({k: whole(r2.fired.get(k, 0), n) for k, n in r3.fired.items()})
        records.append(dataclasses.replace(
            r3, nodes=tuple(whole(a, b, 2, 3) for a, b in zip(r2.nodes, r3.nodes)),
            flops=tuple(whole(a, b) for a, b in zip(r2.flops, r3.flops)),
            bytes=tuple(whole(a, b) for a, b in zip(r2.bytes, r3.bytes)),
            seconds=r2.seconds + r3.seconds, fired=+fired, notes=list(r3.notes)))
    return records


def _stamp_record(last, after, seconds, repeat):
    note = (f"optimized 3 of {repeat.count} repeated layers ({repeat.period} nodes each) and copied "
            f"the third for the other {repeat.count - 3}")
    return dataclasses.replace(last, name="stamp_layers", contract="exact", nodes=(last.nodes[1], after[0]),
                               flops=(last.flops[1], after[1]), bytes=(last.bytes[1], after[2]),
                               seconds=seconds, fired=Counter({"stamped-layer": repeat.count - 3}),
                               notes=[note], error=None, status="ok")

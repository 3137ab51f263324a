"""Repeated layers: find the unrolled loop in a traced graph.

A model written as `for p in params["layers"]: x = layer(x, p)` traces to the same nodes K times in
a row. Each instance reads its own parameters, what the instance before it computed (the carried
values: the residual stream), and values shared by all (inputs, constants, a mask computed once):

    %0 = ...                            prefix
    %1 = dot_general %0, %w0            instance 0   (reads %0, its own parameter %w0)
    %2 = add %1, %0
    %3 = dot_general %2, %w1            instance 1   (reads %2 from instance 0, %w1)
    %4 = add %3, %2
    ...                                 instances 2 .. K-1, then the suffix

`find_repeat(graph)` finds the longest such run among the top-level nodes and checks it exactly:
the same ops with the same params (constants by value), regions (by structure) and types at the
same place in every instance, the same wiring inside an instance and from the instance before, the same shared values,
and parameters of the same types at the same places. The suffix may read only the last instance.
graphopt.stamp uses it to optimize one instance and copy the result to the others.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> def net(ws, x):
    ...     for w in ws:
    ...         x = jnp.tanh(x @ w) + x
    ...     return x
    >>> g = graphopt.trace(net, [jnp.ones((4, 4))] * 6, jnp.ones((2, 4)), params_argnums=0)
    >>> r = find_repeat(g, min_count=4)
    >>> r.count, r.period, [a.path for a in r.params[1]]
    (6, 3, ['1'])
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphopt import _jax_compat as compat
from graphopt.ir import Argument, Graph, Node, Value
from graphopt.ops import params_key


@dataclasses.dataclass
class Repeat:
    """`count` instances of `period` nodes each, the first at `nodes[start]`."""

    nodes: list[Node]                 # the graph's top-level nodes, in order
    start: int
    period: int
    count: int
    params: list[list[Argument]]      # per instance, its parameters in order of first use
    exits: list[tuple[int, int]]      # (node in the instance, output): values read after it

    def instance(self, k: int) -> list[Node]:
        first = self.start + k * self.period
        return self.nodes[first:first + self.period]

    @property
    def end(self) -> int:
        """Index of the first node after the last instance."""
        return self.start + self.count * self.period

    def exit_values(self, k: int) -> list[Value]:
        nodes = self.instance(k)
        return [nodes[j].outputs[o] for j, o in self.exits]


def find_repeat(graph: Graph, *, min_count: int = 4) -> Repeat | None:
    """The longest run of at least `min_count` identical instances among the top-level nodes, or
    None. Nodes with effects are never part of an instance."""
    nodes = list(graph.nodes)
    position = {id(node): i for i, node in enumerate(nodes)}
    keys = _key_ids(nodes)
    coarse = _coarse_ids(nodes, keys)
    found = _period_and_run(coarse, min_count)
    if found is None:
        return None
    period, first, end = found
    start = first + _rotation(nodes, position, first, end, period)
    count = (end - start) // period
    exact = _exact_ids(nodes, keys, position, start, count, period)
    start, count = _agreeing(nodes, position, exact, start, count, period)
    while start >= period and _first_agrees(nodes, position, start - period, period):
        start, count = start - period, count + 1  # the first layer reads the prefix
    if count < min_count:
        return None
    repeat = Repeat(nodes, start, period, count, [], [])
    if not _fill_params(repeat) or not _fill_exits(repeat, graph, position):
        return None
    return repeat


# --- signatures ----------------------------------------------------------------------------------

def _key_ids(nodes) -> list[int]:
    """Per node, an id for what it is apart from its operands: op, params (constants by value) and
    regions (by structure: a `custom_jvp` activation in every layer). Nodes with effects, or with
    params or regions that cannot be keyed, get an id of their own.

    Types need no key: alike operands (the same node of the instance, or the same value) have
    alike types, so alike nodes do; where they are parameters, _exact_ids keys their types."""
    ids: dict = {}
    out = []
    for node in nodes:
        key = None
        if node.regions and not node.effects:
            regions = tuple([_region_key(r) for r in node.regions])
            exact = node_params_key(node)
            if exact is not None and None not in regions:
                key = (node.op, exact, regions)
        elif not node.effects:
            params = node.params
            # Python's == on the params is exact (and several times cheaper than params_key) but
            # for floats (-0.0 == 0.0) and for bools in tuples ((True,) == (1,)).
            if not _inexact(params.values()):
                key = (node.op, tuple([(name, type(value), value) for name, value in params.items()]))
                try:
                    out.append(ids.setdefault(key, len(ids)))
                    continue
                except TypeError:  # an unhashable value (an array)
                    pass
            exact = params_key(params)
            if exact is not None:
                key = (node.op, exact)
        out.append(ids.setdefault(key if key is not None else ("unique", id(node)), len(ids)))
    return out


def node_params_key(node: Node):
    """params_key of the node's params but its rules, or None. A rule is a function-valued param:
    a `custom_jvp_call`'s derivative rule is a new function object at every call, even of the
    same activation, so a key by identity would set every layer apart. Each layer keeps its own
    rules when stamped (graphopt.stamp), so they need not be equal.

    >>> import graphopt, jax, jax.numpy as jnp
    >>> g = graphopt.trace(lambda x: jax.nn.relu(jax.nn.relu(x) + 1.0), jnp.ones(3))
    >>> a, b = [n for n in g.nodes if n.op.name == "custom_jvp_call"]
    >>> a.params == b.params, node_params_key(a) == node_params_key(b)
    (False, True)
    """
    params = node.params
    if not any(map(_is_rule, params.values())):
        return params_key(params)
    key = params_key({name: value for name, value in params.items() if not _is_rule(value)})
    return None if key is None else (key, tuple([name for name, value in params.items() if _is_rule(value)]))


def rules(node: Node) -> list:
    """The node's rules (function-valued params), then those of the nodes in its regions."""
    found = [value for value in node.params.values() if _is_rule(value)]
    for region in node.regions:
        for inner in region.nodes:
            found.extend(rules(inner))
    return found


def _is_rule(value) -> bool:
    """A function, or one JAX wrapped; not a class (a dtype's scalar type is no rule)."""
    return isinstance(value, compat.WrappedFun) or (callable(value) and not isinstance(value, type))


def _region_key(region: Graph):
    """A hashable key equal for regions that compute alike: the same nodes (op, exact params,
    output types, regions) reading the same places, or None (a node with effects, params that
    cannot be keyed)."""
    places = {id(a): ("input", i) for i, a in enumerate(region.inputs)}
    items: list = [tuple([a.type for a in region.inputs])]
    for n, node in enumerate(region.nodes):
        exact = node_params_key(node)
        if node.effects or exact is None:
            return None
        inner = tuple([_region_key(r) for r in node.regions])
        if None in inner:
            return None
        items.append((node.op, exact, tuple([places[id(v)] for v in node.inputs]), inner,
                      tuple([v.type for v in node.outputs])))
        places.update((id(v), (n, v.index)) for v in node.outputs)
    items.append(tuple([places[id(v)] for v in region.outputs]))
    return tuple(items)


def _inexact(values, nested: bool = False) -> bool:
    """Whether a float, complex or NumPy scalar is among the values, or (nested) a bool."""
    for v in values:
        kind = type(v)
        if kind in _PLAIN:
            if nested and kind is bool:
                return True
            continue
        if kind is tuple or kind is list:
            if not _PLAIN_NESTED.issuperset(map(type, v)) and _inexact(v, True):
                return True
        elif kind is float or kind is complex or isinstance(v, np.generic):
            return True
    return False


_PLAIN = frozenset({int, str, bool, type(None)})
_PLAIN_NESTED = frozenset({int, str, type(None)})


def _coarse_ids(nodes, keys) -> np.ndarray:
    """Per node, an id equal for nodes alike up to where their operands come from (the producing
    op, not its place): the same in every instance, whatever the period."""
    ids: dict = {}
    out = []
    for node, key in zip(nodes, keys):
        operands = tuple([(v.node.op, v.index) if v.node is not None else (v.role, v.type)
                          for v in node.inputs])
        out.append(ids.setdefault((key, operands), len(ids)))
    return np.array(out, np.int64)


def _period_and_run(ids: np.ndarray, min_count: int) -> tuple[int, int, int] | None:
    """(period, first, end): of the periods whose longest run holds `min_count` instances and
    covers at least half as many nodes as the longest such run, the shortest (a period's multiples
    repeat too), with its run."""
    runs = {}
    for period in _periods(ids, min_count):
        first, end = _longest_run(ids, period)
        if (end - first) // period >= min_count:
            runs[period] = (first, end)
    if not runs:
        return None
    longest = max(end - first for first, end in runs.values())
    period = min(p for p, (first, end) in runs.items() if 2 * (end - first) >= longest)
    return (period, *runs[period])


def _periods(ids: np.ndarray, min_count: int) -> set[int]:
    """Candidate periods: per kind of node seen `min_count` times or more, the commonest gap
    between one and the next, the one after and the one after that (a block of two alike halves,
    conv-BatchNorm-relu twice, has its kinds recur every half, and its period is two gaps)."""
    order = np.argsort(ids, kind="stable")
    bounds = np.flatnonzero(np.diff(ids[order])) + 1
    found = set()
    for positions in np.split(order, bounds):
        if len(positions) < min_count:
            continue
        for m in (1, 2, 3):
            gaps, counts = np.unique(positions[m:] - positions[:-m], return_counts=True)
            if len(gaps):
                found.add(int(gaps[np.argmax(counts)]))
    return found


def _longest_run(ids: np.ndarray, period: int) -> tuple[int, int]:
    """[first, end): the longest stretch where every node equals the one `period` later (shifted
    so it ends at the last such node's partner)."""
    same = np.concatenate([[False], ids[:-period] == ids[period:], [False]])
    edges = np.flatnonzero(np.diff(same.astype(np.int8)))
    starts, stops = edges[::2], edges[1::2]
    if not len(starts):
        return 0, 0
    best = int(np.argmax(stops - starts))
    return int(starts[best]), int(stops[best]) + period


def _rotation(nodes, position, first, end, period) -> int:
    """Where in the period instances begin: where the fewest values cross from one instance to
    later nodes, and of those places, where they have the most readers. At a layer boundary only
    the residual stream crosses, and many read it; a cut inside `dot + bias`, with one value
    crossing too, would keep that pair from being recognized as one linear op."""
    base = first + period if end - first >= 3 * period else first
    window = range(base, min(base + 2 * period, len(nodes)))
    last_use = {}
    for q in window:
        for value in nodes[q].outputs:
            last_use[(q, value.index)] = max((position.get(id(user), len(nodes)) if user is not None
                                              else len(nodes) for user, _ in value.uses), default=q)
    # With instances starting at base + r, the value made at q leaves its instance when
    # r <= q - base < r + period <= last - base.
    crossings = np.zeros(period + 1, np.int64)
    for (q, _), last in last_use.items():
        lo, hi = max(q - base - period + 1, 0), min(q - base, last - base - period, period - 1)
        if lo <= hi:
            crossings[lo] += 1
            crossings[hi + 1] -= 1
    counts = np.cumsum(crossings)[:period]
    fewest = np.flatnonzero(counts == counts.min())

    def readers(r):
        cut = base + r + period
        return sum(len(nodes[q].outputs[i].uses) for (q, i), last in last_use.items()
                   if base + r <= q < cut <= last)
    return int(max(fewest, key=lambda r: (readers(r), -r)))


def _exact_ids(nodes, keys, position, start, count, period) -> np.ndarray | None:
    """Per node of the run, an id equal across instances only for nodes alike in every respect
    but their own parameters: operands inside the instance or the one before by relative place,
    anything else by identity. Shape (count, period)."""
    ids: dict = {}
    out = []
    for i in range(start, start + count * period):
        j = (i - start) % period
        operands = []
        for v in nodes[i].inputs:
            if v.node is None:
                operands.append(("param", v.type) if v.role == "param" else ("input", id(v)))
                continue
            offset = i - position[id(v.node)]
            operands.append(("near", offset, v.index) if offset <= j + period else ("far", id(v)))
        out.append(ids.setdefault((keys[i], tuple(operands)), len(ids)))
    return np.array(out, np.int64).reshape(count, period)


def _agreeing(nodes, position, exact, start, count, period) -> tuple[int, int]:
    """The longest run of instances equal to their neighbours. Instance 0 reads the prefix where the
    others read the instance before, so unless equal it is compared operand by operand."""
    differs = np.flatnonzero(np.any(exact[2:] != exact[1], axis=1)) + 2 if count > 2 else []
    if len(differs):
        count = int(differs[0])
    if count >= 2 and not np.array_equal(exact[0], exact[1]) and not _first_agrees(nodes, position, start, period):
        start, count = start + period, count - 1
    return start, count


def _first_agrees(nodes, position, start, period) -> bool:
    """The instance at `start` against the next: equal but where the next reads this one, which this
    one reads from before it."""
    for j in range(period):
        a, b = nodes[start + j], nodes[start + period + j]
        if _key_ids([a, b]) != [0, 0] or len(a.inputs) != len(b.inputs):
            return False
        for va, vb in zip(a.inputs, b.inputs):
            if vb.node is None:
                if not (va is vb or (va.node is None and va.role == vb.role == "param" and va.type == vb.type)):
                    return False
                continue
            q = position[id(vb.node)] - start - period  # where b's operand is, relative to instance 1
            if 0 <= q:  # inside instance 1: a reads the same place in instance 0
                if va.node is None or position[id(va.node)] - start != q or va.index != vb.index:
                    return False
            elif q >= -period:  # instance 0: a reads something made before the run
                if va.node is not None and position[id(va.node)] >= start:
                    return False
                if va.type != vb.type:
                    return False
            elif va is not vb:
                return False
    return True


def _fill_params(repeat: Repeat) -> bool:
    """Each instance's parameters in order of first use; False unless the instances agree on where
    one parameter is read again (the same parameter twice in one instance, or tied weights)."""
    pattern = None
    for k in range(repeat.count):
        seen: dict[int, int] = {}
        order, uses = [], []
        for node in repeat.instance(k):
            for v in node.inputs:
                if v.node is None and v.role == "param":
                    uses.append(seen.setdefault(id(v), len(order)))
                    if len(order) < len(seen):
                        order.append(v)
        if pattern is None:
            pattern = uses
        elif uses != pattern:
            return False
        repeat.params.append(order)
    return True


def _fill_exits(repeat: Repeat, graph: Graph, position) -> bool:
    """The values instances pass on: read by the next instance, or (the last one's) by the suffix
    and the graph's outputs. False when the suffix reads an earlier instance."""
    start, period, end = repeat.start, repeat.period, repeat.end
    exits = set()
    middle = start + period  # instance 1: what it reads from instance 0
    for j, node in enumerate(repeat.instance(1)):
        for v in node.inputs:
            q = position.get(id(v.node)) if v.node is not None else None
            if q is not None and start <= q < middle:
                exits.add((q - start, v.index))
    last = end - period
    readers = [v for node in repeat.nodes[end:] for v in node.inputs] + list(graph.outputs)
    for v in readers:
        q = position.get(id(v.node)) if v.node is not None else None
        if q is None or q < start or q >= end:
            continue
        if q < last:
            return False
        exits.add((q - last, v.index))
    repeat.exits = sorted(exits)
    return bool(exits)  # instances nothing reads are dead code, not layers

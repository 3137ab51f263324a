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
the same ops with the same params (constants by value) and types at the same place in every
instance, the same wiring inside an instance and from the instance before, the same shared values,
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
    None. Nodes with regions or effects are never part of an instance."""
    nodes = list(graph.nodes)
    position = {id(node): i for i, node in enumerate(nodes)}
    keys = _key_ids(nodes)
    coarse = _coarse_ids(nodes, keys)
    period = _period(coarse, min_count)
    if period is None:
        return None
    first, end = _longest_run(coarse, period)
    if (end - first) // period < min_count:
        return None
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
    """Per node, an id for what it is apart from its operands: op and params (constants by value).
    Nodes with regions or effects, or with params that cannot be keyed, get an id of their own.

    Types need no key: alike operands (the same node of the instance, or the same value) have
    alike types, so alike nodes do; where they are parameters, _exact_ids keys their types."""
    ids: dict = {}
    out = []
    for node in nodes:
        key = None
        if not node.regions and not node.effects:
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
    out = np.empty(len(nodes), np.int64)
    for i, (node, key) in enumerate(zip(nodes, keys)):
        operands = tuple([(v.node.op, v.index) if v.node is not None else (v.role, v.type)
                          for v in node.inputs])
        out[i] = ids.setdefault((key, operands), len(ids))
    return out


def _period(ids: np.ndarray, min_count: int) -> int | None:
    """The spacing at which the most nodes recur: per kind of node, the commonest gap between
    one and the next, voted for by how often it occurs."""
    order = np.argsort(ids, kind="stable")
    bounds = np.flatnonzero(np.diff(ids[order])) + 1
    votes: dict[int, int] = {}
    for positions in np.split(order, bounds):
        if len(positions) < min_count:
            continue
        gaps, counts = np.unique(np.diff(positions), return_counts=True)
        best = int(np.argmax(counts))
        votes[int(gaps[best])] = votes.get(int(gaps[best]), 0) + int(counts[best])
    return max(votes, key=lambda p: (votes[p], -p)) if votes else None


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
    out = np.empty(count * period, np.int64)
    for i in range(start, start + count * period):
        j = (i - start) % period
        operands = []
        for v in nodes[i].inputs:
            if v.node is None:
                operands.append(("param", v.type) if v.role == "param" else ("input", id(v)))
                continue
            offset = i - position[id(v.node)]
            operands.append(("near", offset, v.index) if offset <= j + period else ("far", id(v)))
        out[i - start] = ids.setdefault((keys[i], tuple(operands)), len(ids))
    return out.reshape(count, period)


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

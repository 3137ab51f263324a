"""Declarative rewrite rules: `pattern → replacement`, and a driver that applies them to a fixed point.

A pattern describes a value by the node that computes it:

    x, c = Var("x"), Const("c", where=is_power_of_two)
    Rule("div-by-pow2", Op("div", x, c), lambda b, x, c: b.op("mul", x, b.const(1 / c.scalar, like=x)))

- `Var(name)` matches any value and captures it; the same name used twice must bind the same value,
  which makes DAG patterns (`sub(x, mean(x))`) exact.
- `Op(name, *operands, ...)` matches a value produced by an op (a name or a set of names), with
  params (`params={"axes": (1,)}` or a predicate), `dtype`, `shape`, `commutative=True` (either
  operand order), `single_use=True` (the value has exactly one reader, so rewriting it does not
  duplicate work), `index` for multi-output ops, and `name` to capture the matched value.
- `Const(name, value=..., where=...)` matches a value computed by a constant node; a scalar literal
  is matched by value exactly (NaN and the sign of zero included).
- `Rule(name, pattern, replacement, where=...)`: `replacement(builder, **captures)` returns the new
  value for the root, a dict `{capture name: new value}` to replace several matched values at once
  (multi-output rewrites), or None to decline. A replacement must keep each replaced value's type.

`rewrite(graph, rules)` applies the rules until none fires (a worklist over the graph and its
regions), erases what became dead, and returns how often each rule fired. `explain(rule, node)` says
why a rule does not match a node.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> g = graphopt.trace(lambda x: -(-x), jnp.ones(3))
    >>> x = Var("x")
    >>> double_neg = Rule("neg-neg", Op("neg", Op("neg", x)), lambda b, x: x)
    >>> dict(rewrite(g, [double_neg]))
    {'neg-neg': 1}
    >>> [n.op.name for n in g.nodes]
    []
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np

from graphopt.builder import Builder
from graphopt.errors import GraphError
from graphopt.ir import Graph, Node, Value, erase_dead

Predicate = Callable[[Any], bool]


class Pattern(abc.ABC):
    """Base class of patterns. `match(value, captures, why)` returns True and fills `captures`."""

    @abc.abstractmethod
    def match(self, value: Value, captures: dict, why: list | None) -> bool:
        """Whether `value` matches; on success the captures are added to `captures`."""

    def produced_by(self) -> frozenset | None:
        """The names of the ops that can compute a value this pattern matches, or None for any
        (a graph input too). Feeds the driver's operand guards; never too narrow."""
        return None

    def root_guard(self) -> "OperandGuard | None":
        """A necessary condition on the ops computing the operands of a node whose output this
        pattern matches (see OperandGuard), or None."""
        return None


@dataclasses.dataclass(frozen=True)
class Var(Pattern):
    """Any value (optionally with a dtype or shape condition); captured under `name`."""

    name: str | None = None
    dtype: Any = None
    shape: Any = None

    def match(self, value, captures, why):
        if (self.dtype is not None or self.shape is not None) and not _type_ok(self, value, why):
            return False
        name = self.name
        if name is not None and captures.setdefault(name, value) is not value:
            return _fail(why, lambda: f"{name!r} would bind two different values")
        return True


@dataclasses.dataclass(frozen=True)
class Const(Pattern):
    """A value computed by a constant node. `value`: a scalar it must equal exactly; `where`: a
    predicate on the numpy value."""

    name: str | None = None
    value: Any = None
    where: Predicate | None = None
    dtype: Any = None
    shape: Any = None

    def produced_by(self):
        return frozenset({"constant"})

    def match(self, value, captures, why):
        node = value.node
        if node is None or node.op.name != "constant":
            return _fail(why, lambda: f"expected a constant, got {_describe(value)}")
        if not _type_ok(self, value, why):
            return False
        if self.value is not None or self.where is not None:  # only then read it (host copy)
            array = np.asarray(node.params["value"])
            if self.value is not None and not _same_scalar(array, self.value):
                return _fail(why, lambda: f"constant {array!r} is not {self.value!r}")
            if self.where is not None and not self.where(array):
                return _fail(why, lambda: f"constant {array!r} fails its condition")
        return _bind(self.name, value, captures, why)


@dataclasses.dataclass(frozen=True)
class Op(Pattern):
    """A value produced by op `op` (name or set of names) from `operands` (patterns)."""

    op: str | frozenset
    operands: tuple = ()
    params: Any = None        # dict of exact param values, or a predicate on the params dict
    dtype: Any = None
    shape: Any = None
    commutative: bool = False
    single_use: bool = False
    index: int = 0
    name: str | None = None

    def __init__(self, op, *operands, params=None, dtype=None, shape=None, commutative=False,
                 single_use=False, index=0, name=None):
        ops = frozenset([op]) if isinstance(op, str) else frozenset(op)
        for key, val in (("op", ops), ("operands", tuple(operands)), ("params", params), ("dtype", dtype),
                         ("shape", shape), ("commutative", commutative), ("single_use", single_use),
                         ("index", index), ("name", name)):
            object.__setattr__(self, key, val)
        # The ops that can compute each operand (None: any), to skip an operand order of a
        # commutative op on the names alone.
        object.__setattr__(self, "_operand_ops", tuple(p.produced_by() for p in self.operands))
        # Only an op name, operands and a capture name to check (most patterns): see _match_plain.
        object.__setattr__(self, "_plain", params is None and dtype is None and shape is None and
                           not single_use and index == 0 and not (commutative and len(operands) == 2))

    def produced_by(self):
        return self.op

    def root_guard(self):
        return _operand_guard(self)

    def match(self, value, captures, why):
        if self._plain and why is None:
            return self._match_plain(value, captures)
        node = value.node
        if node is None:
            return _fail(why, lambda: f"expected {_ops_text(self.op)}, got a graph input")
        if node.op.name not in self.op:
            return _fail(why, lambda: f"expected {_ops_text(self.op)}, got {node.op.name}")
        if value.index != self.index:
            return _fail(why, lambda: f"expected output {self.index} of {node.op.name}, got output {value.index}")
        if self.single_use and len(value.uses) != 1:
            return _fail(why, lambda: f"{node.op.name} result has {len(value.uses)} uses; the rule needs one")
        if (self.dtype is not None or self.shape is not None) and not _type_ok(self, value, why):
            return False
        if self.params is not None and not self._params_ok(node, why):
            return False
        inputs = node.inputs
        if self.operands and len(self.operands) != len(inputs):
            return _fail(why, lambda: f"{node.op.name} has {len(inputs)} operands, pattern {len(self.operands)}")
        if not (self.commutative and len(inputs) == 2):
            # One operand order: bind straight into `captures`. A failed attempt may leave partial
            # bindings behind; callers discard the dict of a failed attempt (see Rule.match).
            for pattern, operand in zip(self.operands, inputs):
                if not pattern.match(operand, captures, why):
                    return _fail(why, lambda: f"{node.op.name} operand: {why[-1]}") if why else False
            return _bind(self.name, value, captures, why)
        for order in (inputs, inputs[::-1]):
            if why is None and not _may_match(self._operand_ops, order):
                continue  # explain() tries it, for the reason
            trial = dict(captures)
            sub_why = [] if why is not None else None
            if all(p.match(v, trial, sub_why) for p, v in zip(self.operands, order)):
                if _bind(self.name, value, trial, why):
                    captures.clear()
                    captures.update(trial)
                    return True
            elif why is not None and sub_why:
                why.append(f"{node.op.name} operand: {sub_why[-1]}")
        return False

    def _match_plain(self, value, captures) -> bool:
        """match() for a pattern with no condition but the op, the operands and the name, when no
        reason is asked for: the same checks, the fewest steps (the driver's hot path)."""
        node = value.node
        if node is None or node.op.name not in self.op or value.index != 0:
            return False
        operands, inputs = self.operands, node.inputs
        if operands:
            if len(operands) != len(inputs):
                return False
            for pattern, operand in zip(operands, inputs):
                if not pattern.match(operand, captures, None):
                    return False
        name = self.name
        return name is None or captures.setdefault(name, value) is value

    def _params_ok(self, node, why) -> bool:
        if self.params is None:
            return True
        if callable(self.params):
            return self.params(node.params) or _fail(why, lambda: f"{node.op.name} params fail the condition")
        for key, want in self.params.items():
            if node.params.get(key) != want:
                return _fail(why, lambda: f"{node.op.name} param {key}={node.params.get(key)!r}, want {want!r}")
        return True


@dataclasses.dataclass
class Rule:
    """A named rewrite. `where(captures)` is an extra condition over all captures (the matched
    root value is `captures["_root"]`)."""

    name: str
    pattern: Op
    replacement: Callable[..., Any]
    where: Callable[[dict], bool] | None = None

    def __post_init__(self):
        if not isinstance(self.pattern, Op):
            raise TypeError(f"rule {self.name!r}: the root of a pattern must be an Op")
        self._guard = self.pattern.root_guard()
        RULES.setdefault(self.name, self)

    def match(self, node: Node, why: list | None = None) -> dict | None:
        """The captures if the rule matches `node` (one of its outputs), else None; `why`
        collects the reasons of a failed match (see explain)."""
        if why is None and not self.admits(_producer_ops(node)):
            return None  # explain() skips the guard: the full match says why
        return self._match(node, why)

    def admits(self, producer_ops: tuple) -> bool:
        """A quick necessary condition on the ops computing a node's operands (see _OperandGuard)."""
        return self._guard is None or self._guard.admits(producer_ops)

    def _match(self, node: Node, why: list | None) -> dict | None:
        for value in node.outputs:
            captures: dict = {}
            if self.pattern.match(value, captures, why):
                captures.setdefault("_root", value)
                if self.where is None or self.where(captures):
                    return captures
                _fail(why, "the rule's `where` condition is false")
        return None


class OperandGuard:
    """A quick necessary condition of a root pattern: its operand count, and the ops each operand
    may be computed by, where the pattern limits them. Most rules the driver could try on a node
    fail for an operand's op; this check, on the names alone, rejects them without matching (and
    the driver caches its verdicts per operand-op signature). It never rejects a node the full
    match accepts."""

    __slots__ = ("arity", "ops", "commutative")

    def __init__(self, arity: int, ops: tuple, commutative: bool):
        self.arity, self.ops, self.commutative = arity, ops, commutative

    def admits(self, producer_ops: tuple) -> bool:
        """`producer_ops`: per operand, the name of the op computing it (None for an input)."""
        if len(producer_ops) != self.arity:
            return False
        if self.commutative:
            (a, b), (x, y) = self.ops, producer_ops
            return (_among(x, a) and _among(y, b)) or (_among(y, a) and _among(x, b))
        return all(_among(name, names) for name, names in zip(producer_ops, self.ops))


class AnyGuard:
    """The guard of alternatives: admits what one of `guards` admits."""

    __slots__ = ("guards",)

    def __init__(self, guards):
        self.guards = tuple(guards)

    def admits(self, producer_ops: tuple) -> bool:
        return any(g.admits(producer_ops) for g in self.guards)


def any_guard(patterns) -> AnyGuard | None:
    """The root guard of a choice between `patterns` (None if one of them has none)."""
    guards = [p.root_guard() for p in patterns]
    return None if any(g is None for g in guards) else AnyGuard(guards)


def _among(name, names) -> bool:
    return names is None or (name is not None and name in names)


def _operand_guard(pattern: Op) -> OperandGuard | None:
    if not pattern.operands:
        return None
    ops = tuple(p.produced_by() for p in pattern.operands)
    if all(names is None for names in ops):
        return None  # the operand count alone: the match checks it, and costs less than a guard
    return OperandGuard(len(ops), ops, pattern.commutative and len(ops) == 2)


def _may_match(operand_ops: tuple, operands) -> bool:
    """Whether each operand is computed by one of the ops its pattern allows (None: any)."""
    for ops, value in zip(operand_ops, operands):
        if ops is not None and (value.node is None or value.node.op.name not in ops):
            return False
    return True


def _producer_ops(node: Node) -> tuple:
    names = []
    for v in node.inputs:
        producer = v.node
        names.append(producer.op.name if producer is not None else None)
    return tuple(names)


# Every rule ever defined, by name: for the coverage test (each rule must fire in some test).
RULES: dict[str, Rule] = {}


def explain(rule: Rule, node: Node) -> str:
    """Why `rule` does or does not match `node`, in one line."""
    why: list[str] = []
    if rule.match(node, why) is not None:
        return f"rule {rule.name!r} matches {node.op.name}"
    reason = why[-1] if why else "no reason recorded"
    return f"rule {rule.name!r} does not match {node.op.name} ({node.provenance.describe()}): {reason}"


class RewriteLimitError(GraphError):
    """The rules kept firing past the limit: two of them probably undo each other."""


def rewrite(graph: Graph, rules: Sequence[Rule], *, made_by: str | None = None,
            max_rewrites: int | None = None, descend: Callable[[Node], bool] | None = None) -> Counter:
    """Apply `rules` to `graph` and its regions until none fires. Returns fire counts per rule.

    `descend(node)` says whether to rewrite inside a node's regions (default: always)."""
    fired: Counter = Counter()
    _rewrite_graph(graph, _Dispatch(rules, descend), fired, made_by, max_rewrites)
    return fired


class _Dispatch:
    """The rules worth trying on a node, by its op and the ops computing its operands: rules are
    indexed by root op, then filtered by their operand guards once per distinct signature."""

    def __init__(self, rules: Sequence[Rule], descend=None):
        self.descend = descend
        self.by_op: dict[str, list[Rule]] = {}
        for rule in rules:
            for op in rule.pattern.op:
                self.by_op.setdefault(op, []).append(rule)
        self._cache: dict[tuple, list[Rule]] = {}
        # The ops with a guarded rule: for the others, every rule is a candidate.
        self.guarded = {op for op, rules in self.by_op.items() if any(r._guard is not None for r in rules)}

    def candidates(self, node: Node, rules: list[Rule]) -> list[Rule]:
        """Those of `rules` (the rules for node's op) whose operand guards admit `node`."""
        if node.op.name not in self.guarded:
            return rules
        producers = _producer_ops(node)
        key = (node.op.name, producers)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = [r for r in rules if r.admits(producers)]
        return found


def _rewrite_graph(graph, dispatch, fired, made_by, max_rewrites):
    limit = max_rewrites if max_rewrites is not None else 10 * len(graph) + 1000
    by_op = dispatch.by_op
    # Only nodes some rule is rooted at, or that hold regions, are visited: the rest cannot change
    # here. Reversed, so that pop() from the end visits in program order.
    worklist = []
    node = graph._last
    while node is not None:
        if node.op.name in by_op or node.regions:
            worklist.append(node)
        node = node._prev
    queued = set(worklist)  # nodes hash by identity
    count = 0
    while worklist:
        node = worklist.pop()
        queued.discard(node)
        if node.graph is not graph:
            continue  # erased meanwhile
        if node.regions and (dispatch.descend is None or dispatch.descend(node)):
            for region in node.regions:
                _rewrite_graph(region, dispatch, fired, made_by, max_rewrites)
        rules = by_op.get(node.op.name)
        if rules is None:
            continue
        for rule in dispatch.candidates(node, rules):
            captures = rule._match(node, None)
            if captures is None:
                continue
            new_nodes = _apply(graph, rule, node, captures, made_by)
            if new_nodes is None:
                continue
            fired[rule.name] += 1
            count += 1
            if count > limit:
                raise RewriteLimitError(
                    f"rewrite stopped after {count} rewrites (limit {limit}); the rules fired most: "
                    f"{', '.join(f'{k}×{v}' for k, v in fired.most_common(3))}. Two rules probably undo "
                    "each other", node)
            for fresh in new_nodes:
                if fresh not in queued and fresh.graph is graph and (fresh.op.name in by_op or fresh.regions):
                    worklist.append(fresh)
                    queued.add(fresh)
            break


def _apply(graph: Graph, rule: Rule, root: Node, captures: dict, made_by) -> list[Node] | None:
    """Build the replacement, rewire the readers, erase what became dead; returns the nodes worth
    visiting again (those built and the readers of the replaced values), or None if the rule
    declined."""
    builder = Builder(graph, before=root, made_by=made_by or rule.name, origin=root.provenance)
    result = rule.replacement(builder, **{k: v for k, v in captures.items() if k[0] != "_"})  # "_root" is private
    if result is None:
        if builder.modified:
            raise GraphError(f"rule {rule.name!r} modified a node in place, then declined; a rule "
                             "modifies last, once it will not decline", root)
        builder.discard()
        return None
    root_value = captures.get("_root")
    if result is root_value and not builder.on_rewired:
        # The usual canonical rewrite: the root changed in place (Builder.modify), so its value,
        # type and readers stay; the nodes built, changed and reading it may match anew.
        touched = builder.created
        touched += builder.modified
        touched.extend([node for node, _ in result.uses if node is not None])
        erase_dead([*builder.released, root])
        return [n for n in touched if n.graph is graph]
    if isinstance(result, dict):
        pairs = [(captures.get(name), new) for name, new in result.items()]
        names = list(result)
    else:
        pairs, names = [(root_value, result)], ["_root"]
    for name, (old, new) in zip(names, pairs):  # all checked before any rewiring
        _check_replacement(rule, name, old, new, builder, root)
    touched = builder.created
    if builder.modified:
        touched += builder.modified
    dead = list(builder.released)
    for old, new in pairs:
        touched.extend([node for node, _ in old.uses if node is not None])
        graph.replace_all_uses(old, new)
        if old.node is not None:
            dead.append(old.node)
    for action in builder.on_rewired:
        action()
    erase_dead(dead)
    return [n for n in touched if n.graph is graph]  # erased nodes have no graph


def _check_replacement(rule, name, old, new, builder, root) -> None:
    if old is None:
        raise GraphError(f"rule {rule.name!r} replaces {name!r}, which its pattern does not capture")
    if not isinstance(new, Value):
        raise GraphError(f"rule {rule.name!r} returned {type(new).__name__} for {name!r}, not a Value")
    if new.type != old.type:
        builder.discard()
        raise GraphError(f"rule {rule.name!r} changes the type of {name!r} from {old.type} to "
                         f"{new.type}; a rewrite must preserve types", root)


def constant_value(value: Value) -> np.ndarray | None:
    """The numpy value of a value computed by a constant node, else None."""
    node = value.node
    if node is None or node.op.name != "constant":
        return None
    return np.asarray(node.params["value"])


# --- helpers -------------------------------------------------------------------------------------

def _bind(name, value, captures, why) -> bool:
    if name is None:
        return True
    bound = captures.get(name)
    if bound is None:
        captures[name] = value
        return True
    return bound is value or _fail(why, lambda: f"{name!r} would bind two different values")


def _type_ok(pattern, value, why) -> bool:
    t = value.type
    if pattern.dtype is not None:
        ok = pattern.dtype(t.dtype) if callable(pattern.dtype) else t.dtype == np.dtype(pattern.dtype)
        if not ok:
            return _fail(why, lambda: f"dtype {t.dtype} does not satisfy the pattern")
    if pattern.shape is not None:
        ok = pattern.shape(t.shape) if callable(pattern.shape) else t.shape == tuple(pattern.shape)
        if not ok:
            return _fail(why, lambda: f"shape {t.shape} does not satisfy the pattern")
    return True


def _same_scalar(array: np.ndarray, want) -> bool:
    """Whether 0-d `array` holds `want` exactly: NaN equals NaN, −0 only −0."""
    if array.ndim != 0:
        return False
    if array.dtype.kind == "f" and type(want) in (float, int):  # the common case, without numpy
        a, b = float(array), float(want)
        if a != a:
            return b != b
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    a, b = array.astype(np.float64) if array.dtype.kind in "fc" else array, np.asarray(want)
    if np.isnan(a) if a.dtype.kind == "f" else False:
        return bool(np.isnan(b)) if b.dtype.kind == "f" else False
    return bool(a == b) and bool(np.signbit(a) == np.signbit(b)) if a.dtype.kind == "f" else bool(a == b)


def _fail(why, reason) -> bool:
    """Record why a match failed (`reason`: a string, or a function making one), for explain().
    Matching runs for every node, explain() rarely: messages are built only when asked for."""
    if why is not None:
        why.append(reason() if callable(reason) else reason)
    return False


def _describe(value: Value) -> str:
    return "a graph input" if value.node is None else value.node.op.name


def _ops_text(ops) -> str:
    return " or ".join(sorted(ops))

"""validate: translation validation. Every pass's result is run against the graph before it.

`run_pipeline(graph, pipeline, validator=Validator(...))` copies the graph before each pass, runs
the pass, then runs both graphs under `jax.jit` on the same inputs and compares the results under
the pass's numerics contract:

- `exact`: finite floats within the per-dtype tolerances of `graphopt.testing.TOLERANCES`; NaN
  positions, infinities (sign included) and the sign of zeros unchanged; integers and bools equal;
- `approximate(bound)`: NaN and infinity positions unchanged, and the relative error of each output,
  max |after − before| / max |before| over its finite elements, at most `bound`. (Element-wise
  relative error means nothing near zero, where a quantized value's absolute error dominates.)

The inputs are the user's (`user_inputs`: argument tuples of the traced function, as
`graphopt.lower(graph)` took them right after tracing) and `random_inputs` sets drawn from the input
types. Random set 0 holds ordinary values: normal floats, ints in [-4, 8) (valid indices for most
axes; XLA clamps gather and slice starts anyway), random bools. Under an exact contract the other
sets also put each of −0, +0, NaN, +Inf, −Inf into every float input, since exact passes promise
those results too. Parameters (role "param") always get ordinary values: weights are finite in
practice, and a pass that precomputes on weights (fold_params) may turn `(x·w)·s` into `x·(w·s)`,
which differs for an infinite weight without being wrong for any real model.

On a mismatch the validator runs both graphs again keeping every intermediate value, pairs each node
the pass kept with its copy in the snapshot, and names the first node in program order whose values
differ, with its rewired operands and the nodes the pass made that feed it. Then it warns
(`ValidationWarning`), marks the pass "reverted" in the report and returns the snapshot, so the
pipeline goes on from the graph before the pass; with `on_mismatch="raise"` it raises
`ValidationError` instead. `bisect` runs a pipeline that way and names the first wrong pass.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> from graphopt.pipeline import run_pipeline
    >>> g = graphopt.trace(lambda x: jnp.sin(x) + jnp.cos(x) * 0, jnp.ones(3))
    >>> result = run_pipeline(g, ["dce"], validator=Validator())
    >>> [(r.name, r.status, r.error) for r in result.report.records]
    [('dce', 'ok', 0.0)]
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Sequence

import jax
import numpy as np

from graphopt.errors import GraphError, SignatureError, ValidationError, ValidationWarning
from graphopt.frameworks import adapt
from graphopt.ir import Graph, Node, Value
from graphopt.lowering.emit import lower
from graphopt.param_prep import prepare
from graphopt.pipeline import EXACT, Contract, PassRecord, PipelineSpec, resolve, run_pipeline
from graphopt.trace import trace

# Put into every float input of the special-value sets, at random positions.
_SPECIALS = (-0.0, 0.0, math.nan, math.inf, -math.inf)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """How a pass's outputs compare with the outputs before it."""

    error: float            # max relative error over the outputs (finite elements)
    problem: str | None     # how the contract is broken, or None


def compare(actual: Sequence, expected: Sequence, contract: Contract = EXACT) -> Comparison:
    """Compare flat output lists under `contract` (see the module docstring).

    >>> import numpy as np
    >>> compare([np.float32([1, -0.0])], [np.float32([1, 0.0])]).problem  # doctest: +ELLIPSIS
    'output 0: 1 of 2 elements differ (...±0 must match); worst at index (1,): after -0.0, before 0.0'
    """
    if len(actual) != len(expected):
        return Comparison(math.inf, f"{len(actual)} outputs, before the pass {len(expected)}")
    error, problem = 0.0, None
    for i, (a, e) in enumerate(zip(actual, expected)):
        leaf_error, why = _compare_leaf(np.asarray(a), np.asarray(e), contract)
        error = max(error, leaf_error)
        if why and problem is None:
            problem = f"output {i}: {why}"
    return Comparison(error, problem)


@dataclasses.dataclass(eq=False)
class Snapshot:
    """The graph before a pass: a copy, the map from each original node and value (by id) to its
    copy, the original's structure (which also keeps its objects alive, so ids are not reused),
    and the copy's outputs already computed, by input-set label."""

    graph: Graph
    mapping: dict
    structure: list
    outputs: dict


class Validator:
    """Translation validation for `run_pipeline(..., validator=...)`. See the module docstring.

    `user_inputs`: argument tuples of the traced function. `random_inputs`: how many random input
    sets to add. `on_mismatch`: "revert" (warn, go on from the graph before the pass) or "raise".
    `records` lists the report rows of every pass checked, in order.
    """

    def __init__(self, user_inputs: Sequence[tuple] = (), random_inputs: int = 2, seed: int = 0,
                 on_mismatch: str = "revert"):
        if on_mismatch not in ("revert", "raise"):
            raise ValueError(f"on_mismatch must be 'revert' or 'raise', got {on_mismatch!r}")
        self.user_inputs = [tuple(args) for args in user_inputs]
        self.random_inputs = int(random_inputs)
        self.seed = seed
        self.on_mismatch = on_mismatch
        self.records: list[PassRecord] = []
        self._known: tuple[list, dict] | None = None  # (structure, outputs) of the last graph returned
        self._sets: dict = {}  # signature -> user input sets; (signature, contract kind) -> (all, note)

    def snapshot(self, graph: Graph) -> Snapshot:
        self._user_sets(graph)  # refuse user inputs of another signature before any pass runs
        structure = _structure(graph)
        copy, mapping = graph.clone()
        known = self._known
        outputs = dict(known[1]) if known is not None and _same(known[0], structure) else {}
        return Snapshot(copy, mapping, structure, outputs)

    def check(self, info, snapshot: Snapshot, graph: Graph, record: PassRecord) -> Graph:
        """Compare `graph` (after the pass) with `snapshot`; return the graph to continue with."""
        self.records.append(record)
        if _same(snapshot.structure, _structure(graph)):  # the pass changed nothing
            record.error = 0.0
            self._known = (snapshot.structure, snapshot.outputs)
            return graph
        sets, note = self._input_sets(snapshot.graph, info.contract)
        if note and sets:
            record.notes.append(note)
        if not sets:
            record.notes.append(note or "not validated: no inputs (no user_inputs, random_inputs=0)")
            self._known = None
            return graph
        before, after = _Runner(snapshot.graph), _Runner(graph)
        error, failure, outputs = 0.0, None, {}
        for inputs in sets:
            if inputs.label not in snapshot.outputs:
                try:
                    snapshot.outputs[inputs.label] = before.run(inputs)
                except Exception as err:  # noqa: BLE001 (not the pass's fault: nothing to check)
                    record.notes.append(f"not validated: the graph before the pass fails to run "
                                        f"on {inputs.label}: {type(err).__name__}: {err}")
                    self._known = None
                    return graph
            try:
                outputs[inputs.label] = after.run(inputs)
            except Exception as err:  # noqa: BLE001 (a graph that cannot run is a wrong result)
                error, failure = math.inf, (inputs, f"the graph after the pass fails to run: "
                                                    f"{type(err).__name__}: {err}", False)
                break
            result = compare(outputs[inputs.label], snapshot.outputs[inputs.label], info.contract)
            error = max(error, result.error)
            if result.problem and failure is None:
                failure = (inputs, result.problem, True)
        record.error = error
        if failure is None:
            self._known = (_structure(graph), outputs)
            return graph
        return self._reject(info, snapshot, graph, record, *failure)

    def _reject(self, info, snapshot: Snapshot, graph: Graph, record: PassRecord, inputs, problem,
                ran: bool):
        divergence = None
        try:
            if ran:
                divergence = _first_divergence(snapshot, graph, inputs, info.contract)
        except Exception as err:  # noqa: BLE001 (the diagnosis is best effort; the verdict stands)
            divergence = f"(could not compare intermediate values: {type(err).__name__}: {err})"
        message = _message(info, inputs, problem, divergence if ran else "", record.error)
        node = divergence.node.describe() if isinstance(divergence, _Divergence) and divergence.node \
            else None
        if self.on_mismatch == "raise":
            raise ValidationError(message, info.name, node, record.error)
        warnings.warn(message + "\nThe pass was reverted: the pipeline goes on from the graph before it.",
                      ValidationWarning, stacklevel=4)  # _reject, check, run_pipeline, its caller
        where = f"differs at {node}" if node else "results differ"
        record.status = f"reverted: {where}, error {record.error:.2g}"
        self._known = (_structure(snapshot.graph), snapshot.outputs)
        return snapshot.graph

    def _user_sets(self, graph: Graph) -> list:
        tree, slots = _original_signature(graph)
        key = (tree, tuple(slots))
        if key not in self._sets:
            self._sets[key] = [
                _InputSet(f"user input set {i}", tree, _check_user_leaves(i, args, tree, slots))
                for i, args in enumerate(self.user_inputs)]
        return self._sets[key]

    def _input_sets(self, graph: Graph, contract: Contract) -> tuple[list, str | None]:
        tree, slots = _original_signature(graph)
        key = (tree, tuple(slots), contract.kind)
        if key not in self._sets:
            sets = list(self._user_sets(graph))
            note = None
            try:
                sets += self._random_sets(tree, slots, contract)
            except _NoRandomValues as err:
                note = f"random inputs skipped: {err}" if sets else f"not validated: {err}"
            self._sets[key] = (sets, note)
        return self._sets[key]

    def _random_sets(self, tree, slots, contract: Contract) -> list:
        count = self.random_inputs if slots else min(self.random_inputs, 1)
        sets = []
        for j in range(count):
            special = contract.kind == "exact" and j > 0
            rng = np.random.default_rng([self.seed, j])
            leaves = tuple(_random_leaf(rng, t, role, special, j + k) for k, (t, role) in enumerate(slots))
            kind = "with −0, +0, NaN, ±Inf" if special else "ordinary values"
            sets.append(_InputSet(f"random input set {j} ({kind})", tree, leaves))
        return sets


@dataclasses.dataclass
class BisectResult:
    """The first pass of a pipeline that changes the results (None if none does)."""

    pass_name: str | None
    node: str | None        # the first diverging node, described
    error: float | None     # max relative error measured on that pass
    report: str             # what was checked and found, for people

    def __str__(self):
        return self.report


def bisect(fn_or_graph, *args, pipeline: PipelineSpec = "default", params_argnums=None,
           static_argnums=(), disable: Sequence[str] = (), random_inputs: int = 2,
           seed: int = 0) -> BisectResult:
    """Run `pipeline` with every pass validated and name the first pass that changes the results.

    `fn_or_graph` is a model (traced at `args`, which are also used as inputs) or a Graph (left
    untouched; `args`, if given, are inputs). Passes whose result fails `Graph.verify()` are named
    the same way.

    >>> import jax.numpy as jnp
    >>> result = bisect(lambda x: jnp.exp(x) * 2, jnp.ones(3), pipeline=["dce"])
    >>> result.pass_name is None, result.report.splitlines()[-1]
    (True, 'every pass keeps the results (max relative error 0)')
    """
    if isinstance(fn_or_graph, Graph):
        graph, user_inputs = fn_or_graph.clone()[0], [args] if args else []
    else:
        graph = trace(fn_or_graph, *args, params_argnums=params_argnums, static_argnums=static_argnums)
        static = {i % len(args) for i in ((static_argnums,) if isinstance(static_argnums, int)
                                          else static_argnums)}
        dynamic = tuple(a for i, a in enumerate(args) if i not in static)
        user_inputs = [adapt(fn_or_graph, dynamic, params_argnums).args]
    validator = Validator(user_inputs, random_inputs, seed, on_mismatch="raise")
    names = [info.name for info, _ in resolve(pipeline, disable)]
    try:
        run_pipeline(graph, pipeline, disable=disable, debug=True, validator=validator)
    except ValidationError as err:
        return BisectResult(err.pass_name, err.node, err.error,
                            _bisect_report(names, validator, err.pass_name, str(err)))
    except GraphError as err:  # from verify() or the pass: that pass made an invalid graph
        index = len(validator.records)
        name = names[index] if index < len(names) else None
        node = err.node.describe() if getattr(err, "node", None) is not None else None
        return BisectResult(name, node, None, _bisect_report(
            names, validator, name, f"pass {name!r} made an invalid graph: {err}"))
    error = max((r.error for r in validator.records if r.error is not None), default=0.0)
    return BisectResult(None, None, error, _bisect_report(
        names, validator, None, f"every pass keeps the results (max relative error {error:.2g})"))


# --- inputs --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _InputSet:
    label: str
    tree: Any       # argument structure of the traced function (None: a hand-built graph's flat inputs)
    leaves: tuple


class _NoRandomValues(Exception):
    pass


def _original_signature(graph: Graph) -> tuple[Any, list]:
    """(argument tree, [(type, role)] per leaf) of the traced function, which passes never change:
    after fold_params the parameter leaves are the prep graph's inputs."""
    prep = graph.prep
    if prep is None:
        return graph.in_tree, [(a.type, a.role) for a in graph.inputs]
    slots: list = [None] * prep.original_in_tree.num_leaves
    for index, arg in zip(prep.param_leaf_indices, prep.graph.inputs):
        slots[index] = (arg.type, "param")
    others = iter([a for a in graph.inputs if a.role != "param"])
    for index, slot in enumerate(slots):
        if slot is None:
            arg = next(others)
            slots[index] = (arg.type, arg.role)
    return prep.original_in_tree, slots


def _check_user_leaves(index: int, args: tuple, tree, slots) -> tuple:
    leaves, given_tree = jax.tree_util.tree_flatten(args)
    expected = ", ".join(str(t) for t, _ in slots)
    given = ", ".join(f"{_dtype_of(x)}{list(np.shape(x))}" for x in leaves)
    fits = (tree is None or given_tree == tree) and len(leaves) == len(slots) and all(
        tuple(np.shape(x)) == t.shape and _dtype_of(x) == t.dtype for x, (t, _) in zip(leaves, slots))
    if not fits:
        raise SignatureError(
            f"user input set {index} does not match the traced function's arguments:\n"
            f"  expected leaves ({expected})\n  given leaves    ({given})\n"
            "Give argument tuples as the traced function takes them (for nnx and Equinox modules: "
            "the module state first).")
    return tuple(leaves)


def _dtype_of(x):
    dtype = getattr(x, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.dtype(jax.numpy.result_type(x))


def _random_leaf(rng, type, role: str, special: bool, rotate: int):
    from graphopt.testing import is_float  # here: graphopt.testing imports graphopt

    shape, dtype = type.shape, type.dtype
    if not isinstance(dtype, np.dtype):
        raise _NoRandomValues(f"no random values for an input of type {type}; give user_inputs")
    if dtype == np.bool_:
        x = rng.random(shape) < 0.5
    elif dtype.kind in "iu":
        x = np.asarray(rng.integers(0 if dtype.kind == "u" else -4, 8, size=shape)).astype(dtype)
    elif dtype.kind == "c":
        x = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    elif is_float(dtype):
        x = np.asarray(rng.standard_normal(shape), np.float64)
        if special and role != "param" and x.size:
            flat = x.reshape(-1)
            for k, position in enumerate(rng.permutation(flat.size)[:len(_SPECIALS)]):
                flat[position] = _SPECIALS[(k + rotate) % len(_SPECIALS)]
        x = x.astype(dtype)
    else:
        raise _NoRandomValues(f"no random values for an input of type {type}; give user_inputs")
    x = np.asarray(x)
    if type.weak_type and x.ndim == 0:  # a Python scalar, as the traced function was called with
        scalar = x.item()
        if np.dtype(jax.numpy.result_type(scalar)) == dtype:
            return scalar
    return x


def _graph_leaves(graph: Graph, inputs: _InputSet) -> list:
    """The flat arguments of `lower(graph)` for the traced function's arguments `inputs`."""
    if inputs.tree is None:
        return list(inputs.leaves)
    args = jax.tree_util.tree_unflatten(inputs.tree, inputs.leaves)
    return jax.tree_util.tree_leaves(prepare(graph, *args))


class _Runner:
    """A graph, lowered and jitted once, run on input sets."""

    def __init__(self, graph: Graph):
        self.graph, self._fn = graph, None

    def run(self, inputs: _InputSet) -> list:
        if self._fn is None:
            self._fn = jax.jit(lower(self.graph).flat)
        return [_to_numpy(x) for x in self._fn(*_graph_leaves(self.graph, inputs))]


def _to_numpy(x) -> np.ndarray:
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.extended):
        return np.asarray(jax.random.key_data(x))  # PRNG keys: compare their bits
    return np.asarray(x)


# --- comparing -----------------------------------------------------------------------------------

def _compare_leaf(a: np.ndarray, e: np.ndarray, contract: Contract) -> tuple[float, str | None]:
    """(max relative error, how the contract is broken or None) for one output."""
    from graphopt.testing import leaf_mismatch  # here: graphopt.testing imports graphopt

    sides = {"names": ("after", "before"), "show": lambda v: repr(v.item())}
    if a.dtype != e.dtype or a.shape != e.shape:
        return math.inf, leaf_mismatch(a, e, **sides)
    error = relative_error(a, e)
    if contract.kind == "exact":
        return error, leaf_mismatch(a, e, signed_zeros=True, **sides)
    positions = leaf_mismatch(a, e, rtol=0.0, atol=math.inf, **sides)  # NaN and ±Inf only
    if positions is not None:
        return math.inf, f"NaN and ±Inf positions must match: {positions}"
    if error > contract.bound:
        return error, f"relative error {error:.3g} exceeds the contract's bound {contract.bound:g}"
    return error, None


def relative_error(a: np.ndarray, e: np.ndarray) -> float:
    """max |a - e| / max |e| over elements finite on both sides (complex as [real, imag])."""
    if a.size == 0:
        return 0.0
    ar = np.stack([a.real, a.imag], -1) if a.dtype.kind == "c" else a
    er = np.stack([e.real, e.imag], -1) if e.dtype.kind == "c" else e
    ar, er = ar.astype(np.float64), er.astype(np.float64)
    finite = np.isfinite(ar) & np.isfinite(er)
    diff = np.abs(ar[finite] - er[finite]).max(initial=0.0)
    scale = np.abs(er[finite]).max(initial=0.0)
    return float(diff / scale) if scale > 0 else (0.0 if diff == 0 else math.inf)


@dataclasses.dataclass
class _Divergence:
    node: Node | None           # in the graph after the pass (None: an output reads an input)
    what: str                   # how its values differ
    changes: list[str]          # how it differs from its copy in the snapshot
    made: list[Node]            # nodes the pass made that feed it
    output: int | None = None   # set when no kept node differs, only graph output `output`


def _first_divergence(snapshot: Snapshot, graph: Graph, inputs: _InputSet, contract) -> _Divergence | None:
    before = _intermediates(snapshot.graph, inputs)
    after = _intermediates(graph, inputs)
    mapping = snapshot.mapping
    for node in graph.nodes:
        twin = mapping.get(id(node))
        if not isinstance(twin, Node) or twin.graph is not snapshot.graph:
            continue  # made by the pass: no copy to compare with
        pairs = [(o, t) for o, t in zip(node.outputs, twin.outputs) if id(o) in after and id(t) in before]
        result = compare([after[id(o)] for o, _ in pairs], [before[id(t)] for _, t in pairs], contract)
        if result.problem:
            return _Divergence(node, result.problem, _changes(node, twin, mapping),
                               _made(node.inputs, mapping))
    for i, (out, twin_out) in enumerate(zip(graph.outputs, snapshot.graph.outputs)):
        if id(out) not in after or id(twin_out) not in before:
            continue
        result = compare([after[id(out)]], [before[id(twin_out)]], contract)
        if result.problem:
            changes = [] if mapping.get(id(out)) is twin_out else \
                [f"it now returns {_describe_value(out)}, was {_describe_value(twin_out)}"]
            return _Divergence(out.node, result.problem.replace("output 0", "value", 1), changes,
                               _made([out], mapping), output=i)
    return None


def _intermediates(graph: Graph, inputs: _InputSet) -> dict:
    """id(value) -> array for the graph's inputs and every top-level node output, run under jit."""
    copy, mapping = graph.clone()
    values = [v for v in graph.inputs] + [v for n in graph.nodes for v in n.outputs]
    values = [v for v in values if isinstance(v.type.dtype, np.dtype)]
    copy.set_outputs([mapping[id(v)] for v in values])
    outs = jax.jit(lower(copy).flat)(*_graph_leaves(graph, inputs))
    return {id(v): np.asarray(x) for v, x in zip(values, outs)}


def _changes(node: Node, twin: Node, mapping: dict) -> list[str]:
    changes = []
    if node.op is not twin.op:
        changes.append(f"its op changed from {twin.op.name} to {node.op.name}")
    elif node.params is not twin.params:  # clones share params; passes replace, never edit, them
        changes.append("its params were replaced")
    for i, (value, old) in enumerate(zip(node.inputs, twin.inputs)):
        if mapping.get(id(value)) is not old:
            changes.append(f"operand {i} now reads {_describe_value(value)}, was {_describe_value(old)}")
    return changes


def _made(values: Sequence[Value], mapping: dict) -> list[Node]:
    """Nodes without a copy in the snapshot (made by the pass) that `values` depend on, up to the
    nearest kept nodes, in program order."""
    made, seen, stack = [], set(), list(values)
    while stack:
        node = stack.pop().node
        if node is None or id(node) in seen or id(node) in mapping:
            continue
        seen.add(id(node))
        made.append(node)
        stack.extend(node.inputs)
    order = {id(n): i for i, n in enumerate(made[0].graph.nodes)} if made else {}
    return sorted(made, key=lambda n: order.get(id(n), 0))


def _describe_value(value: Value) -> str:
    if value.node is None:
        return f"input {getattr(value, 'path', '') or value.index}"
    output = f" output {value.index}" if len(value.node.outputs) > 1 else ""
    return f"{value.node.describe()}{output}"


def _message(info, inputs: _InputSet, problem: str, divergence, error: float) -> str:
    lines = [f"pass {info.name!r} (contract {info.contract}) changed the program's results on "
             f"{inputs.label}: {problem}"]
    if isinstance(divergence, str):
        lines += [f"  {divergence}"] if divergence else []
    elif divergence is None:
        lines.append("  no single node differs when intermediate values are kept; the difference "
                     "shows only in the compiled program")
    else:
        where = divergence.node.describe() if divergence.node is not None else "a graph input"
        if divergence.output is None:
            lines.append(f"  first diverging node: {where}")
        else:
            lines.append(f"  no node the pass kept differs; graph output {divergence.output} does, "
                         f"computed by {where}")
        lines.append(f"    {divergence.what}")
        lines += [f"    {change}" for change in divergence.changes]
        if divergence.made:
            shown = "; ".join(n.describe() for n in divergence.made[:4])
            more = f" and {len(divergence.made) - 4} more" if len(divergence.made) > 4 else ""
            lines.append(f"    nodes the pass made that feed it: {shown}{more}")
    lines.append(f"  max relative error: {error:.3g}")
    lines.append("  To find the first wrong pass of a pipeline: graphopt.bisect(fn, *args, "
                 f"pipeline=...); to run without this one: disable=[{info.name!r}].")
    return "\n".join(lines)


def _bisect_report(names: list[str], validator: Validator, culprit: str | None, verdict: str) -> str:
    lines = [f"bisect: {' → '.join(names) or '(no passes)'}"]
    for record in validator.records:
        if record.name == culprit:
            break
        error = "" if record.error is None else f", error {record.error:.2g}"
        notes = f" ({'; '.join(record.notes)})" if any(n.startswith(("not validated", "random"))
                                                      for n in record.notes) else ""
        lines.append(f"  {record.name}: ok{error}{notes}")
    lines.append(verdict)
    return "\n".join(lines)


# --- structure -----------------------------------------------------------------------------------

def _structure(graph: Graph) -> list:
    """Every object that makes up the graph, in order; two graphs are the same if their lists hold
    the same objects (`_same`). Passes replace nodes and params, they never edit them in place."""
    items: list = [graph, graph.prep, *graph.inputs, None, *graph.outputs, None]
    for node in graph.nodes:
        items += [node, node.op, node.params, *node.inputs, None, *node.outputs, None]
        for region in node.regions:
            items += _structure(region)
    return items


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))

"""fold_constants: compute at optimize time what depends on constants only.

    %0 = iota[shape=(4,)] : i32[4]
    %1 = mul %0, 2 : i32[4]              %c = constant [1 3 5 7] : i32[4]
    %2 = add %1, 1 : i32[4]       →      %3 = add %x, %c : i32[4]
    %3 = add %x, %2 : i32[4]             return %3
    return %3

What folds: a plain JAX primitive (not opaque, no regions, no effects; not `rng_uniform`,
`rng_bit_generator`, `optimization_barrier`, `device_put`, callbacks or sharding annotations)
whose inputs are all constants or fold themselves. Regions fold inside: a constant expression in
a scan body becomes a constant of that body. Region ops themselves are not evaluated.

Sizes. A result larger than max(its largest constant input, `max_bytes` = 64 KiB) is not made a
constant; e.g. `broadcast_in_dim` of a scalar to (1024, 1024) or an `iota` over a large range
stays lazy: free for XLA at run time, a big literal in the program otherwise. Small readers of
such a lazy value still fold (`jnp.arange(100_000).sum()` becomes a scalar) as long as the lazy
value is at most 1 MiB (XLA's evaluator computes about a million elements a second). And an
`iota` or a growing `broadcast_in_dim` read by nodes that stay is kept, with its input folded:
XLA fuses it into its readers for free, and patterns downstream see a scalar, not a literal.
PRNG keys are never made constants (they can be intermediates of folded random numbers).

Bits. All folding nodes, regions included, run as one program with the graph's constants as its
literals, compiled by `jax.jit` on CPU: one compile per pass, not per node. The folded bits are
then those that `jax.jit` of the original gets, because XLA folds constant expressions itself
with its HLO evaluator, whose `exp`, `tanh`, `erf`, ... differ in the last bit from the compiled
kernels that eager evaluation would use (measured on CPU: 9% of `exp` results, 60% of `tanh`
results). The evaluator is the same on every backend. Expressions XLA leaves lazy (over an iota or
a broadcast) run through the same kernels in both programs. NaN, ±Inf and −0 are kept. What can
still change in the last bit: XLA's CPU backend contracts `a * b + x` into a fused multiply-add,
and a folded `a * b` no longer can (`x + jax.random.normal(key(0), ...)`): rounding of
reordered arithmetic, within the exact contract.

One sweep in program order reaches the fixed point (a folded node makes its readers foldable in
the same sweep). Each distinct expression is evaluated once (value numbering, as in cse: an
unrolled model repeats its masks and scales in every layer), and equal results become one
constant per graph, before its first reader. Folded nodes, and the constants and lazy nodes only
they read, are erased.

XLA would fold most of this itself. graphopt folds so that later passes see constants: a mask or
a scale is one literal that fold_params, CSE (equal masks of every layer merge) and fusion
patterns can match, and constant arithmetic leaves the cost reports.

Contract: exact.
"""

from __future__ import annotations

from collections import Counter

import jax
import numpy as np

from graphopt import _jax_compat as compat
from graphopt.ops import CONSTANT, params_key
from graphopt.passes.cse import ValueTable, _constant_key
from graphopt.pipeline import register_pass
from graphopt.types import is_extended_dtype

# Pure by JAX's account, but folding them would be wrong (rng_uniform is a stateful generator;
# rng_bit_generator's default algorithm depends on the backend) or would defeat their purpose
# (barriers, placement, sharding annotations, host callbacks).
NEVER_FOLDED = frozenset({
    "rng_uniform", "rng_bit_generator", "optimization_barrier", "device_put",
    "sharding_constraint", "mesh_cast", "reshard",
    "pure_callback", "io_callback", "debug_callback", "ffi_call", "custom_call",
})
# A lazy constant value is still computed as an intermediate of smaller folds up to this size:
# XLA's evaluator, which computes it, does about a million elements a second.
MAX_EVAL_BYTES = 1 << 20


@register_pass("fold_constants", layerwise=True)
def fold_constants(graph, ctx, max_bytes: int = 64 << 10):
    """Replace nodes whose inputs are all constants by constants holding their results.

    Example:
        >>> import graphopt, jax.numpy as jnp
        >>> from graphopt.pipeline import run_pipeline
        >>> g = graphopt.trace(lambda x: x + (jnp.arange(4) * 2 + 1), jnp.ones(4, jnp.int32))
        >>> g = run_pipeline(g, ["fold_constants"]).graph
        >>> [n.op.name for n in g.nodes], next(g.nodes).params["value"].tolist()
        (['constant', 'add'], [1, 3, 5, 7])
    """
    refused: set[int] = set()
    while True:
        plan = _plan(graph, int(max_bytes), refused)
        if not plan.wanted:
            ctx.count(_kept_lazy(plan))
            break
        try:
            results = _evaluate(plan)
        except _Refused as refusal:  # JAX would not bind this node: leave it, fold the rest
            refused.add(id(refusal.node))
            ctx.note(f"not folded: {refusal.node.describe()}: {refusal.reason}")
            continue
        except Exception as err:  # XLA failed on the whole program: change nothing
            ctx.note(f"fold_constants skipped: evaluating the constant program failed: {err}")
            return graph
        ctx.count(_rewrite(plan, results))
        break
    return graph


class _Plan:
    """What to evaluate, and what happens to each constant-only node."""

    def __init__(self):
        self.nodes: list = []      # what the wanted values need: constants and nodes, in order
        self.wanted: list = []     # outputs of folded nodes read by nodes that stay
        self.gone: list = []       # constant-only nodes that disappear, and constants they read
        self.kept: list = []       # constant-only nodes left in place: too large, expanders, keys


def _plan(graph, max_bytes: int, refused: set) -> _Plan:
    plan = _Plan()
    # Forward, producers first: which nodes are constant-only (`computable`), and which of those
    # may become constants (`folds`). Per value: its bytes if it is or becomes a constant, 0 if
    # it is computable but stays lazy; absent if not computable.
    size: dict[int, int] = {}
    computable, folds, order = [], set(), []
    for node in graph.walk():
        if node.op is CONSTANT:
            size[id(node.output)] = node.output.type.nbytes
            order.append(node)
            continue
        inputs = _input_sizes(node, size)
        if inputs is None or not _foldable_op(node) or id(node) in refused:
            continue
        out_bytes = sum(v.type.nbytes for v in node.outputs)
        if out_bytes > MAX_EVAL_BYTES:  # constant, but too large even to compute here
            plan.kept.append(node)
            continue
        computable.append(node)
        order.append(node)
        fits = out_bytes <= max(max(inputs, default=0), max_bytes)
        if fits and not any(is_extended_dtype(v.type.dtype) for v in node.outputs):
            folds.add(id(node))
        size.update((id(v), v.type.nbytes if id(node) in folds else 0) for v in node.outputs)
    # Backward, readers first: a node stays if a node that stays (or the graph output) reads it
    # and it cannot fold, or it is an expander (kept, its input folds instead: a broadcast or
    # iota is free for XLA, a literal of its shape is not). Everything else disappears; the
    # outputs of folding nodes that staying nodes read become constants.
    gone: set[int] = set()
    for node in reversed(computable):
        staying = [v for v in node.outputs
                   if any(user is None or id(user) not in gone for user, _ in v.uses)]
        if staying and (id(node) not in folds or _is_expander(node)):
            plan.kept.append(node)
            continue
        gone.add(id(node))
        plan.wanted.extend(staying)
        gone.update(id(v.node) for v in node.inputs if v.node is not None and v.node.op is CONSTANT)
    plan.wanted.reverse()  # program order: a shared constant goes before its first reader
    plan.gone = [n for n in order if id(n) in gone]
    # Evaluate only what the wanted values depend on.
    needed: set[int] = set()
    stack = [v.node for v in plan.wanted]
    while stack:
        node = stack.pop()
        if id(node) not in needed:
            needed.add(id(node))
            stack.extend(v.node for v in node.inputs)
    plan.nodes = [n for n in order if id(n) in needed]
    return plan


def _input_sizes(node, size: dict) -> list | None:
    """The sizes of `node`'s inputs if all are computable, else None (at the first that is not:
    this runs for every node of the model)."""
    sizes = []
    for value in node.inputs:
        nbytes = size.get(id(value))
        if nbytes is None:
            return None
        sizes.append(nbytes)
    return sizes


def _is_expander(node) -> bool:
    """iota, or a broadcast that grows its input: free for XLA, fused into their readers."""
    if node.op.name == "iota":
        return True
    return (node.op.name == "broadcast_in_dim"
            and node.output.type.nbytes > node.inputs[0].type.nbytes)


def _foldable_op(node) -> bool:
    op = node.op
    return (getattr(op, "kind", None) == "primitive" and not node.regions and not node.effects
            and op.name not in NEVER_FOLDED and bool(node.outputs))


class _Refused(Exception):
    def __init__(self, node, reason: str):
        super().__init__(reason)
        self.node, self.reason = node, reason


def _evaluate(plan: _Plan) -> list[np.ndarray]:
    """The wanted values, computed by one jitted CPU program with the constants as literals.

    Each distinct expression is computed once (value numbering, as cse does): an unrolled model
    repeats the same mask and scale in every layer. Equal wanted values get the same array.
    """
    table, same = ValueTable(), {}  # same: id(value) -> the value computing the same thing
    distinct = []
    for node in plan.nodes:
        first = table.first(node, tuple(id(same.get(id(v), v)) for v in node.inputs))
        if first is node:
            distinct.append(node)
        else:
            same.update((id(v), f) for v, f in zip(node.outputs, first.outputs))
    index: dict[int, int] = {}
    for value in plan.wanted:
        index.setdefault(id(same.get(id(value), value)), len(index))
    returned = {i: v for v, i in index.items()}
    key = _program_key(distinct, same, [returned[i] for i in range(len(returned))])
    results = _PROGRAMS.get(key) if key is not None else None
    if results is None:
        results = _run_program(distinct, same, returned)
        if key is not None:
            _PROGRAMS[key] = (results, [n.params for n in distinct])  # keeps id-keyed objects alive
            while len(_PROGRAMS) > MAX_CACHED_PROGRAMS:
                del _PROGRAMS[next(iter(_PROGRAMS))]
    else:
        results = results[0]
    return [results[index[id(same.get(id(v), v))]] for v in plan.wanted]


# Results of the constant programs evaluated in this process, by their content (see
# _program_key): optimizing a model again (another clone, a second `optimize` of the same model,
# the benchmark's repeats) skips the XLA compile, most of this pass's time.
_PROGRAMS: dict = {}
MAX_CACHED_PROGRAMS = 32


def _program_key(distinct, same, returned) -> tuple | None:
    """What the constant program computes, as a hashable key: per node its op, params (exact
    keys), types and operands by position, and which values (`returned`: ids) it returns; None
    if some params cannot be keyed. Objects keyed by identity (large arrays) stay alive with the
    entry."""
    position = {}
    parts = []
    for i, node in enumerate(distinct):
        params = _constant_key(node.params["value"]) if node.op is CONSTANT else params_key(node.params)
        if params is None:
            return None
        operands = tuple(position[id(same.get(id(v), v))] for v in node.inputs)
        parts.append((node.op.name, params, operands, tuple(v.type for v in node.outputs)))
        position.update((id(v), (i, j)) for j, v in enumerate(node.outputs))
    return tuple(parts), tuple(position[v] for v in returned), bool(jax.config.jax_enable_x64)


def _run_program(distinct, same, returned: dict) -> list[np.ndarray]:
    """Evaluate the distinct nodes as one jitted CPU program; the values `returned` (i -> id of
    a value) in that order, as read-only arrays."""
    def program():
        env = {}
        for node in distinct:
            if node.op is CONSTANT:
                env[id(node.output)] = compat.make_constant(**node.params)
                continue
            args = [env[id(same.get(id(v), v))] for v in node.inputs]
            try:
                outs = compat.bind(node.op.primitive, args, node.params)
            except Exception as err:
                raise _Refused(node, f"{type(err).__name__}: {err}") from err
            env.update(zip(map(id, node.outputs), outs))
        return [env[returned[i]] for i in range(len(returned))]

    # Lower and compile explicitly: this runs now even when the pass itself runs under a trace
    # (`@optimize` called inside `jax.jit`), where calling the jitted function would stage it out.
    cpu = jax.local_devices(backend="cpu")[0]
    on_cpu = jax.sharding.SingleDeviceSharding(cpu)
    with jax.default_device(cpu):
        outs = jax.jit(program, out_shardings=on_cpu).lower().compile()()
    results = [np.array(out) for out in outs]
    for result in results:
        result.setflags(write=False)  # shared by every graph that folds the same program
    return results


def _rewrite(plan: _Plan, results) -> Counter:
    fired: Counter = Counter()
    made: dict = {}  # one constant per graph and distinct result, before its first reader
    for value, result in zip(plan.wanted, results):
        node = value.node
        if result.dtype != value.type.dtype or result.shape != value.type.shape:
            fired["type-mismatch-kept"] += 1  # e.g. traced with x64 on, folded with it off
            continue
        key = (id(node.graph), id(result), value.type)
        constant = made.get(key)
        if constant is None:
            constant = made[key] = node.graph.constant(
                result, value.type.dtype, value.type.weak_type, before=node,
                provenance=node.provenance.derived("fold_constants"))
        node.graph.replace_all_uses(value, constant)
    # Erase, readers before producers, what is now unused.
    for node in reversed(plan.gone):
        if not any(v.uses for v in node.outputs):
            node.graph.erase(node)
            fired["folded-node" if node.op is not CONSTANT else "dead-constant"] += 1
    return fired + _kept_lazy(plan)


def _kept_lazy(plan: _Plan) -> Counter:
    kept = sum(1 for node in plan.kept if node.graph is not None)
    return Counter({"kept-lazy": kept} if kept else {})

"""fold_constants: compute at optimize time what depends on constants only.

    %0 = iota[shape=(4,)] : i32[4]
    %1 = mul %0, 2 : i32[4]              %c = constant [1 3 5 7] : i32[4]
    %2 = add %1, 1 : i32[4]       →      %3 = add %c, %x : i32[4]
    %3 = add %2, %x : i32[4]             return %3
    return %3

A node folds when every input is a constant or folds itself, it is a plain JAX primitive (not
opaque, no regions, no effects, not `rng_uniform`, `optimization_barrier`, `device_put`, a
callback or a sharding annotation), its dtypes are ordinary (not PRNG keys), and its result is no
larger than max(its largest constant input, `max_bytes`, default 64 KiB). A node that is
constant but too large stays in the graph, lazily computed: `broadcast_in_dim` of a scalar or an
`iota` over a large range costs XLA nothing at run time but would cost a big literal in the
program. Its small consumers still fold (`jnp.arange(10**6).sum()` becomes a scalar). Regions
fold inside: a constant expression in a scan body becomes a constant of that body.

How the values are computed: all folding nodes of the graph and its regions run as one program
under `jax.jit` on CPU, with the graph's constants as literals of that program. One compile per
pass, not per node; and the bits are those `jax.jit` of the original model gets: XLA folds
constant expressions itself, with its HLO evaluator, whose `exp`, `tanh`, `erf`, ... differ in
the last bit from the compiled kernels that eager evaluation would use. The evaluator is the same
on every backend, so the folded values match what XLA would compute for them on GPU and TPU too.
Expressions XLA leaves lazy (over an `iota` or a `broadcast`) run through the same compiled
kernels in both programs. NaN, ±Inf and −0 results are kept bit for bit.

The sweep is in program order, so a folded node makes its users foldable in the same sweep: one
sweep reaches the fixed point. Folded nodes, and the lazy or constant nodes that only they used,
are erased.

XLA would fold most of this itself; folding in graphopt lets later passes see constants (a
folded mask or scale is a literal that fold_params and fusion patterns can match) and keeps
constant arithmetic out of cost reports.

Contract: exact.
"""

from __future__ import annotations

from collections import Counter

import jax
import numpy as np

from graphopt import _jax_compat as compat
from graphopt.ops import CONSTANT
from graphopt.pipeline import register_pass

# Pure by JAX's account, but folding them would be wrong (rng_uniform is a stateful generator;
# rng_bit_generator's default algorithm depends on the backend) or would defeat their purpose
# (barriers, placement, sharding annotations, host callbacks).
NEVER_FOLDED = frozenset({
    "rng_uniform", "rng_bit_generator", "optimization_barrier", "device_put", "sharding_constraint", "mesh_cast",
    "reshard", "pure_callback", "io_callback", "debug_callback", "ffi_call", "custom_call",
})
# A constant too large to fold is still computed as an intermediate of smaller folds, up to this
# size: XLA's evaluator, which computes them, takes about a second per million elements.
MAX_EVAL_BYTES = 1 << 20


@register_pass("fold_constants")
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
        if not _foldable_op(node) or id(node) in refused:
            continue
        inputs = [size.get(id(v)) for v in node.inputs]
        if None in inputs:
            continue
        out_bytes = sum(v.type.nbytes for v in node.outputs)
        if out_bytes > MAX_EVAL_BYTES:  # constant, but too large even to compute here
            plan.kept.append(node)
            continue
        computable.append(node)
        order.append(node)
        fits = out_bytes <= max(max(inputs, default=0), max_bytes)
        if fits and not any(_is_extended(v.type.dtype) for v in node.outputs):
            folds.add(id(node))
        size.update((id(v), v.type.nbytes if id(node) in folds else 0) for v in node.outputs)
    # Backward, readers first: a node stays if a node that stays (or the graph output) reads it
    # and it cannot fold, or it is an expander (kept, its input folds instead: a broadcast or
    # iota is free for XLA, a literal of its shape is not). Everything else disappears; the
    # outputs of folding nodes that staying nodes read become constants.
    gone: set[int] = set()
    for node in reversed(computable):
        staying = [v for v in node.outputs if any(u is None or id(u) not in gone for u, _ in v.uses)]
        if staying and (id(node) not in folds or _is_expander(node)):
            plan.kept.append(node)
            continue
        gone.add(id(node))
        plan.wanted.extend(staying)
        gone.update(id(v.node) for v in node.inputs if v.node is not None and v.node.op is CONSTANT)
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


def _is_expander(node) -> bool:
    """iota, or a broadcast that grows its input: free for XLA, fused into their readers."""
    if node.op.name == "iota":
        return True
    return node.op.name == "broadcast_in_dim" and node.output.type.nbytes > node.inputs[0].type.nbytes


def _foldable_op(node) -> bool:
    op = node.op
    return (getattr(op, "kind", None) == "primitive" and not node.regions and not node.effects
            and op.name not in NEVER_FOLDED and bool(node.outputs))


def _is_extended(dtype) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.extended)


class _Refused(Exception):
    def __init__(self, node, reason: str):
        super().__init__(reason)
        self.node, self.reason = node, reason


def _evaluate(plan: _Plan) -> list[np.ndarray]:
    """The wanted values, computed by one jitted CPU program with the constants as literals."""
    def program():
        env = {}
        for node in plan.nodes:
            if node.op is CONSTANT:
                env[id(node.output)] = compat.make_constant(**node.params)
                continue
            try:
                outs = compat.bind(node.op.primitive, [env[id(v)] for v in node.inputs], node.params)
            except Exception as err:
                raise _Refused(node, f"{type(err).__name__}: {err}") from err
            env.update(zip(map(id, node.outputs), outs))
        return [env[id(v)] for v in plan.wanted]

    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        outs = jax.jit(program)()
    return [np.asarray(out) for out in outs]


def _rewrite(plan: _Plan, results) -> Counter:
    fired: Counter = Counter()
    for value, result in zip(plan.wanted, results):
        node = value.node
        if result.dtype != value.type.dtype or result.shape != value.type.shape:
            fired["type-mismatch-kept"] += 1  # e.g. traced with x64 on, folded with it off
            continue
        constant = node.graph.constant(result, value.type.dtype, value.type.weak_type, before=node,
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

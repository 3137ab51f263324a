"""cse: common subexpression elimination — one node per distinct computation.

    %1 = sin %x                 %1 = sin %x
    %2 = sin %x          →      %3 = add %1, %1
    %3 = add %1, %2             return %3
    return %3

Two nodes compute the same thing when they have the same op, equal params, the same output types
and the same inputs, by identity (after earlier merges, so chains collapse in one forward sweep).
The first node is kept and the uses of the later one move to it. The sweep is O(n) with a hash
table per graph (`ValueTable`), keyed by op and inputs; params are keyed, and compared, only
when two nodes share both. Params compare by bits and type: 0.0 ≠ −0.0, 1 ≠ True ≠ 1.0. Constants
merge when dtype, weak type, shape and bits are equal: 0.0 and −0.0 stay apart, NaNs with
identical bits merge.

What is never merged:
- nodes with effects (callbacks, prints, ordered I/O) and `rng_uniform` (a stateful generator
  that JAX does not mark as effectful); `optimization_barrier`, which exists to stop rewrites;
- region ops (scan, while, cond, remat, ...): each region belongs to exactly one node, so two
  region ops never hold the same region object, and comparing bodies structurally costs O(body)
  per candidate for a rare win. CSE runs inside every region instead, each with its own table
  (a region sees only its own inputs, so nothing merges across a region boundary);
- nodes whose params cannot be keyed (unhashable objects). Large arrays in params (more than
  4096 elements) are keyed by identity, not by content, so keying stays cheap. Constants are
  keyed by content up to 16 MiB (a digest, confirmed bit for bit on a match), by identity above.
- Commuted operands (`mul %a, %b` vs `mul %b, %a`) are different keys; canonicalize orders them.

XLA runs CSE on the compiled program too. graphopt does it on its own graph because later passes
match patterns on values: after CSE, fold_params and fusion patterns see one value where the
trace had two copies (e.g. one `rsqrt(var + eps)` per use), cost reports stop counting duplicates,
and every later pass and the lowering touch fewer nodes.

Contract: exact (the kept node computes bit-identical results).
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np

from graphopt.ops import CONSTANT, MAX_KEYED_ELEMENTS, params_key
from graphopt.pipeline import register_pass

# Constants up to this size are keyed by content, larger ones (closed-over weights) by identity.
MAX_HASHED_CONSTANT_BYTES = 16 << 20
# Pure by JAX's account but not to be merged (see the module docstring).
NEVER_MERGED = frozenset({"rng_uniform", "optimization_barrier"})


@register_pass("cse", layerwise=True)
def cse(graph, ctx):
    """Merge nodes that compute the same value (same op, params and inputs) into the first one.

    Example:
        >>> import graphopt, jax.numpy as jnp
        >>> from graphopt.pipeline import run_pipeline
        >>> g = graphopt.trace(lambda x: jnp.sin(x) + jnp.sin(x), jnp.ones(3))
        >>> [n.op.name for n in run_pipeline(g, ["cse"]).graph.nodes]
        ['sin', 'add']
    """
    fired: Counter = Counter()
    _cse(graph, fired)
    ctx.count(fired)
    return graph


def _cse(graph, fired: Counter) -> None:
    table = ValueTable()
    for node in graph.nodes:
        for region in node.regions:
            _cse(region, fired)
        first = table.first(node)
        if first is node:
            continue
        for old, new in zip(node.outputs, first.outputs):
            graph.replace_all_uses(old, new)
        graph.erase(node)
        fired["merged-constant" if node.op is CONSTANT else "merged-node"] += 1


class ValueTable:
    """Value numbering: finds the first node added that computes what a node computes.

    Nodes are keyed by op, input identities and output types first; params are keyed only when
    two nodes share those (most nodes never need it), so a sweep stays O(n) and cheap. Also used
    by fold_constants to evaluate each distinct constant expression once.

    Example:
        >>> import graphopt, jax.numpy as jnp
        >>> g = graphopt.trace(lambda x: jnp.sin(x) * jnp.sin(x), jnp.ones(3))
        >>> table = ValueTable()
        >>> [table.first(n) is n for n in g.nodes]
        [True, False, True]
    """

    def __init__(self):
        self._entries: dict = {}

    def first(self, node, input_ids: tuple | None = None):
        """The earlier node computing the same values as `node`, or `node` itself (now added).

        `input_ids` stands for `node`'s inputs (ids of values) when the caller numbers values
        without rewiring the graph.
        """
        op = node.op
        if node.effects or node.regions or op.name in NEVER_MERGED:
            return node
        if op is CONSTANT:
            key = (CONSTANT, _constant_key(node.params["value"]), node.output.type)
            return self._entries.setdefault(key, node)
        coarse = (op, tuple(map(id, node.inputs)) if input_ids is None else input_ids)
        entry = self._entries.get(coarse)
        if entry is None:  # the usual case: no other node reads these inputs with this op
            self._entries[coarse] = node
            return node
        if not isinstance(entry, dict):  # a second candidate: key both by their params
            entry, lone = {}, entry
            lone_key = params_key(lone.params)
            if lone_key is not None:
                entry[lone_key] = lone
            self._entries[coarse] = entry
        key = params_key(node.params)
        found = node if key is None else entry.setdefault(key, node)
        # Same op, inputs and params give the same types; opaque ops' types come from the trace.
        if found is not node and [v.type for v in found.outputs] != [v.type for v in node.outputs]:
            return node
        return found


def _constant_key(value):
    """Constants are keyed by content up to MAX_HASHED_CONSTANT_BYTES (a digest of the bytes,
    checked against the bytes themselves on a match), larger ones by identity."""
    try:
        array = np.asarray(value)
    except Exception:  # e.g. PRNG key arrays, which have no numpy form
        return ("id", id(value))
    if array.dtype == object or array.nbytes > MAX_HASHED_CONSTANT_BYTES:
        return ("id", id(value))
    if array.size <= MAX_KEYED_ELEMENTS:
        return (array.dtype.str, array.shape, array.tobytes())
    return _Content(array)


class _Content:
    """A large array's bytes as a dict key: hashed by digest, compared bit for bit."""

    __slots__ = ("array", "_hash")

    def __init__(self, array: np.ndarray):
        self.array = np.ascontiguousarray(array)
        digest = hashlib.blake2b(self._bytes(), digest_size=16).digest()
        self._hash = hash((self.array.dtype.str, self.array.shape, digest))

    def _bytes(self) -> np.ndarray:
        return self.array.reshape(-1).view(np.uint8)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return (isinstance(other, _Content) and self._hash == other._hash
                and self.array.dtype == other.array.dtype and self.array.shape == other.array.shape
                and np.array_equal(self._bytes(), other._bytes()))

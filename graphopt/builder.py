"""Builder: create nodes at an insertion point, for rewrite rules and passes.

Nodes are inserted before an anchor (the node being rewritten) and marked as made by a pass, keeping
the anchor's module path and source line. Three ways to build:

- `b.op("mul", x, y)`: a primitive or graphopt op by name, params as keywords (a primitive's
  params left out take the values `jax.lax.mul(x, y)` would give them);
- `b.const(2.0, like=x)`: a scalar or array constant (a scalar takes `like`'s dtype);
- `b.jax(fn, x, y)`: trace a small JAX function on the values' types and inline it. Params of
  primitives differ between JAX versions; `b.jax(lambda a, w: a @ w, x, w)` writes them for you.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> g = graphopt.trace(lambda x: jnp.exp(x), jnp.ones(3))
    >>> exp = next(g.nodes)
    >>> b = Builder(g, before=None, made_by="example")
    >>> y = b.op("mul", exp.output, b.const(2.0, like=exp.output))
    >>> g.set_outputs([y])
    >>> [n.op.name for n in g.nodes], y.node.provenance.made_by
    (['exp', 'constant', 'mul'], 'example')
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from graphopt import _jax_compat as compat
from graphopt.ir import Graph, Node, Provenance, Value
from graphopt.ops import OPS, Op, primitive_named, signature_key


class Builder:
    """Creates nodes in `graph` before `before` (at the end if None)."""

    def __init__(self, graph: Graph, *, before: Node | None = None, made_by: str | None = None,
                 origin: Provenance | None = None):
        self.graph = graph
        self.before = before
        self._origin = origin or (before.provenance if before is not None else Provenance())
        self._made_by = made_by
        self._provenance = None
        self._start = before._prev if before is not None else graph._last

    # Filled in when used (most builders build one node): actions to run once rewired, the nodes
    # changed in place (modify), and the nodes that computed their former operands.
    on_rewired: list[Callable[[], Any]] | tuple = ()
    modified: list[Node] | tuple = ()
    released: list[Node] | tuple = ()

    @property
    def provenance(self) -> Provenance:
        """The provenance of the nodes built: the origin's, marked as made by `made_by`."""
        if self._provenance is None:  # made when first needed: many rules build nothing
            origin, made_by = self._origin, self._made_by
            self._provenance = origin.derived(made_by) if made_by else origin
        return self._provenance

    def op(self, op: str | Op, *inputs: Value, **params) -> Value | tuple[Value, ...]:
        """A node of `op` (name or Op); returns its output, or all outputs if it has several."""
        op, params = self._resolve(op, inputs, params)
        node = self.graph.add_node(op, inputs, params, provenance=self.provenance, before=self.before)
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

    def modify(self, value: Value, op: str | Op, *inputs: Value, **params) -> Value:
        """Make the node computing `value` compute `op(*inputs, **params)` in place (params as in
        `op`), when that gives the same types: no node is made, nothing is rewired. Returns
        `value`. The node cannot be restored: a rule does this last, once it will not decline.
        Raises GraphError, changing nothing, if the types would differ."""
        op, params = self._resolve(op, inputs, params)
        node = value.node
        released = self.graph.modify(node, op, inputs, params, self.provenance)
        self.released = [*self.released, *released]
        self.modified = [*self.modified, node]
        return value

    def _resolve(self, op, inputs, params):
        if isinstance(op, str):
            op = OPS[op] if op in OPS else primitive_named(op)
        if op.kind == "primitive":  # params the caller leaves out take JAX's defaults
            defaults = _default_params(op, inputs, params)
            if not defaults.keys() <= params.keys():
                params = {**defaults, **params}
        return op, params

    def const(self, value: Any, *, like: Value | None = None, dtype=None, weak_type: bool = False) -> Value:
        """A constant of `dtype` (default: like's dtype). A scalar constant is a valid operand of
        binary primitives whatever the other operand's shape; `weak_type` as JAX's literals."""
        if dtype is None and like is not None:
            dtype = like.type.dtype
        array = np.asarray(value, dtype=dtype)
        return self.graph.constant(array, array.dtype, weak_type, before=self.before, provenance=self.provenance)

    def jax(self, fn: Callable, *inputs: Value, **static) -> Value | list[Value]:
        """Trace `fn(*inputs, **static)` with JAX on the inputs' types and inline it here."""
        from graphopt.trace import inline_function

        with self.graph.inserting_before(self.before):
            outs = inline_function(self.graph, fn, list(inputs), static, self.provenance)
        return outs[0] if len(outs) == 1 else outs

    def when_rewired(self, action: Callable[[], Any]) -> None:
        """Run `action` once the rewrite driver has made the replaced values' readers read the
        replacement, before it erases what became dead (a rule that moves the matched nodes into
        the new node's region can only move them then)."""
        self.on_rewired = [*self.on_rewired, action]

    @property
    def created(self) -> list[Node]:
        """The nodes this builder has inserted so far, in order."""
        node = self._start._next if self._start is not None else self.graph._first
        nodes = []
        while node is not None and node is not self.before:
            nodes.append(node)
            node = node._next
        return nodes

    def discard(self) -> None:
        """Erase every node this builder created (they must be unused outside the builder)."""
        for node in reversed(self.created):
            self.graph.erase(node)


_DEFAULTS: dict = {}


def _default_params(op, inputs, given: dict) -> dict:
    """JAX's default params of primitive `op` on operands of these dtypes (learned once per
    dtypes, on scalars: default params do not depend on shapes). For primitives whose lax
    function needs options (reshape its `new_sizes`), learned once per dtypes and options, from a
    call on these operands with the options given (where they are lax's keyword arguments and
    hashable)."""
    key = (op, tuple([(v.type.dtype, v.type.weak_type) for v in inputs]))
    found = _DEFAULTS.get(key)
    if found is None:
        avals = [compat.shaped_array((), dtype, weak) for dtype, weak in key[1]]
        found = _DEFAULTS[key] = compat.default_params(op.primitive, avals)
    if found or not given:
        return found
    options = signature_key((), given)
    if options is None:
        return found
    key = (*key, options)
    learned = _DEFAULTS.get(key)
    if learned is None:
        avals = [v.type.aval() for v in inputs]
        learned = _DEFAULTS[key] = compat.default_params(op.primitive, avals, given)
    return learned

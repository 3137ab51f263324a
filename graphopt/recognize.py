"""Helpers for recognizing composite ops in primitive graphs: more pattern combinators, constant-only
values, and the reductions that norms and softmax are made of.

- `AnyOf(p, q, ...)`: the first alternative that matches (each tried on a copy of the captures).
- `Maybe(ops, p)`: `p`, or an op of `ops` applied to `p` (an optional reshape, stop_gradient, ...).
- `Scalar(name, where=...)`: a value computed from constants only (a literal, `sqrt(64.0)`,
  `8.0 - convert(0)`) holding one number; `where` tests that number. `constant_array(value)`
  evaluates such a value.
- `Mean(p)`: `reduce_sum(p) * (1/n)` or `reduce_sum(p) / n`, n the number of summed elements,
  optionally with a keepdims reshape between the sum and the scaling; `Kept(p)`: `p` or `p` with
  size-1 dims inserted (keepdims) or expanded. Both record what they matched in the captures
  (`"_means"`, `"_kept"`) so that a rule's `where` can check that every reduction runs over the
  same axes and every keepdims reshape puts the ones at those axes (`reductions_agree`).

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> from graphopt.pattern import Op, Var
    >>> g = graphopt.trace(lambda x: x - x.mean(-1, keepdims=True), jnp.ones((2, 6)))
    >>> root = list(g.nodes)[-1].output
    >>> captures = {}
    >>> Op("sub", Var("x"), Kept(Mean(Var("x")))).match(root, captures, None)
    True
    >>> captures["_means"][0][0], reductions_agree(captures)
    ((1,), True)
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from graphopt import _jax_compat as compat
from graphopt.ir import Value
from graphopt.ops import CONSTANT
from graphopt.pattern import Op, Pattern, _bind, _fail, any_guard

# Constant-only values up to this many elements are evaluated (masks of long sequences are not).
MAX_EVAL_ELEMENTS = 1 << 25


class AnyOf(Pattern):
    """Matches if one of `alternatives` matches; the captures are those of the first that does."""

    def __init__(self, *alternatives: Pattern, name: str | None = None):
        self.alternatives = alternatives
        self.name = name
        # (alternative, the ops that can compute what it matches or None): an alternative is
        # tried only on a value one of its ops computes (without copying the captures).
        self._tries = [(p, p.produced_by()) for p in alternatives]

    def produced_by(self):
        names = [p.produced_by() for p in self.alternatives]
        return None if any(n is None for n in names) else frozenset().union(*names)

    def root_guard(self):
        return any_guard(self.alternatives)

    def match(self, value, captures, why):
        node = value.node
        op = node.op.name if node is not None else None
        for pattern, ops in self._tries:
            if ops is not None and op not in ops and why is None:
                continue  # explain() tries it, for the reason
            trial = dict(captures)
            if pattern.match(value, trial, why) and _bind(self.name, value, trial, why):
                captures.clear()
                captures.update(trial)
                return True
        return _fail(why, "no alternative matches")


def Maybe(ops, inner: Pattern, **op_options) -> Pattern:
    """`inner`, or one op of `ops` (a name or set of names) applied to it."""
    return AnyOf(Op(ops, inner, **op_options), inner)


class Scalar(Pattern):
    """A one-element value computed from constants only; `where(number)` must hold."""

    def __init__(self, name: str | None = None, where: Callable[[float], bool] | None = None):
        self.name, self.where = name, where

    def match(self, value, captures, why):
        if value.type.size != 1:
            return _fail(why, lambda: f"expected a scalar, got {value.type}")
        array = constant_array(value)
        if array is None:
            return _fail(why, "not computed from constants only")
        number = _number(array)
        if self.where is not None and not self.where(number):
            return _fail(why, lambda: f"constant {number!r} fails its condition")
        if self.name is not None:
            captures[f"_{self.name}"] = number
        return _bind(self.name, value, captures, why)


class Mean(Pattern):
    """mean of `inner` over some axes: reduce_sum, optionally a keepdims step, then × 1/n or ÷ n
    (n exactly the count of summed elements, 1/n as the dtype rounds it). Records
    `(axes, summed value, result)` in `captures["_means"]`."""

    def __init__(self, inner: Pattern, name: str | None = None):
        self.inner, self.name = inner, name

    def produced_by(self):
        return frozenset({"mul", "div"})

    def match(self, value, captures, why):
        node = value.node
        if node is None or node.op.name not in ("mul", "div") or len(node.inputs) != 2:
            return _fail(why, "a mean is a reduce_sum scaled by 1/n")
        summed, divisor = node.inputs
        count = _scalar(divisor)
        kept = summed
        if summed.node is not None and summed.node.op.name in ("reshape", "broadcast_in_dim"):
            summed = summed.node.inputs[0]
        if count is None or summed.node is None or summed.node.op.name != "reduce_sum":
            return _fail(why, "a mean is a reduce_sum scaled by 1/n")
        axes = tuple(int(a) for a in summed.node.params["axes"])
        source = summed.node.inputs[0]
        n = math.prod(source.type.shape[a] for a in axes)
        dtype = value.type.dtype
        if node.op.name == "mul":
            ok = count == float(np.asarray(1.0 / n, dtype))
        else:
            ok = count == n
        if not ok:
            return _fail(why, lambda: f"scaled by {count}, not 1/{n}")
        if kept is not summed and not _is_keepdims(summed, kept, axes, source.type.shape):
            return _fail(why, "the reshape between sum and scaling is not keepdims")
        if not self.inner.match(source, captures, why):
            return False
        captures["_means"] = captures.get("_means", ()) + ((axes, source, value),)
        return _bind(self.name, value, captures, why)


class Kept(Pattern):
    """`inner`, or `inner` reshaped to insert size-1 dims, or broadcast without moving dims.
    Records `(input, result)` in `captures["_kept"]` for `reductions_agree`."""

    def __init__(self, inner: Pattern):
        self.inner = inner

    def match(self, value, captures, why):
        node = value.node
        if node is not None and node.op.name in ("reshape", "broadcast_in_dim"):
            trial = dict(captures)
            if self.inner.match(node.inputs[0], trial, None):
                trial["_kept"] = trial.get("_kept", ()) + ((node.inputs[0], value),)
                captures.clear()
                captures.update(trial)
                return True
        return self.inner.match(value, captures, why)


class Broadcast(Pattern):
    """`inner`, or `inner` reshaped or broadcast the way numpy broadcasting would do it (size-1
    dims prepended; `broadcast_in_dim` onto the trailing dims): a scale or bias operand."""

    def __init__(self, inner: Pattern):
        self.inner = inner

    def match(self, value, captures, why):
        node = value.node
        if node is not None and node.op.name in ("reshape", "broadcast_in_dim") and \
                is_numpy_broadcast(node.inputs[0], value):
            trial = dict(captures)
            if self.inner.match(node.inputs[0], trial, None):
                captures.clear()
                captures.update(trial)
                return True
        return self.inner.match(value, captures, why)


def is_numpy_broadcast(before: Value, after: Value) -> bool:
    """`after` (a reshape or broadcast_in_dim of `before`) holds what numpy broadcasting of
    `before` to `after`'s shape holds."""
    node, src, out = after.node, before.type.shape, after.type.shape
    lead = len(out) - len(src)
    if lead < 0:
        return False
    if node.op.name == "reshape":
        return node.params.get("dimensions") is None and out == (1,) * lead + src
    dims = tuple(node.params["broadcast_dimensions"])
    return node.params.get("sharding") is None and dims == tuple(range(lead, len(out))) and \
        all(d in (1, o) for d, o in zip(src, out[lead:]))


def mean_axes(value: Value) -> tuple:
    """The axes of a value matched by `Mean`."""
    summed = value.node.inputs[0]
    if summed.node.op.name != "reduce_sum":
        summed = summed.node.inputs[0]
    return tuple(int(a) for a in summed.node.params["axes"])


def reductions_agree(captures: dict) -> bool:
    """Every recorded mean reduces the same axes of values of one shape, and every keepdims step
    recorded by `Kept` turns a reduced (or kept) value into the kept (or full) shape."""
    means = captures.get("_means", ())
    if not means:
        return True
    axes, source, _ = means[0]
    shape = source.type.shape
    if any(a != axes or s.type.shape != shape for a, s, _ in means):
        return False
    return keepdims_agree(captures, axes, shape)


def keepdims_agree(captures: dict, axes, shape) -> bool:
    """Every keepdims step recorded by `Kept` keeps the reduced `axes` of `shape` (or expands the
    kept shape back to `shape`)."""
    for before, after in captures.get("_kept", ()):
        if not (_is_keepdims(before, after, axes, shape) or _is_expansion(before, after, axes, shape)):
            return False
    return True


def kept_shape(shape, axes) -> tuple:
    """`shape` with the reduced `axes` set to 1 (what keepdims=True leaves)."""
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


def constant_array(value: Value, max_elements: int = MAX_EVAL_ELEMENTS) -> np.ndarray | None:
    """The value as a numpy array if it is computed from constants only (no graph input, no
    effects, no regions), else None. Evaluated eagerly with the graph's own primitives."""
    node = value.node
    if node is not None and node.op is CONSTANT:  # the usual case, after fold_constants
        if value.type.size > max_elements:
            return None
        p = node.params
        return np.asarray(p["value"], p["dtype"])
    memo: dict[int, Any] = {}
    if not _constant_only(value, memo, max_elements):
        return None
    return np.asarray(_evaluate(value, memo))


def constant_only(value: Value, max_elements: float = MAX_EVAL_ELEMENTS) -> bool:
    """Whether `value` is computed from constants only, by at most MAX_CONSTANT_NODES plain
    primitives (no graph input, effects or regions) whose results have at most `max_elements`
    elements each: what `constant_array` evaluates."""
    return _constant_only(value, {}, max_elements)


def evaluate_slice(inputs, arrays, outputs) -> list[np.ndarray] | None:
    """Evaluate `outputs` with `inputs` bound to `arrays` (eagerly, with the graph's primitives),
    or None if the slice between them reads another graph input, has effects or regions."""
    memo: dict[int, Any] = {}
    env = {id(v): a for v, a in zip(inputs, arrays)}
    try:
        return [np.asarray(_evaluate(v, memo, env)) for v in outputs]
    except _NotEvaluable:
        return None


# --- helpers -------------------------------------------------------------------------------------

def _scalar(value: Value):
    if value.type.size != 1:
        return None
    array = constant_array(value)
    return None if array is None else _number(array)


def _number(array: np.ndarray):
    """A one-element array as a Python bool, int or float (bfloat16 & co. as floats)."""
    scalar = array.reshape(())
    return scalar.item() if array.dtype.kind in "biuf" else float(scalar)


def _is_keepdims(before: Value, after: Value, axes, full_shape) -> bool:
    """`after` is `before` (reduced over `axes`) with ones inserted at those axes."""
    reduced = tuple(d for i, d in enumerate(full_shape) if i not in axes)
    if before.type.shape != reduced or after.type.shape != kept_shape(full_shape, axes):
        return False
    return _moves_no_dims(after)


def _is_expansion(before: Value, after: Value, axes, full_shape) -> bool:
    """`after` broadcasts the kept `before` to the full shape along `axes`."""
    return (before.type.shape == kept_shape(full_shape, axes) and after.type.shape == tuple(full_shape)
            and _moves_no_dims(after))


def _moves_no_dims(value: Value) -> bool:
    node = value.node
    if node.op.name == "reshape":
        return node.params.get("dimensions") is None
    dims = tuple(node.params["broadcast_dimensions"])
    rank_in = node.inputs[0].type.ndim
    out = value.type.shape
    if rank_in == 0:
        return all(d == 1 for d in out) or len(dims) == 0 and out == ()
    return list(dims) == sorted(dims) and len(dims) == rank_in and node.params.get("sharding") is None \
        and (rank_in == len(out) or all(out[d] == 1 for d in range(len(out)) if d not in dims))


# Constant-only slices are small (a literal, an iota mask); a search past this many nodes gives up,
# so asking about an activation does not walk the whole graph.
MAX_CONSTANT_NODES = 64


def _constant_only(value: Value, memo: dict, max_elements: int) -> bool:
    stack = [value]
    seen: set[int] = set()
    while stack:
        if len(seen) > MAX_CONSTANT_NODES:
            return False
        v = stack.pop()
        node = v.node
        if node is None:
            return False
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.effects or node.regions or node.op.kind == "opaque":
            return False
        if any(o.type.size > max_elements for o in node.outputs):
            return False
        if node.op.name != "constant" and node.op.kind != "primitive":
            return False
        stack.extend(node.inputs)
    return True


class _NotEvaluable(Exception):
    pass


def _evaluate(value: Value, memo: dict, env: dict | None = None):
    if env is not None and id(value) in env:
        return env[id(value)]
    node = value.node
    if node is None:
        raise _NotEvaluable(value)
    if id(node) not in memo:
        if node.op.name == "constant":
            p = node.params
            memo[id(node)] = [np.asarray(p["value"], p["dtype"])]
        else:
            if node.effects or node.regions or node.op.kind != "primitive":
                raise _NotEvaluable(node)
            args = [_evaluate(v, memo, env) for v in node.inputs]
            memo[id(node)] = _run(node, args)
    return memo[id(node)][value.index]


def _run(node, args) -> list:
    """One primitive on numpy arrays: numpy for data movement, logic and arithmetic on the small
    masks and scalars recognition evaluates (an eager JAX call compiles once per primitive and
    shape, ~50 ms each); JAX itself for everything else."""
    fn = _NUMPY.get(node.op.name)
    if fn is not None and all(isinstance(a, np.ndarray) for a in args):
        out = node.outputs[0].type
        try:
            with np.errstate(all="ignore"):
                result = fn(*args, **node.params)
        except (TypeError, ValueError):
            result = None
        if result is not None:
            result = np.asarray(result)
            if result.shape == tuple(out.shape) and np.can_cast(result.dtype, out.dtype, "same_kind") \
                    or result.dtype == np.bool_ and out.dtype == np.bool_:
                return [result.astype(out.dtype, copy=False)]
    return [np.asarray(x) for x in compat.bind(node.op.primitive, args, node.params)]


def _iota(*, dtype, shape, dimension, **_):
    index = [1] * len(shape)
    index[dimension] = shape[dimension]
    return np.broadcast_to(np.arange(shape[dimension], dtype=dtype).reshape(index), shape)


def _broadcast(x, *, shape, broadcast_dimensions, **_):
    index = [1] * len(shape)
    for d, n in zip(broadcast_dimensions, x.shape):
        index[d] = n
    return np.broadcast_to(x.reshape(index), shape)


def _convert(x, *, new_dtype, **_):
    # float -> int saturates in XLA and is undefined in numpy: leave those to JAX
    if np.dtype(x.dtype).kind == "f" and np.dtype(new_dtype).kind in "iub":
        return None
    return x.astype(new_dtype)


def _select(pred, *cases):
    if pred.dtype != np.bool_ or len(cases) != 2:
        return None
    return np.where(pred, cases[1], cases[0])


def _same_kind(fn):
    """A binary op on operands of one dtype (lax requires it), in that dtype."""
    def run(a, b, **_):
        if a.dtype != b.dtype:
            return None
        return np.asarray(fn(a, b)).astype(a.dtype, copy=False)
    return run


_NUMPY: dict[str, Callable] = {
    "iota": _iota,
    "broadcast_in_dim": _broadcast,
    "reshape": lambda x, *, new_sizes, dimensions=None, **_: None if dimensions is not None
    else x.reshape(new_sizes),
    "transpose": lambda x, *, permutation: np.transpose(x, permutation),
    "squeeze": lambda x, *, dimensions: np.squeeze(x, tuple(dimensions)),
    "convert_element_type": _convert,
    "select_n": _select,
    "eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
    "ge": np.greater_equal,
    "and": _same_kind(np.bitwise_and), "or": _same_kind(np.bitwise_or),
    "not": lambda x: np.logical_not(x) if x.dtype == np.bool_ else np.invert(x),
    "add": _same_kind(np.add), "sub": _same_kind(np.subtract), "mul": _same_kind(np.multiply),
    "max": _same_kind(np.maximum), "min": _same_kind(np.minimum),
    "neg": np.negative,
}

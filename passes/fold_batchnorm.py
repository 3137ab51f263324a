"""fold_batchnorm: fold inference BatchNorm (any per-channel affine on weights) into conv/matmul weights.

    %0 = conv_general_dilated %x, %W                    %0 = reshape[(1,1,1,C)] %s'        # prep
    %1 = add %0, %bias                                  %1 = mul %W, %0                    # prep
    %2 = sub %1, %mean                           →      %2 = conv_general_dilated %x, %1
    %3 = mul %2, %s          # s = gamma·rsqrt(var+eps) %3 = add %2, %t'   # t' = ((bias − mean)·s + beta)
    %4 = add %3, %beta                                  return %3
    return %4

At inference the statistics and the affine of a BatchNorm are frozen, so `conv(x, W)·s + t` equals
`conv(x, W·s) + t` with `s` laid along the kernel's output-feature dimension (`rhs_spec[0]` of the
conv's dimension numbers; for dot_general, the dims of the weight operand that reach the output).
The rules move subtractions, divisions, scales and bias additions, one step at a time, next to
the linear op; the weight-side arithmetic they leave (`W·s`, the merged bias) depends only on
parameters and constants, and `fold_params`, which runs after this pass, precomputes it once per
set of weights. What stays on activations is one conv or matmul and one bias add, which XLA fuses.

Conditions, all exact: the scale and every bias are parameter-derived (role "param" inputs and
constants only, no effects, no regions: what fold_params moves to the prep); so is the weight
operand, and a parameter is among the sources of `W·s` (of constants only, nothing would
precompute it: fold_constants has run); the scale varies only along output dims that come from
the weight's output features (a scale along batch or spatial dims is left alone); the linear
result and each intermediate has no other reader (`single_use`: no work is duplicated); dtypes
agree (float32 or float64 only: in half precision rounding `W·s` to 8 or 11 bits would exceed the
bound) and are preserved. Grouped and depthwise convs fold the same way: output feature k of any
feature or batch grouping is computed from kernel slice k alone. Nothing is folded inside regions
(their inputs are not parameters).

Numerics: `approximate(1e-4)`, relative to the output's largest magnitude, as validation measures it.
Folding rounds `W·s` once per weight, drops the rounding of the final multiply and reassociates
the bias adds: at most four extra roundings (u = 2^-24 in float32) of each term of the sum, so the
error is below 4u·Σ|xᵢ·Wᵢ·s| / max|y|; 1e-4 allows a cancellation ratio of 400 (measured on the
models in tests/passes/test_fold_batchnorm.py: ~1e-7). NaN and ±Inf: for finite parameters (the
project's convention, see graphopt/validate.py: weights are finite in practice), NaN/±Inf results
caused by the inputs keep their positions — scaling each term xᵢ·Wᵢ by a finite s (0 included)
gives a non-finite term exactly where the original term was non-finite, and reassociating finite
biases changes no non-finite sum — unless an intermediate overflows, which is rounding. A scale
holding ±Inf or NaN (an infinite gamma, or var = −eps) would change them; nothing here can see
parameter values, which exist only when the prep runs, so that case is documented, not checked.
The sign of an exact-zero result may differ when s < 0 and the zero comes from cancellation
((a − a)·(−1) = −0, but a·(−1) + (−a)·(−1) = +0); adding a nonzero or +0 bias evens it out.

Example:
    >>> import graphopt, jax, jax.numpy as jnp
    >>> from graphopt.pipeline import run_pipeline
    >>> def dense_bn(p, x):
    ...     y = x @ p["w"]
    ...     return (y - p["mean"]) * jax.lax.rsqrt(p["var"] + 1e-5) * p["gamma"] + p["beta"]
    >>> p = {"w": jnp.ones((3, 4)), "mean": jnp.zeros(4), "var": jnp.ones(4),
    ...      "gamma": jnp.ones(4), "beta": jnp.zeros(4)}
    >>> g = graphopt.trace(dense_bn, p, jnp.ones((2, 3)), params_argnums=0)
    >>> g = run_pipeline(g, ["canonicalize", "fold_batchnorm", "fold_params", "dce"]).graph
    >>> [n.op.name for n in g.nodes]
    ['dot_general', 'add']
"""

from __future__ import annotations

import jax
import numpy as np

from graphopt.pattern import Op, Pattern, Rule, Var, rewrite
from graphopt.pipeline import approximate, register_pass

BOUND = 1e-4


@register_pass("fold_batchnorm", contract=approximate(BOUND), layerwise=True)
def fold_batchnorm(graph, ctx):
    """Fold per-channel affines on parameters (inference BatchNorm) into conv/matmul weights.

    >>> import graphopt, jax.numpy as jnp
    >>> from graphopt.pipeline import run_pipeline
    >>> g = graphopt.trace(lambda w, x: (x @ w) * 2.0, jnp.ones((3, 4)), jnp.ones(3), params_argnums=0)
    >>> dict(run_pipeline(g, ["fold_batchnorm"]).report.records[0].fired)
    {'fold_batchnorm/scale-into-kernel': 1}
    """
    global _DERIVED
    _DERIVED = {}
    try:
        fired = rewrite(graph, RULES)
    finally:
        _DERIVED = None
    ctx.count(fired)
    folded = fired["fold_batchnorm/scale-into-kernel"]
    if folded:
        ctx.note(f"{folded} per-channel scale(s) folded into conv/matmul weights; fold_params "
                 "precomputes them")
    return graph


# --- parameter-derived values --------------------------------------------------------------------

# id(value) -> (value, PARAM | CONSTANT | None) during one run; holding the value keeps its id
# unique. Outside a run (explain()) each question gets a fresh memo: graphs change between runs.
_DERIVED: dict | None = None
PARAM, CONSTANT = "param", "constant"
_PENDING = object()


def param_derived(value) -> bool:
    """Whether `value` is computed from role-"param" inputs and constants only (no effects,
    regions or opaque ops): the values fold_params can precompute."""
    return _derivation(value) is not None


def _derivation(value) -> str | None:
    """PARAM (parameter-derived, some parameter among the sources), CONSTANT (constants only:
    fold_params would leave it, fold_constants has run) or None (depends on an input)."""
    memo = _DERIVED if _DERIVED is not None else {}
    stack = [value]
    while stack:
        v = stack[-1]
        if id(v) in memo:
            stack.pop()
            continue
        node = v.node
        if node is None:
            result = PARAM if getattr(v, "role", None) == "param" else None
        elif node.op.name == "constant":
            result = CONSTANT
        elif node.effects or node.regions or node.op.kind == "opaque" or not node.inputs:
            result = None
        else:  # None if an operand is; else PARAM if one is; else CONSTANT
            result = CONSTANT
            for u in node.inputs:
                known = memo.get(id(u))
                if known is None:  # not derived yet: derive it, then come back
                    stack.append(u)
                    result = _PENDING
                    break
                if known[1] is None:
                    result = None
                    break
                if known[1] is PARAM:
                    result = PARAM
            if result is _PENDING:
                continue
        memo[id(v)] = (v, result)
        stack.pop()
    return memo[id(value)][1]


class Weights(Pattern):
    """A parameter-derived value, captured under `name`."""

    def __init__(self, name: str):
        self.name = name

    def match(self, value, captures, why):
        if not param_derived(value):
            if why is not None:
                why.append(f"{self.name!r} is not computed from parameters and constants only")
            return False
        bound = captures.setdefault(self.name, value)
        return bound is value


# --- conditions ----------------------------------------------------------------------------------

_FOLDABLE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _weight_side(y) -> int | None:
    """Which operand of the linear op `y` holds the weights (1: rhs, 0: lhs of a dot), or None."""
    node = y.node
    lhs, rhs = node.inputs
    if param_derived(rhs):
        return 1
    if node.op.name == "dot_general" and param_derived(lhs):
        return 0
    return None


def _channel_dims(y, side: int) -> list[tuple[int, int]]:
    """(output dim, weight dim) pairs: the output dims that come from the weight's features."""
    node = y.node
    if node.op.name == "conv_general_dilated":
        numbers = node.params["dimension_numbers"]
        return [(numbers.out_spec[1], numbers.rhs_spec[0])]
    (contract, batch) = node.params["dimension_numbers"]
    lhs, rhs = node.inputs
    nb = len(batch[0])
    free = lambda operand, i: [d for d in range(operand.type.ndim)
                               if d not in contract[i] and d not in batch[i]]
    lhs_free, rhs_free = free(lhs, 0), free(rhs, 1)
    offset = nb if side == 0 else nb + len(lhs_free)
    dims = lhs_free if side == 0 else rhs_free
    return [(offset + j, d) for j, d in enumerate(dims)]


def _linear_ok(y) -> bool:
    node = y.node
    side = _weight_side(y)
    if side is None or y.type.dtype not in _FOLDABLE_DTYPES:
        return False
    preferred = node.params.get("preferred_element_type")
    return node.inputs[side].type.dtype == y.type.dtype and preferred in (None, y.type.dtype)


def _per_channel(s, y) -> bool:
    """s (same dtype) broadcasts onto y without growing it and varies only along channel dims."""
    if s.type.dtype != y.type.dtype:
        return False
    if s.type.shape == ():
        return True
    if s.type.ndim != y.type.ndim:
        return False
    channels = {out for out, _ in _channel_dims(y, _weight_side(y))}
    return all(n == 1 or (d in channels and n == y.type.shape[d]) for d, n in enumerate(s.type.shape))


def _bias_ok(b, out) -> bool:
    return b.type.dtype == out.type.dtype and (b.type.shape == () or b.type.ndim == out.type.ndim)


def _chain_linear(v):
    """The linear op's result under `v` when v is it or `add(it, bias)`, each single-use."""
    node = v.node
    if node is None or len(v.uses) != 1:
        return None
    if node.op.name in LINEAR:
        return v if _linear_ok(v) else None
    if node.op.name == "add":
        for y, b in (node.inputs, node.inputs[::-1]):
            if y.node is not None and y.node.op.name in LINEAR and len(y.uses) == 1 and \
                    _linear_ok(y) and param_derived(b) and _bias_ok(b, v):
                return y
    return None


def _scale_into_kernel_ok(c) -> bool:
    """Also: W·s has a parameter source, so fold_params precomputes it (constants only would
    leave the product to run on every call)."""
    y = c["y"]
    if not (c["out"].type == y.type and _linear_ok(y) and _per_channel(c["s"], y)):
        return False
    return PARAM in (_derivation(y.node.inputs[_weight_side(y)]), _derivation(c["s"]))


def _through_bias_ok(c) -> bool:
    return _scale_into_kernel_ok(c) and _bias_ok(c["b_"], c["out"]) and c["biased"].type == c["out"].type


def _merge_ok(c) -> bool:
    return (c["out"].type == c["y"].type and _linear_ok(c["y"]) and _bias_ok(c["b_"], c["out"])
            and _bias_ok(c["c"], c["out"]))


class Chain(Pattern):
    """A conv/dot_general result, or `add(it, bias)`, each single-use (see _chain_linear),
    captured under `name` (the linear op's result under "_linear"). Matched before the other
    operand: it rejects most values on their op alone, before the parameter search."""

    def __init__(self, name: str):
        self.name = name

    def produced_by(self):
        return LINEAR | {"add"}

    def match(self, value, captures, why):
        y = _chain_linear(value)
        if y is None:
            if why is not None:
                why.append(f"{self.name!r} is not a conv/dot_general (plus a bias) used once")
            return False
        captures["_linear"] = y
        return captures.setdefault(self.name, value) is value


def _on_chain(per_channel: bool):
    def where(c) -> bool:
        y = c["_linear"]
        return c["out"].type == c["v"].type and (
            _per_channel(c["s"], y) if per_channel else _bias_ok(c["s"], c["out"]))
    return where


# --- replacements --------------------------------------------------------------------------------

def _scaled_linear(b, x, w, y, s, out):
    """linear(x, w)·s → linear(x, w·s_k), s_k: s laid along the weight's feature dims."""
    node = y.node
    side = _weight_side(y)
    weight = node.inputs[side]
    if s.type.shape != ():
        shape = [1] * weight.type.ndim
        for out_dim, weight_dim in _channel_dims(y, side):
            shape[weight_dim] = s.type.shape[out_dim]
        s = b.jax(lambda v: jax.lax.reshape(v, tuple(shape)), s)
    scaled = b.op("mul", weight, s)
    if scaled.type != weight.type:
        return None
    operands = list(node.inputs)
    operands[side] = scaled
    return _typed(b.op(node.op, *operands, **node.params), out)


def _scale_through_bias(b, x, w, y, b_, s, biased, out):
    return _typed(b.op("add", b.op("mul", y, s), b.op("mul", b_, s)), out)


def _merged_biases(b, x, w, y, b_, c, biased, out):
    return _typed(b.op("add", y, b.op("add", b_, c)), out)


def _subtract_as_add(b, v, s, out):
    return _typed(b.op("add", v, b.op("neg", s)), out)


def _divide_as_multiply(b, v, s, out):
    return _typed(b.op("mul", v, b.op("div", b.const(1.0, like=s), s)), out)


def _typed(new, out):
    """`new` if it has `out`'s type (weak types included), else None: the rule declines."""
    return new if new.type == out.type else None


# --- the rules -----------------------------------------------------------------------------------

LINEAR = frozenset({"conv_general_dilated", "dot_general"})
_linear = Op(LINEAR, Var("x"), Var("w"), single_use=True, name="y")
_biased = Op("add", _linear, Weights("b_"), commutative=True, single_use=True, name="biased")

RULES = [
    # linear(x, W)·s → linear(x, W·s): the heart of the fold.
    Rule("fold_batchnorm/scale-into-kernel",
         Op("mul", _linear, Weights("s"), commutative=True, name="out"), _scaled_linear,
         where=_scale_into_kernel_ok),
    # (linear + b)·s → linear·s + b·s, then the rule above.
    Rule("fold_batchnorm/scale-through-bias",
         Op("mul", _biased, Weights("s"), commutative=True, name="out"), _scale_through_bias,
         where=_through_bias_ok),
    # (linear + b) + c → linear + (b + c): one bias add on activations.
    Rule("fold_batchnorm/merge-biases",
         Op("add", _biased, Weights("c"), commutative=True, name="out"), _merged_biases,
         where=_merge_ok),
    # v − m → v + (−m): IEEE defines subtraction so (exact).
    Rule("fold_batchnorm/subtract-as-add", Op("sub", Chain("v"), Weights("s"), name="out"),
         _subtract_as_add, where=_on_chain(per_channel=False)),
    # v / s → v · (1/s): one more rounding (1/s), within the bound.
    Rule("fold_batchnorm/divide-as-multiply", Op("div", Chain("v"), Weights("s"), name="out"),
         _divide_as_multiply, where=_on_chain(per_channel=True)),
]

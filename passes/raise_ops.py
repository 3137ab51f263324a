"""raise_ops: recognize graphopt's semantic ops (graphopt/nn_ops.py) in the primitives that Flax,
Equinox and hand-written JAX trace to, so a transformer's listing reads as attention, layer_norm,
rms_norm, softmax, gelu, silu and linear.

    %0 = reduce_max[axes=(1,)] %x
    %1 = max %0, -inf
    %2 = reshape[new_sizes=(3,1)] %1                %0 = softmax[axes=(1,)] %x
    %3 = stop_gradient %2                    →        decomposition(%arg0) {
    %4 = sub %x, %3                                     %0 = reduce_max[axes=(1,)] %arg0
    %5 = exp %4                                         ...   (the 9 primitives on the left)
    %6 = reduce_sum[axes=(1,)] %5                     }
    %7 = reshape[new_sizes=(3,1)] %6
    %8 = div %5, %7

Each raised node holds the primitives it was recognized from as its "decomposition" region
(`graphopt.outline`: they move there), and `implementation=None`, so the lowering runs exactly those primitives:
the pass changes no bit of any result. A later pass (fusion) may pick a kernel for the op.

What is recognized (after canonicalize and cse; the forms each rule accepts are next to it):
softmax (`jax.nn.softmax`, `exp(x - max) / sum`), gelu (tanh and erf forms), silu, layer_norm
(flax linen/nnx, equinox, hand-written mean/variance), rms_norm, linear (dot_general plus a bias
along the output features; a dot_general with a parameter operand), and attention
(`graphopt.recognize_attention`: Flax linen and nnx attention, `jax.nn.dot_product_attention`,
einsum or matmul attention in either layout, with scale, bias, where-masks and causal masks).

Every condition of a form is checked: the constants (1/n of a mean, gelu's 0.044715 and
sqrt(2/π), -inf of a max), the reduction axes and the keepdims shapes, where epsilon is added,
that scale and bias vary along the normalized axes only. Look-alikes stay primitives: a variance
without the mean subtracted, a softmax without the max subtracted (it overflows where softmax
does not), a mean over other axes than the normalization.

Order: complete forms first (layer_norm with scale and bias before the one without, which would
otherwise take its inner product), then partial ones; softmax before attention, so attention
matches over a softmax node, which stays nested in the attention's decomposition. Rules do not
fire inside a decomposition region: an op is raised once, whole.

Contract: exact (bit for bit: only regions are introduced).
"""

from __future__ import annotations

import math

import jax

from graphopt import nn_ops
from graphopt.errors import GraphError
from graphopt.outline import OutlineError, outline_into, outline_slice
from graphopt.pattern import Const, Op, Rule, Var, rewrite
from graphopt.pipeline import register_pass
from graphopt.recognize import (AnyOf, Broadcast, Kept, Maybe, Mean, Scalar, constant_array,
                                keepdims_agree, mean_axes, reductions_agree)
from graphopt.recognize_attention import raise_attention


@register_pass("raise_ops", layerwise=True)
def raise_ops(graph, ctx):
    """Wrap recognized primitive sub-graphs into softmax, gelu, ..., attention nodes (bit-exact).

    >>> import graphopt, jax, jax.numpy as jnp
    >>> from graphopt.pipeline import run_pipeline
    >>> g = graphopt.trace(lambda x: jax.nn.silu(jax.nn.softmax(x)), jnp.ones((2, 4)))
    >>> g = run_pipeline(g, ["canonicalize", "raise_ops"]).graph
    >>> [n.op.name for n in g.nodes]
    ['softmax', 'silu']
    """
    for rules in RULE_PHASES:
        # Decompositions are not searched: an op is raised whole, once (and they are many). The
        # rules' conditions need not check it.
        ctx.count(rewrite(graph, rules, descend=lambda node: node.op.name not in nn_ops.COMPOSITE_OPS))
    ctx.count(raise_attention(graph))
    return graph


# --- replacements --------------------------------------------------------------------------------

def _raise(b, inputs, root, build):
    """The node `build(None)` makes (with `b`) to replace `root`; once the driver has rewired
    root's readers, the match moves into it as its decomposition (`outline_into`). None (the
    rewrite declines) if the match cannot be outlined, or the op's shape rule rejects it, or its
    type differs from the root's."""
    try:
        order = outline_slice(inputs, [root])
    except OutlineError:
        return None
    try:
        new = build(None)
    except GraphError as err:  # the op's shape rule raised TypeError: it rejects these operands
        if isinstance(err.__cause__, TypeError):
            return None
        raise
    if new.type != root.type:
        return None
    b.when_rewired(lambda: outline_into(new.node, inputs, [root], order))
    return new


def _softmax(b, x, xmax, out, **_):
    axes = tuple(int(a) for a in xmax.node.params["axes"])
    return _raise(b, [x], out, lambda r: nn_ops.softmax_node(b, x, axes, decomposition=r))


def _gelu(approximate: bool):
    def replace(b, x, out, **_):
        return _raise(b, [x], out, lambda r: nn_ops.gelu_node(b, x, approximate=approximate,
                                                              decomposition=r))
    return replace


def _silu(b, x, out):
    return _raise(b, [x], out, lambda r: nn_ops.silu_node(b, x, decomposition=r))


def _layer_norm(b, x, out, eps, mean, scale=None, bias=None, **_):
    inputs = [x] + [v for v in (scale, bias) if v is not None]
    return _raise(b, inputs, out, lambda r: nn_ops.layer_norm_node(
        b, x, scale, bias, axes=mean_axes(mean), epsilon=_number(eps), decomposition=r))


def _rms_norm(b, x, out, eps, ms, scale=None, **_):
    inputs = [x] + ([scale] if scale is not None else [])
    return _raise(b, inputs, out, lambda r: nn_ops.rms_norm_node(
        b, x, scale, axes=mean_axes(ms), epsilon=_number(eps), decomposition=r))


def _linear(b, x, w, dot, out=None, bias=None):
    p = dot.node.params
    inputs = [x, w] + ([bias] if bias is not None else [])
    return _raise(b, inputs, out if out is not None else dot, lambda r: nn_ops.linear_node(
        b, x, w, bias, dimension_numbers=p["dimension_numbers"], precision=p["precision"],
        preferred_element_type=p["preferred_element_type"], decomposition=r))


def _linear_swapped(b, x, w, dot, t, out, bias):
    """add(transpose(dot_general(w, x)), bias), the transpose putting x's free dims first (a
    vmapped equinox Linear): linear(x, w, bias) with the dimension numbers swapped."""
    p = dot.node.params
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    nb, nl = len(lb), w.type.ndim - len(lc) - len(lb)
    nr = x.type.ndim - len(rc) - len(rb)
    swapped = (*range(nb), *range(nb + nl, nb + nl + nr), *range(nb, nb + nl))
    precision = p["precision"]
    if isinstance(precision, tuple) and len(precision) == 2:
        precision = precision[::-1]
    elif precision is not None and not isinstance(precision, jax.lax.Precision):
        return None  # a DotAlgorithm may treat lhs and rhs differently
    if tuple(int(i) for i in t.node.params["permutation"]) != swapped:
        return None
    return _raise(b, [x, w, bias], out, lambda r: nn_ops.linear_node(
        b, x, w, bias, dimension_numbers=((rc, lc), (rb, lb)), precision=precision,
        preferred_element_type=p["preferred_element_type"], decomposition=r))


# --- conditions ----------------------------------------------------------------------------------

def _number(value) -> float:
    return float(constant_array(value).reshape(()))


def _close_to(target: float):
    """The constant is `target` as its dtype rounds it: within 1% (bf16 holds 0.044715 as
    0.04468; `sqrt(2/π)` computed in f32 may differ in the last bit from its rounding)."""
    def check(number) -> bool:
        return math.isfinite(number) and abs(number - target) <= 1e-2 * abs(target)
    return check


def _norm_ok(c) -> bool:
    """Means over the same trailing axes of x; keepdims steps put the ones at those axes; epsilon
    >= 0; scale and bias have the trailing (normalized) dims of x, as nn_ops broadcasts them."""
    if not reductions_agree(c):
        return False
    axes = c["_means"][0][0]
    x = c["x"].type
    if axes != tuple(range(x.ndim - len(axes), x.ndim)) or not c["_eps"] >= 0:
        return False
    normalized = x.shape[axes[0]:]
    for name in ("scale", "bias"):
        if name in c:
            shape = c[name].type.shape
            if len(shape) > len(normalized) or normalized[len(normalized) - len(shape):] != shape:
                return False
    return True


def _softmax_ok(c) -> bool:
    axes = tuple(int(a) for a in c["xmax"].node.params["axes"])
    return tuple(int(a) for a in c["esum"].node.params["axes"]) == axes and \
        keepdims_agree(c, axes, c["x"].type.shape)


def _bias_along_features(c) -> bool:
    """The bias varies along the free dims of one operand only (the features), not along the
    others (a residual add is not a bias)."""
    if c["dot"].node.params.get("out_sharding") is not None:
        return False
    dot, bias = c["dot"], c["bias"]
    (lc, _), (lb, _) = dot.node.params["dimension_numbers"]
    nb = len(lb)
    nl = c["x"].type.ndim - len(lc) - nb
    out = dot.type.shape
    if c["_root"].type.shape != out or bias.type.ndim > len(out):
        return False
    shape = (1,) * (len(out) - bias.type.ndim) + bias.type.shape  # as numpy broadcasting sees it
    varying = {i for i, d in enumerate(shape) if d != 1}
    lhs_free, rhs_free = set(range(nb, nb + nl)), set(range(nb + nl, len(out)))
    # Along the lhs's free dims only when the lhs is the weight (equinox: weight @ x).
    lhs_is_weight = getattr(c["x"], "role", None) == "param" and c["x"].node is None
    return all(shape[i] == out[i] for i in varying) and (
        varying <= rhs_free or (lhs_is_weight and varying <= lhs_free))


def _bias_along_lhs_features(c) -> bool:
    """For add(transpose(dot(w, x)), bias): the bias varies along w's free dims, which the
    transpose puts last, only."""
    dot, bias, out = c["dot"], c["bias"], c["_root"].type.shape
    if dot.node.params.get("out_sharding") is not None or \
            c["t"].type.shape != out or bias.type.ndim > len(out):
        return False
    (lc, _), (lb, _) = dot.node.params["dimension_numbers"]
    nl = c["w"].type.ndim - len(lc) - len(lb)
    shape = (1,) * (len(out) - bias.type.ndim) + bias.type.shape
    varying = {i for i, d in enumerate(shape) if d != 1}
    return all(shape[i] == out[i] for i in varying) and varying <= set(range(len(out) - nl, len(out)))


def _is_weight(c) -> bool:
    """A dot_general with a parameter (a graph input with role param) as its rhs."""
    w = c["w"]
    return w.node is None and getattr(w, "role", None) == "param" and \
        c["dot"].node.params.get("out_sharding") is None


# --- the rules -----------------------------------------------------------------------------------

x = Var("x")
NEG_INF = float("-inf")


def _square(p):
    return AnyOf(Op("square", p), Op("integer_pow", p, params={"y": 2}))


def _commuted(op, a, b, **kw):
    return Op(op, a, b, commutative=True, **kw)


# softmax: exp(x - max(x)) / sum(exp(x - max(x))); the max may be stop_gradient-ed (jax.nn.softmax)
# and clamped at -inf (its `initial`); reshapes keep the reduced dims.
_xmax = Op("reduce_max", x, name="xmax")
_shift = Maybe("stop_gradient", Kept(Maybe("stop_gradient", Kept(
    AnyOf(Op("max", _xmax, Const(value=NEG_INF)), _xmax)))))
_exp = Op("exp", Op("sub", x, _shift), name="e")
# Low-precision inputs: jax.nn.softmax sums in float32 (converts around the reduce_sum).
_CONVERT = "convert_element_type"
SOFTMAX = Op("div", _exp, Kept(Maybe(_CONVERT, Kept(Op("reduce_sum", Maybe(_CONVERT, _exp), name="esum")))),
             name="out")

# gelu, tanh form: x * (0.5 * (1 + tanh(sqrt(2/π) * (x + 0.044715 x³)))), in jax.nn.gelu's order
# or as 0.5 x (1 + tanh(...)).
_cubic = Op("add", x, Op("mul", Op("integer_pow", x, params={"y": 3}),
                         Scalar("c1", where=_close_to(0.044715))))
_tanh1 = Op("add", Op("tanh", Op("mul", _cubic, Scalar("c2", where=_close_to(math.sqrt(2 / math.pi))))),
            Const(value=1.0))
_half = Scalar("half", where=lambda v: v == 0.5)
GELU_TANH = AnyOf(_commuted("mul", x, Op("mul", _tanh1, _half)),
                  _commuted("mul", Op("mul", x, _half), _tanh1), name="out")
# gelu, erf form: 0.5 x · erfc(-x / √2) (jax.nn.gelu) or 0.5 x (1 + erf(x / √2)).
_inv_sqrt2 = Scalar("c", where=_close_to(1 / math.sqrt(2)))
_sqrt2 = Scalar("c", where=_close_to(math.sqrt(2)))
_erfc = Op("erfc", Op("mul", Op("neg", x), _inv_sqrt2))
_erf1 = Op("add", Op("erf", AnyOf(Op("mul", x, _inv_sqrt2), Op("div", x, _sqrt2))), Const(value=1.0))
GELU_ERF = _commuted("mul", Op("mul", x, _half), AnyOf(_erfc, _erf1), name="out")

SILU = _commuted("mul", x, Op("logistic", x), name="out")

# layer_norm: (x - mean) * rsqrt(var + eps) [* scale] [+ bias], var either mean((x - mean)²)
# (two-pass; equinox guards it with a select on n - ddof > 0) or mean(x²) - mean² clamped at 0
# (flax). Scale may multiply rsqrt first (flax), the product (equinox), or x / sqrt(var + eps).
_mean = Mean(x, name="mean")
_centered = Op("sub", x, Kept(_mean), name="xc")
_two_pass = Mean(_square(Var("xc")))
_guarded = Op("select_n", Scalar(where=lambda v: v is True), Var(), _two_pass)
_fast = Op("sub", Mean(_square(x)), _square(Var("mean")))
_var_raw = AnyOf(_two_pass, _guarded, _fast)
_var = AnyOf(Op("max", _var_raw, Const(value=0.0)), _var_raw)
_var_eps = AnyOf(Op("add", Kept(_var), Scalar("eps")), Kept(Op("add", _var, Scalar("eps"))))
_inv = Kept(Op("rsqrt", _var_eps))
_scale = Broadcast(Var("scale"))
_bias = Broadcast(Var("bias"))
_ln_plain = AnyOf(_commuted("mul", _centered, _inv), Op("div", _centered, Op("sqrt", _var_eps)))
_ln_scaled = AnyOf(_commuted("mul", _centered, _commuted("mul", _inv, _scale)),
                   _commuted("mul", _ln_plain, _scale))
LAYER_NORM_FULL = _commuted("add", AnyOf(_ln_scaled, _ln_plain), _bias, name="out")
LAYER_NORM_SCALED = AnyOf(_ln_scaled, name="out")
LAYER_NORM_PLAIN = AnyOf(_ln_plain, name="out")

# rms_norm: x * rsqrt(mean(x²) + eps) [* scale].
_ms = Mean(_square(x), name="ms")
_ms_eps = AnyOf(Op("add", Kept(_ms), Scalar("eps")), Kept(Op("add", _ms, Scalar("eps"))))
_rms_inv = Kept(Op("rsqrt", _ms_eps))
_rms_plain = AnyOf(_commuted("mul", x, _rms_inv), Op("div", x, Op("sqrt", _ms_eps)))
RMS_NORM_SCALED = AnyOf(_commuted("mul", x, _commuted("mul", _rms_inv, _scale)),
                        _commuted("mul", _rms_plain, _scale), name="out")
RMS_NORM_PLAIN = AnyOf(_rms_plain, name="out")

# linear: dot_general(x, w) + bias, the bias (maybe reshaped) along the output features.
_dot = Op("dot_general", x, Var("w"), name="dot")
LINEAR_BIAS = _commuted("add", _dot, Broadcast(Var("bias")), name="out")
LINEAR_SWAPPED = _commuted("add", Op("transpose", Op("dot_general", Var("w"), x, single_use=True, name="dot"),
                                     name="t"), Broadcast(Var("bias")), name="out")


def _root_rule(name, pattern, replacement, where=None):
    """A rule whose pattern is `pattern` under any root op (an AnyOf root is an Op set)."""
    ops = _root_ops(pattern)
    return Rule(name, _RootedBy(ops, pattern), replacement, where=where)


class _RootedBy(Op):
    """An Op pattern over `ops` that delegates matching to `inner` (for AnyOf-rooted rules)."""

    def __init__(self, ops, inner):
        super().__init__(ops)
        object.__setattr__(self, "inner", inner)

    def match(self, value, captures, why):
        return self.inner.match(value, captures, why)

    def root_guard(self):
        return self.inner.root_guard()


def _root_ops(pattern) -> frozenset:
    if isinstance(pattern, AnyOf):
        return frozenset().union(*(_root_ops(p) for p in pattern.alternatives))
    return pattern.op


# jax.nn.dot_product_attention (vmapped) takes the max before it transposes the scores:
# sub(transpose(y), transpose(max(y))). Taking the max of transpose(y) instead is bit-identical
# (max is exact, whatever the order) and makes it a plain softmax of transpose(y).
_ymax = Op("reduce_max", Var("y"), name="ymax")
_moved_max = Maybe("stop_gradient", Kept(Maybe("stop_gradient", Kept(Op("transpose", AnyOf(
    Op("max", _ymax, Const(value=NEG_INF), name="clamped"), _ymax), name="moved")))))
MAX_OF_TRANSPOSED = Op("sub", Op("transpose", Var("y"), name="t"), _moved_max, name="out")


def _max_after_transpose(b, y, ymax, t, moved, out, clamped=None):
    perm = tuple(int(p) for p in t.node.params["permutation"])
    axes = tuple(int(a) for a in ymax.node.params["axes"])
    new_axes = tuple(sorted(perm.index(a) for a in axes))
    # the reduced max, transposed: its dims are y's free dims in the order perm puts them
    free = [a for a in range(y.type.ndim) if a not in axes]
    if tuple(int(p) for p in moved.node.params["permutation"]) != tuple(
            free.index(a) for a in perm if a in free):
        return None
    m = b.op("reduce_max", t, axes=new_axes, **{k: v for k, v in ymax.node.params.items() if k != "axes"})
    if clamped is not None:
        m = b.op("max", m, clamped.node.inputs[1])
    kept = tuple(1 if i in new_axes else d for i, d in enumerate(t.type.shape))
    shift = out.node.inputs[1]
    m = b.jax(jax.lax.reshape, m, new_sizes=kept) if kept != m.type.shape else m
    if _has_stop_gradient(shift):
        m = b.jax(jax.lax.stop_gradient, m)
    return b.op("sub", t, m) if m.type.shape == shift.type.shape else None


def _has_stop_gradient(value) -> bool:
    while value.node is not None and value.node.op.name in ("reshape", "broadcast_in_dim",
                                                            "stop_gradient", "transpose", "max"):
        if value.node.op.name == "stop_gradient":
            return True
        value = value.node.inputs[0]
    return False


# Phases, in order: a complete form before its parts (layer_norm with its bias before the one
# without, which would take the inner product), layer norms before rms norms (x - mean is an
# rms_norm's input too), linear with a bias before the bare dot.
RULE_PHASES = [
    [Rule("raise_ops/max-after-transpose", MAX_OF_TRANSPOSED, _max_after_transpose)],
    [_root_rule("raise_ops/softmax", SOFTMAX, _softmax, _softmax_ok),
     _root_rule("raise_ops/gelu-tanh", GELU_TANH, _gelu(True)),
     _root_rule("raise_ops/gelu-erf", GELU_ERF, _gelu(False)),
     _root_rule("raise_ops/silu", SILU, _silu),
     _root_rule("raise_ops/linear", LINEAR_BIAS, _linear, _bias_along_features),
     _root_rule("raise_ops/linear-transposed", LINEAR_SWAPPED, _linear_swapped, _bias_along_lhs_features),
     _root_rule("raise_ops/layer-norm", LAYER_NORM_FULL, _layer_norm, _norm_ok)],
    [_root_rule("raise_ops/layer-norm-scale-only", LAYER_NORM_SCALED, _layer_norm, _norm_ok)],
    [_root_rule("raise_ops/layer-norm-plain", LAYER_NORM_PLAIN, _layer_norm, _norm_ok)],
    [_root_rule("raise_ops/rms-norm", RMS_NORM_SCALED, _rms_norm, _norm_ok)],
    [_root_rule("raise_ops/rms-norm-plain", RMS_NORM_PLAIN, _rms_norm, _norm_ok),
     _root_rule("raise_ops/linear-param", _dot, _linear, _is_weight)],
]

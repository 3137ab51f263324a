"""autocast: mixed precision, jmp-style: matmuls and convolutions in bfloat16 with float32 accumulation.

    %0 = dot_general %x, %W : f32[B,N]           %0 = convert_element_type[bf16] %x : bf16[B,K]
    %1 = add %0, %b : f32[B,N]             →     %1 = convert_element_type[bf16] %W : bf16[K,N]   # prep
    %2 = reduce_max %1 : f32[B]                  %2 = dot_general[preferred=f32] %0, %1 : f32[B,N]
                                                 %3 = add %2, %b : f32[B,N]
                                                 %4 = reduce_max %3 : f32[B]

A float32 dot_general or conv_general_dilated gets `compute_dtype` operands and
`preferred_element_type=float32`: products of 8-bit-mantissa values are exact in float32, so the
only rounding added is that of the operands, and the sums accumulate in float32 (what the MXU and
tensor cores do). Every result keeps its type, so the graph's signature and everything around the
cast ops are unchanged. Casting a weight is parameter-only work: fold_params, which runs after,
moves it into the prep graph, so the weights the program carries shrink to half their bytes.

Which ops: `ops` (default: dot_general, conv_general_dilated and graphopt's `linear` and
`attention`); `elementwise=True` adds LOW_ELEMENTWISE (add, sub, mul, neg, max, min, abs, square:
well conditioned, each result converted back to float32); `keep_f32` removes names from the set.
Attention gets bfloat16 q, k, v and computes its logits and softmax in float32 (its reference
implementation promotes them), as cuDNN's fused attention does. A cast composite gets its
reference implementation at the new types as its decomposition (so it lowers as before and cost
still counts its FLOPs); one whose kernel is already chosen (`implementation` set) is left alone.
Never cast (PRECISION_SENSITIVE): reductions and cumulative ops (sums of n terms lose log2(n) more
bits), exp/log/logistic/tanh/erf and the other transcendentals (their error grows with |x|),
div/rsqrt/sqrt/pow, and graphopt's softmax, layer_norm, rms_norm, gelu, silu: they keep float32
whatever the options say. Nodes of other dtypes (float64, already low precision, integer) are left
alone, and so is everything inside a composite's decomposition region (the composite is cast, or
kept, whole). Order: after fold_batchnorm (fold in float32 first) and raise_ops, before
fuse_attention (kernels are chosen for the final dtypes) and fold_params (which moves the weight
casts into the prep).

Numerics: `approximate(2^-5)`, the max error relative to an output's largest magnitude, as
translation validation measures it. Rounding both operands to bfloat16 (u = 2^-8) changes each
product by at most 2u relative, so a dot's error is below 2u·Σ|xᵢwᵢ|; on normal data that is
≈ u·|y|, and a few layers of it stay below 2^-5 (measured: 2e-3 to 1e-2 on the MLPs, CNNs and
transformers of tests/models). Sums that cancel (|y| ≪ Σ|xᵢwᵢ|) can exceed any bound of this
kind: validation reports it, and such a model should keep that op in float32 (`keep_f32`).
float16 (u = 2^-11) is 8× more precise but overflows above 65504: validation then reports changed
±Inf. NaN, ±Inf and −0 survive the cast; float32 values within 0.2% of float32's largest (above
bfloat16's largest finite plus half an ulp, ≈3.396e38) become Inf: the only new Inf.

Training: the lowered graph is differentiable (convert_element_type's gradient converts back), so
autocast serves mixed-precision training too: float32 master weights, bfloat16 matmuls, float32
gradients. bfloat16 has float32's exponent range, so no loss scaling is needed; with float16 it
is, and this pass does not add it. Speed: bfloat16 matmuls are emulated on CPUs; the gain is on
GPUs and TPUs (and in the weight bytes anywhere). Weights read inside a scan or while body (stacked
layers) are cast there, per iteration: fold_params does not reach into regions.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> from graphopt.pipeline import run_pipeline
    >>> g = graphopt.trace(lambda w, x: x @ w, jnp.ones((4, 2)), jnp.ones((3, 4)), params_argnums=0)
    >>> g = run_pipeline(g, ["autocast", "fold_params"]).graph
    >>> [(a.path, str(a.type)) for a in g.params()]
    [('w:convert_element_type', 'bf16[4,2]')]
    >>> [n.op.name for n in g.nodes], str(g.outputs[0].type)
    (['convert_element_type', 'dot_general'], 'f32[3,2]')
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from graphopt.errors import GraphoptError
from graphopt.pattern import Op, Rule, Var, rewrite
from graphopt.pipeline import approximate, register_pass

BOUND = 2.0 ** -5
F32 = np.dtype(np.float32)
COMPUTE_DTYPES = {"bfloat16": np.dtype(jnp.bfloat16), "float16": np.dtype(np.float16)}
MATMULS = frozenset({"dot_general", "conv_general_dilated"})
COMPOSITES = frozenset({"linear", "attention"})
LOW_ELEMENTWISE = frozenset({"add", "sub", "mul", "neg", "max", "min", "abs", "square"})
DEFAULT_OPS = ("dot_general", "conv_general_dilated", "linear", "attention")
PRECISION_SENSITIVE = frozenset("""
reduce_sum reduce_max reduce_min reduce_prod reduce_precision argmax argmin cumsum cumprod cummax
cummin cumlogsumexp reduce_window_sum exp exp2 log log1p expm1 logistic tanh erf erfc erf_inv
lgamma digamma sin cos tan sinh cosh asin acos atan atan2 div rsqrt sqrt cbrt pow integer_pow
softmax layer_norm rms_norm gelu silu
""".split())


@register_pass("autocast", contract=approximate(BOUND))
def autocast(graph, ctx, compute_dtype: str = "bfloat16", ops=DEFAULT_OPS, elementwise: bool = False,
             keep_f32=()):
    """Run float32 matmuls/convolutions (and, optionally, cheap elementwise ops) in `compute_dtype`.

    >>> import graphopt, jax.numpy as jnp
    >>> from graphopt.pipeline import run_pipeline
    >>> g = graphopt.trace(lambda a, b: jnp.exp(a @ b), jnp.ones((2, 3)), jnp.ones((3, 2)))
    >>> g = run_pipeline(g, ["autocast(compute_dtype='float16')"]).graph
    >>> [(n.op.name, str(n.outputs[0].type)) for n in g.nodes]  # doctest: +NORMALIZE_WHITESPACE
    [('convert_element_type', 'f16[2,3]'), ('convert_element_type', 'f16[3,2]'),
     ('dot_general', 'f32[2,2]'), ('exp', 'f32[2,2]')]
    """
    low = _low_precision_ops(ops, elementwise, keep_f32)
    if compute_dtype not in COMPUTE_DTYPES:
        raise GraphoptError(f"autocast: compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, "
                            f"got {compute_dtype!r}")
    _OPTIONS.update(dtype=COMPUTE_DTYPES[compute_dtype], ops=low)
    try:
        fired = rewrite(graph, RULES)
    finally:
        _OPTIONS.clear()
    ctx.count(fired)
    cast = sum(fired.values())
    if cast:
        ctx.note(f"{cast} op(s) run in {compute_dtype} (float32 accumulation for matmuls)")
    return graph


def _low_precision_ops(ops, elementwise: bool, keep_f32) -> frozenset:
    ops = frozenset([ops] if isinstance(ops, str) else ops)
    keep = frozenset([keep_f32] if isinstance(keep_f32, str) else keep_f32)
    sensitive = sorted(ops & PRECISION_SENSITIVE)
    if sensitive:
        raise GraphoptError(f"autocast: {', '.join(sensitive)} stay float32 (precision-sensitive: "
                            "reductions, transcendentals, norms and softmax lose too many bits in "
                            "16-bit floats); remove them from `ops`")
    known = MATMULS | COMPOSITES | LOW_ELEMENTWISE
    unknown = sorted(ops - known)
    if unknown:
        raise GraphoptError(f"autocast: cannot run {', '.join(unknown)} in low precision; `ops` "
                            f"takes names among {', '.join(sorted(known))}")
    return (ops | (LOW_ELEMENTWISE if elementwise else frozenset())) - keep


# The options of the running pass (the rules below are module-level, as rule coverage wants).
_OPTIONS: dict = {}


# --- conditions ----------------------------------------------------------------------------------

def _is_float(value) -> bool:
    return jnp.issubdtype(value.type.dtype, jnp.floating)


def _all_f32(c) -> bool:
    """The op is enabled, its float operands and its outputs are float32 (others: left alone)."""
    node = c["out"].node
    if node.op.name not in _OPTIONS.get("ops", ()) or _in_decomposition(node):
        return False
    floats = [v for v in node.inputs if _is_float(v)]
    return bool(floats) and all(v.type.dtype == F32 for v in floats) and \
        all(v.type.dtype == F32 for v in node.outputs)


def _in_decomposition(node) -> bool:
    """Inside a composite's "decomposition" region: the composite is cast whole (attention,
    linear) or kept float32 whole (softmax, norms), never piecemeal."""
    parent = node.graph.parent
    return parent is not None and "decomposition" in getattr(parent.op, "region_names", ())


def _composite_ok(c) -> bool:
    """A composite whose kernel is not chosen yet: a kernel picked for float32 inputs (by
    fuse_attention, which runs after this pass) may not support bfloat16 (XLA:CPU's does not)."""
    return _all_f32(c) and c["out"].node.params.get("implementation") is None


def _matmul_ok(c) -> bool:
    params = c["out"].node.params
    return _all_f32(c) and params.get("preferred_element_type") in (None, F32)


# --- replacements --------------------------------------------------------------------------------

def _cast(b, value, dtype):
    """`value` in `dtype`: a constant is converted now (closure weights halve too), a float32
    value that was converted from `dtype` is that value, anything else gets a convert node."""
    if value.type.dtype == dtype or not _is_float(value):
        return value
    node = value.node
    if node is not None and node.op.name == "constant":
        return b.const(np.asarray(node.params["value"]).astype(dtype), dtype=dtype)
    if node is not None and node.op.name == "convert_element_type" and \
            node.inputs[0].type.dtype == dtype:
        return node.inputs[0]  # exact: float32 holds every value of the 16-bit dtype
    return b.jax(lambda v: jax.lax.convert_element_type(v, dtype), value)


def _typed(new, out):
    """`new` if it has `out`'s type, else None (the rule declines)."""
    return new if new.type == out.type else None


def _matmul(b, x, w, out):
    low = _OPTIONS["dtype"]
    node = out.node
    params = {**node.params, "preferred_element_type": F32}
    return _typed(b.op(node.op, _cast(b, x, low), _cast(b, w, low), **params), out)


def _linear(b, out):
    """linear(x, w, [bias]) → linear(low x, low w, [bias], preferred f32): the bias adds in f32.
    The old decomposition (float32 primitives) no longer fits; the new one is the reference."""
    node = out.node
    if node.params.get("preferred_element_type") not in (None, F32):
        return None
    low = _OPTIONS["dtype"]
    x, w, *bias = node.inputs
    params = {**node.params, "preferred_element_type": F32}
    return _typed(_composite(b, node.op, [_cast(b, x, low), _cast(b, w, low), *bias], params), out)


def _attention(b, out):
    """attention(q, k, v, ...) in low precision; its logits and softmax promote to float32."""
    node = out.node
    low = _OPTIONS["dtype"]
    q, k, v, *extra = node.inputs
    inputs = [_cast(b, q, low), _cast(b, k, low), _cast(b, v, low), *extra]
    return _typed(_cast(b, _composite(b, node.op, inputs, node.params), F32), out)


def _composite(b, op, inputs, params):
    """A composite node whose decomposition is its reference implementation at the new types:
    it lowers the same as without one, and cost counts its FLOPs."""
    from graphopt.nn_ops import add_composite, decomposition

    region = decomposition(lambda *xs: op.impl(*xs, regions=[], **params), [v.type for v in inputs])
    return add_composite(b, op, inputs, params, region)


def _elementwise(b, out):
    node = out.node
    low = _OPTIONS["dtype"]
    result = b.op(node.op, *[_cast(b, v, low) for v in node.inputs], **node.params)
    return _typed(_cast(b, result, F32), out)


# --- the rules -----------------------------------------------------------------------------------

RULES = [
    Rule("autocast/matmul", Op(MATMULS, Var("x"), Var("w"), name="out"), _matmul, where=_matmul_ok),
    Rule("autocast/linear", Op("linear", name="out"), _linear, where=_composite_ok),
    Rule("autocast/attention", Op("attention", name="out"), _attention, where=_composite_ok),
    Rule("autocast/elementwise", Op(LOW_ELEMENTWISE, name="out"), _elementwise, where=_all_f32),
]

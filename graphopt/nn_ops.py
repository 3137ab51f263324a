"""graphopt's semantic ops: attention, softmax, layer_norm, rms_norm, gelu, silu, linear.

Each is a *composite* (`CompositeOp`): what it computes is defined by a reference implementation in
public JAX, and a node may also hold one region, "decomposition": the exact primitive sub-graph it
was recognized from (its inputs are the node's inputs, same types and order; its outputs the node's
outputs). Every op has the param `implementation` (None or a kernel name). The lowering runs

    implementation None, with a decomposition  -> the decomposition (raising an op is bit-exact)
    implementation None, without one           -> the reference implementation below
    implementation "name"                      -> the kernel "name" registered for this backend in
                                                  graphopt.implementations (an error if there is none)

so a pass that recognizes ops (raise_ops) changes no result, and a pass that picks kernels
(fuse_attention) changes them only by the kernel's rounding.

Build nodes with the `*_node` helpers: they take a `Builder` (or a `Graph`, to append), fill the
derived params (`has_bias`, default `scale`, canonical `axes`) and take an optional decomposition
region, a Graph built by the caller (`decomposition(fn, in_types)` traces one from a JAX function).

Example:
    >>> import jax, numpy as np
    >>> from graphopt.ir import Graph
    >>> from graphopt.types import TensorType
    >>> g = Graph()
    >>> x = g.add_input(TensorType((2, 8), np.float32), path="x")
    >>> region = decomposition(lambda x: jax.nn.softmax(x, axis=-1), [x.type])
    >>> y = softmax_node(g, x, axes=-1, decomposition=region)
    >>> g.set_outputs([y]); g.verify()
    >>> y.node.op.name, y.node.params, len(y.node.regions[0])
    ('softmax', {'axes': (1,), 'implementation': None}, 10)
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from graphopt.builder import Builder
from graphopt.ops import OPS, OpDef, register, signature_key
from graphopt.types import TensorType


class CompositeOp(OpDef):
    """A graphopt op with a reference implementation and an optional "decomposition" region.

    `check(in_types, params) -> list[TensorType]` validates inputs and params (TypeError naming
    what is wrong) and gives the output types; the region, when present, must fit them exactly.
    `param_names` are the op's params; every composite also has `implementation`.
    """

    def __init__(self, name: str, check: Callable, impl: Callable, param_names: Sequence[str], **outputs):
        super().__init__(name, check, impl, region_names=("decomposition",), **outputs)
        self.param_names = frozenset(param_names) | {"implementation"}
        self._signatures: dict = {}

    def signature(self, in_types, params, regions):
        # raise_ops builds the same op on the same types once per layer, and the shape rules
        # (dtype promotion through jnp) cost tens of µs: memoized, for nodes built without their
        # region (it is checked when given) and keyable params.
        key = None if regions else signature_key(in_types, params)
        if key is None:
            return super().signature(in_types, params, regions)
        hit = self._signatures.get(key)
        if hit is None:
            if len(self._signatures) > 4096:
                self._signatures.clear()
            hit = self._signatures[key] = tuple(super().signature(in_types, params, regions))
        return hit

    def infer(self, in_types, params, regions):
        missing, unknown = self.param_names - set(params), set(params) - self.param_names
        if missing or unknown:
            raise TypeError(f"{self.name}: params must be {sorted(self.param_names)}; "
                            f"missing {sorted(missing)}, unknown {sorted(unknown)}")
        implementation = params["implementation"]
        if implementation is not None and (not isinstance(implementation, str) or not implementation):
            raise TypeError(f"{self.name}: implementation must be None or a kernel name, got {implementation!r}")
        outs = self._infer(list(in_types), params)
        if len(regions) > 1:
            raise TypeError(f"{self.name} holds at most one region (its decomposition), got {len(regions)}")
        for region in regions:
            _expect(f"{self.name} decomposition inputs", [a.type for a in region.inputs], in_types)
            _expect(f"{self.name} decomposition outputs", [v.type for v in region.outputs], outs)
        return outs


def _expect(what, got, want):
    if [t.strong() for t in got] != [t.strong() for t in want]:
        raise TypeError(f"{what}: expected ({', '.join(map(str, want))}), got ({', '.join(map(str, got))})")


def _float(op: str, what: str, t: TensorType) -> None:
    if not jnp.issubdtype(t.dtype, jnp.floating):
        raise TypeError(f"{op}: {what} must be a float array, got {t}")


def _count(op: str, in_types, names: list[str]) -> None:
    if len(in_types) != len(names):
        raise TypeError(f"{op} takes {len(names)} inputs ({', '.join(names)}) with these params, "
                        f"got {len(in_types)}")


def _axes(op: str, axes, rank: int, trailing: bool = False) -> tuple[int, ...]:
    if not isinstance(axes, tuple) or not axes or any(type(a) is not int for a in axes):
        raise TypeError(f"{op}: axes must be a non-empty tuple of ints, got {axes!r}")
    if list(axes) != sorted(set(axes)) or axes[0] < 0 or axes[-1] >= rank:
        raise TypeError(f"{op}: axes {axes} must be sorted, distinct and in [0, {rank}) "
                        "(the *_node helpers canonicalize negative axes)")
    if trailing and axes != tuple(range(rank - len(axes), rank)):
        raise TypeError(f"{op}: axes {axes} must be the trailing axes of a rank-{rank} input")
    return axes


def canonical_axes(axes, rank: int) -> tuple[int, ...]:
    """Sorted, distinct, non-negative axes (an out-of-range axis is kept, for the rule to reject).

    >>> canonical_axes(-1, 3), canonical_axes((2, 0, -3), 3)
    ((2,), (0, 2))
    """
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(sorted({a % rank if -rank <= a < rank else a for a in axes}))


def _broadcastable(shape, target) -> bool:
    return len(shape) <= len(target) and all(
        d in (1, t) for d, t in zip(reversed(shape), reversed(target)))


def _promoted(*types: TensorType) -> np.dtype:
    return np.dtype(jnp.result_type(*[t.dtype for t in types]))


def _stats_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


# --- attention -----------------------------------------------------------------------------------

ATTENTION_PARAMS = ("scale", "is_causal", "has_bias", "has_mask", "mask_value", "layout")


def attention_dims(t: TensorType, layout: str) -> tuple:
    """(B or None, T, N, H) of a q/k/v type in `layout` ("BTNH" or "BNTH"; rank 3 drops B)."""
    shape = t.shape if t.ndim == 4 else (None, *t.shape)
    b, x, y, h = shape
    return (b, x, y, h) if layout == "BTNH" else (b, y, x, h)


def _attention_check(in_types, p):
    op, layout = "attention", p["layout"]
    if layout not in ("BTNH", "BNTH"):
        raise TypeError(f"attention: layout must be 'BTNH' or 'BNTH', got {layout!r}")
    for flag in ("is_causal", "has_bias", "has_mask"):
        if type(p[flag]) is not bool:
            raise TypeError(f"attention: {flag} must be a bool, got {p[flag]!r}")
    if not isinstance(p["scale"], float):
        raise TypeError(f"attention: scale must be a float, got {p['scale']!r}")
    if p["mask_value"] is not None and not isinstance(p["mask_value"], float):
        raise TypeError(f"attention: mask_value must be None or a float, got {p['mask_value']!r}")
    _count(op, in_types, ["q", "k", "v"] + ["bias"] * p["has_bias"] + ["mask"] * p["has_mask"])
    q, k, v = in_types[:3]
    if q.ndim not in (3, 4) or k.ndim != q.ndim or v.ndim != q.ndim:
        raise TypeError(f"attention: q, k, v must all be rank 4 ([B,T,N,H] in {layout} order) or "
                        f"all rank 3 (no batch), got {q}, {k}, {v}")
    for name, t in zip("qkv", (q, k, v)):
        _float(op, name, t)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"attention: q, k, v must have one dtype, got {q}, {k}, {v}")
    (b, t, n, h), (bk, s, nk, hk), (bv, sv, nv, hv) = (attention_dims(x, layout) for x in (q, k, v))
    if b != bk or b != bv:
        raise TypeError(f"attention: batch sizes differ: q {q}, k {k}, v {v} ({layout})")
    if (s, nk) != (sv, nv):
        raise TypeError(f"attention: k {k} and v {v} must agree on length and heads ({layout})")
    if h != hk:
        raise TypeError(f"attention: q {q} and k {k} must have the same head dim ({layout})")
    if nk == 0 or n % nk:
        raise TypeError(f"attention: query heads ({n}) must be a multiple of kv heads ({nk})")
    logits = (n, t, s) if b is None else (b, n, t, s)
    extra = in_types[3:]
    if p["has_bias"]:
        _float(op, "bias", extra[0])
        if not _broadcastable(extra[0].shape, logits):
            raise TypeError(f"attention: bias {extra[0]} does not broadcast to the scores {logits}")
    if p["has_mask"]:
        mask = extra[-1]
        if mask.dtype != np.bool_ or not _broadcastable(mask.shape, logits):
            raise TypeError(f"attention: mask must be bool and broadcast to the scores {logits}, got {mask}")
    return [TensorType((*q.shape[:-1], hv), q.dtype)]


def _to_btnh(x, layout):
    return x if layout == "BTNH" else jnp.swapaxes(x, -3, -2)


def masked_fill(dtype):
    """Fill for masked scores when mask_value is None: jax.nn.dot_product_attention's."""
    return -0.7 * min(float(jnp.finfo(dtype).max), float(jnp.finfo(jnp.float32).max))


def _attention_impl(q, k, v, *extra, regions, scale, is_causal, has_bias, has_mask, mask_value,
                    layout, implementation):
    bias = extra[0] if has_bias else None
    mask = extra[-1] if has_mask else None
    rank3 = q.ndim == 3
    q, k, v = (_to_btnh(x, layout)[None] if rank3 else _to_btnh(x, layout) for x in (q, k, v))
    (B, T, N, H), (S, K, Hv) = q.shape, (k.shape[1], k.shape[2], v.shape[3])
    G = N // K
    logits_dtype = _stats_dtype(q.dtype)
    # Query head n reads kv head n // G: group the heads instead of repeating k and v.
    logits = jnp.einsum("btkgh,bskh->bkgts", q.reshape(B, T, K, G, H), k,
                        preferred_element_type=logits_dtype).reshape(B, N, T, S)
    logits = logits * jnp.asarray(scale, logits_dtype)
    if bias is not None:
        logits = (logits + bias).astype(logits_dtype)
    keep = None if mask is None else mask
    if is_causal:
        causal = jnp.tril(jnp.ones((T, S), bool))
        keep = causal if keep is None else jnp.logical_and(keep, causal)
    if keep is not None:
        fill = masked_fill(logits_dtype) if mask_value is None else mask_value
        logits = jnp.where(keep, logits, jnp.asarray(fill, logits_dtype))
    probs = jax.nn.softmax(logits.astype(jnp.promote_types(logits_dtype, jnp.float32)), axis=-1)
    probs = probs.astype(v.dtype).reshape(B, K, G, T, S)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(B, T, N, Hv)
    out = _to_btnh(out, layout)
    return [out[0] if rank3 else out]


ATTENTION = register(CompositeOp("attention", _attention_check, _attention_impl, ATTENTION_PARAMS))


# --- softmax, gelu, silu -------------------------------------------------------------------------

def _softmax_check(in_types, p):
    _count("softmax", in_types, ["x"])
    _float("softmax", "x", in_types[0])
    _axes("softmax", p["axes"], in_types[0].ndim)
    return [in_types[0].strong()]


def _softmax_impl(x, *, regions, axes, implementation):
    return [jax.nn.softmax(x, axis=axes)]


SOFTMAX = register(CompositeOp("softmax", _softmax_check, _softmax_impl, ("axes",)))


def _unary_check(name, extra_check=None):
    def check(in_types, p):
        _count(name, in_types, ["x"])
        _float(name, "x", in_types[0])
        if extra_check:
            extra_check(p)
        return [in_types[0].strong()]
    return check


def _gelu_params(p):
    if type(p["approximate"]) is not bool:
        raise TypeError(f"gelu: approximate must be a bool, got {p['approximate']!r}")


def _gelu_impl(x, *, regions, approximate, implementation):
    return [jax.nn.gelu(x, approximate=approximate)]


def _silu_impl(x, *, regions, implementation):
    return [jax.nn.silu(x)]


GELU = register(CompositeOp("gelu", _unary_check("gelu", _gelu_params), _gelu_impl, ("approximate",)))
SILU = register(CompositeOp("silu", _unary_check("silu"), _silu_impl, ()))


# --- layer_norm, rms_norm ------------------------------------------------------------------------

def _norm_check(name, optional):
    def check(in_types, p):
        flags = [p[f"has_{o}"] for o in optional]
        if any(type(f) is not bool for f in flags):
            raise TypeError(f"{name}: {', '.join(f'has_{o}' for o in optional)} must be bools")
        if not isinstance(p["epsilon"], float) or not p["epsilon"] >= 0:
            raise TypeError(f"{name}: epsilon must be a float >= 0, got {p['epsilon']!r}")
        _count(name, in_types, ["x"] + [o for o, f in zip(optional, flags) if f])
        x = in_types[0]
        _float(name, "x", x)
        axes = _axes(name, p["axes"], x.ndim, trailing=True)
        normalized = x.shape[axes[0]:]
        for what, t in zip([o for o, f in zip(optional, flags) if f], in_types[1:]):
            _float(name, what, t)
            if not _broadcastable(t.shape, normalized):
                raise TypeError(f"{name}: {what} {t} does not broadcast to the normalized axes {normalized}")
        return [TensorType(x.shape, _promoted(*in_types))]
    return check


def _normalize(x, scale, bias, out_dtype, centered, axes, epsilon):
    xf = x.astype(_stats_dtype(x.dtype))
    if centered:
        xf = xf - jnp.mean(xf, axes, keepdims=True)
    y = xf * lax.rsqrt(jnp.mean(jnp.square(xf), axes, keepdims=True) + jnp.asarray(epsilon, xf.dtype))
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return [y.astype(out_dtype)]


def _layer_norm_impl(x, *rest, regions, axes, epsilon, has_scale, has_bias, implementation):
    rest = list(rest)
    scale = rest.pop(0) if has_scale else None
    bias = rest.pop(0) if has_bias else None
    out = jnp.result_type(x, *rest, *(t for t in (scale, bias) if t is not None))
    return _normalize(x, scale, bias, out, True, axes, epsilon)


def _rms_norm_impl(x, *rest, regions, axes, epsilon, has_scale, implementation):
    scale = rest[0] if has_scale else None
    return _normalize(x, scale, None, jnp.result_type(x, *rest), False, axes, epsilon)


LAYER_NORM = register(CompositeOp("layer_norm", _norm_check("layer_norm", ("scale", "bias")),
                                  _layer_norm_impl, ("axes", "epsilon", "has_scale", "has_bias")))
RMS_NORM = register(CompositeOp("rms_norm", _norm_check("rms_norm", ("scale",)), _rms_norm_impl,
                                ("axes", "epsilon", "has_scale")))


# --- linear --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def _dot_type(x: TensorType, w: TensorType, dimension_numbers, precision, preferred_element_type):
    out = jax.eval_shape(functools.partial(lax.dot_general, dimension_numbers=dimension_numbers,
                                           precision=precision,
                                           preferred_element_type=preferred_element_type),
                         x.aval(), w.aval())
    return TensorType(out.shape, out.dtype)


def _linear_check(in_types, p):
    if type(p["has_bias"]) is not bool:
        raise TypeError(f"linear: has_bias must be a bool, got {p['has_bias']!r}")
    _count("linear", in_types, ["x", "w"] + ["b"] * p["has_bias"])
    try:
        out = _dot_type(in_types[0].strong(), in_types[1].strong(), p["dimension_numbers"],
                        p["precision"], p["preferred_element_type"])
    except TypeError as err:  # unhashable params, or lax's own complaint
        raise TypeError(f"linear: dot_general rejects {in_types[0]}, {in_types[1]} with "
                        f"dimension_numbers={p['dimension_numbers']!r}: {err}") from None
    if p["has_bias"]:
        b = in_types[2]
        if not _broadcastable(b.shape, out.shape):
            raise TypeError(f"linear: bias {b} does not broadcast to the output {out}")
        out = TensorType(out.shape, _promoted(out, b))
    return [out]


def _linear_impl(x, w, *b, regions, dimension_numbers, precision, preferred_element_type, has_bias,
                 implementation):
    out = lax.dot_general(x, w, dimension_numbers, precision=precision,
                          preferred_element_type=preferred_element_type)
    return [out + b[0] if has_bias else out]


LINEAR = register(CompositeOp("linear", _linear_check, _linear_impl,
                              ("dimension_numbers", "precision", "preferred_element_type", "has_bias")))

COMPOSITE_OPS = {op.name: op for op in (ATTENTION, SOFTMAX, GELU, SILU, LAYER_NORM, RMS_NORM, LINEAR)}


# --- building nodes ------------------------------------------------------------------------------

def add_composite(where, op: CompositeOp | str, inputs, params: dict, decomposition=None):
    """Add a node of composite `op` at a Builder's insertion point (or the end of a Graph), holding
    `decomposition` (a Graph whose inputs and outputs match the node's) if given; its output Value.
    The node keeps the Builder's provenance (module path, source line, made_by)."""
    return composite_node(where, op, inputs, params, decomposition).output


def composite_node(where, op: CompositeOp | str, inputs, params: dict, decomposition=None):
    """As `add_composite`, but the Node (for ops with several outputs)."""
    op = OPS[op] if isinstance(op, str) else op
    graph, before, provenance = ((where.graph, where.before, where.provenance)
                                 if isinstance(where, Builder) else (where, None, None))
    regions = [] if decomposition is None else [decomposition]
    return graph.add_node(op, inputs, params, regions, provenance, before=before)


def attention_node(where, q, k, v, bias=None, mask=None, *, scale: float | None = None,
                   is_causal: bool = False, mask_value: float | None = None, layout: str = "BTNH",
                   implementation: str | None = None, decomposition=None):
    """An attention node; `scale` defaults to 1/sqrt(head dim). mask_value: the fill the source used
    for masked scores, as its score dtype held it (-1e9 in f16 scores is -inf); None: as
    jax.nn.dot_product_attention (`masked_fill`: a fully masked row averages v)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.type.shape[-1])
    params = dict(scale=float(scale), is_causal=bool(is_causal), has_bias=bias is not None,
                  has_mask=mask is not None, layout=layout, implementation=implementation,
                  mask_value=None if mask_value is None else float(mask_value))
    inputs = [q, k, v] + [x for x in (bias, mask) if x is not None]
    return add_composite(where, ATTENTION, inputs, params, decomposition)


def softmax_node(where, x, axes=-1, *, implementation=None, decomposition=None):
    """softmax over `axes` (an int or ints, negative allowed)."""
    params = dict(axes=canonical_axes(axes, x.type.ndim), implementation=implementation)
    return add_composite(where, SOFTMAX, [x], params, decomposition)


def gelu_node(where, x, *, approximate: bool = True, implementation=None, decomposition=None):
    """gelu: the tanh form if `approximate` (jax.nn.gelu's default), else the erf form."""
    params = dict(approximate=bool(approximate), implementation=implementation)
    return add_composite(where, GELU, [x], params, decomposition)


def silu_node(where, x, *, implementation=None, decomposition=None):
    """silu (swish): x * sigmoid(x)."""
    return add_composite(where, SILU, [x], dict(implementation=implementation), decomposition)


def layer_norm_node(where, x, scale=None, bias=None, *, axes=-1, epsilon: float = 1e-6,
                    implementation=None, decomposition=None):
    """layer_norm over trailing `axes`; scale and bias broadcast against those axes."""
    params = dict(axes=canonical_axes(axes, x.type.ndim), epsilon=float(epsilon),
                  has_scale=scale is not None, has_bias=bias is not None, implementation=implementation)
    inputs = [x] + [t for t in (scale, bias) if t is not None]
    return add_composite(where, LAYER_NORM, inputs, params, decomposition)


def rms_norm_node(where, x, scale=None, *, axes=-1, epsilon: float = 1e-6, implementation=None,
                  decomposition=None):
    """rms_norm over trailing `axes`: x / sqrt(mean(x²) + epsilon) * scale."""
    params = dict(axes=canonical_axes(axes, x.type.ndim), epsilon=float(epsilon),
                  has_scale=scale is not None, implementation=implementation)
    return add_composite(where, RMS_NORM, [x] + ([scale] if scale is not None else []), params,
                         decomposition)


def linear_node(where, x, w, bias=None, *, dimension_numbers=None, precision=None,
                preferred_element_type=None, implementation=None, decomposition=None):
    """dot_general(x, w) + bias; dimension_numbers default: x's last axis with w's first."""
    if dimension_numbers is None:
        dimension_numbers = (((x.type.ndim - 1,), (0,)), ((), ()))
    (lc, rc), (lb, rb) = ([tuple(int(d) for d in dims) for dims in pair] for pair in dimension_numbers)
    params = dict(dimension_numbers=((lc, rc), (lb, rb)),
                  precision=precision, preferred_element_type=preferred_element_type,
                  has_bias=bias is not None, implementation=implementation)
    return add_composite(where, LINEAR, [x, w] + ([bias] if bias is not None else []), params,
                         decomposition)


def decomposition(fn: Callable, in_types: Sequence[TensorType], **static):
    """A region Graph computing `fn(*inputs, **static)` (traced with JAX) on inputs of `in_types`."""
    from graphopt.ir import Graph, Provenance
    from graphopt.trace import inline_function

    graph = Graph("decomposition")
    inputs = [graph.add_input(t) for t in in_types]
    graph.set_outputs(inline_function(graph, fn, inputs, static, Provenance()))
    return graph

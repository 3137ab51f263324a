"""graphopt.nn_ops: shape rules, reference implementations against plain JAX, gradients, and the
decomposition region (lowered bit-exactly when present)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt import nn_ops
from graphopt.errors import GraphError
from graphopt.ir import Graph
from graphopt.testing import assert_equivalent, tolerance
from graphopt.types import TensorType

DTYPES = [np.float32, jnp.bfloat16, np.float16]


def one_node(build, *arrays):
    """jit(lower(graph)) of a graph with one input per array and the node `build(graph, *inputs)`."""
    g = Graph()
    inputs = [g.add_input(TensorType(a.shape, a.dtype)) for a in arrays]
    g.set_outputs([build(g, *inputs)])
    g.verify()
    return jax.jit(lambda *xs: graphopt.lower(g).flat(*xs)[0]), g


def rand(shape, dtype=np.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), np.float32).astype(dtype)


def tol(dtype, factor=4.0):
    rtol, atol = tolerance(dtype)
    return dict(rtol=rtol * factor, atol=atol * factor)


# --- shape rules ---------------------------------------------------------------------------------

def types(*specs):
    return [TensorType(shape, dtype) for shape, dtype in specs]


def attention_params(**overrides):
    p = dict(scale=0.5, is_causal=False, has_bias=False, has_mask=False, mask_value=None,
             layout="BTNH", implementation=None)
    return {**p, **overrides}


F32 = np.float32


@pytest.mark.parametrize("in_types, params, message", [
    (types(((2, 4, 6, 8), F32), ((2, 5, 4, 8), F32), ((2, 5, 4, 8), F32)), {},
     r"query heads \(6\) must be a multiple of kv heads \(4\)"),
    (types(((2, 4, 4, 8), F32), ((2, 5, 4, 8), np.float16), ((2, 5, 4, 8), F32)), {}, "one dtype"),
    (types(((2, 4, 4, 8), F32), ((2, 5, 4, 7), F32), ((2, 5, 4, 8), F32)), {}, "same head dim"),
    (types(((2, 4, 4, 8), F32), ((3, 5, 4, 8), F32), ((3, 5, 4, 8), F32)), {}, "batch sizes differ"),
    (types(((2, 4, 4, 8), F32), ((2, 5, 4, 8), F32), ((2, 6, 4, 8), F32)), {}, "agree on length"),
    (types(((4, 4, 8), F32), ((2, 5, 4, 8), F32), ((2, 5, 4, 8), F32)), {}, "all rank 3"),
    (types(((2, 4, 4, 8), np.int32), ((2, 5, 4, 8), np.int32), ((2, 5, 4, 8), np.int32)), {},
     "q must be a float"),
    (types(((2, 4, 4, 8), F32), ((2, 5, 4, 8), F32), ((2, 5, 4, 8), F32), ((2, 4, 4, 5), np.int32)),
     {"has_mask": True}, "mask must be bool"),
    (types(((2, 4, 4, 8), F32), ((2, 5, 4, 8), F32), ((2, 5, 4, 8), F32), ((3, 4, 5), F32)),
     {"has_bias": True}, r"bias f32\[3,4,5\] does not broadcast to the scores \(2, 4, 4, 5\)"),
    (types(((2, 4, 4, 8), F32), ((2, 5, 4, 8), F32), ((2, 5, 4, 8), F32)), {"has_bias": True},
     r"attention takes 4 inputs \(q, k, v, bias\)"),
    (types(((2, 4, 4, 8), F32), ((2, 5, 4, 8), F32), ((2, 5, 4, 8), F32)), {"layout": "TBNH"}, "layout"),
    (types(((2, 4, 4, 8), F32), ((2, 5, 4, 8), F32), ((2, 5, 4, 8), F32)), {"scale": 1}, "scale must be a float"),
])
def test_attention_shape_rule_rejects(in_types, params, message):
    with pytest.raises(TypeError, match=message):
        nn_ops.ATTENTION.infer(in_types, attention_params(**params), [])


def test_attention_shape_rule_accepts_layouts_gqa_and_rank3():
    bnth = types(((2, 6, 4, 8), F32), ((2, 3, 5, 8), F32), ((2, 3, 5, 16), F32), ((6, 1, 5), F32))
    out = nn_ops.ATTENTION.infer(bnth, attention_params(layout="BNTH", has_bias=True), [])
    assert out == [TensorType((2, 6, 4, 16), F32)]
    rank3 = types(((4, 6, 8), F32), ((5, 2, 8), F32), ((5, 2, 8), F32), ((4, 5), np.bool_))
    assert nn_ops.ATTENTION.infer(rank3, attention_params(has_mask=True), []) == [TensorType((4, 6, 8), F32)]


@pytest.mark.parametrize("op, in_types, params, message", [
    (nn_ops.SOFTMAX, types(((2, 3), F32)), {"axes": (-1,)}, "sorted, distinct and in"),
    (nn_ops.SOFTMAX, types(((2, 3), F32)), {"axes": 1}, "non-empty tuple"),
    (nn_ops.SOFTMAX, types(((2, 3), np.int32)), {"axes": (1,)}, "x must be a float"),
    (nn_ops.LAYER_NORM, types(((2, 3), F32)),
     {"axes": (0,), "epsilon": 1e-6, "has_scale": False, "has_bias": False}, "must be the trailing axes"),
    (nn_ops.LAYER_NORM, types(((2, 3), F32), ((2,), F32)),
     {"axes": (1,), "epsilon": 1e-6, "has_scale": True, "has_bias": False}, r"scale f32\[2\] does not broadcast"),
    (nn_ops.RMS_NORM, types(((2, 3), F32)), {"axes": (1,), "epsilon": -1.0, "has_scale": False}, "epsilon"),
    (nn_ops.GELU, types(((2, 3), F32)), {"approximate": 1}, "approximate must be a bool"),
    (nn_ops.SILU, types(((2, 3), F32), ((2, 3), F32)), {}, r"silu takes 1 inputs \(x\)"),
    (nn_ops.LINEAR, types(((2, 3), F32), ((4, 5), F32)),
     {"dimension_numbers": (((1,), (0,)), ((), ())), "precision": None, "preferred_element_type": None,
      "has_bias": False}, "dot_general rejects"),
    (nn_ops.LINEAR, types(((2, 3), F32), ((3, 5), F32), ((3,), F32)),
     {"dimension_numbers": (((1,), (0,)), ((), ())), "precision": None, "preferred_element_type": None,
      "has_bias": True}, r"bias f32\[3\] does not broadcast to the output"),
    (nn_ops.SILU, types(((2, 3), F32)), {"approximate": True}, r"unknown \['approximate'\]"),
    (nn_ops.SILU, types(((2, 3), F32)), {"implementation": ""}, "a kernel name"),
])
def test_shape_rules_reject(op, in_types, params, message):
    params = {"implementation": None, **params}
    with pytest.raises(TypeError, match=message):
        op.infer(in_types, params, [])


def test_decomposition_must_fit_the_node():
    g = Graph()
    x = g.add_input(TensorType((2, 3), F32))
    wrong = nn_ops.decomposition(lambda x: x.sum(-1), [x.type])
    with pytest.raises(GraphError, match=r"softmax decomposition outputs: expected \(f32\[2,3\]\), got \(f32\[2\]\)"):
        nn_ops.softmax_node(g, x, decomposition=wrong)


# --- reference implementations vs plain JAX ------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_and_softmax_match_jax(dtype):
    x = rand((3, 5, 7), dtype)
    cases = [
        (lambda g, v: nn_ops.gelu_node(g, v, approximate=True), lambda v: jax.nn.gelu(v, approximate=True)),
        (lambda g, v: nn_ops.gelu_node(g, v, approximate=False), lambda v: jax.nn.gelu(v, approximate=False)),
        (lambda g, v: nn_ops.silu_node(g, v), jax.nn.silu),
        (lambda g, v: nn_ops.softmax_node(g, v, axes=(-1, 0)), lambda v: jax.nn.softmax(v, axis=(0, 2))),
    ]
    for build, reference in cases:
        f, _ = one_node(build, x)
        assert_equivalent(f(x), jax.jit(reference)(x), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_match_flax(dtype):
    x = rand((4, 6, 16), dtype) * 3 + 1
    scale, bias = rand((16,), dtype, 1), rand((16,), dtype, 2)
    ln = nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=dtype)
    ln_vars = {"params": {"scale": scale, "bias": bias}}
    f, _ = one_node(lambda g, v, s, b: nn_ops.layer_norm_node(g, v, s, b, epsilon=1e-5), x, scale, bias)
    assert_equivalent(f(x, scale, bias), ln.apply(ln_vars, x), **tol(dtype))
    rms = nn.RMSNorm(epsilon=1e-5, dtype=dtype, param_dtype=dtype)
    f, _ = one_node(lambda g, v, s: nn_ops.rms_norm_node(g, v, s, epsilon=1e-5), x, scale)
    assert_equivalent(f(x, scale), rms.apply({"params": {"scale": scale}}, x), **tol(dtype))


def test_layer_norm_promotes_like_flax():
    x, scale = rand((2, 8), jnp.bfloat16), rand((8,), np.float32)
    f, g = one_node(lambda g, v, s: nn_ops.layer_norm_node(g, v, s), x, scale)
    assert g.outputs[0].type == TensorType((2, 8), np.float32)
    expected = nn.LayerNorm(epsilon=1e-6, use_bias=False).apply({"params": {"scale": scale}}, x)
    assert_equivalent(f(x, scale), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_matches_dot_plus_bias(dtype):
    x, w, b = rand((2, 3, 8), dtype), rand((8, 5), dtype, 1), rand((5,), dtype, 2)
    f, _ = one_node(lambda g, *v: nn_ops.linear_node(g, *v), x, w, b)
    assert_equivalent(f(x, w, b), jax.jit(lambda x, w, b: x @ w + b)(x, w, b), **tol(dtype))
    dn = (((0,), (0,)), ((), ()))
    f, _ = one_node(lambda g, *v: nn_ops.linear_node(g, *v, dimension_numbers=dn,
                                                     preferred_element_type=np.float32), w, x[0].T)
    assert_equivalent(f(w, x[0].T), jax.lax.dot_general(w, x[0].T, dn, preferred_element_type=np.float32),
                      **tol(dtype))


def attention_case(layout="BTNH", n=4, kv=2, bias=False, mask=False, causal=False, dtype=np.float32,
                   t=5, s=7, batch=True):
    shape = lambda length, heads: (2, length, heads, 8) if layout == "BTNH" else (2, heads, length, 8)
    q, k, v = rand(shape(t, n), dtype, 0), rand(shape(s, kv), dtype, 1), rand(shape(s, kv), dtype, 2)
    extra = []
    if bias:
        extra.append(rand((1, n, t, s), np.float32, 3))
    if mask:
        extra.append(jnp.asarray(np.random.default_rng(4).random((2, 1, t, s)) < 0.7))
    if not batch:
        q, k, v = q[0], k[0], v[0]
        extra = [e[0] for e in extra]
    return q, k, v, extra


def dpa(q, k, v, extra, bias, mask, causal, layout):
    to = (lambda x: x) if layout == "BTNH" else (lambda x: jnp.swapaxes(x, -3, -2))
    b = extra[0] if bias else None
    m = extra[-1] if mask else None
    return to(jax.nn.dot_product_attention(to(q), to(k), to(v), b, m, is_causal=causal))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout, n, kv, bias, mask, causal, batch", [
    ("BTNH", 4, 4, False, False, False, True),
    ("BTNH", 4, 2, True, True, True, True),
    ("BNTH", 4, 1, False, True, False, True),
    ("BNTH", 2, 2, True, False, True, True),
    ("BTNH", 4, 2, True, True, False, False),
])
def test_attention_matches_dot_product_attention(dtype, layout, n, kv, bias, mask, causal, batch):
    q, k, v, extra = attention_case(layout, n, kv, bias, mask, causal, dtype, batch=batch)
    f, _ = one_node(lambda g, *xs: nn_ops.attention_node(g, *xs[:3], *(
        [xs[3]] if bias else [None]), *([xs[-1]] if mask else []), is_causal=causal, layout=layout), q, k, v, *extra)
    # XLA:CPU has no F16_F16_F32 dot, which jax.nn.dot_product_attention asks for: f16 is checked
    # against the f32 result, rounded.
    wide = [x.astype(np.float32) if x.dtype == np.float16 else x for x in (q, k, v)]
    expected = jax.jit(dpa, static_argnums=(4, 5, 6, 7))(*wide, extra, bias, mask, causal, layout).astype(dtype)
    assert_equivalent(f(q, k, v, *extra), expected, **tol(dtype, 8))


def test_attention_mask_value_fills_masked_scores():
    q, k, v, (mask,) = attention_case(mask=True)
    mask = mask.at[0, 0, 1].set(False)  # a fully masked row
    f, _ = one_node(lambda g, *xs: nn_ops.attention_node(g, *xs[:3], mask=xs[3], mask_value=-1e9), q, k, v, mask)

    def expected(q, k, v, m):
        k, v = jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2)  # GQA: query head n reads kv head n // 2
        scores = jnp.where(m, jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(8), -1e9)
        return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, -1), v)

    out = f(q, k, v, mask)
    assert_equivalent(out, jax.jit(expected)(q, k, v, mask), **tol(np.float32, 8))
    np.testing.assert_allclose(out[0, 1], jnp.broadcast_to(jnp.repeat(v, 2, 2)[0].mean(0), out[0, 1].shape),
                               rtol=1e-5, atol=1e-6)  # fully masked: the mean of v


def test_gradients_match_plain_jax():
    q, k, v, (bias, mask) = attention_case(bias=True, mask=True)
    f, _ = one_node(lambda g, *xs: nn_ops.attention_node(g, *xs, is_causal=True), q, k, v, bias, mask)
    grads = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2, 3))(q, k, v, bias, mask)
    expected = jax.grad(lambda q, k, v, b: jax.nn.dot_product_attention(q, k, v, b, mask, is_causal=True).sum(),
                        argnums=(0, 1, 2, 3))(q, k, v, bias)
    assert_equivalent(grads, expected, **tol(np.float32, 8))
    x, s, b = rand((3, 16)), rand((16,), seed=1), rand((16,), seed=2)
    f, _ = one_node(lambda g, *xs: nn_ops.layer_norm_node(g, *xs, epsilon=1e-5), x, s, b)
    ln = lambda x, s, b: nn.LayerNorm(epsilon=1e-5).apply({"params": {"scale": s, "bias": b}}, x)
    assert_equivalent(jax.grad(lambda *a: (f(*a) ** 2).sum(), argnums=(0, 1, 2))(x, s, b),
                      jax.grad(lambda *a: (ln(*a) ** 2).sum(), argnums=(0, 1, 2))(x, s, b), **tol(np.float32, 8))


# --- decomposition regions -----------------------------------------------------------------------

def handwritten_softmax(x):
    e = jnp.exp(x - jax.lax.stop_gradient(x.max(-1, keepdims=True)))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_decomposition_lowers_bit_exactly(dtype):
    x = rand((4, 33), dtype) * 5
    x = x.at[0, 0].set(jnp.inf).at[1, 1].set(jnp.nan).at[2].set(-0.0)
    region = nn_ops.decomposition(handwritten_softmax, [TensorType(x.shape, x.dtype)])
    f, g = one_node(lambda g, v: nn_ops.softmax_node(g, v, decomposition=region), x)
    assert_equivalent(f(x), jax.jit(handwritten_softmax)(x), exact=True)
    assert_equivalent(jax.grad(lambda x: f(x)[3].sum())(x), jax.grad(lambda x: handwritten_softmax(x)[3].sum())(x),
                      exact=True)


def test_the_region_is_what_runs_not_the_reference():
    x = rand((3,))
    region = nn_ops.decomposition(lambda v: v * 2, [TensorType(x.shape, x.dtype)])  # not silu on purpose
    f, g = one_node(lambda g, v: nn_ops.silu_node(g, v, decomposition=region), x)
    assert_equivalent(f(x), x * 2, exact=True)
    next(g.nodes).params["implementation"] = "xla"  # silu has no kernels: an error, not a fallback
    with pytest.raises(GraphError, match=r"silu: implementation 'xla' has no kernel on backend 'cpu'"):
        jax.jit(graphopt.lower(g).flat)(x)


def test_nodes_keep_the_builders_provenance():
    from graphopt.builder import Builder

    g = graphopt.trace(lambda x: jnp.tanh(x), jnp.ones((2, 4)))
    tanh = next(g.nodes)
    y = nn_ops.gelu_node(Builder(g, before=None, made_by="raise_ops", origin=tanh.provenance), tanh.output)
    assert y.node.provenance.made_by == "raise_ops"
    assert y.node.provenance.source == tanh.provenance.source

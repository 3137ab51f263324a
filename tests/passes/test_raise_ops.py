"""raise_ops: each spelling of each op is recognized (counted), the lowered program is the original
bit for bit, gradients too; look-alikes that compute something else stay primitives.

Every case traces a function, runs canonicalize and cse (raise_ops runs after them in a pipeline),
keeps that graph, runs raise_ops with verify(), and compares: the op counts, the params found, the
outputs of both graphs under jax.jit (bit for bit) and the gradients with respect to the first
argument (bit for bit: the decomposition regions are the same primitives).
"""

import math
from collections import Counter

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import graphopt
from graphopt.pipeline import run_pipeline
from graphopt.testing import assert_equivalent

COMPOSITES = ("attention", "softmax", "layer_norm", "rms_norm", "gelu", "silu", "linear")
B, T, N, K, H = 2, 5, 4, 2, 8


def rand(*shape, seed=0):
    return np.asarray(jax.random.normal(jax.random.key(seed + sum(shape)), shape), np.float32)


def raised(fn, *args, grad=True, params_argnums=None):
    """(graph after raise_ops, rules fired); asserts outputs and gradients are unchanged."""
    graph = graphopt.trace(fn, *args, params_argnums=params_argnums)
    graph = run_pipeline(graph, ["canonicalize", "cse"]).graph
    before = graph.clone()[0]
    result = run_pipeline(graph, ["raise_ops"], debug=True)
    after = result.graph
    lowered_before, lowered_after = graphopt.lower(before), graphopt.lower(after)
    assert_equivalent(jax.jit(lowered_after)(*args), jax.jit(lowered_before)(*args), exact=True)
    if grad:
        def loss(f):
            return lambda first, *rest: sum(jnp.sum(jnp.sin(leaf)) for leaf in
                                            jax.tree.leaves(f(first, *rest))
                                            if jnp.issubdtype(leaf.dtype, jnp.floating))
        assert_equivalent(jax.jit(jax.grad(loss(lowered_after)))(*args),
                          jax.jit(jax.grad(loss(lowered_before)))(*args), exact=True)
    return after, result.report.records[0].fired


def counts(graph) -> Counter:
    return Counter(n.op.name for n in graph.walk() if n.op.name in COMPOSITES
                   and (n.graph.parent is None or n.graph.parent.op.name not in COMPOSITES))


def only(graph, name):
    (node,) = [n for n in graph.walk() if n.op.name == name]
    return node


# --- softmax, gelu, silu -------------------------------------------------------------------------

X = rand(3, 7)


@pytest.mark.parametrize("fn, op, params", [
    (lambda x: jax.nn.softmax(x), "softmax", {"axes": (1,)}),
    (lambda x: jax.nn.softmax(x, axis=0), "softmax", {"axes": (0,)}),
    (lambda x: (e := jnp.exp(x - x.max(-1, keepdims=True))) / e.sum(-1, keepdims=True), "softmax",
     {"axes": (1,)}),
    (lambda x: jax.nn.gelu(x), "gelu", {"approximate": True}),
    (lambda x: jax.nn.gelu(x, approximate=False), "gelu", {"approximate": False}),
    (lambda x: 0.5 * x * (1 + jnp.tanh(jnp.sqrt(2 / jnp.pi) * (x + 0.044715 * x ** 3))), "gelu",
     {"approximate": True}),
    (lambda x: 0.5 * x * (1 + jax.lax.erf(x / jnp.sqrt(2.0))), "gelu", {"approximate": False}),
    (lambda x: jax.nn.silu(x), "silu", {}),
    (lambda x: jax.nn.sigmoid(x) * x, "silu", {}),
])
def test_activations(fn, op, params):
    graph, _ = raised(fn, X)
    assert counts(graph) == {op: 1}
    node = only(graph, op)
    assert {k: node.params[k] for k in params} == params and node.params["implementation"] is None
    assert [n.op.name for n in graph.nodes] == [op]  # every primitive moved into the region


def test_bf16_gelu_constants_as_rounded():
    graph, _ = raised(jax.nn.gelu, X.astype(jnp.bfloat16))
    assert counts(graph) == {"gelu": 1}


@pytest.mark.parametrize("fn", [
    lambda x: jnp.exp(x) / jnp.exp(x).sum(-1, keepdims=True),                 # no max: overflows
    lambda x: (e := jnp.exp(x - x.max(0, keepdims=True))) / e.sum(-1, keepdims=True),  # two axes
    lambda x: 0.5 * x * (1 + jnp.tanh(0.8 * (x + 0.05 * x ** 3))),            # other constants
    lambda x: 0.4 * x * (1 + jax.lax.erf(x / jnp.sqrt(2.0))),
    lambda x: x * jax.nn.sigmoid(2 * x),
])
def test_activation_look_alikes_stay(fn):
    graph, fired = raised(fn, X)
    assert not counts(graph) and not fired


# --- norms ---------------------------------------------------------------------------------------

XN = rand(2, 5, 8)


def _linen(module, x):
    variables = module.init(jax.random.key(0), x)
    variables = jax.tree.map(lambda v: v + 0.1 * rand(*v.shape, seed=3), variables)
    return module.apply, variables


def _nnx(module):
    graphdef, state = nnx.split(module)
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state


def _eqx(module, batched=True):
    module = jax.tree.map(lambda v: v + 0.1 * rand(*v.shape, seed=4) if eqx.is_array(v) else v, module)
    return (lambda m, x: jax.vmap(jax.vmap(m))(x)) if batched else (lambda m, x: m(x)), module


def _hand_ln(x, w, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + 1e-5) * w + b


@pytest.mark.parametrize("make, op, params", [
    (lambda: _linen(nn.LayerNorm(), XN), "layer_norm", dict(has_scale=True, has_bias=True, epsilon=1e-6)),
    (lambda: _linen(nn.LayerNorm(use_bias=False), XN), "layer_norm", dict(has_scale=True, has_bias=False)),
    (lambda: _linen(nn.LayerNorm(use_bias=False, use_scale=False), XN), "layer_norm",
     dict(has_scale=False, has_bias=False)),
    (lambda: _linen(nn.LayerNorm(use_scale=False), XN), "layer_norm", dict(has_scale=False, has_bias=True)),
    (lambda: _linen(nn.LayerNorm(reduction_axes=(-2, -1), feature_axes=(-2, -1)), XN), "layer_norm",
     dict(axes=(1, 2))),
    (lambda: _nnx(nnx.LayerNorm(8, rngs=nnx.Rngs(0))), "layer_norm", dict(has_scale=True, has_bias=True)),
    (lambda: _eqx(eqx.nn.LayerNorm(8)), "layer_norm", dict(has_scale=True, has_bias=True, epsilon=1e-5)),
    (lambda: _linen(nn.RMSNorm(), XN), "rms_norm", dict(has_scale=True, epsilon=1e-6)),
    (lambda: _linen(nn.RMSNorm(use_scale=False), XN), "rms_norm", dict(has_scale=False)),
    (lambda: _nnx(nnx.RMSNorm(8, rngs=nnx.Rngs(0))), "rms_norm", dict(has_scale=True)),
    (lambda: _eqx(eqx.nn.RMSNorm(8, use_bias=False)), "rms_norm", dict(has_scale=True, epsilon=1e-5)),
])
def test_framework_norms(make, op, params):
    fn, variables = make()
    graph, _ = raised(fn, variables, XN)
    assert counts(graph) == {op: 1}
    node = only(graph, op)
    params = {"axes": (2,), **params}
    assert {k: pytest.approx(node.params[k]) for k in params} == params


def test_equinox_rms_norm_with_bias_keeps_the_bias_add():
    fn, module = _eqx(eqx.nn.RMSNorm(8))
    graph, _ = raised(fn, module, XN)
    assert counts(graph) == {"rms_norm": 1}
    assert "add" in [n.op.name for n in graph.nodes]  # rms_norm has no bias: it stays outside


def test_equinox_unbatched_layer_norm():
    fn, module = _eqx(eqx.nn.LayerNorm(8), batched=False)
    graph, _ = raised(fn, module, XN[0, 0])
    assert counts(graph) == {"layer_norm": 1} and only(graph, "layer_norm").params["axes"] == (0,)


@pytest.mark.parametrize("fn, op", [
    (_hand_ln, "layer_norm"),
    (lambda x, w, b: (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5) * w + b,
     "layer_norm"),
    (lambda x, w, b: x * jax.lax.rsqrt(jnp.mean(x ** 2, -1, keepdims=True) + 1e-6) * w + b, "rms_norm"),
    (lambda x, w, b: x / jnp.sqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 1e-6), "rms_norm"),
])
def test_hand_written_norms(fn, op):
    graph, _ = raised(fn, XN, rand(8), rand(8, seed=1))
    assert counts(graph) == {op: 1}


@pytest.mark.parametrize("fn", [
    # variance without the mean subtracted
    lambda x, w: (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * w,
    # the mean over another axis than the variance
    lambda x, w: (x - x.mean(-2, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5) * w,
    # epsilon added after the square root
    lambda x, w: x / (jnp.sqrt(jnp.mean(x ** 2, -1, keepdims=True)) + 1e-6) * w,
    # sum instead of mean
    lambda x, w: x * jax.lax.rsqrt(jnp.sum(x ** 2, -1, keepdims=True) + 1e-6) * w,
    # normalized over a leading axis
    lambda x, w: x * jax.lax.rsqrt(jnp.mean(x ** 2, 0, keepdims=True) + 1e-6),
])
def test_norm_look_alikes_stay(fn):
    graph, _ = raised(fn, XN, rand(8))
    assert not counts(graph)


# --- linear --------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, has_bias", [
    (lambda: _linen(nn.Dense(4), XN), True),
    (lambda: _linen(nn.Dense(4, use_bias=False), XN), False),
    (lambda: _linen(nn.DenseGeneral((2, 3)), XN), True),
    (lambda: _nnx(nnx.Linear(8, 4, rngs=nnx.Rngs(0))), True),
])
def test_framework_linear(make, has_bias):
    fn, variables = make()
    graph, _ = raised(fn, variables, XN)
    assert counts(graph) == {"linear": 1} and only(graph, "linear").params["has_bias"] is has_bias


def test_equinox_linear_weight_on_the_left():
    linear = eqx.nn.Linear(8, 4, key=jax.random.key(0))
    graph, _ = raised(lambda m, x: m(x), linear, XN[0, 0], params_argnums=(0,))
    assert counts(graph) == {"linear": 1}
    # the same with the weight an ordinary input: the bias follows the lhs, which is no weight
    graph, _ = raised(lambda m, x: m(x), linear, XN[0, 0], params_argnums=())
    assert not counts(graph)


def test_vmapped_equinox_linear_transposes_its_dot():
    mlp = eqx.nn.MLP(8, 4, width_size=16, depth=2, activation=jax.nn.silu, key=jax.random.key(0))
    params, static = eqx.partition(mlp, eqx.is_array)
    graph, _ = raised(lambda p, x: jax.vmap(eqx.combine(p, static))(x), params, XN[0])
    assert counts(graph) == {"linear": 3, "silu": 2}
    node = next(n for n in graph.nodes if n.op.name == "linear")
    assert node.params["dimension_numbers"] == (((1,), (1,)), ((), ()))  # x [5, 8] · w [16, 8]


@pytest.mark.parametrize("fn", [
    lambda x, w, b: jnp.einsum("fd,td->ft", w, x).T + b[:5, None],  # the bias follows x's rows
    lambda x, w, b: jnp.einsum("fd,td->ft", w, x).T + x[:, :1],     # not a bias at all
])
def test_transposed_linear_look_alikes_stay(fn):
    graph, _ = raised(fn, XN[0], rand(16, 8), rand(16))
    assert not counts(graph)


def test_einsum_plus_bias_is_linear():
    graph, _ = raised(lambda x, w, b: jnp.einsum("btd,df->btf", x, w) + b, XN, rand(8, 4), rand(4))
    assert counts(graph) == {"linear": 1}


@pytest.mark.parametrize("fn, w", [
    (lambda x, w: x @ w + x, rand(8, 8)),                         # a residual, not a bias
    (lambda x, w: x @ w + x[:, :, :1], rand(8, 8)),               # varies along the tokens
    (lambda x, w: x @ w, rand(8, 8)),                             # no bias, w is no parameter
])
def test_linear_look_alikes_stay(fn, w):
    graph, _ = raised(fn, XN, w)
    assert not counts(graph)


# --- attention -----------------------------------------------------------------------------------

Q, KV, KV_GQA = rand(B, T, N, H), rand(B, T, N, H, seed=1), rand(B, T, K, H, seed=2)
QN, KN, VN = rand(B, N, T, H), rand(B, N, T, H, seed=1), rand(B, N, T, H, seed=2)
CAUSAL = np.tril(np.ones((T, T), bool))


def einsum_attention(q, k, v, mask=None, bias=None, scale="div", fill=-1e9):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    s = s / math.sqrt(H) if scale == "div" else s * (1 / math.sqrt(H))
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = jnp.where(mask, s, fill)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def matmul_attention(q, k, v, bias=None):
    s = (q * (1 / math.sqrt(H))) @ jnp.swapaxes(k, -1, -2)
    if bias is not None:
        s = s + bias
    e = jnp.exp(s - s.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)) @ v


def attention_params(graph):
    node = only(graph, "attention")
    return {k: node.params[k] for k in ("scale", "is_causal", "has_bias", "has_mask", "mask_value",
                                        "layout")}


def test_einsum_attention_with_causal_tril_mask():
    graph, _ = raised(lambda q, k, v: einsum_attention(q, k, v, jnp.tril(jnp.ones((T, T), bool))), Q, KV, KV)
    assert counts(graph) == {"attention": 1}
    assert attention_params(graph) == dict(scale=pytest.approx(1 / math.sqrt(H)), is_causal=True,
                                           has_bias=False, has_mask=False, mask_value=-1e9, layout="BTNH")
    assert [n.op.name for n in graph.nodes] == ["attention"]
    # softmax stays, nested in the decomposition
    assert [n.op.name for n in only(graph, "attention").regions[0].nodes if n.op.name == "softmax"] == ["softmax"]


def test_einsum_attention_with_padding_mask_and_scale_multiplier():
    pad = np.arange(T)[None, None, None, :] < np.array([3, 5])[:, None, None, None]  # [B,1,1,S]
    graph, _ = raised(lambda q, k, v, m: einsum_attention(q, k, v, m, scale="mul"), Q, KV, KV, pad)
    p = attention_params(graph)
    assert counts(graph) == {"attention": 1} and p["has_mask"] and not p["is_causal"]
    assert only(graph, "attention").inputs[3].type.shape == (B, 1, 1, T)


def test_scale_along_a_non_normalized_axis_stays_outside():
    graph, _ = raised(lambda x, w: x * jax.lax.rsqrt(jnp.mean(x ** 2, -1, keepdims=True) + 1e-6)
                      * w[:5, None], XN, rand(8))
    assert counts(graph) == {"rms_norm": 1} and not only(graph, "rms_norm").params["has_scale"]


def test_constant_non_causal_mask_is_a_mask_operand():
    graph, _ = raised(lambda q, k, v: einsum_attention(q, k, v, jnp.asarray(CAUSAL.T)), Q, KV, KV)
    p = attention_params(graph)
    assert p["has_mask"] and not p["is_causal"]
    assert only(graph, "attention").inputs[3].type.shape == (T, T)


@pytest.mark.parametrize("k, causal", [(0, True), (-1, False), (1, False)])
def test_masks_too_large_to_evaluate_here_are_checked_by_xla(monkeypatch, k, causal):
    # Past recognize's evaluation limit (here 16 elements), the mask's constant expression is
    # compared with the causal pattern in one program compiled for the CPU.
    import graphopt.recognize as recognize
    import graphopt.recognize_attention as recognize_attention

    monkeypatch.setattr(recognize_attention, "constant_array", lambda v: recognize.constant_array(v, 16))
    mask = lambda: jnp.tril(jnp.ones((T, T), bool), k)
    graph, _ = raised(lambda q, k, v: einsum_attention(q, k, v, mask()), Q, KV, KV)
    p = attention_params(graph)
    assert (p["is_causal"], p["has_mask"]) == (causal, not causal)


def test_the_causal_mask_of_a_long_sequence_is_not_an_operand():
    # tril(ones(8192, 8192)) has 67M elements, past what recognition evaluates with numpy; were
    # it an operand, it would be materialized at the scores' size (bool[1,2,8192,8192]).
    x = jax.ShapeDtypeStruct((1, 8192, 2, 8), jnp.float32)
    graph = graphopt.trace(lambda q, k, v: einsum_attention(q, k, v, jnp.tril(jnp.ones((8192, 8192), bool))),
                           x, x, x)
    graph = run_pipeline(graph, ["canonicalize", "fold_constants", "cse", "raise_ops"]).graph
    assert attention_params(graph)["is_causal"] and not attention_params(graph)["has_mask"]


def test_einsum_attention_with_additive_mask_is_bias():
    bias = np.where(CAUSAL, 0.0, -1e9).astype(np.float32)[None, None]
    graph, _ = raised(lambda q, k, v, b: einsum_attention(q, k, v, bias=b), Q, KV, KV, bias)
    assert attention_params(graph)["has_bias"] and not attention_params(graph)["has_mask"]


def test_matmul_attention_in_bnth_layout_with_bias():
    graph, _ = raised(matmul_attention, QN, KN, VN, rand(B, 1, 1, T))
    assert counts(graph) == {"attention": 1, }
    p = attention_params(graph)
    assert p["layout"] == "BNTH" and p["has_bias"] and p["scale"] == pytest.approx(1 / math.sqrt(H))


@pytest.mark.parametrize("kwargs, k, expect", [
    ({}, KV, dict(is_causal=False, has_mask=False, has_bias=False)),
    ({"is_causal": True}, KV, dict(is_causal=True, has_mask=False)),
    ({"is_causal": True}, KV_GQA, dict(is_causal=True)),          # grouped-query attention
    ({"scale": 0.3}, KV_GQA, dict(scale=0.3)),
    ({"mask": np.asarray(rand(B, 1, T, T) > 0)}, KV, dict(has_mask=True, is_causal=False)),  # a constant
    ({"bias": rand(1, N, T, T)}, KV, dict(has_bias=True)),
])
def test_jax_dot_product_attention(kwargs, k, expect):
    graph, _ = raised(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **kwargs), Q, k, k)
    assert counts(graph) == {"attention": 1}
    p = attention_params(graph)
    assert {key: p[key] for key in expect} == {key: pytest.approx(v) if isinstance(v, float) else v
                                               for key, v in expect.items()}
    if kwargs.get("scale") is None:
        assert p["scale"] == pytest.approx(1 / math.sqrt(H))


def test_jax_dot_product_attention_causal_and_a_mask_argument():
    mask = np.asarray(rand(B, 1, T, T) > 0)
    graph, _ = raised(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, is_causal=True),
                      Q, KV_GQA, KV_GQA, mask)
    p = attention_params(graph)
    assert p["is_causal"] and p["has_mask"]
    assert only(graph, "attention").inputs[3].type.shape == (B, 1, T, T)


def test_bfloat16_attention_with_float32_softmax_sums():
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.MultiHeadDotProductAttention(num_heads=2, dtype=jnp.bfloat16)(x, x)

    fn, variables = _linen(Layer(), XN)
    graph, _ = raised(fn, variables, XN)
    assert counts(graph)["attention"] == 1
    assert attention_params(graph)["scale"] == 0.5  # 1 / sqrt(head dim 4), from a bf16 sqrt


def test_scores_too_big_to_check_take_operands_in_their_layout_only(monkeypatch):
    from graphopt import recognize_attention

    monkeypatch.setattr(recognize_attention, "MAX_CHECKED_ELEMENTS", 16)
    pad = np.arange(T)[None, None, None, :] < np.array([3, 5])[:, None, None, None]
    graph, _ = raised(lambda q, k, v, m: einsum_attention(q, k, v, m), Q, KV, KV, pad)
    assert attention_params(graph)["has_mask"]  # [B,1,1,S] broadcasts onto [B,N,T,S] as is
    mask = np.asarray(rand(B, 1, T, T) > 0)
    graph, _ = raised(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m), Q, KV, KV, mask)
    assert "attention" not in counts(graph)  # its mask goes through reshapes: not checked, declined


def test_flax_linen_attention_layers():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
            x = x + nn.MultiHeadDotProductAttention(num_heads=2)(x, x, mask=mask)
            return x + nn.SelfAttention(num_heads=2)(x)

    fn, variables = _linen(Block(), XN)
    graph, _ = raised(fn, variables, XN)
    assert counts(graph)["attention"] == 2 and counts(graph)["linear"] == 8
    assert [n.params["is_causal"] for n in graph.nodes if n.op.name == "attention"] == [True, False]


def test_flax_nnx_attention_with_mask():
    module = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False,
                                    rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(module)
    mask = np.asarray(rand(B, 1, T, T) > 0)
    graph, _ = raised(lambda s, x, m: nnx.merge(graphdef, s)(x, mask=m), state, XN, mask)
    assert counts(graph) == {"attention": 1, "linear": 4} and attention_params(graph)["has_mask"]


def test_models_count_one_attention_per_layer():
    from models import all_models

    for name, layers in [("linen/decoder_scan", 1), ("linen/encoder_padmask", 2),
                         ("nnx/decoder_scan", 1), ("nnx/encoder_padmask", 1)]:
        case = all_models()[name]()
        graph = run_pipeline(graphopt.trace(case.target, *case.trace_args, **case.trace_kwargs),
                             ["canonicalize", "cse", "raise_ops"], debug=True).graph
        assert counts(graph)["attention"] == layers, name
        lowered = jax.jit(graphopt.lower(graph))
        assert_equivalent(lowered(*case.args), jax.jit(case.fn)(*case.args))


@pytest.mark.parametrize("fn", [
    # mask applied before the bias: not nn_ops' order
    lambda q, k, v, b: jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(
        jnp.where(CAUSAL, jnp.einsum("bqhd,bkhd->bhqk", q, k), -1e9) + b), v),
    # scaled after the bias
    lambda q, k, v, b: jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(
        (jnp.einsum("bqhd,bkhd->bhqk", q, k) + b) * 0.3), v),
    # softmax over the queries
    lambda q, k, v, b: jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(
        jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=2), v),
    # contracts p with v over the queries
    lambda q, k, v, b: jnp.einsum("bhqk,bqhd->bkhd", jax.nn.softmax(
        jnp.einsum("bqhd,bkhd->bhqk", q, k)), v),
])
def test_attention_look_alikes_stay(fn):
    graph, _ = raised(fn, Q, KV, KV, rand(B, N, T, T))
    assert "attention" not in counts(graph)

"""Shared by the pruning tests: the models they prune, pruning a traced model, the exactness check.

The exactness property of structured pruning: for any kept channels, the shrunk graph on the
sliced parameters computes what the masked reference (the unpruned graph with the pruned channels
zeroed at every exit) computes on the full ones, up to the order of float sums.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import graphopt
from graphopt.frameworks import adapt
from graphopt.lowering.emit import evaluate
from graphopt.passes.prune.deps import Dependencies, analyze
from graphopt.passes.prune.masked import masked_graph
from graphopt.passes.prune.shrink import shrink, take
from graphopt.testing import assert_equivalent

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: the shared models
from models import numpy_init  # noqa: E402

# Both sides of every comparison compile the same way; this halves XLA's time on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_fast(fn, *args):
    """`jax.jit(fn)(*args)`, compiled with FAST_COMPILE."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def flat_leaves(fn, args: tuple, params_argnums=None) -> list:
    """The arrays `graphopt.trace(fn, *args)` makes graph inputs of, in graph-input order (for an
    nnx or Equinox module: its state first)."""
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(adapt(fn, args, params_argnums).args)]


def keep_fraction(deps: Dependencies, fraction: float, seed: int = 0) -> dict:
    """A random `fraction` of every group's channels (at least one)."""
    rng = np.random.default_rng(seed)
    return {g.name: np.sort(rng.choice(g.size, max(1, int(g.size * fraction)), replace=False))
            for g in deps.groups}


@dataclasses.dataclass
class Pruned:
    deps: Dependencies
    keep: dict
    graph: object          # the shrunk graph
    slices: dict           # {input index: [(axis, kept indices)]}
    leaves: list           # the full graph's inputs
    small_leaves: list     # the shrunk graph's inputs

    def outputs(self):
        """(shrunk graph's outputs, masked reference's outputs), compiled together."""
        reference = masked_graph(self.deps, self.keep)
        return run_fast(lambda small, full: (evaluate(self.graph, small), evaluate(reference, full)),
                        self.small_leaves, self.leaves)


def prune(fn, *args, keep=0.5, params_argnums=None, seed: int = 0) -> Pruned:
    """Trace `fn(*args)`, analyze it and shrink it: `keep` is {group name: indices} or the
    fraction of every group's channels to keep at random."""
    graph = graphopt.trace(fn, *args, params_argnums=params_argnums)
    deps = analyze(graph)
    if not isinstance(keep, dict):
        keep = keep_fraction(deps, keep, seed)
    small, slices = shrink(deps, keep)
    small.verify()
    leaves = flat_leaves(fn, args, params_argnums)
    small_leaves = [take(x, slices[i]) if i in slices else x for i, x in enumerate(leaves)]
    return Pruned(deps, keep, small, slices, leaves, small_leaves)


def assert_exact(pruned: Pruned, rtol: float = 1e-4) -> None:
    """The shrunk graph computes the masked reference, up to float reordering: removing terms from
    a sum changes how XLA groups the rest, so the bound is relative to each output's scale."""
    actual, expected = pruned.outputs()
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        a, e = np.asarray(a), np.asarray(e)
        assert np.isfinite(e.astype(np.float64)).all(), "the reference is not finite: pick other inputs"
        scale = float(np.max(np.abs(e.astype(np.float64)), initial=1.0))
        assert_equivalent(a, e, rtol=rtol, atol=rtol * scale)


# --- models: factories returning (fn, args, params_argnums) -----------------------------------

def normal(seed: int, shape, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def linen_variables(model, *inputs, seed: int = 0):
    """Random variables for a linen model, made without running (and compiling) its init."""
    return numpy_init(jax.eval_shape(model.init, jax.random.key(0), *inputs), seed)


def nnx_module(make, seed: int = 0):
    """`make()` (an nnx Module) with random NumPy weights, built without running its init."""
    from flax import nnx

    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, numpy_init(abstract, seed))


def equinox_module(make, seed: int = 0):
    """`make()` (an Equinox Module) with random NumPy weights, built without running its init."""
    import equinox as eqx

    return numpy_init(eqx.filter_eval_shape(make), seed, fan_in_axes="trailing")


def attention(q, k, v, causal: bool = False):
    """Softmax attention over [B, T, H, D] heads (plain jnp)."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]).astype(np.float32)
    if causal:
        t = q.shape[1]
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v)


def linen_cnn():
    import flax.linen as nn

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(8, (3, 3))(x))
            x = nn.relu(nn.Conv(6, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
            x = x.reshape(x.shape[0], -1)
            return nn.Dense(5)(nn.relu(nn.Dense(12)(x)))

    model, x = CNN(), normal(1, (2, 8, 8, 3))
    return model.apply, (linen_variables(model, x), x), None


def linen_transformer(layers: int = 2):
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm()(x)
            mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
            x = x + nn.MultiHeadDotProductAttention(num_heads=4)(h, h, mask=mask)
            return x + nn.Dense(16)(nn.gelu(nn.Dense(32)(nn.LayerNorm()(x))))

    class Transformer(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(40, 16)(tokens)
            for _ in range(layers):
                x = Block()(x)
            return nn.Dense(40)(nn.LayerNorm()(x))

    model = Transformer()
    tokens = np.random.default_rng(1).integers(0, 40, (2, 6)).astype(np.int32)
    return model.apply, (linen_variables(model, tokens), tokens), None


def nnx_model():
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
            self.conv2 = nnx.Conv(8, 6, (3, 3), rngs=rngs)
            self.linear = nnx.Linear(6 * 4 * 4, 12, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=12, qkv_features=8,
                                               decode=False, rngs=rngs)
            self.head = nnx.Linear(12, 5, rngs=rngs)

        def __call__(self, x):
            h = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
            h = nnx.max_pool(h, (2, 2), (2, 2)).reshape(x.shape[0], -1)
            h = nnx.relu(self.linear(h))[:, None, :].repeat(3, axis=1)  # a sequence of 3
            return self.head(nnx.relu(self.attn(h)))

    return nnx_module(lambda: Model(nnx.Rngs(0))), (normal(1, (2, 8, 8, 3)),), None


B, T, C = 2, 5, 8
DN = ("NHWC", "HWIO", "NHWC")


def conv(x, w, groups=1, dn=DN):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn,
                                        feature_group_count=groups)


# --- hand-written JAX: each factory returns (fn, args, params_argnums) -----------------------------

def mlp():
    p = {"w1": normal(0, (C, 12)), "b1": normal(1, (12,)), "w2": normal(2, (12, 7)), "b2": normal(3, (7,)),
         "w3": normal(4, (7, 3))}

    def fn(p, x):
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        return jax.nn.gelu(h @ p["w2"] + p["b2"]) @ p["w3"]
    return fn, (p, normal(5, (B, C))), 0


def residual_chain():
    p = {"w0": normal(0, (C, 6)), "out": normal(1, (6, 2)),
         "layers": [{"a": normal(2 + i, (6, 10)), "b": normal(5 + i, (10, 6))} for i in range(3)]}

    def fn(p, x):
        h = x @ p["w0"]
        for layer in p["layers"]:
            h = h + jnp.tanh(h @ layer["a"]) @ layer["b"]
        return h @ p["out"]
    return fn, (p, normal(9, (B, C))), 0


def concat_branches():
    p = {"a": normal(0, (C, 6)), "b": normal(1, (C, 5)), "w": normal(2, (11, 3))}
    fn = lambda p, x: jnp.concatenate([jax.nn.relu(x @ p["a"]), jnp.tanh(x @ p["b"])], -1) @ p["w"]
    return fn, (p, normal(3, (B, C))), 0


def concat_with_input():
    """The model input's part of the concatenation is blocked; the branch's part still prunes."""
    p = {"a": normal(0, (C, 6)), "w": normal(1, (6 + C, 3))}
    fn = lambda p, x: jnp.concatenate([jax.nn.relu(x @ p["a"]), x], -1) @ p["w"]
    return fn, (p, normal(2, (B, C))), 0


def _qkv_params(h=4, d=3):
    return {"wqkv": normal(0, (C, 3 * h * d)), "bqkv": normal(1, (3 * h * d,)), "wo": normal(2, (h * d, C)),
            "w2": normal(3, (C, 4))}


def _attention_tail(p, q, k, v, h=4, d=3):
    q, k, v = (a.reshape(B, T, h, d) for a in (q, k, v))
    o = attention(q, k, v).reshape(B, T, h * d)
    return jax.nn.relu(o @ p["wo"]) @ p["w2"]


def fused_qkv_slice():
    def fn(p, x):
        qkv = x @ p["wqkv"] + p["bqkv"]
        n = qkv.shape[-1] // 3
        return _attention_tail(p, qkv[..., :n], qkv[..., n:2 * n], qkv[..., 2 * n:])
    return fn, (_qkv_params(), normal(4, (B, T, C))), 0


def fused_qkv_split():
    def fn(p, x):
        return _attention_tail(p, *jnp.split(x @ p["wqkv"] + p["bqkv"], 3, axis=-1))
    return fn, (_qkv_params(), normal(4, (B, T, C))), 0


def fused_qkv_reshape():
    """qkv as [B, T, 3, H, D]: q, k and v share the head and head-size dimensions."""
    def fn(p, x):
        qkv = (x @ p["wqkv"] + p["bqkv"]).reshape(B, T, 3, 4, 3)
        return _attention_tail(p, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return fn, (_qkv_params(), normal(4, (B, T, C))), 0


def heads_transposed():
    """Heads split as [H, D] but merged as [D, H] before the output projection."""
    h, d = 4, 3
    p = {w: normal(i, (C, h * d)) for i, w in enumerate(("wq", "wk", "wv"))} | {"wo": normal(3, (d * h, C))}

    def fn(p, x):
        q, k, v = ((x @ p[w]).reshape(B, T, h, d) for w in ("wq", "wk", "wv"))
        o = attention(q, k, v, causal=True).transpose(0, 1, 3, 2).reshape(B, T, d * h)
        return o @ p["wo"]
    return fn, (p, normal(4, (B, T, C))), 0


KV, G, D = 2, 3, 4


def _gqa_params():
    return {"wq": normal(0, (C, KV * G * D)), "wk": normal(1, (C, KV * D)), "wv": normal(2, (C, KV * D)),
            "wo": normal(3, (KV * G * D, C))}


def gqa_repeat():
    """Grouped-query attention: KV heads repeated (jnp.repeat) up to the query heads."""
    def fn(p, x):
        q = (x @ p["wq"]).reshape(B, T, KV * G, D)
        k = jnp.repeat((x @ p["wk"]).reshape(B, T, KV, D), G, axis=2)
        v = jnp.repeat((x @ p["wv"]).reshape(B, T, KV, D), G, axis=2)
        return attention(q, k, v, causal=True).reshape(B, T, KV * G * D) @ p["wo"]
    return fn, (_gqa_params(), normal(4, (B, T, C))), 0


def gqa_grouped():
    """Grouped-query attention with the query heads as [KV, G] in the einsums."""
    def fn(p, x):
        q = (x @ p["wq"]).reshape(B, T, KV, G, D)
        k, v = ((x @ p[w]).reshape(B, T, KV, D) for w in ("wk", "wv"))
        s = jax.nn.softmax(jnp.einsum("bqkgd,bskd->bkgqs", q, k), -1)
        return jnp.einsum("bkgqs,bskd->bqkgd", s, v).reshape(B, T, KV * G * D) @ p["wo"]
    return fn, (_gqa_params(), normal(4, (B, T, C))), 0


def depthwise_conv():
    p = {"w1": normal(0, (3, 3, 2, 8)), "dw": normal(1, (3, 3, 1, 8)), "b": normal(2, (8,)),
         "w2": normal(3, (1, 1, 8, 4))}

    def fn(p, x):
        h = jax.nn.relu(conv(x, p["w1"]))
        h = jax.nn.relu(conv(h, p["dw"], groups=8) + p["b"])
        return conv(h, p["w2"])
    return fn, (p, normal(4, (2, 6, 6, 2))), 0


def conv_nchw():
    p = {"w1": normal(0, (6, 3, 3, 3)), "w2": normal(1, (4, 6, 1, 1))}
    dn = ("NCHW", "OIHW", "NCHW")
    fn = lambda p, x: conv(jax.nn.relu(conv(x, p["w1"], dn=dn)), p["w2"], dn=dn)
    return fn, (p, normal(2, (2, 3, 5, 5))), 0


def checkpointed_mlp():
    """The hidden layer inside jax.checkpoint: a remat region whose shapes change."""
    p = {"w1": normal(0, (C, 10)), "w2": normal(1, (10, 6)), "w3": normal(2, (6, 3))}

    @jax.checkpoint
    def block(x, w1, w2):
        return jax.nn.relu(jax.nn.relu(x @ w1) @ w2)
    return (lambda p, x: block(x, p["w1"], p["w2"]) @ p["w3"]), (p, normal(3, (B, C))), 0


@jax.custom_jvp
def _dense_relu(h, w):
    return jax.nn.relu(h @ w)


_dense_relu.defjvp(lambda primals, tangents: jax.jvp(lambda h, w: jax.nn.relu(h @ w), primals, tangents))


def custom_jvp_exit():
    """A contraction (an exit) inside a custom_jvp function."""
    p = {"w1": normal(0, (C, 10)), "w2": normal(1, (10, 6)), "w3": normal(2, (6, 3))}
    fn = lambda p, x: _dense_relu(jnp.tanh(x @ p["w1"]), p["w2"]) @ p["w3"]
    return fn, (p, normal(3, (B, C))), 0


@jax.custom_vjp
def _clip_gradient(x):
    return x


_clip_gradient.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -1, 1),))


def custom_vjp():
    p = {"w1": normal(0, (C, 10)), "w2": normal(1, (10, 3))}
    return (lambda p, x: _clip_gradient(jnp.tanh(x @ p["w1"])) @ p["w2"]), (p, normal(2, (B, C))), 0


def shared_weight():
    """One square weight applied to the residual stream: its rows and columns are one group."""
    p = {"w0": normal(0, (C, 6)), "w": normal(1, (6, 6), 0.5), "out": normal(2, (6, 3))}

    def fn(p, x):
        h = x @ p["w0"]
        for _ in range(2):
            h = h + jnp.tanh(h @ p["w"])
        return h @ p["out"]
    return fn, (p, normal(3, (B, C))), 0


def constant_scale():
    """A constant over the hidden channels is sliced with them."""
    p = {"w1": normal(0, (C, 6)), "w2": normal(1, (6, 3))}
    scale = np.linspace(0.5, 2.0, 6).astype(np.float32)
    return (lambda p, x: (jax.nn.relu(x @ p["w1"]) * scale) @ p["w2"]), (p, normal(2, (B, C))), 0


def bf16_mlp():
    p = {"w1": normal(0, (C, 12)).astype(jnp.bfloat16), "w2": normal(1, (12, 3)).astype(jnp.bfloat16)}
    fn = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
    return fn, (p, normal(2, (B, C)).astype(jnp.bfloat16)), 0


# --- frameworks ----------------------------------------------------------------------------------

def linen_mlp():
    import flax.linen as nn

    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(12), nn.gelu, nn.Dense(3)])
    x = normal(0, (B, C))
    return model.apply, (linen_variables(model, x), x), None


def linen_norms():
    """BatchNorm (inference), GroupNorm (its groups prune whole) and average pooling."""
    import flax.linen as nn

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3))(x)))
            x = nn.relu(nn.GroupNorm(num_groups=4)(nn.Conv(8, (3, 3))(x)))
            return nn.Conv(3, (1, 1))(nn.avg_pool(x, (2, 2), (2, 2))).mean(axis=(1, 2))

    model, x = Model(), normal(0, (2, 6, 6, 2))
    return model.apply, (linen_variables(model, x), x), None


def linen_remat():
    """Residual blocks under nn.remat: the exits are inside remat regions."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + nn.Dense(8)(nn.gelu(nn.Dense(16)(x)))

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(8)(x)
            for _ in range(2):
                x = nn.remat(Block)()(x)
            return nn.Dense(3)(x)

    model, x = Model(), normal(0, (B, C))
    return model.apply, (linen_variables(model, x), x), None


def nnx_mlp():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(C, 16, rngs=rngs), nnx.Linear(16, 12, rngs=rngs),
                                    nnx.Linear(12, 3, rngs=rngs)])

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = nnx.gelu(layer(x))
            return self.layers[-1](x)
    return nnx_module(lambda: MLP(nnx.Rngs(0))), (normal(0, (B, C)),), None


def equinox_mlp():
    import equinox as eqx

    mlp = equinox_module(lambda: eqx.nn.MLP(C, 3, width_size=12, depth=2, key=jax.random.key(0)))
    return mlp, (normal(0, (C,)),), None


CASES = {f.__name__: f for f in (
    mlp, residual_chain, concat_branches, concat_with_input, fused_qkv_slice, fused_qkv_split,
    fused_qkv_reshape, heads_transposed, gqa_repeat, gqa_grouped, depthwise_conv, conv_nchw,
    checkpointed_mlp, custom_jvp_exit, custom_vjp, shared_weight, constant_scale, bf16_mlp,
    linen_mlp, linen_cnn, linen_transformer, linen_norms, linen_remat, nnx_mlp, nnx_model, equinox_mlp)}

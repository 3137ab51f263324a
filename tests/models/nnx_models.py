"""Small Flax nnx models for graphopt round-trip tests.

``graphopt.trace(module, x)`` is called on the module instance; the lowered
function takes ``(state, *inputs)`` with ``state = nnx.state(module)``.  The
reference function is ``lambda state, *xs: nnx.merge(graphdef, state)(*xs)``.

Models (tiny: d_model 32, 2 layers, sequence length 16):

* ``mlp``             – ``nnx.Linear`` layers held in an ``nnx.List``.
* ``cnn_bn``          – ``nnx.Conv`` + ``nnx.BatchNorm(use_running_average=True)``
                        with non-trivial running statistics.
* ``decoder_scan``    – decoder-only transformer: blocks created with
                        ``nnx.vmap`` (stacked params) and run with
                        ``nnx.scan`` over ``nnx.remat``; causal
                        ``nnx.MultiHeadAttention``.
* ``encoder_padmask`` – BERT-style encoder; hand-written attention with a
                        padding mask from token lengths; layers run by a plain
                        ``jax.lax.scan`` over stacked layer state
                        (``nnx.split``/``nnx.merge`` in the body) with
                        ``jax.checkpoint``.
* ``adaptive``        – ``lax.cond`` + adaptive depth via ``lax.while_loop`` +
                        ``custom_jvp`` activation + ``custom_vjp`` gradient clip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from . import (
    ModelCase,
    branch,
    causal_mask,
    clipped_grad,
    halting_steps,
    masked_attention,
    masked_refinement,
    normal,
    numpy_init,
    padding_mask,
    randint,
    surrogate_clip,
)

BATCH = 2
SEQ = 16
VOCAB = 64
D_MODEL = 32
HEADS = 4
LAYERS = 2


def _nnx_case(name, make_module, *inputs, seed=0, **case_kwargs) -> ModelCase:
    """Build ``make_module()`` abstractly, fill its state from NumPy and wrap it."""
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make_module))
    module = nnx.merge(graphdef, numpy_init(abstract_state, seed))
    graphdef, state = nnx.split(module)

    def fn(state, *xs):
        return nnx.merge(graphdef, state)(*xs)

    return ModelCase(
        name=name,
        target=module,
        trace_args=inputs,
        trace_kwargs={},
        fn=fn,
        args=(nnx.state(module), *inputs),
        **case_kwargs,
    )


def _tokens(seed):
    return randint(seed, (BATCH, SEQ), VOCAB)


# ---------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------


class MLP(nnx.Module):
    def __init__(self, sizes=(16, 32, 32, 8), *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])
        )

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = nnx.gelu(x)
        return x


def make_mlp() -> ModelCase:
    x = normal(1, (4, 16))
    return _nnx_case(
        "mlp", lambda: MLP(rngs=nnx.Rngs(0)), x, param_path_hints=("layers", "kernel", "bias")
    )


# ---------------------------------------------------------------------------
# CNN with BatchNorm (inference mode)
# ---------------------------------------------------------------------------


class CNN(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), strides=(2, 2), rngs=rngs)
        self.bn2 = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
        self.head = nnx.Linear(16 * 2 * 2, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        return self.head(x.reshape(x.shape[0], -1))


def make_cnn_bn() -> ModelCase:
    x = normal(2, (2, 8, 8, 3))
    # numpy_init gives BatchNorm non-trivial running statistics (mean, var).
    return _nnx_case(
        "cnn_bn",
        lambda: CNN(rngs=nnx.Rngs(0)),
        x,
        seed=3,
        param_path_hints=("conv1", "bn2", "head", "mean", "var"),
    )


# ---------------------------------------------------------------------------
# Decoder-only transformer: nnx.vmap-stacked blocks, nnx.scan + nnx.remat
# ---------------------------------------------------------------------------


class DecoderBlock(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.ln_attn = nnx.LayerNorm(D_MODEL, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            HEADS, D_MODEL, decode=False, deterministic=True, keep_rngs=False, rngs=rngs
        )
        self.ln_mlp = nnx.LayerNorm(D_MODEL, rngs=rngs)
        self.mlp_in = nnx.Linear(D_MODEL, 4 * D_MODEL, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * D_MODEL, D_MODEL, rngs=rngs)

    def __call__(self, x):
        h = self.ln_attn(x)
        x = x + self.attn(h, mask=causal_mask(x.shape[1]))
        h = self.mlp_out(nnx.gelu(self.mlp_in(self.ln_mlp(x))))
        return x + h


class ScanDecoder(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D_MODEL, rngs=rngs)
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (SEQ, D_MODEL)))

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return DecoderBlock(rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.ln_f = nnx.LayerNorm(D_MODEL, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos_embed[...][: tokens.shape[1]]

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def run_block(x, block):
            return block(x)

        x = run_block(x, self.blocks)
        return self.embed.attend(self.ln_f(x))


def make_decoder_scan() -> ModelCase:
    return _nnx_case(
        "decoder_scan",
        lambda: ScanDecoder(rngs=nnx.Rngs(0)),
        _tokens(4),
        expected_ops=frozenset({"scan", "remat"}),
        param_path_hints=("blocks", "attn", "query", "embed", "pos_embed"),
    )


# ---------------------------------------------------------------------------
# BERT-style encoder: padding mask, lax.scan over stacked state + checkpoint
# ---------------------------------------------------------------------------


class EncoderLayer(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        head_dim = D_MODEL // HEADS
        self.qkv = nnx.LinearGeneral(D_MODEL, (3, HEADS, head_dim), rngs=rngs)
        self.attn_out = nnx.LinearGeneral((HEADS, head_dim), D_MODEL, axis=(-2, -1), rngs=rngs)
        self.ln_attn = nnx.LayerNorm(D_MODEL, rngs=rngs)
        self.ffn_in = nnx.Linear(D_MODEL, 4 * D_MODEL, rngs=rngs)
        self.ffn_out = nnx.Linear(4 * D_MODEL, D_MODEL, rngs=rngs)
        self.ln_ffn = nnx.LayerNorm(D_MODEL, rngs=rngs)

    def __call__(self, x, mask):
        qkv = self.qkv(x)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        x = self.ln_attn(x + self.attn_out(masked_attention(q, k, v, mask)))
        h = self.ffn_out(nnx.gelu(self.ffn_in(x), approximate=False))
        return self.ln_ffn(x + h)


class Encoder(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D_MODEL, rngs=rngs)
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (SEQ, D_MODEL)))
        self.ln_embed = nnx.LayerNorm(D_MODEL, rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs):
            return EncoderLayer(rngs=rngs)

        self.layers = make_layers(rngs)
        self.pooler = nnx.Linear(D_MODEL, D_MODEL, rngs=rngs)

    def __call__(self, tokens, lengths):
        x = self.ln_embed(self.embed(tokens) + self.pos_embed[...])
        mask = padding_mask(lengths, tokens.shape[1])
        graphdef, stacked = nnx.split(self.layers)

        @jax.checkpoint
        def body(x, layer_state):
            return nnx.merge(graphdef, layer_state)(x, mask), None

        x, _ = jax.lax.scan(body, x, stacked)
        pooled = jnp.tanh(self.pooler(x[:, 0]))
        return x, pooled


def make_encoder_padmask() -> ModelCase:
    lengths = jnp.array([SEQ, 5], jnp.int32)
    return _nnx_case(
        "encoder_padmask",
        lambda: Encoder(rngs=nnx.Rngs(0)),
        _tokens(5),
        lengths,
        expected_ops=frozenset({"scan", "remat"}),
        param_path_hints=("layers", "qkv", "pooler", "embed"),
    )


# ---------------------------------------------------------------------------
# Control flow: cond + while_loop + custom_jvp + custom_vjp
# ---------------------------------------------------------------------------


class Adaptive(nnx.Module):
    def __init__(self, in_features=16, features=32, max_steps=6, tol=0.25, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.encoder = nnx.Linear(in_features, features, rngs=rngs)
        self.branch_a = nnx.Param(init(rngs.params(), (features, features)))
        self.branch_b = nnx.Param(init(rngs.params(), (features, features)))
        self.step_kernel = nnx.Param(init(rngs.params(), (features, features)))
        self.head = nnx.Linear(features, 4, rngs=rngs)
        self.max_steps = max_steps
        self.tol = tol

    def __call__(self, x):
        pre = self.encoder(x)
        h = surrogate_clip(pre)
        h = branch(jnp.mean(pre) > 0, h, self.branch_a[...], self.branch_b[...])
        w_step = self.step_kernel[...]
        n_steps = halting_steps(
            jax.lax.stop_gradient(h),
            jax.lax.stop_gradient(w_step),
            max_steps=self.max_steps,
            tol=self.tol,
        )
        h = masked_refinement(h, w_step, n_steps, max_steps=self.max_steps)
        return self.head(clipped_grad(h)), n_steps


def make_adaptive() -> ModelCase:
    x = normal(6, (4, 16))
    return _nnx_case(
        "adaptive",
        lambda: Adaptive(rngs=nnx.Rngs(0)),
        x,
        expected_ops=frozenset(
            {"cond", "while", "scan", "custom_jvp_call", "custom_vjp_call"}
        ),
        param_path_hints=("encoder", "branch_a", "step_kernel", "head"),
    )


MODELS = {
    "mlp": make_mlp,
    "cnn_bn": make_cnn_bn,
    "decoder_scan": make_decoder_scan,
    "encoder_padmask": make_encoder_padmask,
    "adaptive": make_adaptive,
}

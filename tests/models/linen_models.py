"""Small Flax linen models for graphopt round-trip tests.

Models (all tiny: d_model 32, 2 layers, sequence length 16):

* ``mlp``              – three ``nn.Dense`` layers with GELU.
* ``cnn_bn``           – conv net with ``nn.BatchNorm`` in inference mode
                         (``use_running_average=True``, non-trivial running stats).
* ``cnn_bn_train``     – the same net in training mode: ``apply`` is called with
                         ``mutable=["batch_stats"]`` and returns ``(out, updates)``.
* ``decoder_scan``     – decoder-only transformer, causal
                         ``nn.MultiHeadDotProductAttention``, layers stacked with
                         ``nn.scan(nn.remat(Block))`` (so ``scan`` containing ``remat``).
* ``encoder_padmask``  – BERT-style encoder with hand-written attention and a
                         padding mask built from per-example token lengths;
                         returns ``(sequence_output, pooled)``.
* ``adaptive``         – ``lax.cond`` between parameterised branches, adaptive
                         depth chosen by a ``lax.while_loop``, a ``custom_jvp``
                         activation and a ``custom_vjp`` gradient clip.
* ``fixed_point``      – DEQ-style fixed-point iteration in a ``lax.while_loop``
                         with a differentiable carry (checked with forward mode,
                         since reverse mode through ``while`` is unsupported).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import (
    ModelCase,
    branch,
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


def _linen_case(name, model, *inputs, seed=0, **case_kwargs) -> ModelCase:
    """Initialise ``model`` and build a case tracing the bound ``model.apply``."""
    variables = numpy_init(jax.eval_shape(model.init, jax.random.key(0), *inputs), seed)
    return ModelCase(
        name=name,
        target=model.apply,
        trace_args=(variables, *inputs),
        trace_kwargs={},
        fn=model.apply,
        args=(variables, *inputs),
        **case_kwargs,
    )


# ---------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------


class MLP(nn.Module):
    features: tuple[int, ...] = (32, 32, 8)

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.Dense(f)(x)
            if i + 1 < len(self.features):
                x = nn.gelu(x)
        return x


def make_mlp() -> ModelCase:
    x = normal(1, (4, 16))
    return _linen_case(
        "mlp", MLP(), x, param_path_hints=("Dense_0", "Dense_2", "kernel", "bias")
    )


# ---------------------------------------------------------------------------
# CNN with BatchNorm
# ---------------------------------------------------------------------------


class CNN(nn.Module):
    train: bool = False
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not self.train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Conv(16, (3, 3), strides=(2, 2))(x)
        x = nn.BatchNorm(use_running_average=not self.train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes)(x)


def _cnn_inputs():
    return normal(2, (2, 8, 8, 3))


def make_cnn_bn() -> ModelCase:
    model = CNN(train=False)
    x = _cnn_inputs()
    # numpy_init also gives BatchNorm non-trivial running statistics.
    variables = numpy_init(jax.eval_shape(model.init, jax.random.key(0), x), seed=3)
    return ModelCase(
        name="cnn_bn",
        target=model.apply,
        trace_args=(variables, x),
        trace_kwargs={},
        fn=model.apply,
        args=(variables, x),
        param_path_hints=("Conv_0", "BatchNorm_1", "Dense_0", "mean", "var"),
    )


def make_cnn_bn_train() -> ModelCase:
    model = CNN(train=True)
    x = _cnn_inputs()
    # numpy_init also gives BatchNorm non-trivial running statistics.
    variables = numpy_init(jax.eval_shape(model.init, jax.random.key(0), x), seed=3)
    # apply(..., mutable=...) returns (logits, {"batch_stats": new_stats}).
    train_apply = functools.partial(model.apply, mutable=["batch_stats"])
    return ModelCase(
        name="cnn_bn_train",
        target=train_apply,
        trace_args=(variables, x),
        trace_kwargs={"params_argnums": (0,)},
        fn=train_apply,
        args=(variables, x),
        param_path_hints=("Conv_1", "BatchNorm_0", "scale", "mean"),
    )


# ---------------------------------------------------------------------------
# Decoder-only transformer: nn.scan over nn.remat(Block)
# ---------------------------------------------------------------------------


class DecoderBlock(nn.Module):
    """Pre-LN block.  Signature ``(carry, _) -> (carry, None)`` for ``nn.scan``."""

    @nn.compact
    def __call__(self, x, _):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        h = nn.LayerNorm(name="ln_attn")(x)
        h = nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(h, h, mask=mask)
        x = x + h
        h = nn.LayerNorm(name="ln_mlp")(x)
        h = nn.Dense(4 * D_MODEL, name="mlp_in")(h)
        h = nn.Dense(D_MODEL, name="mlp_out")(nn.gelu(h))
        return x + h, None


class ScanDecoder(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(VOCAB, D_MODEL, name="embed")
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (SEQ, D_MODEL))
        x = embed(tokens) + pos[: tokens.shape[1]]
        Blocks = nn.scan(
            nn.remat(DecoderBlock),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=LAYERS,
        )
        x, _ = Blocks(name="layers")(x, None)
        x = nn.LayerNorm(name="ln_f")(x)
        return embed.attend(x)  # tied output projection


def _tokens(seed):
    return randint(seed, (BATCH, SEQ), VOCAB)


def make_decoder_scan() -> ModelCase:
    return _linen_case(
        "decoder_scan",
        ScanDecoder(),
        _tokens(4),
        expected_ops=frozenset({"scan", "remat"}),
        param_path_hints=("layers", "attn", "query", "embed", "pos_embed"),
    )


# ---------------------------------------------------------------------------
# BERT-style encoder with padding mask
# ---------------------------------------------------------------------------


class EncoderLayer(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        head_dim = D_MODEL // HEADS
        qkv = nn.DenseGeneral((3, HEADS, head_dim), name="qkv")(x)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        attn = masked_attention(q, k, v, mask)
        attn = nn.DenseGeneral(D_MODEL, axis=(-2, -1), name="attn_out")(attn)
        x = nn.LayerNorm(name="ln_attn")(x + attn)  # post-LN, as in BERT
        h = nn.Dense(4 * D_MODEL, name="ffn_in")(x)
        h = nn.Dense(D_MODEL, name="ffn_out")(nn.gelu(h, approximate=False))
        return nn.LayerNorm(name="ln_ffn")(x + h)


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, tokens, lengths):
        x = nn.Embed(VOCAB, D_MODEL, name="embed")(tokens)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), (SEQ, D_MODEL))
        x = nn.LayerNorm(name="ln_embed")(x)
        mask = padding_mask(lengths, tokens.shape[1])
        for i in range(LAYERS):
            x = EncoderLayer(name=f"layer_{i}")(x, mask)
        pooled = jnp.tanh(nn.Dense(D_MODEL, name="pooler")(x[:, 0]))
        return x, pooled


def make_encoder_padmask() -> ModelCase:
    lengths = jnp.array([SEQ, 5], jnp.int32)
    return _linen_case(
        "encoder_padmask",
        Encoder(),
        _tokens(5),
        lengths,
        param_path_hints=("layer_0", "layer_1", "qkv", "pooler"),
    )


# ---------------------------------------------------------------------------
# Control flow: cond + while_loop + custom_jvp + custom_vjp
# ---------------------------------------------------------------------------


class Adaptive(nn.Module):
    features: int = 32
    max_steps: int = 6
    tol: float = 0.25

    @nn.compact
    def __call__(self, x):
        f = self.features
        init = nn.initializers.lecun_normal()
        pre = nn.Dense(f, name="encoder")(x)
        h = surrogate_clip(pre)
        w_a = self.param("branch_a", init, (f, f))
        w_b = self.param("branch_b", init, (f, f))
        h = branch(jnp.mean(pre) > 0, h, w_a, w_b)
        w_step = self.param("step_kernel", init, (f, f))
        n_steps = halting_steps(
            jax.lax.stop_gradient(h),
            jax.lax.stop_gradient(w_step),
            max_steps=self.max_steps,
            tol=self.tol,
        )
        h = masked_refinement(h, w_step, n_steps, max_steps=self.max_steps)
        h = clipped_grad(h)
        return nn.Dense(4, name="head")(h), n_steps


def make_adaptive() -> ModelCase:
    x = normal(6, (4, 16))
    return _linen_case(
        "adaptive",
        Adaptive(),
        x,
        expected_ops=frozenset(
            {"cond", "while", "scan", "custom_jvp_call", "custom_vjp_call"}
        ),
        param_path_hints=("encoder", "branch_a", "step_kernel", "head"),
    )


class FixedPoint(nn.Module):
    """h <- tanh(W h + U x) until the update is below ``tol`` (max 30 steps)."""

    features: int = 16
    max_iter: int = 30
    tol: float = 1e-4
    recur_scale: float = 0.2  # keeps the iteration a contraction

    @nn.compact
    def __call__(self, x):
        f = self.features
        u = nn.Dense(f, name="inject")(x)
        w = self.recur_scale * self.param("recur", nn.initializers.normal(1 / f**0.5), (f, f))

        def cond_fn(c):
            i, _, err = c
            return (i < self.max_iter) & (err > self.tol)

        def body_fn(c):
            i, h, _ = c
            h_new = jnp.tanh(h @ w + u)
            return i + 1, h_new, jnp.max(jnp.abs(h_new - h))

        _, h, _ = jax.lax.while_loop(cond_fn, body_fn, (0, jnp.zeros_like(u), jnp.inf))
        return nn.Dense(3, name="readout")(h)


def make_fixed_point() -> ModelCase:
    x = normal(7, (3, 8))
    return _linen_case(
        "fixed_point",
        FixedPoint(),
        x,
        grad_mode="forward",
        expected_ops=frozenset({"while"}),
        param_path_hints=("inject", "recur", "readout"),
    )


MODELS = {
    "mlp": make_mlp,
    "cnn_bn": make_cnn_bn,
    "cnn_bn_train": make_cnn_bn_train,
    "decoder_scan": make_decoder_scan,
    "encoder_padmask": make_encoder_padmask,
    "adaptive": make_adaptive,
    "fixed_point": make_fixed_point,
}

"""GPT-style decoder (Flax linen, random weights): prefill, and a batch-1 decode step with a KV cache.

Pre-norm blocks (causal self-attention, GELU MLP), learned positions, tied-free LM head. Two
zoo models share the module:

- `gpt_prefill` (`build_prefill`): `apply(variables, tokens) -> (logits, cache)` over a prompt;
  the cache holds every layer's keys and values, `(layers, 2, batch, max_len, heads, head_dim)`,
  filled up to the prompt length.
- `gpt_decode` (`build_decode`): `apply(variables, token, cache, position) -> (logits, cache)`
  for one new token at batch 1: the step writes its keys and values into the cache at
  `position` (an int32 scalar) and attends to positions `<= position`. The cache is an input and
  an output of the step, as in a serving loop.

full: width 256, 4 layers, 4 heads, vocab 8192, max_len 512; prefill batch 4 × 128 tokens,
decode at position 256. quick: width 32, 2 layers, 2 heads, vocab 64, max_len 32; prefill
batch 2 × 16, decode at position 16.

>>> import sys; sys.path.insert(0, "benchmarks")          # doctest: +SKIP
>>> from zoo import gpt                                   # doctest: +SKIP
>>> m = gpt.build_decode("quick")                         # doctest: +SKIP
>>> logits, cache = m.apply(m.variables, *m.inputs)       # doctest: +SKIP
>>> logits.shape, cache.shape                             # doctest: +SKIP
((1, 1, 64), (2, 2, 1, 32, 2, 16))
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.model import ZooModel, check_size

SHAPES = {"quick": dict(width=32, depth=2, heads=2, vocab=64, max_len=32, batch=2, prompt=16, position=16),
          "full": dict(width=256, depth=4, heads=4, vocab=8192, max_len=512, batch=4, prompt=128, position=256)}


class Block(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x, cache, start):
        """x: (batch, new, width); cache: (2, batch, max_len, heads, head_dim), written at `start`;
        the new tokens attend to cache positions <= their own."""
        batch, new, width = x.shape
        head_dim = width // self.heads
        h = nn.LayerNorm(name="ln1")(x)
        qkv = nn.DenseGeneral((3, self.heads, head_dim), name="qkv")(h)     # (batch, new, 3, heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        cache = jax.lax.dynamic_update_slice(cache, jnp.stack([k, v]).astype(cache.dtype),
                                             (0, 0, start, 0, 0))
        keys, values = cache[0], cache[1]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, keys) / np.sqrt(head_dim).astype(np.float32)
        query_pos = start + jnp.arange(new)
        allowed = jnp.arange(cache.shape[2])[None, :] <= query_pos[:, None]          # (new, max_len)
        scores = jnp.where(allowed[None, None], scores, jnp.finfo(scores.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), values)
        x = x + nn.DenseGeneral(width, axis=(-2, -1), name="out")(out)
        h = nn.LayerNorm(name="ln2")(x)
        x = x + nn.Dense(width, name="down")(nn.gelu(nn.Dense(4 * width, name="up")(h)))
        return x, cache


class GPT(nn.Module):
    vocab: int
    width: int
    depth: int
    heads: int
    max_len: int

    def empty_cache(self, batch: int, dtype=jnp.float32):
        return jnp.zeros((self.depth, 2, batch, self.max_len, self.heads, self.width // self.heads), dtype)

    @nn.compact
    def __call__(self, tokens, cache, start):
        positions = start + jnp.arange(tokens.shape[1])
        x = nn.Embed(self.vocab, self.width, name="embed")(tokens)
        x = x + nn.Embed(self.max_len, self.width, name="pos_embed")(positions)
        layers = []
        for i in range(self.depth):
            x, layer_cache = Block(self.heads, name=f"block_{i}")(x, cache[i], start)
            layers.append(layer_cache)
        logits = nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="ln_final")(x))
        return logits, jnp.stack(layers)


def _model(size):
    s = SHAPES[check_size(size)]
    return s, GPT(s["vocab"], s["width"], s["depth"], s["heads"], s["max_len"])


def _variables(model, s, seed):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return model.init(jax.random.key(seed), tokens, model.empty_cache(1), jnp.int32(0))


def build_prefill(size: str = "quick", seed: int = 0) -> ZooModel:
    """The decoder over a prompt: `apply(variables, tokens) -> (logits, cache)`."""
    s, model = _model(size)
    variables = _variables(model, s, seed)
    tokens = jax.random.randint(jax.random.key(seed + 1), (s["batch"], s["prompt"]), 0, s["vocab"], jnp.int32)

    def prefill(variables, tokens):
        return model.apply(variables, tokens, model.empty_cache(tokens.shape[0]), 0)

    return ZooModel("gpt_prefill", "flax.linen", prefill, variables, (tokens,),
                    "causal LM prefill: logits and KV cache of a prompt (random weights)", item="sequence")


def build_decode(size: str = "quick", seed: int = 0) -> ZooModel:
    """One batch-1 decode step: `apply(variables, token, cache, position) -> (logits, cache)`,
    on a cache filled by a prefill of `position` random tokens."""
    s, model = _model(size)
    variables = _variables(model, s, seed)
    prompt = jax.random.randint(jax.random.key(seed + 1), (1, s["position"]), 0, s["vocab"], jnp.int32)
    _, cache = jax.jit(model.apply)(variables, prompt, model.empty_cache(1), 0)
    token = jnp.asarray([[int(prompt[0, -1])]], jnp.int32)
    position = jnp.int32(s["position"])

    def decode(variables, token, cache, position):
        return model.apply(variables, token, cache, position)

    return ZooModel("gpt_decode", "flax.linen", decode, variables, (token, cache, position),
                    "causal LM decode step at batch 1 with a KV cache in and out (random weights)",
                    items=1, item="token")


build = build_decode

"""BERT-mini-style encoder (Flax linen, random weights) with a padding mask.

Token + position + segment embeddings, LayerNorm, post-norm encoder blocks (self-attention with
the padding mask, GELU MLP), and a pooled [CLS] classifier. Inputs: `tokens` int32 (batch, seq)
and `mask` bool (batch, seq), True at real tokens; the example batch has sequences of several
lengths, padded. full: BERT-mini (4 layers, width 256, 4 heads, MLP 1024, vocab 30522) on batch 8
× 128 tokens; quick: 2 layers, width 32, 2 heads, vocab 100, batch 2 × 16.

>>> import sys; sys.path.insert(0, "benchmarks")          # doctest: +SKIP
>>> from zoo import bert                                  # doctest: +SKIP
>>> m = bert.build("quick"); m.apply(m.variables, *m.inputs).shape   # doctest: +SKIP
(2, 2)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.model import ZooModel, check_size

SHAPES = {"quick": dict(batch=2, seq=16, vocab=100, width=32, depth=2, heads=2),
          "full": dict(batch=8, seq=128, vocab=30522, width=256, depth=4, heads=4)}


class EncoderBlock(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x, mask):
        attention = nn.MultiHeadDotProductAttention(self.heads, name="attn")(x, x, mask=mask)
        x = nn.LayerNorm(name="ln1")(x + attention)
        width = x.shape[-1]
        y = nn.Dense(width, name="down")(nn.gelu(nn.Dense(4 * width, name="up")(x)))
        return nn.LayerNorm(name="ln2")(x + y)


class BertEncoder(nn.Module):
    vocab: int
    width: int
    depth: int
    heads: int
    max_len: int = 512
    classes: int = 2

    @nn.compact
    def __call__(self, tokens, mask):
        positions = jnp.arange(tokens.shape[1])
        x = nn.Embed(self.vocab, self.width, name="tok_embed")(tokens)
        x = x + nn.Embed(self.max_len, self.width, name="pos_embed")(positions)
        x = x + nn.Embed(2, self.width, name="seg_embed")(jnp.zeros_like(tokens))
        x = nn.LayerNorm(name="ln_embed")(x)
        attention_mask = nn.make_attention_mask(mask, mask)          # (batch, 1, q, k)
        for i in range(self.depth):
            x = EncoderBlock(self.heads, name=f"layer_{i}")(x, attention_mask)
        pooled = jnp.tanh(nn.Dense(self.width, name="pooler")(x[:, 0]))
        return nn.Dense(self.classes, name="classifier")(pooled)


def build(size: str = "quick", seed: int = 0) -> ZooModel:
    """The encoder at `size` with random weights from `seed`; inputs (tokens, padding mask)."""
    s = SHAPES[check_size(size)]
    model = BertEncoder(s["vocab"], s["width"], s["depth"], s["heads"])
    rng = np.random.default_rng(seed + 1)
    tokens = rng.integers(1, s["vocab"], (s["batch"], s["seq"]))
    lengths = np.linspace(s["seq"], max(2, s["seq"] // 4), s["batch"]).astype(int)  # full ... quarter
    mask = np.arange(s["seq"])[None, :] < lengths[:, None]
    tokens = jnp.asarray(np.where(mask, tokens, 0), jnp.int32)
    mask = jnp.asarray(mask)
    variables = model.init(jax.random.key(seed), tokens, mask)
    return ZooModel("bert_mini", "flax.linen", model.apply, variables, (tokens, mask),
                    "sequence classification with a padding mask (random weights)", item="sequence")

"""ViT-tiny (Flax nnx, random weights): patch embedding, class token, pre-norm encoder blocks.

full: ViT-tiny's width 192, 12 layers, 3 heads, MLP 768, on batch 8 of 64x64x3 images in 8x8
patches (64 patches + class token); quick: width 32, 2 layers, 2 heads, batch 2 of 16x16x3.

>>> import sys; sys.path.insert(0, "benchmarks")          # doctest: +SKIP
>>> from zoo import vit                                   # doctest: +SKIP
>>> m = vit.build("quick"); m.apply(m.variables, *m.inputs).shape    # doctest: +SKIP
(2, 10)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.model import ZooModel, check_size, nnx_apply

SHAPES = {"quick": dict(batch=2, image=16, patch=4, width=32, depth=2, heads=2),
          "full": dict(batch=8, image=64, patch=8, width=192, depth=12, heads=3)}


def _list(items):
    return nnx.List(items) if hasattr(nnx, "List") else items


class Block(nnx.Module):
    def __init__(self, width, heads, rngs):
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class ViT(nnx.Module):
    def __init__(self, image, patch, width, depth, heads, classes, rngs):
        self.patch = nnx.Conv(3, width, (patch, patch), strides=(patch, patch), padding="VALID", rngs=rngs)
        tokens = (image // patch) ** 2 + 1
        self.cls = nnx.Param(jax.random.normal(rngs.params(), (1, 1, width)) * 0.02)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, tokens, width)) * 0.02)
        self.blocks = _list([Block(width, heads, rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, classes, rngs=rngs)

    def __call__(self, images):
        x = self.patch(images)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def build(size: str = "quick", seed: int = 0) -> ZooModel:
    """ViT-tiny at `size` with random weights from `seed`, on random images."""
    s = SHAPES[check_size(size)]
    module = ViT(s["image"], s["patch"], s["width"], s["depth"], s["heads"], 10, nnx.Rngs(seed))
    apply, variables = nnx_apply(module)
    x = jax.random.normal(jax.random.key(seed + 1), (s["batch"], s["image"], s["image"], 3))
    return ZooModel("vit_tiny", "flax.nnx", apply, variables, (x,), "image classification (random weights)",
                    item="image")

"""A small residual block shared by the view and CLI tests (diff, DOT, `graphopt show`).

The file is self-contained: the CLI tests load it as a model file (`blocks.py:make`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln")(x)
        h = nn.Dense(32, name="up")(h)
        return x + nn.Dense(16, name="down")(nn.gelu(h))


def make():
    """(fn, example args): the factory form the CLI takes."""
    x = jnp.ones((2, 4, 16))
    block = Block()
    return block.apply, (block.init(jax.random.key(0), x), x)

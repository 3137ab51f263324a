"""MLP (Flax nnx, random weights): Linear-GELU stacks on flattened 28x28 images, 10 classes.

quick: batch 8, 64 → 128 → 128 → 10; full: batch 64, 784 → 512 → 512 → 10.

>>> import sys; sys.path.insert(0, "benchmarks")          # doctest: +SKIP
>>> from zoo import mlp                                   # doctest: +SKIP
>>> m = mlp.build("quick"); m.apply(m.variables, *m.inputs).shape    # doctest: +SKIP
(8, 10)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.model import ZooModel, check_size, nnx_apply

SHAPES = {"quick": dict(batch=8, widths=(64, 128, 128, 10)),
          "full": dict(batch=64, widths=(784, 512, 512, 10))}


class MLP(nnx.Module):
    def __init__(self, widths, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])]) \
            if hasattr(nnx, "List") else [nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.gelu(layer(x))
        return self.layers[-1](x)


def build(size: str = "quick", seed: int = 0) -> ZooModel:
    """The MLP at `size` with random weights drawn from `seed`, on a random input batch."""
    shape = SHAPES[check_size(size)]
    apply, variables = nnx_apply(MLP(shape["widths"], nnx.Rngs(seed)))
    x = jax.random.normal(jax.random.key(seed + 1), (shape["batch"], shape["widths"][0]), jnp.float32)
    return ZooModel("mlp", "flax.nnx", apply, variables, (x,), "classification (random weights)", item="row")

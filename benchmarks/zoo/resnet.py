"""ResNet-18-style CNN (Flax linen, random weights, BatchNorm in inference mode on running stats).

Four stages of two basic blocks (3x3 conv, BatchNorm, ReLU, 3x3 conv, BatchNorm, skip; a 1x1
strided projection where the shape changes), a 3x3 stem, global average pooling and a dense head.
The running statistics are random (not the init's 0 and 1), so folding BatchNorm has work to do.
quick: widths 8-64, batch 2 of 16x16x3; full: widths 32-256 (half ResNet-18), batch 8 of 32x32x3.

>>> import sys; sys.path.insert(0, "benchmarks")          # doctest: +SKIP
>>> from zoo import resnet                                # doctest: +SKIP
>>> m = resnet.build("quick"); m.apply(m.variables, *m.inputs).shape   # doctest: +SKIP
(2, 10)
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.model import ZooModel, check_size

SHAPES = {"quick": dict(batch=2, image=16, widths=(8, 16, 32, 64)),
          "full": dict(batch=8, image=32, widths=(32, 64, 128, 256))}


class BasicBlock(nn.Module):
    width: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        norm = lambda name: nn.BatchNorm(use_running_average=True, name=name)  # noqa: E731
        y = nn.Conv(self.width, (3, 3), (self.stride, self.stride), use_bias=False, name="conv1")(x)
        y = nn.relu(norm("bn1")(y))
        y = nn.Conv(self.width, (3, 3), use_bias=False, name="conv2")(y)
        y = norm("bn2")(y)
        if x.shape[-1] != self.width or self.stride != 1:
            x = nn.Conv(self.width, (1, 1), (self.stride, self.stride), use_bias=False, name="proj")(x)
            x = norm("proj_bn")(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    widths: Sequence[int] = (64, 128, 256, 512)
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.widths[0], (3, 3), use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True, name="stem_bn")(x))
        for stage, width in enumerate(self.widths):
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(width, stride, name=f"stage{stage}_block{block}")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.classes, name="head")(x)


def build(size: str = "quick", seed: int = 0) -> ZooModel:
    """ResNet-18-style at `size`, random weights and running statistics from `seed`."""
    shape = SHAPES[check_size(size)]
    model = ResNet18(shape["widths"])
    x = jax.random.normal(jax.random.key(seed + 1), (shape["batch"], shape["image"], shape["image"], 3))
    variables = model.init(jax.random.key(seed), x)
    rng = np.random.default_rng(seed)

    def stats(path, leaf):
        name = jax.tree_util.keystr(path)
        if "mean" in name:
            return jnp.asarray(rng.normal(0, 0.1, leaf.shape), leaf.dtype)
        return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)

    variables = {"params": variables["params"],
                 "batch_stats": jax.tree_util.tree_map_with_path(stats, variables["batch_stats"])}
    return ZooModel("resnet18", "flax.linen", model.apply, variables, (x,),
                    "image classification (random weights, BatchNorm on running stats)", item="image")

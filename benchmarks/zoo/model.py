"""One interface for every zoo model: `ZooModel`, and how an nnx module becomes one.

Every zoo module has `build(size="quick" | "full", seed=0) -> ZooModel`. A ZooModel is a pure
function and its arguments:

    model = zoo.MODELS["mlp"]("quick")
    outputs = model.apply(model.variables, *model.inputs)       # plain JAX, jittable
    graph = graphopt.trace(model.apply, model.variables, *model.inputs, params_argnums=0)

`variables` is the whole parameter pytree (linen: `{"params": ..., "batch_stats": ...}`; nnx: the
module's state as a plain nested dict), always the first argument, so graphopt treats it as
parameters with `params_argnums=0`. `inputs` are example inputs (arrays) of the shapes the model
is benchmarked on; `items` is how many items (images, sequences, tokens) one call processes, for
throughput. `evaluate`, when set (the trained models), scores a replacement for the model:
`evaluate(run) -> float` calls `run(*inputs)` on evaluation inputs shaped like `inputs` and
returns `metric` (accuracy: higher is better; perplexity: lower is better).

>>> import jax.numpy as jnp
>>> m = ZooModel("id", "jax", lambda v, x: x * v["s"], {"s": jnp.float32(2)}, (jnp.ones(3),), "demo")
>>> m.apply(m.variables, *m.inputs).tolist(), m.items
([2.0, 2.0, 2.0], 3)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

SIZES = ("quick", "full")


@dataclasses.dataclass
class ZooModel:
    """A model as `apply(variables, *inputs) -> outputs` with its parameters and example inputs."""

    name: str
    framework: str                     # "flax.linen" or "flax.nnx" (or "jax" for plain functions)
    apply: Callable                    # apply(variables, *inputs) -> outputs (a pytree of arrays)
    variables: Any                     # the parameter pytree (params_argnums=0)
    inputs: tuple                      # example inputs
    task: str                          # what the model does, in words
    items: int | None = None           # items per call (default: the first input's leading axis)
    item: str = "item"                 # what an item is: "image", "sequence", "token"
    metric: str | None = None          # "accuracy" or "perplexity" when `evaluate` is set
    evaluate: Callable | None = None   # evaluate(run) -> metric, run(*inputs) -> outputs

    def __post_init__(self):
        if self.items is None:
            first = self.inputs[0] if self.inputs else None
            self.items = int(np.shape(first)[0]) if first is not None and np.ndim(first) else 1


def check_size(size: str) -> str:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return size


def nnx_apply(module) -> tuple[Callable, dict]:
    """`(apply, variables)` for an nnx module: `apply(variables, *inputs)` merges the module's
    graph definition with `variables` (its state as a plain dict) and calls it."""
    from flax import nnx

    graphdef, state = nnx.split(module)
    variables = nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()

    def apply(variables, *inputs):
        state_now = nnx.state(nnx.merge(graphdef, state))
        nnx.replace_by_pure_dict(state_now, variables)
        return nnx.merge(graphdef, state_now)(*inputs)

    return apply, variables

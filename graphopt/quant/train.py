"""Quantization-aware fine-tuning: train the float weights through the quantized model's rounding.

`fake_quantized(fn, *args, scheme=...)` traces the model and runs the quantize pass in train mode:
each layer's weight (and, for activation-quantizing schemes, its activation) goes through
`fake_quantize`, which rounds to the scheme's grid in the forward pass and passes the gradient
straight through (the gradient of the identity). The result has the traced function's signature
and takes the *float* parameters, so `jax.grad` of a loss of it trains them to do well after
rounding. `distill` (`graphopt.train`, shared with pruning's recovery) is such a loop: it fits the quantized model to the float model's outputs on
unlabeled batches (KL divergence of softened logits, or squared error), with an optax optimizer.
Quantize the fine-tuned weights as usual afterwards (`graphopt.quantize`).

Example:
    >>> import jax, jax.numpy as jnp
    >>> fn = lambda p, x: x @ p["w"]
    >>> params = {"w": jax.random.normal(jax.random.key(0), (32, 4))}
    >>> x = jax.random.normal(jax.random.key(1), (8, 32))
    >>> student = fake_quantized(fn, params, x, scheme="int4", group=8, params_argnums=0)
    >>> tuned = distill(student, lambda x: fn(params, x), params, [x], steps=50, loss="mse",
    ...                 learning_rate=3e-3)
    >>> err = lambda p: float(jnp.mean((student(p, x) - fn(params, x)) ** 2))
    >>> err(tuned) < err(params)
    True
"""

from __future__ import annotations

from typing import Callable

from graphopt.pipeline import PassSpec, run_pipeline
from graphopt.train import distill

__all__ = ["distill", "fake_quantized"]


def fake_quantized(fn: Callable, *args, scheme="int8", pipeline=("canonicalize", "fold_constants", "cse"),
                   params_argnums=None, **options) -> Callable:
    """`fn` with every layer fake-quantized (straight-through gradients); same signature as `fn`.
    The graph is the function's `.graph`. Options: the quantize pass's (rules, group, calibration...)."""
    import graphopt

    graph = graphopt.trace(fn, *args, params_argnums=params_argnums)
    specs = [*pipeline, PassSpec("quantize", (scheme,), {**options, "mode": "train"}), "dce"]
    graph = run_pipeline(graph, specs).graph
    lowered = graphopt.lower(graph)
    lowered.graph = graph
    return lowered

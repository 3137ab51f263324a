"""Quantization-aware fine-tuning: train the float weights through the quantized model's rounding.

`fake_quantized(fn, *args, scheme=...)` traces the model and runs the quantize pass in train mode:
each layer's weight (and, for activation-quantizing schemes, its activation) goes through
`fake_quantize`, which rounds to the scheme's grid in the forward pass and passes the gradient
straight through (the gradient of the identity). The result has the traced function's signature
and takes the *float* parameters, so `jax.grad` of a loss of it trains them to do well after
rounding. `distill` is such a loop: it fits the quantized model to the float model's outputs on
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

import itertools
from typing import Callable, Iterable

import jax
import jax.numpy as jnp

from graphopt.pipeline import PassSpec, run_pipeline
from graphopt.quant.scheme import QuantizationError


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


def distill(student: Callable, teacher: Callable, params, batches: Iterable, *, steps: int,
            loss: str = "kl", temperature: float = 1.0, learning_rate: float = 1e-4, optimizer=None,
            inputs: Callable | None = None):
    """Fine-tune `params` so that `student(params, x)` matches `teacher(x)`; the new params.

    `batches` yields inputs `x` (cycled until `steps` optimizer steps ran; `inputs(batch)` maps a
    batch to `x` if it holds more, e.g. labels). `loss`: "kl" (teacher's softmax at `temperature`
    against the student's, over the last axis: logits) or "mse". `optimizer`: an optax
    GradientTransformation (default adam at `learning_rate`). `params` itself is not modified.
    """
    import optax

    if loss not in ("kl", "mse"):
        raise QuantizationError(f"distill: loss must be 'kl' or 'mse', got {loss!r}")
    if steps < 1:
        raise QuantizationError(f"distill: steps must be >= 1, got {steps}")
    optimizer = optimizer or optax.adam(learning_rate)

    def objective(p, x, target):
        out = student(p, x)
        if loss == "mse":
            return jnp.mean((out.astype(jnp.float32) - target) ** 2)
        log_q = jax.nn.log_softmax(out.astype(jnp.float32) / temperature, axis=-1)
        log_p = jax.nn.log_softmax(target / temperature, axis=-1)
        return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)) * temperature ** 2

    @jax.jit
    def step(p, state, x):
        target = jax.lax.stop_gradient(teacher(x).astype(jnp.float32))
        value, grads = jax.value_and_grad(objective)(p, x, target)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    params = jax.tree_util.tree_map(jnp.array, params)  # a copy: the caller's arrays stay as they are
    state = optimizer.init(params)
    batches = list(batches) if not isinstance(batches, list) else batches
    if not batches:
        raise QuantizationError("distill: batches is empty")
    for batch in itertools.islice(itertools.cycle(batches), steps):
        params, state, _ = step(params, state, inputs(batch) if inputs else batch)
    return params

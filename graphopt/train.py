"""Fine-tuning loops shared by quantization and pruning: distillation and task-loss training (optax).

    distill(student, teacher, params, batches, steps=...)      fit student(params, x) to teacher(x)
    fine_tune(fn, params, batches, loss, steps=...)             minimize loss(fn(params, x), batch)

Both return new parameters; the caller's arrays are never modified. `batches` are cycled until
`steps` optimizer steps ran; the default optimizer is adam at `learning_rate`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> fn = lambda p, x: x @ p["w"]
    >>> x = jax.random.normal(jax.random.key(1), (16, 4))
    >>> target = x @ jnp.arange(4.0)[:, None]
    >>> params = {"w": jnp.zeros((4, 1))}
    >>> tuned = fine_tune(fn, params, [(x, target)], lambda out, b: jnp.mean((out - b[1]) ** 2),
    ...                   steps=300, learning_rate=0.1, inputs=lambda b: b[0])
    >>> bool(jnp.allclose(tuned["w"][:, 0], jnp.arange(4.0), atol=0.05)), float(params["w"].sum())
    (True, 0.0)
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable

import jax
import jax.numpy as jnp

from graphopt.errors import GraphoptError


class TrainingError(GraphoptError, ValueError):
    """A fine-tuning request with bad arguments (unknown loss, no batches, no steps)."""


def distill(student: Callable, teacher: Callable, params, batches: Iterable, *, steps: int,
            loss: str = "kl", temperature: float = 1.0, learning_rate: float = 1e-4, optimizer=None,
            inputs: Callable | None = None, progress: bool = True):
    """Fine-tune `params` so that `student(params, x)` matches `teacher(x)`; the new params.

    `batches` yields inputs `x` (cycled until `steps` optimizer steps ran; `inputs(batch)` maps a
    batch to `x` if it holds more, e.g. labels). `loss`: "kl" (teacher's softmax at `temperature`
    against the student's, over the last axis: logits) or "mse". `optimizer`: an optax
    GradientTransformation (default adam at `learning_rate`). `params` itself is not modified.
    `progress`: a progress bar on a terminal.
    """
    if loss not in ("kl", "mse"):
        raise TrainingError(f"distill: loss must be 'kl' or 'mse', got {loss!r}")

    def objective(p, batch):
        x = inputs(batch) if inputs else batch
        target = jax.lax.stop_gradient(teacher(x).astype(jnp.float32))
        out = student(p, x)
        if loss == "mse":
            return jnp.mean((out.astype(jnp.float32) - target) ** 2)
        log_q = jax.nn.log_softmax(out.astype(jnp.float32) / temperature, axis=-1)
        log_p = jax.nn.log_softmax(target / temperature, axis=-1)
        return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)) * temperature ** 2

    return _train(objective, params, batches, steps, optimizer, learning_rate, "distilling", progress)


def fine_tune(fn: Callable, params, batches: Iterable, loss: Callable, *, steps: int,
              learning_rate: float = 1e-4, optimizer=None, inputs: Callable | None = None,
              progress: bool = True):
    """Train `params` to minimize `loss(fn(params, x), batch)` over `batches`; the new params.

    `inputs(batch)` gives `x` (default: the batch itself), e.g. `lambda b: b[0]` for (x, y)
    batches whose labels the loss reads. `optimizer`: an optax GradientTransformation. `progress`:
    a progress bar on a terminal."""
    def objective(p, batch):
        return loss(fn(p, inputs(batch) if inputs else batch), batch)

    return _train(objective, params, batches, steps, optimizer, learning_rate, "fine-tuning", progress)


def _train(objective: Callable, params, batches: Iterable, steps: int, optimizer, learning_rate: float,
           description: str, progress: bool):
    """`steps` optimizer steps on `objective(params, batch)`, cycling through `batches`; the new
    params (a copy: the caller's arrays stay as they are)."""
    import optax

    from graphopt.progress import track

    batches = _checked(batches, steps)
    optimizer = optimizer or optax.adam(learning_rate)

    @jax.jit
    def step(p, state, batch):
        value, grads = jax.value_and_grad(objective)(p, batch)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    params = jax.tree_util.tree_map(jnp.array, params)
    state = optimizer.init(params)
    cycled = itertools.islice(itertools.cycle(batches), steps)
    for batch in track(cycled, description, total=steps, enabled=progress):
        params, state, _ = step(params, state, batch)
    return params


def _checked(batches, steps: int) -> list:
    if steps < 1:
        raise TrainingError(f"steps must be >= 1, got {steps}")
    batches = list(batches) if not isinstance(batches, list) else batches
    if not batches:
        raise TrainingError("batches is empty")
    return batches

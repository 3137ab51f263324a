"""Small Equinox models for graphopt round-trip tests.

``graphopt.trace(module, x)`` is called on the module; the lowered function
takes ``(params, x)`` with ``params = eqx.filter(module, eqx.is_array)``.  The
reference is ``lambda params, x: eqx.combine(params, static)(x)``.

Models:

* ``mlp`` – ``eqx.nn.MLP`` (16 -> 32 -> 32 -> 8, GELU), applied to a batch with
            ``jax.vmap`` inside ``__call__``.
* ``cnn`` – ``eqx.nn.Conv2d`` / ``eqx.nn.MaxPool2d`` / ``eqx.nn.Linear`` on
            channel-first images, batched with ``jax.vmap``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from . import ModelCase, normal, numpy_init


def _eqx_case(name, make_module, *inputs, seed=0, **case_kwargs) -> ModelCase:
    """Build ``make_module()`` abstractly, fill its arrays from NumPy and wrap it."""
    abstract = eqx.filter_eval_shape(make_module)
    module = numpy_init(abstract, seed, fan_in_axes="trailing")
    params, static = eqx.partition(module, eqx.is_array)

    def fn(params, *xs):
        return eqx.combine(params, static)(*xs)

    return ModelCase(
        name=name,
        target=module,
        trace_args=inputs,
        trace_kwargs={},
        fn=fn,
        args=(params, *inputs),
        **case_kwargs,
    )


class BatchedMLP(eqx.Module):
    mlp: eqx.nn.MLP

    def __init__(self, key):
        self.mlp = eqx.nn.MLP(16, 8, width_size=32, depth=2, activation=jax.nn.gelu, key=key)

    def __call__(self, x):
        return jax.vmap(self.mlp)(x)


def make_mlp() -> ModelCase:
    x = normal(1, (4, 16))
    return _eqx_case(
        "mlp",
        lambda: BatchedMLP(jax.random.key(0)),
        x,
        param_path_hints=("mlp", "layers", "weight"),
    )


class CNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    pool: eqx.nn.MaxPool2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(3, 8, kernel_size=3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1, key=k2)
        self.pool = eqx.nn.MaxPool2d(kernel_size=2, stride=2)
        self.head = eqx.nn.Linear(16 * 2 * 2, 10, key=k3)

    def _single(self, x):  # x: [C, H, W]
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        x = self.pool(x)
        return self.head(jnp.ravel(x))

    def __call__(self, x):
        return jax.vmap(self._single)(x)


def make_cnn() -> ModelCase:
    x = normal(2, (2, 3, 8, 8))
    return _eqx_case(
        "cnn", lambda: CNN(jax.random.key(0)), x, param_path_hints=("conv1", "head", "weight")
    )


MODELS = {
    "mlp": make_mlp,
    "cnn": make_cnn,
}

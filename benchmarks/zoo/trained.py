"""Adapters: the zoo's trained models (`digits`, `charlm`) as `ZooModel`s that carry their metric.

`build_digits(size)` / `build_charlm(size)` train (or load from the weight cache, see
`zoo/__init__.py`) and wrap the model: inputs are one calibration batch of the evaluation shape
(digits: 128 images 8x8x1; charlm: 32 windows of 64 bytes), and `evaluate(run)` is the module's
own evaluation (test accuracy; validation perplexity per byte) with `run(x)` in place of the
model. full: the modules' default training (300 / 500 steps, about a minute each the first time);
quick: a short run (30 / 40 steps, seconds; the metric is then far from the trained one).

>>> import sys; sys.path.insert(0, "benchmarks")          # doctest: +SKIP
>>> from zoo import trained                               # doctest: +SKIP
>>> m = trained.build_digits("full")                      # doctest: +SKIP
>>> m.evaluate(lambda x: m.apply(m.variables, x))         # doctest: +SKIP
0.98...
"""

from __future__ import annotations

import jax.numpy as jnp

from zoo import charlm, digits
from zoo.model import ZooModel, check_size

QUICK_STEPS = {"digits": 30, "charlm": 40}


def _build(name, module, size, seed, task, metric, item):
    steps = QUICK_STEPS[name] if check_size(size) == "quick" else None
    trained = module.train(seed=seed, steps=steps)
    (variables, x), = module.calibration_batches(trained, n=1)
    evaluate = lambda run: module.evaluate(lambda _, batch: run(jnp.asarray(batch)), None, trained.data)  # noqa: E731
    return ZooModel(name, "flax.linen", trained.apply, variables, (jnp.asarray(x),), task,
                    item=item, metric=metric, evaluate=evaluate)


def build_digits(size: str = "quick", seed: int = 0) -> ZooModel:
    """The digits CNN trained on scikit-learn's digits; metric: test accuracy."""
    return _build("digits", digits, size, seed, "8x8 digit classification (trained)", "accuracy", "image")


def build_charlm(size: str = "quick", seed: int = 0) -> ZooModel:
    """The byte-level transformer trained on the standard library's sources; metric: perplexity."""
    return _build("charlm", charlm, size, seed, "byte-level language model (trained)", "perplexity", "sequence")

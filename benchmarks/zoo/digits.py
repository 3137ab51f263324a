"""A small CNN trained on scikit-learn's bundled 8x8 digits: image classification on real data.

Data: `sklearn.datasets.load_digits` (1797 grayscale 8x8 images of the digits 0-9, 16 gray
levels; the file ships inside scikit-learn). Pixels are scaled to [0, 1] and laid out NHWC, float32
`(n, 8, 8, 1)`; labels are int32. A seeded permutation holds out 360 images (20%) as the test set;
the other 1437 train.

Model (`DigitsCNN`, flax linen, no BatchNorm): 3x3 convs with 32 and 64 channels and ReLU, a 2x2
max-pool, a 3x3 conv with 64 channels, then Dense(256) + ReLU and Dense(10): about 320k
parameters, 83% of them in the first dense layer, so that quantization and pruning have weights
to act on. Trained with Adam (lr 1e-3, batches of 128, 300 steps, ~27 epochs): about 10 s on
two CPU cores, test accuracy about 98-99%.

    python benchmarks/zoo/digits.py [--steps N] [--seed S] [--no-cache] [--verbose]

>>> import sys; sys.path.insert(0, "benchmarks")        # doctest: +SKIP
>>> import jax                                           # doctest: +SKIP
>>> from zoo import digits                               # doctest: +SKIP
>>> data = digits.load_data()                            # doctest: +SKIP
>>> data.x_train.shape, data.x_test.shape                # doctest: +SKIP
((1437, 8, 8, 1), (360, 8, 8, 1))
>>> trained = digits.train()                             # doctest: +SKIP
>>> digits.evaluate(jax.jit(trained.apply), trained.variables, trained.data)  # doctest: +SKIP
0.98...
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the `zoo` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses  # noqa: E402
import hashlib  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from zoo import Trained, padded_batches, script_run, train_cached  # noqa: E402

N_TEST = 360
EVAL_BATCH = 128        # evaluate() and calibration_batches() call apply on (128, 8, 8, 1)
TRAIN_BATCH = 128
STEPS = 300
LEARNING_RATE = 1e-3


@dataclasses.dataclass(frozen=True)
class Splits:
    x_train: np.ndarray     # float32 (1437, 8, 8, 1), in [0, 1]
    y_train: np.ndarray     # int32 (1437,)
    x_test: np.ndarray      # float32 (360, 8, 8, 1)
    y_test: np.ndarray      # int32 (360,)


class DigitsCNN(nn.Module):
    """conv3x3(32) - conv3x3(64) - maxpool2 - conv3x3(64) - dense(256) - dense(10), ReLU."""

    channels: tuple[int, ...] = (32, 64, 64)
    hidden: int = 256
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        first, second, third = self.channels
        x = nn.relu(nn.Conv(first, (3, 3))(x))
        x = nn.relu(nn.Conv(second, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(third, (3, 3))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.classes)(x)


def load_data(seed: int = 0) -> Splits:
    """The digits, scaled to [0, 1], split by a permutation drawn from `seed` (360 test images)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = (digits.data.astype(np.float32) / 16.0).reshape(-1, 8, 8, 1)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    test, train_ = order[:N_TEST], order[N_TEST:]
    return Splits(x[train_], y[train_], x[test], y[test])


def train(seed: int = 0, steps: int | None = None, verbose: bool = False,
          cache: bool = True) -> Trained:
    """Train `DigitsCNN` on the split of `load_data()` (always seed 0, so every run has the same
    test set); `seed` draws the initial weights and the batch order. `steps` defaults to 300.
    With `cache`, weights trained before with the same settings are loaded instead.
    """
    steps = STEPS if steps is None else steps
    data = load_data()
    model = DigitsCNN()
    example = jnp.zeros((1, 8, 8, 1), jnp.float32)
    like = jax.eval_shape(model.init, jax.random.PRNGKey(0), example)
    settings = {"seed": seed, "steps": steps, "batch": TRAIN_BATCH, "lr": LEARNING_RATE,
                "optimizer": "adam"}
    digest = hashlib.sha256(data.x_train.tobytes() + data.y_train.tobytes()).hexdigest()

    def fit():
        return _fit(model, data, seed, steps, verbose)

    variables, seconds, from_cache = train_cached("digits", model, settings, digest, like, fit,
                                                  cache)
    return Trained(model, variables, model.apply, data, seconds, from_cache)


def evaluate(apply, variables, data: Splits, batch_size: int = EVAL_BATCH) -> float:
    """Test accuracy in [0, 1] of `apply(variables, x) -> logits`.

    Calls only `apply`, once per batch of exactly `batch_size` test images (3 calls at 128: the
    last batch padded with zero images, whose predictions are ignored). `apply` is called as
    given, not jitted: pass `jax.jit(trained.apply)`.
    """
    correct = 0
    for start, x, n in padded_batches(data.x_test, batch_size):
        logits = np.asarray(apply(variables, x))[:n]
        correct += int(np.sum(logits.argmax(-1) == data.y_test[start:start + n]))
    return correct / len(data.x_test)


def calibration_batches(trained: Trained, n: int = 8,
                        batch_size: int = EVAL_BATCH) -> list[tuple[dict, np.ndarray]]:
    """`n` argument tuples `(variables, x)` of `batch_size` training images each, in a fixed
    shuffled order (wrapping around the 1437 training images if more are asked for)."""
    x_train = trained.data.x_train
    order = np.random.default_rng(1).permutation(len(x_train))
    order = np.resize(order, n * batch_size)
    return [(trained.variables, x_train[order[i * batch_size:(i + 1) * batch_size]])
            for i in range(n)]


def _fit(model, data: Splits, seed: int, steps: int, verbose: bool):
    init_key = jax.random.PRNGKey(seed)
    variables = model.init(init_key, jnp.asarray(data.x_train[:1]))
    optimizer = optax.adam(LEARNING_RATE)
    opt_state = optimizer.init(variables)

    @jax.jit
    def step(variables, opt_state, x, y):
        def loss_fn(variables):
            logits = model.apply(variables, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, opt_state = optimizer.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    per_epoch = len(data.x_train) // TRAIN_BATCH
    for i in range(steps):
        if i % per_epoch == 0:
            order = rng.permutation(len(data.x_train))
        batch = order[(i % per_epoch) * TRAIN_BATCH:(i % per_epoch + 1) * TRAIN_BATCH]
        variables, opt_state, loss = step(variables, opt_state, data.x_train[batch],
                                          data.y_train[batch])
        if verbose and (i % 100 == 0 or i == steps - 1):
            print(f"step {i:4d}  loss {float(loss):.4f}")
    return variables


def main(argv=None) -> None:
    trained, accuracy, eval_seconds = script_run(__doc__, train, evaluate, argv)
    source = "loaded from cache; trained in" if trained.from_cache else "trained in"
    print(f"digits CNN: {trained.num_params:,} parameters, {source} {trained.train_seconds:.1f} s")
    print(f"test accuracy {accuracy:.4f} ({len(trained.data.x_test)} images, "
          f"evaluated in {eval_seconds:.2f} s)")


if __name__ == "__main__":
    main()

"""A small zoo of models trained on real data, for the quantization and pruning benchmarks.

Random weights say little about what quantization or pruning costs: their activations have no
outliers, their weights no structure, and every model is equally good (or bad) before and after.
These models are trained, in under a minute on a CPU, on data that ships with the installed
packages, so nothing is downloaded at run time:

- `zoo.digits`: a CNN on scikit-learn's bundled 8x8 digits (`load_digits`); test accuracy ~98%.
- `zoo.charlm`: a character-level decoder transformer on the standard library's own `.py`
  sources; validation perplexity per byte ~5.4.

Both modules have the same small API:

    load_data(seed=0) -> Splits                      # numpy arrays
    train(seed=0, steps=None, verbose=False, cache=True) -> Trained
    evaluate(apply, variables, data) -> float        # accuracy (digits) or perplexity (charlm)
    calibration_batches(trained, n=8, batch_size=...) -> [(variables, x), ...]

`evaluate` calls only the `apply(variables, x)` it is given, once per batch of a fixed size (the
last batch padded; padded rows do not count), so an optimized or quantized replacement is measured
on exactly the shapes it was traced for. It does not `jax.jit` the function: pass a jitted one.
`Trained.apply` is the linen `model.apply` itself, not jitted, so that `graphopt.trace` recognizes
it and makes the variables parameters (a `jax.jit` wrapper would make them plain inputs).

Trained weights are cached as safetensors (the pytree flattened to '/'-joined key paths, e.g.
`params/Conv_0/kernel`) under `~/.cache/graphopt/zoo`, or `$GRAPHOPT_ZOO_CACHE`, in a file named
by a hash of the model's hyper-parameters, the training settings, the data and the JAX version and
backend; a second run loads them instead of training. A file that does not load, or whose tensors
do not match the model's names, shapes, dtypes or recorded checksum, is rebuilt.

`zoo.MODELS` (zoo/registry.py) maps every zoo model's name to its `build(size, seed) ->
ZooModel` (zoo/model.py): these two through adapters (zoo/trained.py), and random-weight models
for speed benchmarks: mlp (nnx), resnet18 (linen, BatchNorm), vit_tiny (nnx), bert_mini (linen,
padding mask), gpt_prefill and gpt_decode (linen, KV cache).

Use from the repository root (benchmarks/ is not installed):

>>> import sys; sys.path.insert(0, "benchmarks")        # doctest: +SKIP
>>> import jax, graphopt                                 # doctest: +SKIP
>>> from zoo import digits                               # doctest: +SKIP
>>> trained = digits.train()                             # doctest: +SKIP
>>> digits.evaluate(jax.jit(trained.apply), trained.variables, trained.data)  # doctest: +SKIP
0.98...
>>> (variables, x), = digits.calibration_batches(trained, n=1)       # doctest: +SKIP
>>> graph = graphopt.trace(trained.apply, variables, x)              # doctest: +SKIP
>>> digits.evaluate(jax.jit(graphopt.lower(graph)), variables, trained.data)  # doctest: +SKIP
0.98...
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["MODELS", "Trained", "cache_dir", "count_params", "padded_batches", "script_run", "train_cached"]

CACHE_ENV = "GRAPHOPT_ZOO_CACHE"
_FORMAT = 1  # bump when the file layout or the meaning of a cache key changes


@dataclasses.dataclass
class Trained:
    """A trained model: `apply(variables, x) -> logits` and what evaluation needs.

    `train_seconds` is the wall-clock time of the training run that produced `variables`
    (compilation included); with `from_cache` it is the time recorded when the cache was written.
    """

    model: Any                      # the flax linen module
    variables: dict                 # {"params": ...}
    apply: Callable                 # model.apply (not jitted: graphopt.trace sees its parameters)
    data: Any                       # the module's Splits
    train_seconds: float
    from_cache: bool = False

    @property
    def num_params(self) -> int:
        return count_params(self.variables)


def count_params(variables) -> int:
    """Number of scalars in a pytree of arrays.

    >>> count_params({"params": {"w": np.zeros((3, 4)), "b": np.zeros(4)}})
    16
    """
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(variables)))


def padded_batches(x: np.ndarray, batch_size: int) -> Iterator[tuple[int, np.ndarray, int]]:
    """`(start, batch, n_valid)` over `x` in batches of exactly `batch_size` rows.

    The last batch is padded with zeros; only its first `n_valid` rows are real.

    >>> [(s, b.shape, n) for s, b, n in padded_batches(np.ones((5, 2)), 2)]
    [(0, (2, 2), 2), (2, (2, 2), 2), (4, (2, 2), 1)]
    """
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        n = len(batch)
        if n < batch_size:
            pad = np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)
            batch = np.concatenate([batch, pad])
        yield start, batch, n


def cache_dir() -> Path:
    """`$GRAPHOPT_ZOO_CACHE`, or `~/.cache/graphopt/zoo`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "graphopt" / "zoo")


def train_cached(name: str, model, settings: dict, data_digest: str, like,
                 fit: Callable[[], dict], cache: bool) -> tuple[dict, float, bool]:
    """`(variables, train_seconds, from_cache)`: the cached weights, or `fit()`'s, then cached.

    `like` is the variables' shape tree (`jax.eval_shape(model.init, ...)`), against which a
    cached file is checked; `settings` are the training settings that, with the module's fields
    and `data_digest`, name the file.
    """
    path = cache_dir() / f"{name}-{_cache_key(model, settings, data_digest)}.safetensors"
    if cache:
        loaded = _load(path, like)
        if loaded is not None:
            return loaded[0], loaded[1], True
    start = time.perf_counter()
    variables = jax.block_until_ready(fit())
    seconds = time.perf_counter() - start
    if cache:
        _save(path, variables, seconds)
    return variables, seconds, False


def _cache_key(model, settings: dict, data_digest: str) -> str:
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
              if f.name not in ("parent", "name")}
    spec = {"format": _FORMAT, "module": type(model).__qualname__, "fields": fields,
            "settings": settings, "data": data_digest, "jax": jax.__version__,
            "backend": jax.default_backend()}
    text = json.dumps(spec, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _checksum(flat: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(flat):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(flat[key]).tobytes())
    return digest.hexdigest()


def _flatten(variables) -> dict[str, np.ndarray]:
    from flax import traverse_util
    return {key: np.asarray(value)
            for key, value in traverse_util.flatten_dict(variables, sep="/").items()}


def _save(path: Path, variables, seconds: float) -> None:
    from safetensors.numpy import save_file
    flat = _flatten(variables)
    # Write then rename, so a run killed mid-write or a concurrent one never leaves half a file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(flat, str(tmp),
                  metadata={"train_seconds": repr(seconds), "sha256": _checksum(flat)})
        os.replace(tmp, path)
    except OSError as error:  # a read-only or full disk costs the next run a retraining, no more
        warnings.warn(f"zoo: could not cache the weights in {path}: {error}", stacklevel=3)
        tmp.unlink(missing_ok=True)


def _load(path: Path, like) -> tuple[dict, float] | None:
    """The cached variables and training time, or None when absent or not a match for `like`."""
    if not path.exists():
        return None
    from flax import traverse_util
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            flat = {key: f.get_tensor(key) for key in f.keys()}
        expected = traverse_util.flatten_dict(like, sep="/")
        if set(flat) != set(expected):
            raise ValueError(f"tensor names differ: {sorted(set(flat) ^ set(expected))[:4]}")
        for key, spec in expected.items():
            if flat[key].shape != tuple(spec.shape) or flat[key].dtype != np.dtype(spec.dtype):
                raise ValueError(f"{key}: {flat[key].dtype}{flat[key].shape}, "
                                 f"expected {np.dtype(spec.dtype)}{tuple(spec.shape)}")
        if metadata.get("sha256") != _checksum(flat):
            raise ValueError("checksum mismatch")
        seconds = float(metadata.get("train_seconds", "nan"))
    except Exception as error:  # noqa: BLE001 -- any unreadable file is rebuilt, never fatal
        warnings.warn(f"zoo: rebuilding {path}: the cached file is unusable ({error})",
                      stacklevel=3)
        return None
    variables = traverse_util.unflatten_dict(
        {tuple(key.split("/")): jnp.asarray(value) for key, value in flat.items()})
    return variables, seconds


def script_run(doc: str, train: Callable, evaluate: Callable, argv=None) -> tuple[Trained, float, float]:
    """What each zoo module does when run as a script: parse `--steps --seed --no-cache
    --verbose`, train (or load), evaluate jitted; (trained, metric, evaluation seconds)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    trained = train(seed=args.seed, steps=args.steps, verbose=args.verbose, cache=not args.no_cache)
    start = time.perf_counter()
    metric = evaluate(jax.jit(trained.apply), trained.variables, trained.data)
    return trained, metric, time.perf_counter() - start


from .registry import MODELS  # noqa: E402  (after the helpers digits and charlm import from here)

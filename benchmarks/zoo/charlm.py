"""A small byte-level decoder transformer trained on the standard library's own Python sources.

Data: the top-level `.py` files of the running Python's standard library (the directory of
`os.__file__`), as bytes (vocabulary 256). Files whose name starts with `_` are left out (among
them `_sysconfigdata_*`, which is generated per machine). Six small modules are held out for
validation (`VALID_FILES`: bisect, fnmatch, glob, shlex, string, textwrap; ~63 KB on 3.11); the
others, in sorted name order, are concatenated and cut at 2 MiB for training. Everything is
deterministic for a given Python version (the cache key includes a hash of the text, so another
standard library retrains rather than reusing weights).

Model (`CharTransformer`, flax linen): byte and learned position embeddings (width 128, context
64), 2 pre-LayerNorm blocks of causal `nn.MultiHeadDotProductAttention` (4 heads of 32) and a
GELU MLP (512), a final LayerNorm and a Dense LM head: 470,784 parameters. Trained with Adam
(10% linear warmup, cosine decay from 5e-3 to 5e-4, gradient clipping at 1) on 32 random windows
of 64 bytes per step for 500 steps (1M bytes seen, half the training text): about 40 s of CPU
time; validation perplexity per byte about 5.4, against about 21 for an add-one unigram byte
model of the training text. Context 64 rather than 128: at a fixed time budget, more and cheaper
steps get past the early loss plateau sooner (32 windows of 128 bytes for 300 steps took twice
the time and ended at perplexity 8.4).

Validation perplexity is exp of the mean cross-entropy over every next-byte prediction in the
non-overlapping 64-byte windows of the held-out text (the partial window at the end is dropped).

    python benchmarks/zoo/charlm.py [--steps N] [--seed S] [--no-cache] [--verbose]

>>> import sys; sys.path.insert(0, "benchmarks")        # doctest: +SKIP
>>> import jax                                           # doctest: +SKIP
>>> from zoo import charlm                               # doctest: +SKIP
>>> trained = charlm.train()                             # doctest: +SKIP
>>> charlm.evaluate(jax.jit(trained.apply), trained.variables, trained.data)  # doctest: +SKIP
5.4...
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the `zoo` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from zoo import Trained, padded_batches, script_run, train_cached  # noqa: E402

VALID_FILES = ("bisect.py", "fnmatch.py", "glob.py", "shlex.py", "string.py", "textwrap.py")
TRAIN_BYTES = 2 * 2**20
CONTEXT = 64
EVAL_BATCH = 32         # evaluate() and calibration_batches() call apply on int32 (32, 64)
TRAIN_BATCH = 32
STEPS = 500
PEAK_LR = 5e-3


@dataclasses.dataclass(frozen=True)
class Splits:
    train: np.ndarray       # uint8 (≤ 2 MiB,): the training text
    valid: np.ndarray       # uint8 (~63 KB,): the held-out files, concatenated


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    heads: int
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x, mask):
        width = x.shape[-1]
        h = nn.LayerNorm(name="ln_attn")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(h, h, mask=mask)
        h = nn.LayerNorm(name="ln_mlp")(x)
        h = nn.gelu(nn.Dense(self.mlp_ratio * width, name="mlp_up")(h))
        return x + nn.Dense(width, name="mlp_down")(h)


class CharTransformer(nn.Module):
    """Decoder-only transformer over bytes: `(batch, seq) int32 -> (batch, seq, vocab)` logits."""

    vocab: int = 256
    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    context: int = CONTEXT

    @nn.compact
    def __call__(self, tokens):
        positions = jnp.arange(tokens.shape[-1])
        x = nn.Embed(self.vocab, self.width, name="embed")(tokens)
        x = x + nn.Embed(self.context, self.width, name="pos_embed")(positions)
        mask = nn.make_causal_mask(tokens, dtype=jnp.bool_)
        for i in range(self.layers):
            x = Block(self.heads, self.mlp_ratio, name=f"block_{i}")(x, mask)
        x = nn.LayerNorm(name="ln_final")(x)
        return nn.Dense(self.vocab, name="head")(x)


def load_data(seed: int = 0) -> Splits:
    """The training and validation text as uint8 arrays.

    The split is by file and does not depend on `seed` (accepted so that every zoo module has
    the same `load_data(seed)`).
    """
    del seed
    root = Path(os.__file__).parent
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))
    valid = b"".join((root / name).read_bytes() for name in VALID_FILES)
    train_ = b"".join(p.read_bytes() for p in files if p.name not in VALID_FILES)[:TRAIN_BYTES]
    return Splits(np.frombuffer(train_, np.uint8).copy(), np.frombuffer(valid, np.uint8).copy())


def train(seed: int = 0, steps: int | None = None, verbose: bool = False,
          cache: bool = True) -> Trained:
    """Train `CharTransformer` on `load_data()`'s text; `seed` draws the initial weights and the
    training windows. `steps` defaults to 500. With `cache`, weights trained before with the same
    settings on the same text are loaded instead.
    """
    steps = STEPS if steps is None else steps
    data = load_data()
    model = CharTransformer()
    like = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, CONTEXT), jnp.int32))
    settings = {"seed": seed, "steps": steps, "batch": TRAIN_BATCH, "optimizer": "adam",
                "peak_lr": PEAK_LR, "schedule": "10% warmup, cosine to peak/10", "clip": 1.0}
    digest = hashlib.sha256(data.train.tobytes() + b"|" + data.valid.tobytes()).hexdigest()

    def fit():
        return _fit(model, data, seed, steps, verbose)

    variables, seconds, from_cache = train_cached("charlm", model, settings, digest, like, fit,
                                                  cache)
    return Trained(model, variables, model.apply, data, seconds, from_cache)


def evaluate(apply, variables, data: Splits, batch_size: int = EVAL_BATCH) -> float:
    """Validation perplexity per byte of `apply(variables, tokens) -> logits`.

    Calls only `apply`, once per batch of exactly `batch_size` windows of `CONTEXT` bytes, int32
    (the last batch padded with zero windows, which do not count). `apply` is called as given,
    not jitted: pass `jax.jit(trained.apply)`.
    """
    inputs, targets = _windows(data.valid)
    total, count = 0.0, 0
    for start, x, n in padded_batches(inputs, batch_size):
        logits = np.asarray(apply(variables, x.astype(np.int32)), np.float64)[:n]
        peak = logits.max(-1, keepdims=True)
        log_z = np.log(np.exp(logits - peak).sum(-1)) + peak[..., 0]
        chosen = np.take_along_axis(logits, targets[start:start + n, :, None], -1)[..., 0]
        total += float(np.sum(log_z - chosen))
        count += chosen.size
    return math.exp(total / count)


def calibration_batches(trained: Trained, n: int = 8,
                        batch_size: int = EVAL_BATCH) -> list[tuple[dict, np.ndarray]]:
    """`n` argument tuples `(variables, tokens)`, each `batch_size` int32 windows of `CONTEXT`
    bytes of training text at fixed pseudo-random offsets."""
    rng = np.random.default_rng(1)
    return [(trained.variables, _sample(trained.data.train, rng, batch_size)[:, :-1])
            for _ in range(n)]


def _windows(text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping `(inputs, targets)` windows, int32 `(n, CONTEXT)`; targets shifted by one."""
    n = (len(text) - 1) // CONTEXT
    inputs = text[:n * CONTEXT].reshape(n, CONTEXT).astype(np.int32)
    targets = text[1:n * CONTEXT + 1].reshape(n, CONTEXT).astype(np.int32)
    return inputs, targets


def _sample(text: np.ndarray, rng: np.random.Generator, batch: int) -> np.ndarray:
    """`batch` random windows of `CONTEXT + 1` bytes, int32."""
    starts = rng.integers(0, len(text) - CONTEXT - 1, size=batch)
    return text[starts[:, None] + np.arange(CONTEXT + 1)].astype(np.int32)


def _fit(model, data: Splits, seed: int, steps: int, verbose: bool):
    rng = np.random.default_rng(seed)
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, CONTEXT), jnp.int32))
    schedule = optax.warmup_cosine_decay_schedule(0.0, PEAK_LR, warmup_steps=max(1, steps // 10),
                                                  decay_steps=max(2, steps),
                                                  end_value=PEAK_LR / 10)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = optimizer.init(variables)

    @jax.jit
    def step(variables, opt_state, windows):
        def loss_fn(variables):
            logits = model.apply(variables, windows[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()
        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, opt_state = optimizer.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss

    for i in range(steps):
        variables, opt_state, loss = step(variables, opt_state,
                                          _sample(data.train, rng, TRAIN_BATCH))
        if verbose and (i % 50 == 0 or i == steps - 1):
            print(f"step {i:4d}  loss {float(loss):.4f}  (perplexity {math.exp(loss):.2f})")
    return variables


def main(argv=None) -> None:
    trained, perplexity, eval_seconds = script_run(__doc__, train, evaluate, argv)
    counts = np.bincount(trained.data.train, minlength=256) + 1.0   # add-one unigram baseline
    log_p = np.log(counts / counts.sum())
    unigram = math.exp(-float(np.mean(log_p[trained.data.valid[1:]])))
    source = "loaded from cache; trained in" if trained.from_cache else "trained in"
    print(f"char LM: {trained.num_params:,} parameters, {source} {trained.train_seconds:.1f} s")
    print(f"validation perplexity per byte {perplexity:.3f} ({len(trained.data.valid):,} bytes, "
          f"evaluated in {eval_seconds:.2f} s; unigram baseline {unigram:.2f})")


if __name__ == "__main__":
    main()

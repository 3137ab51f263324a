"""`graphopt demo`: trace a bundled small Flax transformer, optimize it, and check the result.

The demo prints the optimized graph's summary, the time to the first optimized result (a later run
loads the program from graphopt's program cache: see `graphopt.lowering.cache`), the largest
difference from the original model's output, and the speed of the optimized program relative to
`jax.jit` of the original, measured in the same run on the current backend (median of interleaved
timings, with spread).

Example:
    >>> from graphopt.demo import DemoConfig, demo_model
    >>> model, variables, tokens = demo_model(DemoConfig(layers=1, seq=8))
    >>> model.apply(variables, tokens).shape
    (2, 8, 256)
"""

from __future__ import annotations

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    vocab: int = 256
    width: int = 128
    heads: int = 4
    layers: int = 4
    seq: int = 128
    batch: int = 2


class Block(nn.Module):
    """Pre-norm decoder block: causal self-attention and a GELU MLP."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        h = nn.LayerNorm(name="ln_attn")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(h, h, mask=mask)
        h = nn.LayerNorm(name="ln_mlp")(x)
        h = nn.Dense(4 * self.width, name="up")(h)
        return x + nn.Dense(self.width, name="down")(nn.gelu(h))


class Transformer(nn.Module):
    """A decoder-only language model over bytes."""

    config: DemoConfig

    @nn.compact
    def __call__(self, tokens):
        c = self.config
        x = nn.Embed(c.vocab, c.width, name="embed")(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (c.seq, c.width))[: tokens.shape[1]]
        for i in range(c.layers):
            x = Block(c.width, c.heads, name=f"block_{i}")(x)
        return nn.Dense(c.vocab, name="head")(nn.LayerNorm(name="ln_out")(x))


def demo_model(config: DemoConfig = DemoConfig()):
    """(model, variables, example tokens) for the demo transformer."""
    model = Transformer(config)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (config.batch, config.seq), 0, config.vocab)
    variables = model.init(jax.random.PRNGKey(0), tokens)
    return model, variables, tokens


def time_ratio(baseline, candidate, args, candidate_args=None, *, repeats: int = 50) -> dict:
    """Median times of two jitted functions, interleaved so both see the same machine state."""
    candidate_args = args if candidate_args is None else candidate_args
    runs = (("baseline", baseline, args), ("candidate", candidate, candidate_args))
    for _, fn, fn_args in runs:
        jax.block_until_ready(fn(*fn_args))
    times = {"baseline": [], "candidate": []}
    for _ in range(repeats):
        for name, fn, fn_args in runs:
            start = time.perf_counter()
            jax.block_until_ready(fn(*fn_args))
            times[name].append(time.perf_counter() - start)
    base, cand = np.array(times["baseline"]), np.array(times["candidate"])
    ratios = base / cand
    return {"baseline_ms": 1e3 * np.median(base), "candidate_ms": 1e3 * np.median(cand),
            "speedup": float(np.median(base) / np.median(cand)),
            "speedup_p10": float(np.percentile(ratios, 10)), "speedup_p90": float(np.percentile(ratios, 90))}


def run_demo(config: DemoConfig = DemoConfig(), pipeline: str = "default", console=None) -> dict:
    """Run the demo and print its report; returns the figures."""
    from rich.console import Console

    import graphopt
    from graphopt.lowering import cache

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or captured: rich would assume 80 columns
            console = Console(width=120)
    model, variables, tokens = demo_model(config)
    # The build stage, to the first optimized result: trace, passes, lower, compile, parameter prep;
    # or, on a later run, the program cache's load and the compilation cache's hits.
    before, start, cpu = cache.stats(), time.perf_counter(), time.process_time()
    optimized = graphopt.optimize(model.apply, pipeline=pipeline)
    actual = jax.block_until_ready(optimized(variables, tokens))
    built, built_cpu, after = time.perf_counter() - start, time.process_time() - cpu, cache.stats()
    program_cache = "hit" if after["program_hits"] > before["program_hits"] else \
        "stored" if after["program_stores"] > before["program_stores"] else "not used"
    graph = optimized.graph  # after a program cache hit: rebuilt here (trace and passes)
    graph.verify()
    optimized_program, args = optimized.program(variables, tokens)  # timed without the wrapper
    original = jax.jit(model.apply)
    expected = original(variables, tokens)
    error = float(jnp.max(jnp.abs(actual.astype(jnp.float32) - expected.astype(jnp.float32))))
    timing = time_ratio(original, optimized_program, (variables, tokens), args)
    console.rule(f"graphopt demo: {config.layers}-layer transformer, pipeline {pipeline!r}")
    console.print(graph.summary())
    console.print(optimized.report)
    console.print(f"first optimized result {built * 1e3:.0f} ms (CPU {built_cpu * 1e3:.0f} ms; trace, passes, lower, "
                  f"compile, parameter prep; program cache: {program_cache})")
    console.print(f"max |error| vs original {error:.3g}")
    console.print(f"speed vs jax.jit        {timing['speedup']:.2f}x (p10 {timing['speedup_p10']:.2f}x, "
                  f"p90 {timing['speedup_p90']:.2f}x; {timing['baseline_ms']:.2f} ms → "
                  f"{timing['candidate_ms']:.2f} ms on {jax.default_backend()})")
    return {"max_error": error, **timing, "nodes": graph.summary().nodes, "build_s": built,
            "build_cpu_s": built_cpu, "program_cache": program_cache}

"""What fusion buys at inference: `jax.jit(model)` against `jax.jit(graphopt-optimized model)`.

Models (inference, float32):
- a decoder transformer, prefill at `--seqs` (default 512, 2048, 8192): plain JAX, hand-written
  causal attention (einsum scores, where(-1e9) mask, softmax, einsum), pre-LayerNorm, GELU MLP.
  Width 128, 4 heads of 32, 2 layers, batch 1, vocab 256 by default: small widths so that the
  8192-token run (1 GiB of scores per layer) takes seconds per call on a CPU, not minutes. On a GPU
  use `--width 1024 --heads 16 --layers 8` or so; the defaults are for a smoke run anywhere.
- a ResNet-style CNN with BatchNorm (flax linen; stem 16, stages 16/32/64 of two basic blocks,
  32×32×3 images, batch 32, running averages).

The optimized program is `graphopt.trace` + a pipeline (`--pipeline`, default "inference":
canonicalize, fold_constants, cse, fold_batchnorm, raise_ops, fuse_attention, fold_params, dce),
so attention is recognized by raise_ops and its kernel picked by fuse_attention by measurement.

Method: both programs are compiled once (AOT, compile time not measured), warmed up, then run
`--repeats` times interleaved in one process, alternating which goes first; each pair gives one
ratio optimized/baseline (< 1: graphopt is faster). The table shows the medians, the median ratio
and its p10–p90, the peak memory from `compiled.memory_analysis()` (arguments + outputs +
temporaries − aliased), the max relative error of the optimized outputs, and what fuse_attention
chose.

    python benchmarks/fusion.py [--seqs 512 2048 8192] [--repeats 10] [--models transformer resnet]
                                [--pipeline inference] [--markdown] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import graphopt  # noqa: E402
from graphopt.lowering.compile import memory_analysis  # noqa: E402
from graphopt.pipeline import PIPELINES, run_pipeline  # noqa: E402
from graphopt.validate import relative_error  # noqa: E402
from measure import interleaved  # noqa: E402


# --- decoder transformer -------------------------------------------------------------------------

def transformer_params(width, heads, layers, vocab, seed=0):
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 4 * layers + 1))
    init = lambda shape: jax.random.normal(next(keys), shape) * (1 / math.sqrt(shape[0]))
    ln = lambda: {"scale": jnp.ones(width), "bias": jnp.zeros(width)}
    return {"embed": jax.random.normal(next(keys), (vocab, width)) * 0.02,
            "layers": [{"ln1": ln(), "qkv": init((width, 3 * width)), "out": init((width, width)),
                        "ln2": ln(), "up": init((width, 4 * width)), "up_b": jnp.zeros(4 * width),
                        "down": init((4 * width, width)), "down_b": jnp.zeros(width)}
                       for _ in range(layers)]}


def _layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def causal_attention(q, k, v):
    """[B,T,N,H] causal attention as models write it."""
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(q.shape[-1])
    t = q.shape[1]
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, -1), v)


def decoder(heads, attend):
    def apply(params, tokens):
        x = params["embed"][tokens]
        b, t, d = x.shape
        for p in params["layers"]:
            q, k, v = jnp.split(_layer_norm(x, p["ln1"]) @ p["qkv"], 3, axis=-1)
            split = lambda a: a.reshape(b, t, heads, d // heads)
            x = x + attend(split(q), split(k), split(v)).reshape(b, t, d) @ p["out"]
            x = x + jax.nn.gelu(_layer_norm(x, p["ln2"]) @ p["up"] + p["up_b"]) @ p["down"] + p["down_b"]
        return x @ params["embed"].T
    return apply


# --- ResNet-style CNN ----------------------------------------------------------------------------

class Block(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        bn = lambda: nn.BatchNorm(use_running_average=True)
        y = nn.relu(bn()(nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(x)))
        y = bn()(nn.Conv(self.features, (3, 3), use_bias=False)(y))
        if self.strides != 1 or x.shape[-1] != self.features:
            x = bn()(nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(16, (3, 3), use_bias=False)(x)))
        for i, features in enumerate((16, 32, 64)):
            x = Block(features, 1 if i == 0 else 2)(x)
            x = Block(features)(x)
        return nn.Dense(10)(x.mean((1, 2)))


def _randomized_stats(variables, seed=1):
    """Non-trivial running statistics (means near 0, variances around 1), so folding BatchNorm is
    not folding an identity and the activations stay alive through the ReLUs."""
    def randomize(path, leaf):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), hash(jax.tree_util.keystr(path)) % (1 << 31))
        noise = jax.random.normal(key, leaf.shape)
        return jnp.abs(noise) + 0.5 if path[-1].key == "var" else 0.1 * noise

    stats = jax.tree_util.tree_map_with_path(randomize, variables["batch_stats"])
    return {**variables, "batch_stats": stats}


# --- measuring -----------------------------------------------------------------------------------

def optimize(fn, args, pipeline):
    start = time.perf_counter()
    graph = graphopt.trace(fn, *args, params_argnums=0)
    result = run_pipeline(graph, pipeline)
    seconds = time.perf_counter() - start
    chosen = {k: v for r in result.report.records if r.name == "fuse_attention" for k, v in r.fired.items()}
    notes = [n for r in result.report.records if r.name == "fuse_attention" for n in r.notes]
    attention = sum(1 for n in result.graph.walk() if n.op.name == "attention")
    return result.graph, {"optimize_s": seconds, "attention_nodes": attention,
                          "fuse_attention": chosen, "notes": notes}


def compare(name, fn, args, pipeline, repeats) -> dict:
    graph, info = optimize(fn, args, pipeline)
    opt_args = graphopt.prepare(graph, *args)
    base = jax.jit(fn).lower(*args).compile()
    opt = jax.jit(graphopt.lower(graph)).lower(*opt_args).compile()
    error = relative_error(np.asarray(opt(*opt_args)), np.asarray(base(*args)))  # also the warm-up
    timing = interleaved(lambda: opt(*opt_args), lambda: base(*args), repeats, warmup=0)
    return {"model": name, **info, "error": error, "base_ms": timing["baseline_ms"]["median"],
            "opt_ms": timing["latency_ms"]["median"], "ratio": timing["ratio"]["median"],
            "ratio_p10": timing["ratio"]["p10"], "ratio_p90": timing["ratio"]["p90"],
            "base_peak": memory_analysis(base).peak_bytes, "opt_peak": memory_analysis(opt).peak_bytes}


def run(args) -> list[dict]:
    rows = []
    if "transformer" in args.models:
        params = transformer_params(args.width, args.heads, args.layers, args.vocab)
        fn = decoder(args.heads, causal_attention)
        for seq in args.seqs:
            tokens = jax.random.randint(jax.random.PRNGKey(seq), (1, seq), 0, args.vocab)
            rows.append(compare(f"decoder prefill T={seq}", fn, (params, tokens), args.pipeline, args.repeats))
    if "resnet" in args.models:
        model = ResNet()
        images = jax.random.normal(jax.random.PRNGKey(0), (args.batch, 32, 32, 3))
        variables = _randomized_stats(model.init(jax.random.PRNGKey(1), images))
        rows.append(compare(f"resnet batch={args.batch}", model.apply, (variables, images), args.pipeline,
                            args.repeats))
    return rows


def _mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:.1f} MiB"


def report(rows, machine, markdown: bool) -> None:
    table = Table("model", "jit ms", "graphopt ms", "ratio (p10–p90)", "peak jit → graphopt", "rel. error",
                  "attention", "optimize s", title=f"fusion ({machine['backend']}, {machine['cpus']} CPUs)")
    cells = []
    for r in rows:
        chosen = ", ".join(f"{k.split('/')[-1]}×{v}" for k, v in r["fuse_attention"].items()) or "–"
        cells.append([r["model"], f"{r['base_ms']:.2f}", f"{r['opt_ms']:.2f}",
                      f"{r['ratio']:.3f} ({r['ratio_p10']:.3f}–{r['ratio_p90']:.3f})",
                      f"{_mib(r['base_peak'])} → {_mib(r['opt_peak'])}", f"{r['error']:.1e}", chosen,
                      f"{r['optimize_s']:.1f}"])
        table.add_row(*cells[-1])
    Console().print(table)
    for r in rows:
        for note in r["notes"]:
            print(f"  {r['model']}: {note}")
    if markdown:
        print(f"\nMachine: {machine['backend']}, {machine['cpus']} CPUs, {machine['platform']}, "
              f"JAX {machine['jax']}, {machine['date']}; passes: {', '.join(machine['pipeline'])}\n")
        print("| " + " | ".join(table.columns[i].header for i in range(len(table.columns))) + " |")
        print("|" + "---|" * len(table.columns))
        for row in cells:
            print("| " + " | ".join(row) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=["transformer", "resnet"], choices=["transformer", "resnet"])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pipeline", default="inference")
    parser.add_argument("--json")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    rows = run(args)
    machine = {"backend": jax.default_backend(), "cpus": os.cpu_count(), "platform": platform.platform(),
               "jax": jax.__version__, "date": datetime.date.today().isoformat(), "pipeline": list(PIPELINES[args.pipeline]),
               "config": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")}}
    report(rows, machine, args.markdown)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

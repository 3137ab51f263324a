"""How long graphopt's default pipeline takes on large graphs, and whether it scales linearly.

Method: an unrolled decoder transformer written in plain JAX (hand-written attention, LayerNorm,
GELU MLP; small widths, since only graph size matters here), or with `--model resnet` a Flax
linen CNN of ResNet basic blocks (benchmarks/zoo/resnet.py, width 8), is traced once per size
with enough layers to reach about 10k, 50k and 100k nodes. Each measurement runs the pipeline on a fresh clone
of the traced graph (cloning is not timed), `--repeats` times; the table shows the median and the
min–max spread, the time per pass, and time(N) / time(previous N) against the node ratio.

Goal (issue 3): under 2 s for 100k nodes on a 2-core machine, and time(2N) ≤ 2.2 × time(N).

The layers repeat, so the pipeline runs its leading layerwise passes on three layers and copies the
result to the others (graphopt.stamp; the per-pass times are then those on the excerpts, and the
`stamp_layers` row is the detection and the copies). `--no-stamp` runs every pass on the whole
graph, which shows what the passes themselves cost per node.

    python benchmarks/pass_cost.py [--nodes 10000 50000 100000] [--repeats 3] [--pipeline default]
                                   [--model decoder|resnet] [--no-stamp] [--json out.json] [--markdown]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from rich.console import Console
from rich.table import Table

import graphopt
from graphopt.pipeline import STAMP_MIN_NODES, run_pipeline
from zoo.resnet import BasicBlock

WIDTH, HEADS, SEQ, VOCAB = 32, 4, 16, 64


def _layer_params(key):
    k = jax.random.split(key, 6)
    init = lambda k, shape: jax.random.normal(k, shape) * 0.02
    return {"ln1": {"scale": jnp.ones(WIDTH), "bias": jnp.zeros(WIDTH)},
            "qkv": init(k[0], (WIDTH, 3 * WIDTH)), "out": init(k[1], (WIDTH, WIDTH)),
            "ln2": {"scale": jnp.ones(WIDTH), "bias": jnp.zeros(WIDTH)},
            "up": init(k[2], (WIDTH, 4 * WIDTH)), "up_b": jnp.zeros(4 * WIDTH),
            "down": init(k[3], (4 * WIDTH, WIDTH)), "down_b": jnp.zeros(WIDTH)}


def _layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _layer(x, p):
    b, t, _ = x.shape
    q, k, v = jnp.split(_layer_norm(x, p["ln1"]) @ p["qkv"], 3, axis=-1)
    heads = lambda a: a.reshape(b, t, HEADS, WIDTH // HEADS).transpose(0, 2, 1, 3)
    scores = heads(q) @ heads(k).transpose(0, 1, 3, 2) / jnp.sqrt(WIDTH // HEADS)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
    attn = (jax.nn.softmax(scores, -1) @ heads(v)).transpose(0, 2, 1, 3).reshape(b, t, WIDTH)
    x = x + attn @ p["out"]
    h = jax.nn.gelu(_layer_norm(x, p["ln2"]) @ p["up"] + p["up_b"])
    return x + h @ p["down"] + p["down_b"]


def decoder(params, tokens):
    x = params["embed"][tokens]
    for p in params["layers"]:
        x = _layer(x, p)
    return x @ params["embed"].T


def build_decoder(layers: int):
    keys = jax.random.split(jax.random.PRNGKey(0), layers + 1)
    params = {"embed": jax.random.normal(keys[0], (VOCAB, WIDTH)),
              "layers": [_layer_params(k) for k in keys[1:]]}
    tokens = jnp.zeros((2, SEQ), jnp.int32)
    return graphopt.trace(decoder, params, tokens, params_argnums=0)


class _ResNet(nn.Module):
    blocks: int

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3))(x)
        for i in range(self.blocks):
            x = BasicBlock(8, name=f"blocks_{i}")(x)
        return nn.Dense(10)(x.mean((1, 2)))


def build_resnet(layers: int):
    model, x = _ResNet(layers), jnp.ones((2, 8, 8, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    return graphopt.trace(model.apply, variables, x, params_argnums=0)


MODELS = {"decoder": build_decoder, "resnet": build_resnet}


def nodes_per_layer(build=build_decoder) -> float:
    small, large = build(2), build(4)
    return (_count(large) - _count(small)) / 2


def _count(graph) -> int:
    return sum(1 for _ in graph.walk())


def measure(target: int, per_layer: float, repeats: int, pipeline="default", stamp: bool = True,
            build=build_decoder) -> dict:
    layers = max(1, round(target / per_layer))
    start = time.perf_counter()
    graph = build(layers)
    trace_seconds = time.perf_counter() - start
    totals, cpu, per_pass = [], [], {}
    for _ in range(repeats):
        work, _ = graph.clone()
        # The previous run's graphs are garbage in reference cycles: collect them now, so no run
        # pays for another's (as timeit does by switching the collector off).
        gc.collect()
        start, start_cpu = time.perf_counter(), time.process_time()
        result = run_pipeline(work, pipeline, stamp_min_nodes=STAMP_MIN_NODES if stamp else None)
        totals.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        for record in result.report.records:
            per_pass.setdefault(record.name, []).append(record.seconds)
        nodes_after = _count(result.graph)
        del work, result
    return {"target": target, "layers": layers, "nodes": _count(graph),
            "nodes_after": nodes_after, "trace_s": trace_seconds,
            "median_s": statistics.median(totals), "min_s": min(totals), "max_s": max(totals),
            "cpu_median_s": statistics.median(cpu),
            "per_pass_s": {k: statistics.median(v) for k, v in per_pass.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--pipeline", default="default", help="a pipeline name or comma-separated passes")
    parser.add_argument("--no-stamp", action="store_true", help="run every pass on the whole graph")
    parser.add_argument("--model", choices=sorted(MODELS), default="decoder")
    args = parser.parse_args(argv)
    pipeline = args.pipeline if "," not in args.pipeline else args.pipeline.split(",")
    load_before = os.getloadavg()
    build = MODELS[args.model]
    per_layer = nodes_per_layer(build)
    rows = [measure(n, per_layer, args.repeats, pipeline, not args.no_stamp, build) for n in args.nodes]
    for prev, row in zip(rows, rows[1:]):
        row["scaling"] = row["median_s"] / prev["median_s"]
        row["node_ratio"] = row["nodes"] / prev["nodes"]
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "jax": jax.__version__, "date": datetime.date.today().isoformat(),
               "load_average": {"start": load_before, "end": os.getloadavg()}, "pipeline": args.pipeline,
               "model": args.model, "stamp": not args.no_stamp}
    table = Table("nodes", "layers", "nodes after", "pipeline median (min–max)", "µs/node", "× vs previous",
                  "slowest passes", title=f"{args.pipeline} pipeline cost, {args.model} ({machine['cpus']} CPUs, jax {machine['jax']})")
    for row in rows:
        passes = sorted(row["per_pass_s"].items(), key=lambda kv: -kv[1])[:3]
        table.add_row(f"{row['nodes']:,}", str(row["layers"]), f"{row['nodes_after']:,}",
                      f"{row['median_s']:.2f} s ({row['min_s']:.2f}–{row['max_s']:.2f})",
                      f"{1e6 * row['median_s'] / row['nodes']:.1f}",
                      f"{row['scaling']:.2f} for {row['node_ratio']:.2f}× nodes" if "scaling" in row else "",
                      ", ".join(f"{k} {v:.2f}s" for k, v in passes))
    Console().print(table)
    if args.markdown:
        load = machine["load_average"]
        print(f"\nMachine: {machine['cpus']} CPUs, {machine['platform']}, Python {machine['python']}, "
              f"JAX {machine['jax']}, {machine['date']}; pipeline {args.pipeline!r}, model {args.model}"
              f"{'' if machine['stamp'] else ', without stamping'}; load average (1 min) "
              f"{load['start'][0]:.1f} at start, {load['end'][0]:.1f} at end\n")
        print("| nodes | pipeline median (min–max) | CPU s (median) | µs/node | time ratio vs previous size | per pass (median) |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            passes = ", ".join(f"{k} {v:.2f}s" for k, v in row["per_pass_s"].items())
            ratio = f"{row['scaling']:.2f} for {row['node_ratio']:.2f}× nodes" if "scaling" in row else "–"
            print(f"| {row['nodes']:,} | {row['median_s']:.2f} s ({row['min_s']:.2f}–{row['max_s']:.2f}) | "
                  f"{row['cpu_median_s']:.2f} | "
                  f"{1e6 * row['median_s'] / row['nodes']:.1f} | {ratio} | {passes} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

"""How much compile time does graphopt add on top of plain `jax.jit`?

Usage:
    python benchmarks/trace_cost.py [--layers 12 48 96] [--repeats 3] [--json out.json] [--markdown]

Method
------
The model is graphopt's bundled demo transformer (`graphopt.demo`), whose layers are a Python loop,
so the traced program grows linearly with depth. It is measured at several depths (default 12, 48
and 96 layers) with a small width (64) and sequence (32): XLA's compile time depends mostly on the
number of operations, not on tensor sizes, and a 96-layer model then compiles in about 15 s on a
2-core CPU, so a full run takes a few minutes. Both paths compile for the default JAX backend.

For each depth, two paths from a Python model to an XLA executable are timed:

- baseline: `jax.jit(model.apply).lower(variables, tokens).compile()`, timed in its stages
  (`jit(...).trace` to a jaxpr, `Traced.lower` to StableHLO, `Lowered.compile` in XLA; the three
  together are exactly what `jit(...).lower(...).compile()` does);
- graphopt: `graphopt.trace(model.apply, variables, tokens)`, `run_pipeline(graph, "default")`, then
  `jax.jit(graphopt.lower(graph)).lower(variables, tokens).compile()`, timed in its stages: trace
  (split into JAX's `make_jaxpr` of the model and graphopt's jaxpr → graph conversion, by wrapping
  `graphopt._jax_compat.make_jaxpr_with_shape` with a timer), pipeline, lower to StableHLO (split
  into the replay of the graph under `jit(...).trace` and `Traced.lower`), and XLA compile.

graphopt's overhead is the graphopt total minus the baseline total, computed per repetition (the
two runs of a repetition are back to back) and reported as the median and min–max over repetitions,
and as a fraction of the median baseline total. Both paths hand XLA the same computation, so their
compile times differ only by noise; the "pre-XLA" overhead (both totals without the XLA compile)
isolates graphopt's own work from that noise. Overhead per layer and a least-squares line through
(layers, overhead) show whether the overhead grows linearly with depth.

Nothing is served from a cache: before every timed run `jax.clear_caches()` empties JAX's tracing,
lowering and compilation caches, every run builds fresh `jax.jit` objects, and the persistent
compilation cache is disabled. A throwaway warm-up (1-layer model, both paths) first pays one-time
costs (imports, backend start-up). Repetitions interleave the two paths and alternate which runs
first; depths are cycled inside each repetition so slow drifts of the machine spread over all
sizes. `gc.collect()` runs before each timed run; the garbage collector stays on while timing.

After the last repetition of each depth, the two compiled programs are compared by their count of
HLO instructions per opcode (instruction names and source metadata differ; the computation should
not), to confirm that the compile times being compared are for the same program.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from contextlib import contextmanager

import jax
import numpy as np

import graphopt
from graphopt import _jax_compat
from graphopt.demo import DemoConfig, demo_model
from graphopt.pipeline import run_pipeline

BASELINE_PHASES = ("trace", "lower", "compile")
GRAPHOPT_PHASES = ("make_jaxpr", "convert", "pipeline", "replay", "stablehlo", "compile")


# --- timing one run ------------------------------------------------------------------------------

@contextmanager
def _timing_make_jaxpr(record: dict):
    """Time graphopt's call of JAX's make_jaxpr inside graphopt.trace (a timer, nothing else)."""
    original = _jax_compat.make_jaxpr_with_shape

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            record["make_jaxpr"] = time.perf_counter() - start

    _jax_compat.make_jaxpr_with_shape = timed
    try:
        yield
    finally:
        _jax_compat.make_jaxpr_with_shape = original


def _fresh_start() -> None:
    jax.clear_caches()
    gc.collect()


def run_baseline(model, variables, tokens):
    """`jax.jit(model.apply).lower(...).compile()`, timed by stage. Returns (times, compiled)."""
    _fresh_start()
    t0 = time.perf_counter()
    traced = jax.jit(model.apply).trace(variables, tokens)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    times = {"trace": t1 - t0, "lower": t2 - t1, "compile": t3 - t2}
    times["total"] = t3 - t0
    return times, compiled


def run_graphopt(model, variables, tokens, pipeline: str):
    """trace + pipeline + `jax.jit(lower(graph)).lower(...).compile()`. Returns (times, compiled, nodes)."""
    _fresh_start()
    times: dict[str, float] = {}
    with _timing_make_jaxpr(times):
        t0 = time.perf_counter()
        graph = graphopt.trace(model.apply, variables, tokens)
        t1 = time.perf_counter()
    graph = run_pipeline(graph, pipeline)
    t2 = time.perf_counter()
    traced = jax.jit(graphopt.lower(graph)).trace(variables, tokens)
    t3 = time.perf_counter()
    lowered = traced.lower()
    t4 = time.perf_counter()
    compiled = lowered.compile()
    t5 = time.perf_counter()
    times.update(convert=(t1 - t0) - times["make_jaxpr"], pipeline=t2 - t1, replay=t3 - t2,
                 stablehlo=t4 - t3, compile=t5 - t4)
    times["trace"] = t1 - t0             # make_jaxpr + convert
    times["lower"] = t4 - t2             # replay + stablehlo: jit(lower(graph)).lower(...)
    times["total"] = t5 - t0
    nodes = sum(1 for _ in graph.walk())
    return times, compiled, nodes


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = .*? ([a-z][\w-]*)\(", re.MULTILINE)


def opcode_counts(compiled) -> collections.Counter:
    """Count of HLO instructions per opcode in a compiled program (names and metadata ignored)."""
    return collections.Counter(_INSTRUCTION.findall(compiled.as_text()))


# --- the benchmark -------------------------------------------------------------------------------

def config_for(layers: int, args) -> DemoConfig:
    return DemoConfig(vocab=args.vocab, width=args.width, heads=args.heads, layers=layers,
                      seq=args.seq, batch=args.batch)


def warm_up(args) -> None:
    model, variables, tokens = demo_model(config_for(1, args))
    run_baseline(model, variables, tokens)
    run_graphopt(model, variables, tokens, args.pipeline)


def benchmark(args, progress=print) -> dict:
    jax.config.update("jax_enable_compilation_cache", False)
    load_at_start = _load_average()
    warm_up(args)
    models = {layers: demo_model(config_for(layers, args)) for layers in args.layers}
    runs = {layers: {"baseline": [], "graphopt": [], "nodes": None, "same_program": None}
            for layers in args.layers}
    for rep in range(args.repeats):
        for layers in args.layers:
            model, variables, tokens = models[layers]
            order = ("baseline", "graphopt") if rep % 2 == 0 else ("graphopt", "baseline")
            compiled = {}
            for path in order:
                if path == "baseline":
                    times, compiled[path] = run_baseline(model, variables, tokens)
                else:
                    times, compiled[path], runs[layers]["nodes"] = run_graphopt(
                        model, variables, tokens, args.pipeline)
                runs[layers][path].append(times)
            progress(f"rep {rep + 1}/{args.repeats}, {layers:3d} layers: baseline "
                     f"{runs[layers]['baseline'][-1]['total']:.2f} s, graphopt "
                     f"{runs[layers]['graphopt'][-1]['total']:.2f} s")
            if rep == args.repeats - 1:
                runs[layers]["same_program"] = (opcode_counts(compiled["baseline"])
                                                == opcode_counts(compiled["graphopt"]))
            del compiled
    sizes = [summarize(layers, runs[layers]) for layers in args.layers]
    machine = {**machine_info(), "load_average_at_start": load_at_start}
    return {"machine": machine, "config": _config_dict(args), "sizes": sizes,
            "linear_fit": linear_fit(args.layers, sizes)}


def _stats(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": list(values)}


def summarize(layers: int, run: dict) -> dict:
    base, opt = run["baseline"], run["graphopt"]
    overhead = [o["total"] - b["total"] for b, o in zip(base, opt)]
    pre_xla = [(o["total"] - o["compile"]) - (b["total"] - b["compile"]) for b, o in zip(base, opt)]
    base_total = statistics.median(b["total"] for b in base)
    return {
        "layers": layers,
        "nodes": run["nodes"],
        "same_program": run["same_program"],
        "baseline": {k: _stats([b[k] for b in base]) for k in (*BASELINE_PHASES, "total")},
        "graphopt": {k: _stats([o[k] for o in opt])
                     for k in (*GRAPHOPT_PHASES, "trace", "lower", "total")},
        "overhead_s": _stats(overhead),
        "overhead_ratio": statistics.median(overhead) / base_total,
        "overhead_per_layer_ms": 1e3 * statistics.median(overhead) / layers,
        "pre_xla_overhead_s": _stats(pre_xla),
        "pre_xla_overhead_ratio": statistics.median(pre_xla) / base_total,
    }


def linear_fit(layers, sizes) -> dict | None:
    """Least-squares overhead ≈ intercept + slope·layers (median overheads), with R²."""
    if len(layers) < 2:
        return None
    out = {}
    for key in ("overhead_s", "pre_xla_overhead_s"):
        x = np.asarray(layers, float)
        y = np.asarray([s[key]["median"] for s in sizes])
        slope, intercept = np.polyfit(x, y, 1)
        residual = y - (intercept + slope * x)
        total = np.sum((y - y.mean()) ** 2)
        r2 = float(1 - np.sum(residual ** 2) / total) if total > 0 else 1.0
        out[key] = {"slope_ms_per_layer": 1e3 * float(slope), "intercept_s": float(intercept), "r2": r2}
    return out


def machine_info() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import flax
    import jaxlib

    return {"cpu": cpu, "cpu_count": os.cpu_count(), "usable_cpus": usable,
            "platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "graphopt": graphopt.__version__,
            "backend": jax.default_backend(), "load_average": _load_average(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _load_average() -> list[float] | None:
    """1-, 5- and 15-minute load averages: timings on a busy machine are noisier and slower."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _config_dict(args) -> dict:
    return {"layers": list(args.layers), "repeats": args.repeats, "width": args.width,
            "heads": args.heads, "seq": args.seq, "batch": args.batch, "vocab": args.vocab,
            "pipeline": args.pipeline, "command": "python " + " ".join(sys.argv)}


# --- output --------------------------------------------------------------------------------------

def _s(stats: dict) -> str:
    return f"{stats['median']:.2f} ({stats['min']:.2f}–{stats['max']:.2f})"


def _signed(stats: dict) -> str:
    return f"{stats['median']:+.2f} ({stats['min']:+.2f}–{stats['max']:+.2f})"


def _same(flag) -> str:
    return {True: "yes", False: "NO", None: "?"}[flag]


SUMMARY_HEADER = ("layers", "graph nodes", "baseline total s", "graphopt total s", "overhead s",
                  "overhead % of baseline", "overhead / layer ms", "pre-XLA overhead s",
                  "pre-XLA overhead %", "same XLA program")
PHASE_HEADER = ("layers", "baseline trace", "baseline lower", "baseline compile",
                "graphopt make_jaxpr", "graphopt convert", "graphopt pipeline", "graphopt replay",
                "graphopt StableHLO", "graphopt compile")


def summary_rows(result: dict) -> list[tuple[str, ...]]:
    return [(str(s["layers"]), str(s["nodes"]), _s(s["baseline"]["total"]), _s(s["graphopt"]["total"]),
             _signed(s["overhead_s"]), f"{100 * s['overhead_ratio']:+.1f}%",
             f"{s['overhead_per_layer_ms']:+.1f}", _signed(s["pre_xla_overhead_s"]),
             f"{100 * s['pre_xla_overhead_ratio']:+.1f}%", _same(s["same_program"]))
            for s in result["sizes"]]


def phase_rows(result: dict) -> list[tuple[str, ...]]:
    return [(str(s["layers"]), *(f"{s['baseline'][k]['median']:.3f}" for k in BASELINE_PHASES),
             *(f"{s['graphopt'][k]['median']:.3f}" for k in GRAPHOPT_PHASES)) for s in result["sizes"]]


def fit_line(result: dict) -> str:
    fit = result["linear_fit"]
    if not fit:
        return "linear fit: needs two or more sizes"
    parts = []
    for key, label in (("overhead_s", "overhead"), ("pre_xla_overhead_s", "pre-XLA overhead")):
        f = fit[key]
        parts.append(f"{label} ≈ {f['intercept_s']:+.2f} s + {f['slope_ms_per_layer']:.1f} ms × layers "
                     f"(R² {f['r2']:.3f})")
    return "least-squares fit over sizes: " + "; ".join(parts)


def machine_line(result: dict) -> str:
    m, c = result["machine"], result["config"]
    return (f"{m['cpu']}, {m['cpu_count']} CPUs ({m['usable_cpus']} usable), {m['platform']}, "
            f"Python {m['python']}, jax {m['jax']}, flax {m['flax']}, backend {m['backend']}, "
            f"{m['date']}, load average (1/5/15 min) {_load(m['load_average_at_start'])} at start, "
            f"{_load(m['load_average'])} at end; model width {c['width']}, heads {c['heads']}, "
            f"seq {c['seq']}, batch {c['batch']}, vocab {c['vocab']}; pipeline {c['pipeline']!r}; "
            f"{c['repeats']} repetitions")


def _load(load) -> str:
    return "/".join(f"{x:.1f}" for x in load) if load else "n/a"


def print_console(result: dict, console) -> None:
    from rich.table import Table

    table = Table(title="graphopt trace cost: seconds, median (min–max) over repetitions")
    for i, name in enumerate(SUMMARY_HEADER):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in summary_rows(result):
        table.add_row(*row)
    console.print(table)
    phases = Table(title="time by phase: seconds, median")
    for i, name in enumerate(PHASE_HEADER):
        phases.add_column(name, justify="left" if i == 0 else "right")
    for row in phase_rows(result):
        phases.add_row(*row)
    console.print(phases)
    console.print(fit_line(result))
    console.print(machine_line(result), style="dim")


def markdown(result: dict) -> str:
    def table(header, rows):
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)

    return "\n".join([
        f"Machine: {machine_line(result)}.", "",
        f"Command: `{result['config']['command']}`", "",
        "Seconds, median (min–max) over repetitions; overhead = graphopt total − baseline total, "
        "per repetition; pre-XLA = the same without the XLA compile of either path.", "",
        table(SUMMARY_HEADER, summary_rows(result)), "",
        "Time by phase (seconds, median). Baseline `lower` = `Traced.lower`; graphopt trace = "
        "make_jaxpr + convert, graphopt lower to StableHLO = replay + StableHLO.", "",
        table(PHASE_HEADER, phase_rows(result)), "",
        fit_line(result) + ".",
    ])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 48, 96])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--pipeline", default="default")
    parser.add_argument("--json", metavar="PATH", help="also write all figures, raw times included")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # redirected: don't squeeze the tables to 80 columns
        console = Console(width=200)
    result = benchmark(args, progress=lambda line: console.print(line, style="dim"))
    print_console(result, console)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        console.print(f"wrote {args.json}")
    if args.markdown:
        print()
        print(markdown(result))
    return result


if __name__ == "__main__":
    main()

"""How much compile time does graphopt add on top of plain `jax.jit`?

Usage:
    python benchmarks/trace_cost.py [--layers 12 48 96] [--repeats 3] [--json out.json] [--markdown]
    python benchmarks/trace_cost.py --from-json out.json --markdown   # tables of an earlier run

Method
------
The model is graphopt's bundled demo transformer (`graphopt.demo`), whose layers are a Python loop,
so the traced program grows linearly with depth. It is measured at several depths (default 12, 48
and 96 layers) with a small width (64) and sequence (32): XLA's compile time depends mostly on the
number of operations, not on tensor sizes, and a 96-layer model then takes 10–15 s to compile on a
2-core CPU, so a full run takes a few minutes. Both paths compile for the default JAX backend.

For each depth, two paths from a Python model to an XLA executable are timed:

- baseline: `jax.jit(model.apply).lower(variables, tokens).compile()`, timed in its stages
  (`jit(...).trace` to a jaxpr, `Traced.lower` to StableHLO, `Lowered.compile` in XLA; the three
  together are exactly what `jit(...).lower(...).compile()` does);
- graphopt: `graphopt.trace(model.apply, variables, tokens)`, `run_pipeline(graph, "default")`, then
  `jax.jit(graphopt.lower(graph)).lower(variables, tokens).compile()`, timed in its stages: trace
  (split into JAX's `make_jaxpr` of the model and graphopt's jaxpr → graph conversion, by wrapping
  `graphopt._jax_compat.make_jaxpr_with_shape` with a timer), pipeline, parameter prep, lower to
  StableHLO (split into the replay of the graph under `jit(...).trace` and `Traced.lower`), and
  XLA compile. Parameter prep is zero unless a pass (fold_params) moved work on the weights into a
  prep graph; then the optimized graph takes the prep graph's outputs, and tracing, compiling and
  running the prep graph once (`graphopt.param_prep.prepare`) is part of graphopt's cost.
  `--pipeline none` measures tracing and lowering alone.

Every stage is timed twice: wall-clock time (`time.perf_counter`), what a user waits for, and the
process's CPU time (`time.process_time`, all threads), which other processes competing for the
cores disturb much less, so it is the steadier measure on a shared machine.

graphopt's overhead is the graphopt total minus the baseline total, computed per repetition (the
two runs of a repetition are back to back) and reported as the median and min–max over repetitions,
as a fraction of the median baseline total, and per layer; a least-squares line through
(layers, overhead) shows whether it grows linearly with depth. The subtraction carries the noise
of the XLA compile (most of the total), so the stages that exist only on graphopt's path
(conversion, pipeline, parameter prep, replay: "graphopt-only stages") are also reported as a
direct, low-noise estimate of graphopt's own work. (graphopt's make_jaxpr, StableHLO lowering and
XLA compile do the same work as the baseline's trace, lower and compile, on an unchanged graph.)

Nothing is served from a cache: before every timed run `jax.clear_caches()` empties JAX's tracing,
lowering and compilation caches, every run builds fresh `jax.jit` objects, and the persistent
compilation cache is disabled. A throwaway warm-up (1-layer model, both paths) first pays one-time
costs (imports, backend start-up). Repetitions interleave the two paths and alternate which runs
first; depths are cycled inside each repetition so slow drifts of the machine spread over all
sizes. `gc.collect()` runs before each timed run; the garbage collector stays on while timing, as
it is for users.

After the last repetition of each depth, the two compiled programs are compared by their count of
HLO instructions per opcode (instruction names and source metadata differ; the computation should
not), to confirm that the compile times being compared are for the same program (with a pipeline
that rewrites the graph they differ, and XLA's compile time may differ with them).
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

CLOCKS = ("wall", "cpu")
BASELINE_STAGES = ("trace", "lower", "compile")
GRAPHOPT_STAGES = ("make_jaxpr", "convert", "pipeline", "prep", "replay", "stablehlo", "compile")
GRAPHOPT_ONLY = ("convert", "pipeline", "prep", "replay")  # no counterpart in the baseline


# --- timing one run ------------------------------------------------------------------------------

def _now() -> dict[str, float]:
    return {"wall": time.perf_counter(), "cpu": time.process_time()}


class Stopwatch:
    """Records named stages, each in wall-clock and CPU seconds: `times[clock][stage]`."""

    def __init__(self):
        self.times: dict[str, dict[str, float]] = {clock: {} for clock in CLOCKS}
        self._start = self._last = _now()

    def lap(self, stage: str) -> None:
        """Record the time since the previous lap (or the start) as `stage`."""
        now = _now()
        for clock in CLOCKS:
            self.times[clock][stage] = now[clock] - self._last[clock]
        self._last = now

    def total(self) -> None:
        for clock in CLOCKS:
            self.times[clock]["total"] = self._last[clock] - self._start[clock]


@contextmanager
def _timing_make_jaxpr(record: dict):
    """Time graphopt's call of JAX's make_jaxpr inside graphopt.trace (a timer, nothing else)."""
    original = _jax_compat.make_jaxpr_with_shape

    def timed(*args, **kwargs):
        start = _now()
        try:
            return original(*args, **kwargs)
        finally:
            end = _now()
            for clock in CLOCKS:
                record[clock] = end[clock] - start[clock]

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
    watch = Stopwatch()
    traced = jax.jit(model.apply).trace(variables, tokens)
    watch.lap("trace")
    lowered = traced.lower()
    watch.lap("lower")
    compiled = lowered.compile()
    watch.lap("compile")
    watch.total()
    return watch.times, compiled


def run_graphopt(model, variables, tokens, pipeline: str):
    """trace + pipeline + `jax.jit(lower(graph)).lower(...).compile()`, timed by stage.

    Returns (times, compiled, (nodes traced, nodes after the pipeline)).
    """
    _fresh_start()
    make_jaxpr: dict[str, float] = {}
    watch = Stopwatch()
    with _timing_make_jaxpr(make_jaxpr):
        graph = graphopt.trace(model.apply, variables, tokens)
    watch.lap("trace")
    traced_nodes = _count_nodes(graph)  # untimed: counting is not part of either path
    watch.lap("untimed")
    graph = run_pipeline(graph, pipeline).graph
    watch.lap("pipeline")
    # fold_params' prep (trace, compile, run once per set of weights) is part of graphopt's cost.
    args = jax.block_until_ready(graphopt.prepare(graph, variables, tokens))
    watch.lap("prep")
    traced = jax.jit(graphopt.lower(graph)).trace(*args)
    watch.lap("replay")
    lowered = traced.lower()
    watch.lap("stablehlo")
    compiled = lowered.compile()
    watch.lap("compile")
    watch.total()
    for clock, times in watch.times.items():
        times["total"] -= times.pop("untimed")
        # If graphopt stops calling the hooked function, the whole trace counts as conversion.
        times["make_jaxpr"] = make_jaxpr.get(clock, 0.0)
        times["convert"] = times["trace"] - times["make_jaxpr"]
        times["lower"] = times["replay"] + times["stablehlo"]   # = jit(lower(graph)).lower(...)
        times["graphopt_only"] = sum(times[stage] for stage in GRAPHOPT_ONLY)
    return watch.times, compiled, (traced_nodes, _count_nodes(graph))


def _count_nodes(graph) -> int:
    return sum(1 for _ in graph.walk())  # regions' nodes included


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
    try:
        run_graphopt(model, variables, tokens, args.pipeline)
    except graphopt.GraphoptError as err:
        sys.exit(f"trace_cost: graphopt failed on a 1-layer model with pipeline {args.pipeline!r}: "
                 f"{err}\n(--pipeline none measures tracing and lowering alone)")


def benchmark(args, progress=print) -> dict:
    """Run all repetitions for all depths; returns the figures (see `summarize`)."""
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
            base, opt = runs[layers]["baseline"][-1], runs[layers]["graphopt"][-1]
            progress(f"rep {rep + 1}/{args.repeats}, {layers:3d} layers: baseline "
                     f"{base['wall']['total']:.2f} s ({base['cpu']['total']:.2f} s CPU), graphopt "
                     f"{opt['wall']['total']:.2f} s ({opt['cpu']['total']:.2f} s CPU)")
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
    """Per clock: stage statistics of both paths, the overhead and the graphopt-only stages."""
    traced, optimized = run["nodes"]
    out = {"layers": layers, "nodes": {"traced": traced, "after_pipeline": optimized},
           "same_program": run["same_program"]}
    for clock in CLOCKS:
        base = [r[clock] for r in run["baseline"]]
        opt = [r[clock] for r in run["graphopt"]]
        overhead = [o["total"] - b["total"] for b, o in zip(base, opt)]
        pre_xla = [(o["total"] - o["compile"]) - (b["total"] - b["compile"]) for b, o in zip(base, opt)]
        base_total = statistics.median(b["total"] for b in base)
        only = statistics.median(o["graphopt_only"] for o in opt)
        out[clock] = {
            "baseline": {k: _stats([b[k] for b in base]) for k in (*BASELINE_STAGES, "total")},
            "graphopt": {k: _stats([o[k] for o in opt])
                         for k in (*GRAPHOPT_STAGES, "trace", "lower", "graphopt_only", "total")},
            "overhead_s": _stats(overhead),
            "overhead_ratio": statistics.median(overhead) / base_total,
            "overhead_per_layer_ms": 1e3 * statistics.median(overhead) / layers,
            "pre_xla_overhead_s": _stats(pre_xla),
            "graphopt_only_ratio": only / base_total,
            "graphopt_only_per_layer_ms": 1e3 * only / layers,
        }
    return out


def linear_fit(layers, sizes) -> dict | None:
    """Least-squares fit `median ≈ intercept + slope·layers` of overhead and graphopt-only stages."""
    if len(set(layers)) < 2:
        return None
    x = np.asarray(layers, float)
    fits = {}
    for clock in CLOCKS:
        series = {"overhead_s": [s[clock]["overhead_s"]["median"] for s in sizes],
                  "graphopt_only_s": [s[clock]["graphopt"]["graphopt_only"]["median"] for s in sizes]}
        for name, values in series.items():
            y = np.asarray(values)
            slope, intercept = np.polyfit(x, y, 1)
            spread = np.sum((y - y.mean()) ** 2)
            r2 = 1 - np.sum((y - intercept - slope * x) ** 2) / spread if spread > 0 else 1.0
            fits[f"{clock}_{name}"] = {"slope_ms_per_layer": 1e3 * float(slope),
                                       "intercept_s": float(intercept), "r2": float(r2)}
    return fits


def machine_info() -> dict:
    import flax
    import jaxlib

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
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "usable_cpus": usable,
            "platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "graphopt": graphopt.__version__, "backend": jax.default_backend(),
            "load_average": _load_average(), "git": _git_revision(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _git_revision() -> str:
    """Commit of the measured graphopt checkout, '-dirty' when it has uncommitted changes."""
    import subprocess

    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                              ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
    return f"{stats['median']:+.2f} ({stats['min']:+.2f} to {stats['max']:+.2f})"


SUMMARY_HEADER = ("layers", "graph nodes", "baseline total s", "graphopt total s", "overhead s",
                  "overhead % of baseline", "overhead / layer ms", "graphopt-only stages s",
                  "graphopt-only % of baseline", "graphopt-only / layer ms")
STAGE_HEADER = ("layers", "baseline trace", "baseline lower", "baseline compile",
                "graphopt make_jaxpr", "graphopt convert", "graphopt pipeline", "graphopt param prep",
                "graphopt replay",
                "graphopt StableHLO", "graphopt compile")


def summary_rows(result: dict, clock: str) -> list[tuple[str, ...]]:
    rows = []
    for size in result["sizes"]:
        s = size[clock]
        traced, optimized = size["nodes"]["traced"], size["nodes"]["after_pipeline"]
        nodes = f"{traced}" if traced == optimized else f"{traced} ({optimized})"
        rows.append((str(size["layers"]), nodes, _s(s["baseline"]["total"]),
                     _s(s["graphopt"]["total"]), _signed(s["overhead_s"]),
                     f"{100 * s['overhead_ratio']:+.1f}%", f"{s['overhead_per_layer_ms']:+.1f}",
                     _s(s["graphopt"]["graphopt_only"]), f"{100 * s['graphopt_only_ratio']:.1f}%",
                     f"{s['graphopt_only_per_layer_ms']:.1f}"))
    return rows


def stage_rows(result: dict, clock: str) -> list[tuple[str, ...]]:
    return [(str(size["layers"]),
             *(f"{size[clock]['baseline'][k]['median']:.3f}" for k in BASELINE_STAGES),
             *(f"{size[clock]['graphopt'][k]['median']:.3f}" for k in GRAPHOPT_STAGES))
            for size in result["sizes"]]


def fit_line(result: dict) -> str:
    fits = result["linear_fit"]
    if not fits:
        return "linear fit: needs two or more depths"
    parts = []
    for key, label in (("wall_overhead_s", "wall overhead"), ("cpu_overhead_s", "CPU overhead"),
                       ("wall_graphopt_only_s", "wall graphopt-only stages"),
                       ("cpu_graphopt_only_s", "CPU graphopt-only stages")):
        f = fits[key]
        parts.append(f"{label} {f['slope_ms_per_layer']:+.1f} ms per layer, intercept "
                     f"{f['intercept_s']:+.2f} s (R² {f['r2']:.3f})")
    return "Least-squares fit over depths: " + "; ".join(parts)


def same_program_line(result: dict) -> str:
    flags = {size["layers"]: size["same_program"] for size in result["sizes"]}
    if all(flags.values()):
        return ("Both paths compiled the same XLA program (HLO instruction counts per opcode) at "
                "every depth.")
    differing = ", ".join(str(k) for k, v in flags.items() if not v)
    return (f"The compiled XLA programs differ (HLO instruction counts per opcode) at {differing} "
            "layers: expected if the pipeline rewrites the graph, a bug in lowering if not.")


def _load(load) -> str:
    return "/".join(f"{x:.1f}" for x in load) if load else "n/a"


def machine_line(result: dict) -> str:
    m, c = result["machine"], result["config"]
    return (f"{m['cpu']}, {m['cpu_count']} CPUs ({m['usable_cpus']} usable), {m['platform']}, "
            f"Python {m['python']}, jax {m['jax']}, flax {m['flax']}, backend {m['backend']}, "
            f"graphopt {m['graphopt']} at {m['git']}, "
            f"{m['date']}, load average (1/5/15 min) {_load(m['load_average_at_start'])} at start, "
            f"{_load(m['load_average'])} at end; model width {c['width']}, heads {c['heads']}, "
            f"seq {c['seq']}, batch {c['batch']}, vocab {c['vocab']}; pipeline {c['pipeline']!r}; "
            f"{c['repeats']} repetition{'s' if c['repeats'] != 1 else ''}")


_CLOCK_NAMES = {"wall": "wall-clock", "cpu": "CPU (process time, all threads)"}


def print_console(result: dict, console) -> None:
    from rich.table import Table

    def table(title, header, rows):
        t = Table(title=title)
        for i, name in enumerate(header):
            t.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            t.add_row(*row)
        console.print(t)

    for clock in CLOCKS:
        table(f"graphopt trace cost, {_CLOCK_NAMES[clock]} seconds: median (min–max)",
              SUMMARY_HEADER, summary_rows(result, clock))
    table("time by stage, wall-clock seconds, median", STAGE_HEADER, stage_rows(result, "wall"))
    console.print(fit_line(result))
    console.print(same_program_line(result))
    console.print(machine_line(result), style="dim")


def markdown(result: dict) -> str:
    def table(header, rows):
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)

    return "\n".join([
        f"Machine: {machine_line(result)}.", "",
        f"Command: `{result['config']['command']}`", "",
        "Seconds, median (min–max) over repetitions. Overhead = graphopt total − baseline total, "
        "per repetition. graphopt-only stages = convert + pipeline + param prep + replay, the "
        "stages the baseline does not have. Graph nodes: as traced, regions included (after the "
        "pipeline, in parentheses, where it changed them).", "",
        "Wall-clock:", "",
        table(SUMMARY_HEADER, summary_rows(result, "wall")), "",
        "CPU time of the process (all threads; less disturbed by other load on the machine):", "",
        table(SUMMARY_HEADER, summary_rows(result, "cpu")), "",
        "Time by stage (wall-clock seconds, median). Baseline `lower` = `Traced.lower`; graphopt "
        "trace = make_jaxpr + convert; graphopt lower to StableHLO = replay + StableHLO.", "",
        table(STAGE_HEADER, stage_rows(result, "wall")), "",
        fit_line(result) + ". " + same_program_line(result),
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
    parser.add_argument("--from-json", metavar="PATH",
                        help="measure nothing: print the tables of a file written by --json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # redirected: don't squeeze the tables to 80 columns
        console = Console(width=220)
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
    else:
        result = benchmark(args, progress=lambda line: console.print(line, style="dim"))
    print_console(result, console)
    if args.json and not args.from_json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        console.print(f"wrote {args.json}")
    if args.markdown:
        print()
        print(markdown(result))
    return result


if __name__ == "__main__":
    main()

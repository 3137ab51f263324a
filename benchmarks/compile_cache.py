"""Cold against warm start of `graphopt demo`: what the program cache and the compilation cache save.

Usage:
    python benchmarks/compile_cache.py [--repeats 3] [--layers 4] [--seq 128] [--json out.json] [--results]

`--results` writes benchmarks/results/compile_cache.json and regenerates this benchmark's section
of benchmarks/RESULTS.md.

Method
------
Each repetition makes a fresh, empty cache folder and runs `graphopt demo` twice as subprocesses
with `GRAPHOPT_CACHE_DIR` pointing at it: the cold run finds nothing (it traces, runs the passes,
lowers, compiles, and stores the optimized program and the XLA executables), the warm run finds
both caches filled (it loads the optimized program and its XLA compiles hit JAX's persistent
compilation cache). Two figures per run:

- whole command: wall-clock time of the subprocess, and its CPU time (children's user + system
  time from `resource.getrusage`, steadier when other processes compete for the cores). It
  includes the demo's fixed costs, which no cache removes: starting Python, importing JAX and
  Flax, initializing the model, rebuilding the graph for the printed summary, and the timing loops;
- build stage: the time to the first optimized result, as the demo prints it ("first optimized
  result ... ms (CPU ... ms ...; program cache: hit|stored)"): trace, passes, lower, compile and
  parameter prep when cold; the fingerprint (JAX's make_jaxpr of the model), the load and the
  compile-cache hits when warm.

The ratio warm / cold is computed per repetition (the two runs are back to back) and reported as the
median and min–max over repetitions, next to the medians of the times. The goal is warm ≤ 0.2×
cold. A repetition whose warm run misses the program cache (graphopt's source, part of the key,
edited between the two runs) is run again, at most three times. The runs inherit the environment except `JAX_COMPILATION_CACHE_DIR`, which is removed, and
`GRAPHOPT_CACHE`, which is set to 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

_BUILD = re.compile(r"first optimized result (\d+) ms \(CPU (\d+) ms;.*program cache: ([\w ]+)\)")


def run_demo(cache_dir: str, layers: int, seq: int) -> dict:
    """One `graphopt demo` subprocess: wall and CPU seconds, and the build stage it printed."""
    env = {**os.environ, "GRAPHOPT_CACHE_DIR": cache_dir, "GRAPHOPT_CACHE": "1"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    command = [sys.executable, "-m", "graphopt.cli", "demo", "--layers", str(layers), "--seq", str(seq)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"graphopt demo failed ({done.returncode}):\n{done.stderr[-3000:]}")
    match = _BUILD.search(" ".join(done.stdout.split()))
    if match is None:
        raise SystemExit(f"no 'first optimized result' line in the demo's output:\n{done.stdout[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "build_s": int(match.group(1)) / 1e3,
            "build_cpu_s": int(match.group(2)) / 1e3, "program_cache": match.group(3).strip()}


def measure(repeats: int, layers: int, seq: int, tries: int = 3) -> list[dict]:
    runs = []
    for repeat in range(repeats):
        for attempt in range(tries):
            folder = tempfile.mkdtemp(prefix="graphopt-cache-bench-")
            try:
                cold = run_demo(folder, layers, seq)
                warm = run_demo(folder, layers, seq)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            if warm["program_cache"] == "hit":
                break
            # graphopt's source is part of the program key: a tree edited between the two runs
            # (a development checkout) makes the warm run miss. Such a pair measures nothing.
            print(f"repetition {repeat + 1}: the warm run missed the program cache "
                  f"({warm['program_cache']}); repeating it", flush=True)
        runs.append({"cold": cold, "warm": warm, "attempts": attempt + 1})
        print(f"repetition {repeat + 1}: cold {cold['wall_s']:.2f} s (build {cold['build_s']:.2f} s, "
              f"program cache {cold['program_cache']}), warm {warm['wall_s']:.2f} s (build "
              f"{warm['build_s']:.2f} s, program cache {warm['program_cache']})", flush=True)
    return runs


def summarize(runs: list[dict]) -> str:
    rows = [("whole command, wall", "wall_s"), ("whole command, CPU", "cpu_s"),
            ("build stage, wall", "build_s"), ("build stage, CPU", "build_cpu_s")]
    lines = [f"{'measure':<22} {'cold (median)':>14} {'warm (median)':>14} {'warm/cold median':>17} "
             f"{'min–max':>13}  goal ≤ 0.2"]
    for label, field in rows:
        cold = [r["cold"][field] for r in runs]
        warm = [r["warm"][field] for r in runs]
        ratios = [w / c for w, c in zip(warm, cold)]
        ratio = statistics.median(ratios)
        lines.append(f"{label:<22} {statistics.median(cold):>12.2f} s {statistics.median(warm):>12.2f} s "
                     f"{ratio:>16.3f}x {min(ratios):>6.3f}–{max(ratios):.3f}  "
                     f"{'met' if ratio <= 0.2 else 'not met'}")
    states = sorted({f"cold {r['cold']['program_cache']}, warm {r['warm']['program_cache']}" for r in runs})
    lines.append(f"program cache: {'; '.join(states)} ({len(runs)} repetitions)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--json", help="write the runs to this file")
    parser.add_argument("--results", action="store_true", help="write benchmarks/results/compile_cache.json "
                        "and this benchmark's section of benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    runs = measure(args.repeats, args.layers, args.seq)
    summary = summarize(runs)
    print(summary)
    here = os.path.dirname(os.path.abspath(__file__))
    paths = ([args.json] if args.json else []) + ([os.path.join(here, "results", "compile_cache.json")]
                                                   if args.results else [])
    for path in paths:
        with open(path, "w") as file:
            json.dump({"layers": args.layers, "seq": args.seq, "runs": runs}, file, indent=1)
    if args.results:
        sys.path.insert(0, here)
        from measure import machine_info, replace_section

        m = machine_info()
        command = "python benchmarks/compile_cache.py " + " ".join(argv if argv is not None else sys.argv[1:])
        replace_section(os.path.join(here, "RESULTS.md"), "compile_cache.py", "\n".join([
            "## Compile cache: cold against warm start of `graphopt demo`",
            "",
            "Generated by `benchmarks/compile_cache.py --results`; do not edit by hand. Method: the "
            "module docstring.",
            "",
            f"Command: `{command.strip()}`; demo {args.layers} layers, sequence {args.seq}.",
            "",
            f"Machine: {m['device']} ({m['backend']}), JAX {m['jax']}, Python {m['python']}, git {m['git']}, "
            f"{m['date']}.",
            "", "```", summary, "```"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How XLA:CPU's optional kernel libraries change a zoo model's latency: one flag set per process.

XLA_FLAGS are read once, when JAX starts, so each setting runs in its own subprocess:
`jax.jit(model.apply)` of a zoo model at full size, one warm-up call, then the median of
`--repeats` calls, and the largest output value (the outputs must not change). This VM's speed
drifts between processes minutes apart, so the settings take turns for `--rounds` rounds and
each setting's figure is the median over rounds (min–max beside it).

    python benchmarks/xla_cpu_flags.py [--models resnet bert] [--repeats 40] [--rounds 3]
        [--flags "" --xla_cpu_use_onednn=true --xla_cpu_use_xnnpack=true]

Measured 2026-12-03 (2 cores, JAX 0.10.2, `--repeats 40 --rounds 3`), median (min–max) of the
rounds: resnet 15.87 (13.87–19.43) ms default, 16.61 (12.93–18.01) with oneDNN, 16.43
(15.38–20.32) with XNNPACK; bert 34.98 (25.71–36.89), 34.05 (27.63–38.08), 29.47 (28.00–35.88).
No setting is faster beyond the drift, though one unalternated run had shown oneDNN 1.8x faster
on the ResNet: the reason for the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

_CHILD = """
import statistics, sys, time
sys.path.insert(0, {here!r})
import importlib, jax, numpy as np
model = importlib.import_module("zoo." + {name!r}).build("full")
f = jax.jit(model.apply)
out = jax.block_until_ready(f(model.variables, *model.inputs))
times = []
for _ in range({repeats}):
    start = time.perf_counter()
    jax.block_until_ready(f(model.variables, *model.inputs))
    times.append(time.perf_counter() - start)
print(f"{{statistics.median(times) * 1e3:.3f}} ms, max |output| {{float(np.abs(np.asarray(jax.tree.leaves(out)[0])).max()):.6g}}")
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet", "bert"], help="zoo module names")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flags", nargs="+", default=["", "--xla_cpu_use_onednn=true",
                                                      "--xla_cpu_use_xnnpack=true"])
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    for name in args.models:
        times: dict[str, list[float]] = {flags: [] for flags in args.flags}
        outputs: dict[str, set] = {flags: set() for flags in args.flags}
        for _ in range(args.rounds):
            for flags in args.flags:
                env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
                code = _CHILD.format(here=here, name=name, repeats=args.repeats)
                result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
                if result.returncode != 0:
                    raise SystemExit(f"{name} with {flags!r} failed: {result.stderr.strip()[-2000:]}")
                ms, output = result.stdout.strip().splitlines()[-1].split(" ms, max |output| ")
                times[flags].append(float(ms))
                outputs[flags].add(output)
        for flags in args.flags:
            t = times[flags]
            print(f"{name:8s} {flags or '(default)':32s} {statistics.median(t):7.2f} ms "
                  f"({min(t):.2f}–{max(t):.2f}) over {len(t)} rounds, max |output| {', '.join(sorted(outputs[flags]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

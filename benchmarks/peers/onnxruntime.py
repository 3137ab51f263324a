"""graphopt against ONNX Runtime on CPU: the same zoo models, float32 and dynamic int8, one process.

Each model is exported once to ONNX (`peers.onnx_export`, jax2onnx, weights as initializers) and
run in an `onnxruntime.InferenceSession` on the CPU execution provider with
`GraphOptimizationLevel.ORT_ENABLE_ALL`, `intra_op_num_threads` = the machine's cores
(`os.cpu_count()`; XLA's CPU client also uses every core) and sequential execution. The int8
variant is `onnxruntime.quantization.quantize_dynamic` with QInt8 weights, per tensor (its
defaults): it rewrites MatMul / Gemm to MatMulInteger, Conv to ConvInteger and Gather (embeddings)
to DequantizeLinear on int8 codes; activations are quantized at run time (DynamicQuantizeLinear).

    run_peer(model, quantize, repeats) -> dict     # ORT alone: latency, CPU time, max error

As a script, for each model (default: zoo `bert` and `resnet`, full size) it times five variants
round-robin in the same process, the order rotated every round: `jax.jit(apply)` (the baseline),
`graphopt.optimize(apply, pipeline="default", params_argnums=0)`, ORT float32,
`graphopt.quantize(apply, variables, *inputs, scheme="int8_dynamic", params_argnums=0)` and ORT
int8. Columns: median and p10–p90 latency in ms; CPU ms per call (`time.process_time`, all
threads: above the wall time where a call uses several cores); the ratio to the baseline (median
and p10–p90 of the per-round ratios; below 1 is faster); max |error| against the baseline's
output; and the verdict for the ORT rows, from the per-round ratio r = graphopt time / ORT time at
the same precision: "graphopt faster by x%" (x = 100 (1 - r), time saved) or "graphopt slower by
x%" (x = 100 (r - 1), time added), from the median r, with r's p10–p90 beside it (and a note
when that spread crosses 1); "even" when the median r is within 5% of 1.

    python benchmarks/peers/onnxruntime.py [--models bert resnet] [--size full] [--repeats 50] [--markdown] [--json F]
                                           [--results]

`--results` writes benchmarks/results/onnxruntime.json and regenerates this comparison's section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: this file's folder must not shadow the real onnxruntime
    _HERE = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import collections  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from peers.onnx_export import export, require  # noqa: E402

WARMUP = 3
INTEGER_OPS = ("MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "DequantizeLinear", "QLinearMatMul")


class OrtRunner:
    """One ONNX Runtime session of a zoo model, float32 or dynamic int8, ready to call."""

    def __init__(self, model, quantize: bool, threads: int | None = None):
        _, ort, _ = require()
        self.exported = export(model)
        self.quantize = quantize
        self.threads = threads or os.cpu_count() or 1
        self.version = ort.__version__
        model_bytes, self.quantized_ops = self.exported.model_bytes, {}
        if quantize:
            model_bytes, self.quantized_ops = _quantize_dynamic(self.exported.model_bytes)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # not the "Removing initializer ..." warnings
        self.session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        self.feed = dict(zip(self.exported.input_names, self.exported.inputs))

    def __call__(self) -> list[np.ndarray]:
        return self.session.run(None, self.feed)

    def max_error(self) -> float:
        """Max |ORT output - jax.jit output| over every output element."""
        return max_error(self(), self.exported.reference)


def run_peer(model, quantize: bool, repeats: int) -> dict:
    """ONNX Runtime on `model` (a zoo ZooModel): latency and max error against `jax.jit(apply)`.

    `quantize`: dynamic int8 (`quantize_dynamic`, QInt8 weights) instead of float32. The model is
    exported once per model object in a process. Times: `WARMUP` calls, then `repeats` timed calls.

    >>> import sys; sys.path.insert(0, "benchmarks")                              # doctest: +SKIP
    >>> from zoo import resnet                                                    # doctest: +SKIP
    >>> r = run_peer(resnet.build("quick"), quantize=True, repeats=20)            # doctest: +SKIP
    >>> sorted(r["quantized_ops"])                                                # doctest: +SKIP
    ['ConvInteger', 'DynamicQuantizeLinear', 'MatMulInteger']
    """
    runner = OrtRunner(model, quantize)
    timing = time_calls(runner, repeats)
    return {"peer": "onnxruntime", "version": runner.version, "model": model.name,
            "precision": "int8 dynamic" if quantize else "float32", "threads": runner.threads, **timing,
            "max_error": runner.max_error(),
            "reference_max": float(max(np.abs(r).max() for r in runner.exported.reference)),
            "exporter": runner.exported.exporter, "export_seconds": runner.exported.seconds,
            "ops": runner.exported.ops, "quantized_ops": runner.quantized_ops, "repeats": repeats}


def time_calls(fn: Callable, repeats: int) -> dict:
    """Median and p10 / p90 wall ms, and median CPU ms (process_time), of `repeats` calls of `fn`."""
    for _ in range(WARMUP):
        jax.block_until_ready(fn())
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    q = statistics.quantiles(wall, n=10) if repeats > 1 else [wall[0]] * 9
    return {"ms": 1e3 * statistics.median(wall), "p10_ms": 1e3 * q[0], "p90_ms": 1e3 * q[-1],
            "cpu_ms": 1e3 * statistics.median(cpu)}


def max_error(outputs, reference) -> float:
    """Max |a - b| over matching leaves (NaN where either has a NaN the other has not)."""
    outputs, reference = jax.tree.leaves(outputs), jax.tree.leaves(reference)
    if len(outputs) != len(reference):
        raise ValueError(f"{len(outputs)} outputs against {len(reference)} reference outputs")
    errors = [np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() for a, b in zip(outputs, reference)]
    return float(max(errors))


def _quantize_dynamic(model_bytes: bytes) -> tuple[bytes, dict]:
    """(the dynamic-int8 model, its counts of integer ops) from a float32 model."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "float.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(model_bytes)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        quantized = dst.read_bytes()
    ops = collections.Counter(n.op_type for n in onnx.load_from_string(quantized).graph.node)
    return quantized, {k: ops[k] for k in INTEGER_OPS if ops[k]}


# --- the side-by-side comparison ----------------------------------------------------------------

def compare(model, repeats: int, log=print) -> dict:
    """The five variants of the module docstring on `model`, timed round-robin in this process."""
    import graphopt

    variables, inputs = model.variables, model.inputs
    baseline = jax.jit(model.apply)
    log(f"{model.name}: graphopt default pipeline")
    optimized = graphopt.optimize(model.apply, pipeline="default", params_argnums=0)
    log(f"{model.name}: graphopt int8 dynamic")
    qmodel = graphopt.quantize(model.apply, variables, *inputs, scheme="int8_dynamic", params_argnums=0)
    log(f"{model.name}: ONNX export and sessions")
    ort_f32, ort_i8 = OrtRunner(model, quantize=False), OrtRunner(model, quantize=True)
    variants = {"jax.jit": lambda: baseline(variables, *inputs),
                "graphopt default": lambda: optimized(variables, *inputs),
                "ORT float32": ort_f32,
                "graphopt int8 dynamic": lambda: qmodel(*inputs),
                "ORT int8 dynamic": ort_i8}
    reference = ort_f32.exported.reference
    errors = {name: max_error(jax.block_until_ready(fn()), reference) for name, fn in variants.items()}
    log(f"{model.name}: timing {repeats} rounds of {len(variants)} variants")
    samples = _round_robin(variants, repeats)
    rows = {}
    for name in variants:
        wall, cpu = samples[name]
        ratios = [w / b for w, b in zip(wall, samples["jax.jit"][0])]
        rows[name] = {"ms": _spread(wall, 1e3), "cpu_ms": 1e3 * statistics.median(cpu),
                      "vs_jit": _spread(ratios), "max_error": errors[name]}
    for ours, peer in (("graphopt default", "ORT float32"), ("graphopt int8 dynamic", "ORT int8 dynamic")):
        rows[peer]["graphopt_vs_peer"] = _spread([g / p for g, p in zip(samples[ours][0], samples[peer][0])])
    return {"model": model.name, "task": model.task, "rows": rows, "threads": ort_f32.threads,
            "ort": ort_f32.version, "exporter": ort_f32.exported.exporter,
            "export_seconds": ort_f32.exported.seconds, "quantized_ops": ort_i8.quantized_ops,
            "reference_max": float(max(np.abs(r).max() for r in reference))}


def _round_robin(variants: dict, repeats: int) -> dict:
    """{name: ([wall s], [cpu s])}: each round calls every variant once, the order rotated."""
    fns = list(variants.items())
    for _, fn in fns:
        for _ in range(WARMUP):
            jax.block_until_ready(fn())
    samples = {name: ([], []) for name, _ in fns}
    for i in range(repeats):
        for name, fn in fns[i % len(fns):] + fns[:i % len(fns)]:
            w, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            samples[name][0].append(time.perf_counter() - w)
            samples[name][1].append(time.process_time() - c)
    return samples


def _spread(values, scale: float = 1.0) -> dict:
    q = statistics.quantiles(values, n=10) if len(values) > 1 else [values[0]] * 9
    return {"median": scale * statistics.median(values), "p10": scale * q[0], "p90": scale * q[-1]}


def verdict(r: dict) -> str:
    """The verdict text for a graphopt-time / ORT-time spread (see the module docstring): the
    median ratio decides (within 5% of 1: even); a p10–p90 that crosses 1 is said, not hidden."""
    spread = f"p10–p90 {r['p10']:.2f}–{r['p90']:.2f}"
    if abs(r["median"] - 1.0) < 0.05:
        return f"even (graphopt/ORT {r['median']:.2f}, {spread})"
    word, percent = ("faster", 1 - r["median"]) if r["median"] < 1.0 else ("slower", r["median"] - 1)
    unsure = "; the spread crosses 1" if r["p10"] <= 1.0 <= r["p90"] else ""
    return f"graphopt {word} by {100 * percent:.0f}% (graphopt/ORT {r['median']:.2f}, {spread}{unsure})"


def tables(result: dict) -> list:
    head = ["variant", "ms median (p10–p90)", "CPU ms", "vs jax.jit", "max |error|", "verdict"]
    out = []
    for m in result["models"]:
        rows = []
        for name, r in m["rows"].items():
            ms, ratio = r["ms"], r["vs_jit"]
            rows.append([name, f"{ms['median']:.2f} ({ms['p10']:.2f}–{ms['p90']:.2f})", f"{r['cpu_ms']:.2f}",
                         f"{ratio['median']:.2f} ({ratio['p10']:.2f}–{ratio['p90']:.2f})", f"{r['max_error']:.1e}",
                         verdict(r["graphopt_vs_peer"]) if "graphopt_vs_peer" in r else ""])
        quantized = ", ".join(f"{k}×{v}" for k, v in m["quantized_ops"].items())
        title = (f"{m['model']}: {m['task']}; |output| ≤ {m['reference_max']:.2f}; ORT {m['ort']}, "
                 f"{m['threads']} intra-op threads; ORT int8 graph: {quantized}")
        out.append((title, head, rows))
    return out


def main(argv=None) -> dict:
    from measure import machine_info, print_tables

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["bert", "resnet"], help="zoo module names")
    parser.add_argument("--size", default="full", choices=["quick", "full"])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--results", action="store_true", help="write benchmarks/results/onnxruntime.json and "
                        "this comparison's section of benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    log = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)  # noqa: E731
    models = []
    for name in args.models:
        log(f"building zoo.{name} ({args.size})")
        model = importlib.import_module(f"zoo.{name}").build(args.size)
        models.append(compare(model, args.repeats, log))
    result = {"machine": machine_info(), "repeats": args.repeats, "size": args.size, "cores": os.cpu_count(),
              "models": models}
    benchmarks = Path(__file__).resolve().parents[1]
    for path in ([args.json] if args.json else []) + ([benchmarks / "results" / "onnxruntime.json"]
                                                      if args.results else []):
        Path(path).write_text(json.dumps(result, indent=1))
    m = result["machine"]
    line = (f"{m['device']} ({m['backend']}, {result['cores']} cores), JAX {m['jax']}, Python {m['python']}, "
            f"git {m['git']}, {m['date']}; {result['repeats']} round-robin rounds after {WARMUP} warm-up calls; "
            f"exporter {models[0]['exporter'] if models else '?'}; size {args.size}")
    print_tables(tables(result), line, args.markdown)
    if args.results:
        from measure import markdown_tables, replace_section

        command = "python benchmarks/peers/onnxruntime.py " + " ".join(argv if argv is not None else sys.argv[1:])
        replace_section(benchmarks / "RESULTS.md", "peers/onnxruntime.py", "\n".join([
            "## graphopt against ONNX Runtime (CPU)", "",
            "Generated by `benchmarks/peers/onnxruntime.py --results`; do not edit by hand. Method and "
            "verdict key: the module docstring.", "",
            f"Command: `{command.strip()}`", "", markdown_tables(tables(result), line)]))
    return result


if __name__ == "__main__":
    main()

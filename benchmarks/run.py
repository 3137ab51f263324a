"""Every zoo model through every pipeline, against plain `jax.jit` of the model in the same run.

    python benchmarks/run.py                       # full sizes, all models and pipelines
    python benchmarks/run.py --quick               # tiny shapes, few repeats (CI; minutes on 2 cores)
    python benchmarks/run.py --models mlp bert_mini --pipelines none default int8
    python benchmarks/run.py --results             # also write results/run.json and RESULTS.md's section
    python benchmarks/run.py --peers onnxruntime   # add ONNX Runtime rows (benchmarks/peers/)

Models: `zoo.MODELS` (benchmarks/zoo). Pipelines (PIPELINES below):

    none           trace and lower, no passes (graphopt's round trip)
    default        the inference pipeline (canonicalize ... fold_batchnorm, raise_ops, fuse_attention, fold_params)
    autocast       the mixed_precision pipeline: inference + autocast (bfloat16 matmuls and convolutions)
    int8           graphopt.quantize(scheme="int8"): int8 weights, per-channel scales, float activations
    int8_dynamic   graphopt.quantize(scheme="int8_dynamic"): int8 weights and per-token int8 activations
    prune30        graphopt.prune(flops=0.3): 30% of the FLOPs removed by structured pruning (no recovery)

Per model × pipeline, on the current JAX backend: latency (ms) median and p10–p90 over `--repeats`
calls interleaved with the baseline (alternating which goes first, each call blocked on, after
warm-up), the ratio to the baseline (median and p10–p90 of per-pair ratios), throughput (items /
median latency), compile time (model → executable: graphopt's trace, passes, parameter prep and
XLA's compile; wall and CPU seconds), peak memory of the compiled program
(`memory_analysis()`: arguments + outputs + temporaries − aliased bytes), bytes of the parameters
the program runs on, the max relative error of the outputs against the baseline's
(max |a − e| / max |e| per output leaf, the measure translation validation uses) and the max
absolute error, and whether the error is within the pipeline's contract (CONTRACTS below). The
trained models (digits, charlm) add their metric (accuracy, perplexity) for every row.

A pipeline that does not apply to a model (graphopt raises a GraphoptError: e.g. pruning finds no
prunable group, quantization no layer) gives a row with the reason; any other exception gives a row
with status "error" and the message, and the run goes on. `main` returns 1 when a row is outside
its contract or errored, else 0.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

import jax
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import graphopt  # noqa: E402
from graphopt.errors import GraphoptError  # noqa: E402
from graphopt.lowering.compile import memory_analysis  # noqa: E402
from graphopt.pipeline import PASSES, resolve  # noqa: E402
from graphopt.validate import relative_error  # noqa: E402
from graphopt.testing import leaf_mismatch  # noqa: E402
from measure import interleaved, machine_info, nbytes  # noqa: E402
import run_report  # noqa: E402
from zoo import MODELS  # noqa: E402

# name -> (kind, what): kind "graph" runs a graphopt pipeline by name; "quantize" a scheme; "prune" a FLOP target
PIPELINES = {
    "none": ("graph", "none"),
    "default": ("graph", "default"),
    "autocast": ("graph", "mixed_precision"),
    "int8": ("quantize", "int8"),
    "int8_dynamic": ("quantize", "int8_dynamic"),
    "prune30": ("prune", 0.3),
}
PEERS = ("onnxruntime",)
PEER_CONTRACT = {"kind": "peer", "bound": None}   # another runtime: its error is reported, not checked


def contract(pipeline: str) -> dict:
    """The numerics contract a pipeline's outputs are checked against.

    A graphopt pipeline is exact when all its passes are (outputs within graphopt.testing's per-dtype
    tolerances); else approximate with the sum of its approximate passes' bounds (each bounds the
    relative error it adds, so their sum bounds the chain to first order). Quantization adds the
    quantize pass's bound to the inference pipeline's. Pruning promises no numeric bound (it removes
    channels; quality is the task metric's): it is checked for finite outputs of the original shapes.

    >>> contract("none"), contract("prune30")["kind"]
    ({'kind': 'exact', 'bound': 0.0}, 'none')
    """
    kind, what = PIPELINES[pipeline]
    if kind == "prune":
        return {"kind": "none", "bound": None}
    passes = resolve("default" if kind == "quantize" else what)
    bound = sum(info.contract.bound for info, _ in passes if info.contract.kind == "approximate")
    if kind == "quantize":
        bound += PASSES["quantize"].contract.bound
    return {"kind": "approximate", "bound": bound} if bound else {"kind": "exact", "bound": 0.0}


# --- building each variant: (compiled program, the parameters it runs on) ------------------------

def _compile(fn, args):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def build_variant(model, pipeline: str, prune_multiple, quick: bool = False) -> dict:
    """Make the pipeline's program for `model`: {"compiled", "params", "xla_compile_s", "notes"}.
    `quick`: quantize skips its whole-model timing check (check_model=False; layers are still timed)."""
    kind, what = PIPELINES[pipeline]
    args = (model.variables, *model.inputs)
    notes = ""
    if kind == "graph":
        graph = graphopt.trace(model.apply, *args, params_argnums=0)
        result = graphopt.run_pipeline(graph, what)
        fn, params = graphopt.lower(result.graph), graphopt.prepare(result.graph, *args)[0]
    elif kind == "quantize":
        qmodel = graphopt.quantize(model.apply, *args, scheme=what, params_argnums=0, check_model=not quick)
        forms = {}
        for layer in qmodel.recipe.layers:
            form = str(layer.form) if layer.form is not None else "reference"
            forms[form] = forms.get(form, 0) + 1
        notes = ", ".join(f"{k}×{v}" for k, v in sorted(forms.items()))
        fn, params = graphopt.lower(qmodel.graph), qmodel.params
    else:
        pruned = graphopt.prune(model.apply, *args, flops=what, params_argnums=0, measure=False,
                                multiple=prune_multiple)
        before, after = pruned.report.totals["flops"]
        notes = f"FLOPs left {after / before:.2f}, width multiple {pruned.report.multiple}"
        fn, params = graphopt.lower(pruned.graph), pruned.params
    compiled, xla_seconds = _compile(fn, (params, *model.inputs))
    return {"compiled": compiled, "params": params, "xla_compile_s": xla_seconds, "notes": notes}


# --- measuring -----------------------------------------------------------------------------------

def peak_bytes(compiled) -> int | None:
    """arguments + outputs + temporaries − aliased bytes of a compiled program (None if unknown)."""
    memory = memory_analysis(compiled)
    return None if memory is None else memory.peak_bytes


def compare(actual, expected, contract_: dict) -> dict:
    """max relative / absolute error over the output leaves, and whether `contract_` holds."""
    a_leaves, e_leaves = jax.tree.leaves(actual), jax.tree.leaves(expected)
    if jax.tree.structure(actual) != jax.tree.structure(expected):
        return {"max_rel_error": float("inf"), "max_abs_error": float("inf"), "within_contract": False,
                "why": "the outputs' structure differs"}
    rel = absolute = 0.0
    why = None
    for a, e in zip(a_leaves, e_leaves):
        a, e = np.asarray(a), np.asarray(e)
        if a.shape != e.shape or a.dtype != e.dtype:
            return {"max_rel_error": float("inf"), "max_abs_error": float("inf"), "within_contract": False,
                    "why": f"output {e.dtype}{list(e.shape)} became {a.dtype}{list(a.shape)}"}
        a64, e64 = a.astype(np.float64), e.astype(np.float64)
        finite = np.isfinite(a64) & np.isfinite(e64)
        absolute = max(absolute, float(np.abs(a64 - e64)[finite].max(initial=0.0)))
        rel = max(rel, relative_error(a, e))
        if contract_["kind"] == "exact":
            why = why or leaf_mismatch(a, e)
        elif not np.array_equal(np.isfinite(a64), np.isfinite(e64)):
            why = why or "NaN / ±Inf positions differ"
    if contract_["kind"] == "approximate" and why is None and rel > contract_["bound"]:
        why = f"relative error {rel:.3g} exceeds the bound {contract_['bound']:g}"
    return {"max_rel_error": rel, "max_abs_error": absolute, "within_contract": why is None, "why": why}


def measure_model(name: str, size: str, pipelines, repeats: int, prune_multiple, peers, log) -> list[dict]:
    """The baseline row and one row per pipeline (and per peer) for zoo model `name`."""
    model = MODELS[name](size)
    args = (model.variables, *model.inputs)
    common = {"model": name, "framework": model.framework, "items": model.items, "item": model.item,
              "metric_name": model.metric}
    start, cpu = time.perf_counter(), time.process_time()
    baseline, _ = _compile(model.apply, args)
    base_compile = (time.perf_counter() - start, time.process_time() - cpu)
    expected = jax.block_until_ready(baseline(*args))
    run_base = lambda: baseline(*args)  # noqa: E731
    timing = interleaved(run_base, run_base, repeats)
    rows = [dict(common, pipeline="jax.jit", status="ok", reason=None, contract={"kind": "exact", "bound": 0.0},
                 latency_ms=timing["baseline_ms"], ratio={"median": 1.0, "p10": 1.0, "p90": 1.0},
                 throughput=model.items / (timing["baseline_ms"]["median"] / 1e3),
                 compile_s=base_compile[0], compile_cpu_s=base_compile[1], xla_compile_s=base_compile[0],
                 peak_bytes=peak_bytes(baseline), param_bytes=nbytes(model.variables),
                 max_rel_error=0.0, max_abs_error=0.0, within_contract=True, why=None, notes="",
                 metric=model.evaluate(lambda *x: baseline(model.variables, *x)) if model.evaluate else None)]
    for pipeline in pipelines:
        log(f"{name}: {pipeline}")
        row = dict(common, pipeline=pipeline, contract=contract(pipeline))
        start, cpu = time.perf_counter(), time.process_time()
        try:
            variant = build_variant(model, pipeline, prune_multiple, quick=size == "quick")
        except GraphoptError as error:
            rows.append(dict(row, status="n/a", reason=_first_line(error)))
            continue
        except Exception as error:  # noqa: BLE001 -- one broken row must not lose the others
            traceback.print_exc()
            rows.append(dict(row, status="error", reason=f"{type(error).__name__}: {_first_line(error)}"))
            continue
        row.update(compile_s=time.perf_counter() - start, compile_cpu_s=time.process_time() - cpu)
        compiled, params = variant["compiled"], variant["params"]
        run = lambda: compiled(params, *model.inputs)  # noqa: E731
        timing = interleaved(run, run_base, repeats)
        row.update(status="ok", reason=None, latency_ms=timing["latency_ms"], ratio=timing["ratio"],
                   throughput=model.items / (timing["latency_ms"]["median"] / 1e3),
                   xla_compile_s=variant["xla_compile_s"], peak_bytes=peak_bytes(compiled),
                   param_bytes=nbytes(params), notes=variant["notes"],
                   **compare(jax.block_until_ready(run()), expected, row["contract"]),
                   metric=model.evaluate(lambda *x: compiled(params, *x)) if model.evaluate else None)
        rows.append(row)
    for peer in peers:
        rows.extend(peer_rows(peer, model, common, repeats, rows[0]["latency_ms"]["median"], log))
    return rows


def peer_rows(peer: str, model, common: dict, repeats: int, baseline_ms: float, log) -> list[dict]:
    """Rows from benchmarks/peers/<peer>.py's `run_peer(model, quantize, repeats) -> dict`, float and
    int8; a missing module or a model it does not take is a row with the reason. A peer times its
    runtime alone (not interleaved): its ratio is to the median of this run's jax.jit calls."""
    try:
        module = importlib.import_module(f"peers.{peer}")
    except ImportError as error:
        return [dict(common, pipeline=peer, status="n/a", reason=f"benchmarks/peers/{peer}.py: {error}",
                     contract=PEER_CONTRACT)]
    rows = []
    for quantize in (False, True):
        label = f"{peer}{' int8' if quantize else ''}"
        log(f"{model.name}: {label}")
        row = dict(common, pipeline=label, contract=PEER_CONTRACT)
        try:
            result = module.run_peer(model, quantize=quantize, repeats=repeats)
        except Exception as error:  # noqa: BLE001 -- a peer that cannot run a model is a row, not a crash
            rows.append(dict(row, status="n/a", reason=f"{type(error).__name__}: {_first_line(error)}"))
            continue
        latency = {"median": result["ms"], "p10": result["p10_ms"], "p90": result["p90_ms"]}
        ratio = {k: v / baseline_ms for k, v in latency.items()}
        error = result.get("max_error")
        scale = result.get("reference_max")
        rows.append(dict(row, peer=result, status="ok", reason=None, latency_ms=latency, ratio=ratio,
                         throughput=model.items / (latency["median"] / 1e3), max_abs_error=error,
                         max_rel_error=error / scale if error is not None and scale else None,
                         notes=f"{result.get('version', '')} {result.get('precision', '')}, not interleaved".strip()))
    return rows


def _first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


# --- command line --------------------------------------------------------------------------------

def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="quick model sizes and 5 repeats (CI)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), metavar="MODEL",
                        help=f"of: {', '.join(MODELS)}")
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES),
                        metavar="PIPELINE", help=f"of: {', '.join(PIPELINES)}")
    parser.add_argument("--peers", nargs="*", default=[], choices=PEERS, help="peer runtimes (benchmarks/peers/)")
    parser.add_argument("--repeats", type=int, help="interleaved pairs per row (default 30; --quick: 5)")
    parser.add_argument("--prune-multiple", default=None, help="pruned widths' multiple: a number or auto "
                        "(default auto; --quick: 8)")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--results", action="store_true",
                        help="write results/run.json and regenerate RESULTS.md's run.py section from it")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (5 if args.quick else 30)
    multiple = args.prune_multiple or ("8" if args.quick else "auto")
    args.prune_multiple = multiple if multiple == "auto" else int(multiple)
    return args


def main(argv=None) -> int:
    """Run the benchmark (see the module docstring); 0 when every row is within its contract.

    >>> main(["--quick", "--models", "mlp", "--pipelines", "none"])   # doctest: +SKIP
    0
    """
    args = parse(argv)
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    log = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)  # noqa: E731
    start, cpu = time.perf_counter(), time.process_time()
    rows = []
    for name in args.models:
        rows.extend(measure_model(name, "quick" if args.quick else "full", args.pipelines, args.repeats,
                                  args.prune_multiple, args.peers, log))
    result = {"command": command.strip(), "machine": machine_info(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "size": "quick" if args.quick else "full",
              "repeats": args.repeats, "prune_multiple": args.prune_multiple,
              "contracts": {p: contract(p) for p in args.pipelines}, "wall_s": time.perf_counter() - start,
              "cpu_s": time.process_time() - cpu, "rows": rows}
    paths = [Path(args.json)] if args.json else []
    if args.results:
        paths.append(HERE / "results" / "run.json")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=float))
    run_report.print_result(result, args.markdown)
    if args.results:
        run_report.update_results_md(HERE / "RESULTS.md", HERE / "results" / "run.json")
    bad = [r for r in rows if r["status"] == "error" or (r["status"] == "ok" and not r.get("within_contract", True))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

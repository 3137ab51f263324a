"""What structured pruning costs and buys, on models trained on real data, against plain jax.jit.

Models (`benchmarks/zoo`, trained in under a minute on a CPU and cached):
- digits: a CNN on scikit-learn's bundled 8x8 digits; metric: test accuracy (higher is better).
- charlm: a byte-level decoder transformer on the standard library's .py sources; metric:
  validation perplexity per byte (lower is better).

For each FLOP target (`--targets`, default 30% and 50% of the FLOPs removed) and importance
(`--importance`), `graphopt.prune(apply, variables, x, flops=target, ...)` finds the coupled
channels (digits: every conv's channels and the hidden units; charlm: MLP hidden units,
attention heads and head dimensions; the residual width stays whole, LayerNorm reads all of it),
ranks them globally and removes them. Recovery distills the pruned model against the unpruned
one (`PrunedModel.distill`, KL of the logits) on training inputs, `--recover-steps` Adam steps.

Columns: the metric before and after recovery and its change from the unpruned model; FLOPs and
parameters left; the speed ratio (pruned time / unpruned time under jax.jit, below 1 is faster):
median and p10–p90 over `--repeats` interleaved pairs in this process on the evaluation batch;
the speedup per FLOP reduction: (unpruned time / pruned time) ÷ (unpruned FLOPs / pruned FLOPs),
1 when time falls as fast as FLOPs (Torch-Pruning reports about 0.57 on ResNet-50, 0.34 on ViT).

    python benchmarks/prune.py [--models digits charlm] [--targets 0.3 0.5] [--repeats 30] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import graphopt  # noqa: E402
from graphopt.cost import graph_flops  # noqa: E402
from measure import machine_info, print_tables, ratio_text, speed_ratio  # noqa: E402
from zoo import charlm, count_params, digits  # noqa: E402

MODULES = {"digits": digits, "charlm": charlm}


def training_inputs(name: str, trained, n: int, batch: int) -> list:
    """`n` batches of training inputs (no labels: recovery distills against the unpruned model)."""
    rng = np.random.default_rng(2)
    if name == "digits":
        x = trained.data.x_train
        return [jnp.asarray(x[rng.choice(len(x), batch, replace=False)]) for _ in range(n)]
    return [jnp.asarray(x) for _, x in charlm.calibration_batches(trained, n=n, batch_size=batch)]


def run_model(name: str, targets, importances, repeats: int, recover_steps: int, multiple: int, log) -> dict:
    module = MODULES[name]
    trained = module.train()
    variables = trained.variables
    calib = [x for _, x in module.calibration_batches(trained, n=8)]
    x = calib[0]
    baseline_fn = jax.jit(trained.apply)
    baseline = lambda: baseline_fn(variables, x)  # noqa: E731
    teacher = lambda xb: trained.apply(variables, xb)  # noqa: E731
    unpruned = module.evaluate(baseline_fn, variables, trained.data)
    flops = graph_flops(graphopt.trace(trained.apply, variables, x, params_argnums=0))[0]
    recover_batches = training_inputs(name, trained, 64, x.shape[0])
    rows = []
    for target in targets:
        for importance in importances:
            label = f"{target:.0%} FLOPs, {importance}"
            log(f"{name}: {label}")
            start = time.perf_counter()
            pruned = graphopt.prune(trained.apply, variables, x, flops=target, importance=importance,
                                    calibration=calib if importance == "wanda" else None, multiple=multiple,
                                    params_argnums=0, measure=False)
            seconds = time.perf_counter() - start
            metric = module.evaluate(lambda _, b: pruned(b), None, trained.data)
            recovered = pruned.distill(teacher, recover_batches, steps=recover_steps, loss="kl",
                                       learning_rate=1e-3) if recover_steps else pruned
            metric_recovered = module.evaluate(lambda _, b: recovered(b), None, trained.data)
            compiled, args = jax.jit(graphopt.lower(recovered.graph)), recovered.arguments((x,))
            speed = speed_ratio(lambda: compiled(*args), baseline, repeats)  # the programs, not call overheads
            pruned_flops = pruned.report.totals["flops"][1]
            rows.append({"label": label, "target": target, "importance": importance, "metric": metric,
                         "recovered": metric_recovered, "flops": pruned_flops, "speed": speed,
                         "params": int(pruned.report.totals["params"][1]), "prune_seconds": seconds,
                         "groups": [list(g) for g in pruned.report.groups], "multiple": pruned.report.multiple,
                         "multiple_ms": {str(m): t * 1e3 for m, t in pruned.report.multiple_times.items()},
                         "efficiency": (1 / speed["ratio"]) / (flops / pruned_flops)})
    return {"model": name, "metric": "accuracy" if name == "digits" else "perplexity", "unpruned": unpruned,
            "flops": flops, "params": count_params(variables),
            "recover_steps": recover_steps, "rows": rows}


def tables(result: dict) -> list:
    out = []
    for model in result["models"]:
        accuracy = model["metric"] == "accuracy"
        fmt = (lambda v: f"{100 * v:.2f}%") if accuracy else (lambda v: f"{v:.3f}")
        change = ((lambda v: f"{100 * (v - model['unpruned']):+.2f} pt") if accuracy
                  else (lambda v: f"{100 * (v / model['unpruned'] - 1):+.1f}%"))
        head = ["variant", model["metric"], "after recovery", "change", "FLOPs left", "params left",
                "speed vs jit", "speedup ÷ FLOP reduction"]
        rows = [["unpruned", fmt(model["unpruned"]), "", "", "1.00", "1.00", "1", ""]]
        for r in model["rows"]:
            rows.append([r["label"], fmt(r["metric"]), fmt(r["recovered"]), change(r["recovered"]),
                         f"{r['flops'] / model['flops']:.2f}", f"{r['params'] / model['params']:.2f}",
                         ratio_text(r["speed"]), f"{r['efficiency']:.2f}"])
        title = (f"{model['model']} ({model['flops'] / 1e6:.0f} MFLOPs per evaluation batch, "
                 f"{model['params']:,} parameters; recovery: {model['recover_steps']} distillation steps)")
        out.append((title, head, rows))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits", "charlm"], choices=sorted(MODULES))
    parser.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.5])
    parser.add_argument("--importance", nargs="+", default=["l2", "wanda"], choices=["l1", "l2", "wanda"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--recover-steps", type=int, default=300)
    parser.add_argument("--multiple", default="auto", help="width multiple, or auto (measured)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    log = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)  # noqa: E731
    multiple = args.multiple if args.multiple == "auto" else int(args.multiple)
    models = [run_model(name, args.targets, args.importance, args.repeats, args.recover_steps, multiple, log)
              for name in args.models]
    result = {"machine": machine_info(), "repeats": args.repeats, "models": models}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    m = result["machine"]
    line = (f"{m['device']} ({m['backend']}), JAX {m['jax']}, Python {m['python']}, git {m['git']}, {m['date']}; "
            f"speed: median (p10–p90) of {args.repeats} interleaved pairs; widths in multiples of {args.multiple}")
    print_tables(tables(result), line, args.markdown)
    return result


if __name__ == "__main__":
    main()

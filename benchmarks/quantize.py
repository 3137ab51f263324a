"""What quantization costs and buys, on models trained on real data, against the float model.

Models (`benchmarks/zoo`, trained in under a minute on a CPU and cached):
- digits: a CNN on scikit-learn's bundled 8x8 digits; metric: test accuracy (higher is better).
- charlm: a character-level decoder transformer on the standard library's .py sources; metric:
  validation perplexity per byte (lower is better).
- decode: a matmul-bound stack (`--decode-width`, default 1024 → 4096 → 1024 MLPs × 4, random
  weights: speed only) at batch 1 (decode-style) and batch 64, against float32 and bfloat16.

Each scheme runs through `graphopt.quantize(apply, variables, x, scheme=...)` (the inference
pipeline with the quantize pass; layers in the form fastest on this backend by measurement, or
on their dequantized codes where no quantized form is faster: `prefer="speed"`), and, for the
weight-only schemes, also with `prefer="memory"` (the codes at run time, whatever the speed).
Static schemes calibrate on 8 training batches (absmax, percentile 99.99 and MSE clipping for
int8); SmoothQuant (`smooth=0.5`) on charlm; int4 + QAT fine-tunes the fake-quantized model
against the float model's outputs (`graphopt.quant.train.distill`) before quantizing.

Columns: the metric and its change from float; stored parameter bytes (what `save` writes: codes,
scales and the float parameters left, e.g. biases and embeddings) and the quantized layers' weight
bytes (codes + scales) against their float32 bytes; the bytes the model runs on; the speed ratio
(quantized time / float time, below 1 is faster), median and p10–p90 of per-pair ratios over
`--repeats` interleaved runs in this process on the evaluation batch; and the forms chosen.

    python benchmarks/quantize.py [--models digits charlm decode] [--repeats 30] [--markdown] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import graphopt  # noqa: E402
from graphopt.quant import Calibration, Rule  # noqa: E402
from graphopt.quant.train import fake_quantized  # noqa: E402
from graphopt.train import distill  # noqa: E402
from measure import machine_info, nbytes, print_tables, ratio_text, speed_ratio  # noqa: E402
from zoo import charlm, digits  # noqa: E402


def layer_bytes(qmodel) -> tuple[int, int]:
    """(bytes of the quantized layers' codes and scales as stored, their float32 bytes)."""
    stored = sum(nbytes(v) for k, v in qmodel.storage.items()
                 if k.rsplit(":", 1)[-1] in ("codes", "scale", "zero_point"))
    original = sum(int(np.prod(e.shape)) * 4 for e in qmodel.recipe.layers)
    return stored, original


# --- real-data models ----------------------------------------------------------------------------

def variants(name: str, calib: list) -> list[tuple[str, str, dict]]:
    """(label, scheme, options) to run on model `name`."""
    group = {"digits": 32, "charlm": 128}[name]
    int4 = {"group": group}
    if name == "digits":  # the stem conv has 1 input channel: no groups of 32 there
        int4["rules"] = [Rule(path="Conv_0", scheme="int8")]
    cal = lambda method="absmax", **o: Calibration(calib, method, progress=False, **o)  # noqa: E731
    rows = [
        ("int8 weight-only", "int8", {}),
        ("int8 weight-only, memory", "int8", {"prefer": "memory"}),
        (f"int4 g{group}", "int4", int4),
        (f"int4 g{group}, memory", "int4", {**int4, "prefer": "memory"}),
        ("int8 dynamic", "int8_dynamic", {}),
        ("int8 static absmax", "int8_static", {"calibration": cal()}),
        ("int8 static percentile", "int8_static", {"calibration": cal("percentile", percentile=99.99)}),
        ("int8 static mse", "int8_static", {"calibration": cal("mse")}),
        ("fp8 e4m3 static", "fp8", {"calibration": cal()}),
        ("fp8 e5m2 static", "fp8_e5m2", {"calibration": cal()}),
    ]
    if name == "charlm":
        rows.insert(8, ("int8 static mse + smooth 0.5", "int8_static", {"calibration": cal("mse"), "smooth": 0.5}))
    return rows


def run_model(name: str, module, repeats: int, qat_steps: int, log) -> dict:
    trained = module.train()
    calib = module.calibration_batches(trained, n=8)
    variables, x = calib[0]
    baseline_fn = jax.jit(trained.apply)
    float_metric = module.evaluate(baseline_fn, variables, trained.data)
    baseline = lambda: baseline_fn(variables, x)  # noqa: E731
    rows = []
    for label, scheme, options in variants(name, calib):
        log(f"{name}: {label}")
        start = time.perf_counter()
        qmodel = graphopt.quantize(trained.apply, variables, x, scheme=scheme, **options)
        seconds = time.perf_counter() - start
        rows.append(_row(label, scheme, qmodel, module, trained, variables, x, baseline, repeats, seconds))
    if qat_steps:
        label = f"int4 g{variants(name, calib)[2][2]['group']} + QAT ({qat_steps} steps)"
        log(f"{name}: {label}")
        int4 = variants(name, calib)[2][2]
        start = time.perf_counter()
        student = fake_quantized(trained.apply, variables, x, scheme="int4", **int4)
        batches = [b for _, b in module.calibration_batches(trained, n=32)]
        tuned = distill(student, lambda x: baseline_fn(variables, x), variables, batches, steps=qat_steps,
                        loss="kl", learning_rate=1e-4)
        qmodel = graphopt.quantize(trained.apply, tuned, x, scheme="int4", **int4)
        rows.append(_row(label, "int4", qmodel, module, trained, tuned, x, baseline, repeats,
                         time.perf_counter() - start))
    return {"model": name, "metric": "accuracy" if name == "digits" else "perplexity", "float": float_metric,
            "float_bytes": nbytes(trained.variables), "train_seconds": trained.train_seconds, "rows": rows}


def _row(label, scheme, qmodel, module, trained, variables, x, baseline, repeats, seconds) -> dict:
    metric = module.evaluate(lambda _, batch: qmodel(batch), None, trained.data)
    stored, original = layer_bytes(qmodel)
    forms = collections.Counter(str(e.form) if e.form is not None else "reference" for e in qmodel.recipe.layers)
    return {"label": label, "scheme": scheme, "metric": metric, "stored_bytes": nbytes(qmodel.storage),
            "run_bytes": nbytes(qmodel.params), "layer_bytes": stored, "layer_float_bytes": original,
            "speed": speed_ratio(lambda: qmodel(x), baseline, repeats), "forms": dict(forms),
            "quantize_seconds": seconds}


# --- decode-style matmul-bound model -------------------------------------------------------------

def decode_model(width: int, layers: int):
    rng = np.random.default_rng(0)
    params = [{"up": jnp.asarray(rng.standard_normal((width, 4 * width)) / np.sqrt(width), jnp.float32),
               "down": jnp.asarray(rng.standard_normal((4 * width, width)) / np.sqrt(4 * width), jnp.float32)}
              for _ in range(layers)]

    def fn(params, x):
        for p in params:
            x = x + jax.nn.gelu(x @ p["up"]) @ p["down"]
        return x

    return fn, params


def run_decode(width: int, layers: int, repeats: int, log) -> dict:
    fn, params = decode_model(width, layers)
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    rows = []
    for batch in (1, 64):
        x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, width)), jnp.float32)
        f32_fn = jax.jit(fn)
        bf16_fn = jax.jit(lambda p, x: fn(p, x.astype(jnp.bfloat16)))
        bf16_vs_f32 = speed_ratio(lambda: bf16_fn(bf16, x), lambda: f32_fn(params, x), repeats)
        rows.append({"label": "bfloat16 weights", "batch": batch, "vs_f32": bf16_vs_f32, "forms": {},
                     "run_bytes": nbytes(bf16)})
        for label, scheme, options in [("int8 weight-only", "int8", {}), ("int8 weight-only, memory", "int8",
                                                                           {"prefer": "memory"}),
                                       ("int4 g128", "int4", {}), ("int4 g128, memory", "int4", {"prefer": "memory"}),
                                       ("int8 dynamic", "int8_dynamic", {})]:
            log(f"decode batch {batch}: {label}")
            qmodel = graphopt.quantize(fn, params, x, scheme=scheme, params_argnums=0, **options)
            forms = collections.Counter(str(e.form) if e.form is not None else "reference"
                                        for e in qmodel.recipe.layers)
            rows.append({"label": label, "batch": batch, "forms": dict(forms), "run_bytes": nbytes(qmodel.params),
                         "vs_f32": speed_ratio(lambda: qmodel(x), lambda: f32_fn(params, x), repeats),
                         "vs_bf16": speed_ratio(lambda: qmodel(x), lambda: bf16_fn(bf16, x), repeats)})
    return {"model": "decode", "width": width, "layers": layers, "float_bytes": nbytes(params), "rows": rows}


# --- reporting -----------------------------------------------------------------------------------

def _forms(forms: dict) -> str:
    return ", ".join(f"{k}×{v}" for k, v in sorted(forms.items()))


def tables(result: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    out = []
    for model in result["models"]:
        if model["model"] == "decode":
            head = ["variant", "batch", "bytes run on (vs f32)", "speed vs f32", "speed vs bf16", "forms"]
            rows = [[r["label"], str(r["batch"]), f"{r['run_bytes'] / model['float_bytes']:.2f}×",
                     ratio_text(r["vs_f32"]), ratio_text(r["vs_bf16"]) if "vs_bf16" in r else "—", _forms(r["forms"])]
                    for r in model["rows"]]
            title = (f"decode-style MLP stack ({model['layers']} × {model['width']} → {4 * model['width']} → "
                     f"{model['width']}, {model['float_bytes'] / 2**20:.0f} MiB f32)")
            out.append((title, head, rows))
            continue
        head = ["variant", model["metric"], "change", "stored bytes", "layer weights", "bytes run on", "speed vs float",
                "forms"]
        fmt = (lambda v: f"{100 * v:.2f}%") if model["metric"] == "accuracy" else (lambda v: f"{v:.4f}")
        rows = [["float32", fmt(model["float"]), "", "1.00×", "1.00×", "1.00×", "1", ""]]
        for r in model["rows"]:
            if model["metric"] == "accuracy":
                change = f"{100 * (r['metric'] - model['float']):+.2f} pt"
            else:
                change = f"{100 * (r['metric'] / model['float'] - 1):+.2f}%"
            rows.append([r["label"], fmt(r["metric"]), change, f"{r['stored_bytes'] / model['float_bytes']:.3f}×",
                         f"{r['layer_bytes'] / r['layer_float_bytes']:.3f}×",
                         f"{r['run_bytes'] / model['float_bytes']:.2f}×", ratio_text(r["speed"]), _forms(r["forms"])])
        title = (f"{model['model']} ({model['float_bytes'] / 2**10:.0f} KiB f32 parameters, trained in "
                 f"{model['train_seconds']:.0f} s)")
        out.append((title, head, rows))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits", "charlm", "decode"],
                        choices=["digits", "charlm", "decode"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--qat-steps", type=int, default=200, help="0: no QAT row")
    parser.add_argument("--decode-width", type=int, default=1024)
    parser.add_argument("--decode-layers", type=int, default=4)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    log = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)  # noqa: E731
    models = []
    for name in args.models:
        if name == "decode":
            models.append(run_decode(args.decode_width, args.decode_layers, args.repeats, log))
        else:
            models.append(run_model(name, {"digits": digits, "charlm": charlm}[name], args.repeats,
                                    args.qat_steps, log))
    result = {"machine": machine_info(), "repeats": args.repeats, "models": models}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    m = result["machine"]
    line = (f"{m['device']} ({m['backend']}), JAX {m['jax']}, Python {m['python']}, git {m['git']}, {m['date']}; "
            f"speed: median (p10–p90) of {result['repeats']} interleaved pairs")
    print_tables(tables(result), line, args.markdown)
    return result


if __name__ == "__main__":
    main()

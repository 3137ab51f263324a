"""Accuracy against compression: one figure from the JSON that quantize.py and prune.py write.

One panel per model (digits: test accuracy, higher is better; charlm: validation perplexity per
byte, lower is better). The x axis is what is left of the float32 model, as a fraction:
- quantization (circles): the stored parameter bytes (what `save` writes) over the float32 bytes;
  the `prefer="memory"` rows are left out, they store the same codes as their speed twins;
- pruning (squares): the FLOPs left, with the metric after recovery (distillation); the metric
  right after pruning is the faint square joined by a thin line (off the scale: a faint triangle
  at the panel's edge, the value in the label).
The dashed line is the float32 (unpruned) model, its metric in the panel's title. Points at the
same place share a marker and a label. The figure's title names the machine, JAX version, git
revision and date of the runs.

    python benchmarks/plot.py [--quantize benchmarks/results/quantize.json]
        [--prune benchmarks/results/prune.json benchmarks/results/prune_digits.json]
        [--out benchmarks/results/accuracy_vs_compression.png] [--svg]

With several `--prune` files, a model in a later file replaces the same model in an earlier one.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUANT, PRUNE, BEFORE = ("C0", "o"), ("C3", "s"), 0.25  # colour, marker; alpha before recovery
AXIS = {"accuracy": "test accuracy, % (higher is better)",
        "perplexity": "validation perplexity per byte (lower is better)"}


def load(quantize: Path, prune: list[Path]) -> tuple[dict, dict, dict]:
    """({model: quantize entry}, {model: prune entry}, {"quantization" or "pruning": [machines]})."""
    data = [json.loads(Path(p).read_text()) for p in [quantize, *prune]]
    quant = {m["model"]: m for m in data[0]["models"] if "metric" in m}  # not the speed-only decode
    pruned = {m["model"]: m for d in data[1:] for m in d["models"]}
    return quant, pruned, {"quantization": [data[0]["machine"]], "pruning": [d["machine"] for d in data[1:]]}


def points(quant: dict | None, pruned: dict | None) -> list[dict]:
    """One dict per point: x, y, label, family and (pruning) the metric before recovery."""
    out = []
    for r in quant["rows"] if quant else []:
        if not r["label"].endswith(", memory"):
            out.append({"x": r["stored_bytes"] / quant["float_bytes"], "y": r["metric"], "label": r["label"],
                        "style": QUANT})
    for r in pruned["rows"] if pruned else []:
        out.append({"x": r["flops"] / pruned["flops"], "y": r["recovered"], "before": r["metric"],
                    "label": r["label"], "style": PRUNE})
    return out


def merged(pts: list[dict], span: float) -> list[dict]:
    """Points of one family that coincide (within 1% of x and of the y span) as one, labels joined."""
    out = []
    for p in pts:
        same = next((q for q in out if q["style"] == p["style"] and "before" not in p and "before" not in q
                     and abs(q["x"] - p["x"]) < 0.01 and abs(q["y"] - p["y"]) < 0.01 * span), None)
        if same:
            same["label"] = textwrap.fill(same["label"].replace("\n", " ") + "; " + p["label"], 48)
        else:
            out.append(dict(p))
    return out


def panel(ax, name: str, quant: dict | None, pruned: dict | None) -> list[tuple]:
    """Draw one model's points; returns their labels as (x, y, text), placed once the layout is final."""
    metric = (quant or pruned)["metric"]
    scale = 100 if metric == "accuracy" else 1  # accuracy in percent
    pts = points(quant, pruned)
    references = sorted({m for m in (quant and quant["float"], pruned and pruned["unpruned"]) if m})
    ys = [p["y"] for p in pts] + references  # the scale; points before recovery may fall off it
    low, high = min(ys), max(ys)
    pad = 0.15 * (high - low or abs(high) * 0.01)
    low, high = low - pad, high + pad
    for ref in references:
        ax.axhline(ref * scale, color="0.4", linestyle="--", linewidth=1)
    labels = []
    for p in merged(pts, high - low):
        colour, marker = p["style"]
        label = p["label"]
        if "before" in p:  # before recovery: faint; off the scale, a triangle at the edge and its value
            y = min(max(p["before"], low), high)
            off = {low: "v", high: "^"}.get(y) if y != p["before"] else None
            ax.plot([p["x"]] * 2, [y * scale, p["y"] * scale], color=colour, linewidth=0.6, alpha=BEFORE)
            ax.plot(p["x"], y * scale, off or marker, color=colour, alpha=BEFORE, markersize=6, clip_on=False)
            if off:
                label += f" ({p['before'] * scale:.3g} before)"
        ax.plot(p["x"], p["y"] * scale, marker, color=colour, markersize=6)
        labels.append((p["x"], p["y"] * scale, label))
    ax.set_ylim(low * scale, high * scale)
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("fraction of float32 left: stored bytes (quantization), FLOPs (pruning)")
    ax.set_ylabel(AXIS[metric])
    fmt = (lambda v: f"{100 * v:.2f}%") if metric == "accuracy" else (lambda v: f"{v:.4f}")  # noqa: E731
    ax.set_title(f"{name} (float32: {' / '.join(map(fmt, references))})")
    ax.grid(alpha=0.3)
    return labels


def place(ax, labels: list[tuple], size: float = 6.5) -> None:
    """Each label beside its point (right, else left), moved up or down off other labels and markers."""
    px, renderer = ax.figure.dpi / 72, ax.figure.canvas.get_renderer()  # pixels per point
    step, frame, gap = size * px / 2, ax.bbox, 6  # gap: points between a marker and its label
    boxes = [(X - 4 * px, X + 4 * px, Y - 4 * px, Y + 4 * px)  # markers, then labels: (left, right, bottom, top)
             for X, Y in (ax.transData.transform(label[:2]) for label in labels)]
    for x, y, text in sorted(labels, key=lambda label: -ax.transData.transform(label[:2])[1]):
        note = ax.annotate(text, (x, y), xytext=(gap, 0), textcoords="offset points", fontsize=size, va="center")
        extent = note.get_window_extent(renderer)
        note.remove()  # drawn again where it is free

        def box(side, d):
            shift = 0 if side > 0 else -extent.width - 2 * gap * px
            return extent.x0 + shift, extent.x1 + shift, extent.y0 + d, extent.y1 + d

        def free(b, inside=True):
            return (not any(_overlap(b, other) for other in boxes)
                    and (not inside or frame.x0 < b[0] and b[1] < frame.x1 and frame.y0 < b[2] and b[3] < frame.y1))

        tries = [(side, k * sign * step) for k in range(80) for sign in (-1, 1) for side in (1, -1)]
        side, d = next((t for t in tries if free(box(*t))), next((t for t in tries if free(box(*t), False)), (1, 0)))
        boxes.append(box(side, d))
        ax.annotate(text, (x, y), xytext=(side * gap, d / px), textcoords="offset points", fontsize=size,
                    va="center", ha="left" if side > 0 else "right",
                    arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5} if abs(d) > step else None)


def _overlap(a: tuple, b: tuple) -> bool:
    """Whether boxes (left, right, bottom, top) overlap."""
    return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


def describe(machines: dict) -> str:
    """'quantization: cpu (cpu), JAX 0.10.2, git 9bb733f, 2026-12-03; pruning: ...', from `load`."""
    text = lambda m: f"{m['device']} ({m['backend']}), JAX {m['jax']}, git {m['git']}, {m['date']}"  # noqa: E731
    return "; ".join(f"{kind}: {' / '.join(sorted({text(m) for m in ms}))}" for kind, ms in machines.items())


def plot(quantize: Path, prune: list[Path], out: Path, svg: bool = False) -> Path:
    """Write the figure to `out` (and an SVG beside it with `svg`); returns `out`."""
    quant, pruned, machines = load(quantize, prune)
    names = [n for n in ("digits", "charlm") if n in quant or n in pruned]
    names += sorted((quant.keys() | pruned.keys()) - set(names))
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 5.2), squeeze=False)
    labels = [panel(ax, name, quant.get(name), pruned.get(name)) for ax, name in zip(axes[0], names)]
    handles = [plt.Line2D([], [], color=c, marker=m, linestyle="", label=t) for (c, m), t in
               [(QUANT, "quantized"), (PRUNE, "pruned, after recovery")]]
    handles.append(plt.Line2D([], [], color=PRUNE[0], marker=PRUNE[1], alpha=BEFORE, label="pruned, before recovery"))
    handles.append(plt.Line2D([], [], color="0.4", linestyle="--", label="float32 (unpruned)"))
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"graphopt: accuracy against compression\n{describe(machines)}", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    for ax, panel_labels in zip(axes[0], labels):  # in pixels: after the layout is final
        place(ax, panel_labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    if svg:
        fig.savefig(out.with_suffix(".svg"))
    plt.close(fig)
    return out


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantize", type=Path, default=RESULTS / "quantize.json")
    parser.add_argument("--prune", type=Path, nargs="+",
                        default=[RESULTS / "prune.json", RESULTS / "prune_digits.json"])
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy_vs_compression.png")
    parser.add_argument("--svg", action="store_true", help="also write an SVG beside the PNG")
    args = parser.parse_args(argv)
    out = plot(args.quantize, args.prune, args.out, args.svg)
    print(out)
    return out


if __name__ == "__main__":
    main()

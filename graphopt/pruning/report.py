"""What pruning removed: per group and per layer, parameters, FLOPs and bytes before and after.

A layer is a weight parameter (two or more axes); its FLOPs are those of the contractions
(dot_general, convolution) that read it, directly or through parameter-only ops. The measured
speed ratio (`measure=True`) times the unpruned and the pruned graph once each, jitted, on random
inputs of their types (medians of interleaved samples; `graphopt.implementations.time_graphs`):
a quick figure, the benchmarks (`benchmarks/prune.py`) measure properly.

Example:
    >>> import graphopt, jax, jax.numpy as jnp
    >>> fn = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
    >>> p = {"w1": jax.random.normal(jax.random.key(0), (8, 64)), "w2": jnp.ones((64, 2))}
    >>> pruned = graphopt.prune(fn, p, jnp.ones((4, 8)), ratio=0.5, params_argnums=0, measure=False)
    >>> [(row.path, row.params) for row in pruned.report.layers]
    [('w1', (512, 256)), ('w2', (128, 64))]
"""

from __future__ import annotations

import dataclasses

from graphopt.cost import graph_flops, node_flops, param_stats

CONTRACTIONS = ("dot_general", "conv_general_dilated")


@dataclasses.dataclass(frozen=True)
class LayerRow:
    path: str
    shape: tuple
    new_shape: tuple
    params: tuple                 # (before, after) element counts
    flops: tuple                  # (before, after) of the contractions reading this weight
    bytes: tuple


@dataclasses.dataclass
class PruneReport:
    groups: list                  # (name, size before, size after)
    layers: list[LayerRow]
    totals: dict                  # "params", "flops", "bytes" -> (before, after)
    blocked: list                 # (name, size, reasons) of parameter dimensions left whole
    speedup: float | None = None  # measured time unpruned / pruned
    multiple: int | None = None   # the width multiple used (measured among candidates: multiple_times)
    multiple_times: dict = dataclasses.field(default_factory=dict)
    metric: tuple | None = None   # evaluate(unpruned), evaluate(pruned), when prune(evaluate=...) was given

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table

        groups = Table(title="pruned groups", title_justify="left")
        for col in ("group", "channels"):
            groups.add_column(col)
        for name, before, after in self.groups:
            groups.add_row(name, f"{before} → {after}" if after else f"{before} → 0 (layer removed)")
        layers = Table(title="layers", title_justify="left")
        for col in ("layer", "shape", "params", "FLOPs", "bytes"):
            layers.add_column(col, justify="left" if col in ("layer", "shape") else "right")
        for row in self.layers:
            layers.add_row(row.path, _shape_change(row.shape, row.new_shape), _pair(row.params),
                           _pair(row.flops), _pair(row.bytes))
        return Group(groups, layers, self.summary())

    def summary(self) -> str:
        parts = [f"{key} {_pair(self.totals[key])} ({_fraction(self.totals[key])})" for key in ("params", "flops", "bytes")]
        line = "total: " + ", ".join(parts)
        if self.metric is not None:
            line += f"; metric {self.metric[0]:.4g} → {self.metric[1]:.4g}"
        if self.speedup is not None:
            line += f"; measured speed {self.speedup:.2f}x"
        if self.multiple is not None:
            line += f"; widths in multiples of {self.multiple}"
            if self.multiple_times:
                line += " (measured: " + ", ".join(f"{m} → {t * 1e3:.2f} ms" for m, t in self.multiple_times.items()) + ")"
        if self.blocked:
            line += f"; {len(self.blocked)} parameter dimensions left whole (see .blocked)"
        return line

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=140, record=True, file=open("/dev/null", "w"), color_system=None)
        console.print(self)
        return console.export_text().rstrip()


def build_report(original, pruned, deps, kept: dict, *, measure: bool = True) -> PruneReport:
    """The report of pruning `original` into `pruned` with `kept` channels per group of `deps`."""
    groups = [(g.name, g.size, len(kept[g.name]) if g.name in kept else g.size) for g in deps.groups]
    before, after = _layers(original), _layers(pruned)
    rows = [LayerRow(path, b[0], after[path][0], (b[1], after[path][1]), (b[2], after[path][2]),
                     (b[3], after[path][3])) for path, b in before.items()]
    stats = [param_stats(g) for g in (original, pruned)]
    totals = {"params": (stats[0][0], stats[1][0]), "bytes": (stats[0][1], stats[1][1]),
              "flops": tuple(graph_flops(g)[0] for g in (original, pruned))}
    speedup = None
    if measure:
        from graphopt.implementations import time_graphs

        times = time_graphs({"unpruned": original, "pruned": pruned})
        if all(isinstance(t, float) for t in times.values()):
            speedup = times["unpruned"] / times["pruned"]
    return PruneReport(groups, rows, totals, deps.blocked, speedup)


def _layers(graph) -> dict:
    """path -> (shape, params, FLOPs, bytes) for every weight parameter of two or more axes."""
    from graphopt.param_derived import largest_source, param_derived_values

    derived, _ = param_derived_values(graph)
    flops = {}
    for node in graph.nodes:
        if node.op.name in CONTRACTIONS:
            for value in node.inputs:
                if id(value) in derived:
                    path = largest_source(value).path
                    flops[path] = flops.get(path, 0) + node_flops(node)[0]
    return {a.path: (a.type.shape, a.type.size, flops.get(a.path, 0), a.type.nbytes)
            for a in graph.params() if a.type.ndim >= 2}


def _pair(pair) -> str:
    before, after = pair
    return f"{before:,} → {after:,}" if before != after else f"{before:,}"


def _fraction(pair) -> str:
    before, after = pair
    return f"-{1 - after / before:.0%}" if before else "-"


def _shape_change(a, b) -> str:
    return str(a) if a == b else f"{a} → {b}"

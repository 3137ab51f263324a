"""The pass manager: registered passes with numerics contracts, named pipelines, per-pass reports.

A pass is a function `fn(graph, ctx, **options) -> Graph` registered with `@register_pass`. It may
rewrite the graph in place and return it. `ctx` (a `PassContext`) collects how often each rewrite
rule fired. Every pass declares a numerics contract:

- `exact`: the result equals the original up to float rounding of reordered arithmetic (NaN, ±Inf
  and −0 results unchanged);
- `approximate(bound)`: the pass changes results (quantization, pruning); translation validation
  measures the relative error and checks it against `bound`.

Pipelines are named lists of passes ("cleanup", "inference", "mixed_precision", "training";
"default" is "inference"; see PIPELINES). A pipeline
spec is a name, or a list whose entries are pass names, `"name(arg, key=value)"` strings, `PassSpec`s
or pass functions. `disable=[...]` drops passes by name.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> parse_spec("quantize(int8, weight_only, group=128)")
    PassSpec(name='quantize', args=('int8', 'weight_only'), options={'group': 128})
    >>> g = graphopt.trace(lambda x: -(-x) * 1.0, jnp.ones(3))
    >>> result = run_pipeline(g, ["canonicalize", "dce"])
    >>> [n.op.name for n in result.graph.nodes]
    []
"""

from __future__ import annotations

import ast
import dataclasses
import re
import time
from collections import Counter
from typing import Any, Callable, Sequence

from graphopt.cost import graph_stats
from graphopt.errors import GraphoptError
from graphopt.gc_pause import gc_paused


@dataclasses.dataclass(frozen=True)
class Contract:
    """A pass's numerics contract: exact, or approximate within `bound` (max relative error)."""

    kind: str = "exact"
    bound: float = 0.0

    def __str__(self):
        return self.kind if self.kind == "exact" else f"approximate({self.bound:g})"


EXACT = Contract()


def approximate(bound: float) -> Contract:
    return Contract("approximate", float(bound))


@dataclasses.dataclass
class PassInfo:
    name: str
    fn: Callable
    contract: Contract
    description: str
    layerwise: bool = False  # treats every copy of a repeated layer alike (see graphopt.stamp)


PASSES: dict[str, PassInfo] = {}


def register_pass(name: str, *, contract: Contract = EXACT, layerwise: bool = False):
    """Decorator registering `fn(graph, ctx, **options) -> Graph` under `name`.

    `layerwise=True` says that what the pass does to one layer of an unrolled model depends only
    on that layer and the values it reads, never on how many layers there are or on a global
    measure (a memory budget, a calibration over the whole model): the pipeline may then run it
    on three layers of many and copy the result (graphopt.stamp).
    """
    def decorate(fn):
        if name in PASSES and PASSES[name].fn is not fn:
            raise GraphoptError(f"a pass named {name!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        PASSES[name] = PassInfo(name, fn, contract, doc[0] if doc else "", layerwise)
        return fn
    return decorate


class PassContext:
    """What a running pass reports: rules fired, and free-form notes for the report."""

    def __init__(self, name: str):
        self.name = name
        self.fired: Counter = Counter()
        self.notes: list[str] = []

    def count(self, fired: Counter | dict) -> None:
        self.fired.update(fired)

    def note(self, text: str) -> None:
        self.notes.append(text)


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """A pass by name with its options."""

    name: str
    args: tuple = ()
    options: dict = dataclasses.field(default_factory=dict)


_SPEC = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(?:\((.*)\))?\s*$")


def parse_spec(text: str) -> PassSpec:
    """'name' or 'name(a, b, key=value)' → PassSpec; values are Python literals or bare words."""
    match = _SPEC.match(text)
    if not match:
        raise GraphoptError(f"cannot parse pass spec {text!r}; write 'name' or 'name(arg, key=value)'")
    name, body = match.group(1), match.group(2)
    args, options = [], {}
    for part in _split_args(body or ""):
        key, eq, value = part.partition("=")
        if eq and re.fullmatch(r"\s*[A-Za-z_]\w*\s*", key):
            options[key.strip()] = _literal(value)
        else:
            args.append(_literal(part))
    return PassSpec(name, tuple(args), options)


def _split_args(body: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in body:
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        current += char
    if current.strip():
        parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


# fold_constants runs first: canonicalize then sees the folded constants (x / sqrt(64.0) is x / 8.0,
# so x * 0.125) and does not rewrite what folding erases (a causal mask's iota arithmetic).
# cleanup: the exact, bit-preserving core. inference: cleanup, then fusion on frozen weights (cse
# before fold_batchnorm and raise_ops, which expect one value per expression; fold_params after
# them, so the weight-side work they create is precomputed; raise_ops before fuse_attention,
# which picks kernels for the ops it raised). mixed_precision: inference with autocast after
# raise_ops (norms and softmax are then composites it keeps in float32) and before the kernels
# are chosen. training: no frozen weights, no approximate passes.
PIPELINES: dict[str, tuple[str, ...]] = {
    "none": (),
    "cleanup": ("fold_constants", "canonicalize", "fold_params", "cse", "dce"),
    "inference": ("fold_constants", "canonicalize", "cse", "fold_batchnorm", "raise_ops",
                  "fuse_attention", "fold_params", "dce"),
    "mixed_precision": ("fold_constants", "canonicalize", "cse", "fold_batchnorm", "raise_ops",
                        "autocast", "fuse_attention", "fold_params", "dce"),
    "training": ("fold_constants", "canonicalize", "cse", "raise_ops", "dce"),
}
PIPELINES["default"] = PIPELINES["inference"]

PipelineSpec = Any  # str | Sequence[str | PassSpec | Callable]


def resolve(pipeline: PipelineSpec, disable: Sequence[str] = ()) -> list[tuple[PassInfo, PassSpec]]:
    """A pipeline spec → the (pass, options) pairs to run. Unknown names list the known ones."""
    _load_builtin_passes()
    if isinstance(pipeline, str):
        if pipeline not in PIPELINES:
            raise GraphoptError(f"unknown pipeline {pipeline!r}; known: {', '.join(sorted(PIPELINES))}")
        entries: Sequence = PIPELINES[pipeline]
    else:
        entries = list(pipeline)
    resolved = []
    for entry in entries:
        if callable(entry) and not isinstance(entry, PassSpec):
            name = getattr(entry, "__name__", "custom")
            info = PASSES.get(name) if PASSES.get(name, None) and PASSES[name].fn is entry else \
                PassInfo(name, entry, EXACT, "user pass")
            spec = PassSpec(name)
        else:
            spec = entry if isinstance(entry, PassSpec) else parse_spec(entry)
            if spec.name not in PASSES:
                raise GraphoptError(f"unknown pass {spec.name!r}; known passes: {', '.join(sorted(PASSES))}")
            info = PASSES[spec.name]
        if info.name not in disable:
            resolved.append((info, spec))
    unknown = set(disable) - set(PASSES)
    if unknown:
        raise GraphoptError(f"cannot disable unknown pass(es) {sorted(unknown)}; known: {', '.join(sorted(PASSES))}")
    return resolved


def _load_builtin_passes() -> None:
    import graphopt.passes  # noqa: F401  (each pass module registers itself on import)


@dataclasses.dataclass
class PassRecord:
    """One row of the pipeline report."""

    name: str
    contract: str
    nodes: tuple[int, int]
    flops: tuple[int, int]
    bytes: tuple[int, int]
    seconds: float
    fired: Counter
    error: float | None = None      # measured by translation validation, when it ran
    status: str = "ok"              # "ok", or "reverted: ..." when validation rejected the pass
    notes: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Report:
    """Per-pass statistics of a pipeline run. `str()` renders a table."""

    records: list[PassRecord]

    def _repr_html_(self):
        from graphopt.show import report_html

        return report_html(self)

    def __rich__(self):
        from rich.table import Column, Table

        # Numbers never wrap; one rule per line; long words (approximate(0.0001)) fold, never
        # cropped. The error column only when translation validation measured one.
        number = dict(no_wrap=True, justify="right")
        errors = any(r.error is not None for r in self.records)
        columns = [Column("pass", no_wrap=True), Column("contract", overflow="fold"),
                   Column("nodes", **number), Column("FLOPs", **number), Column("bytes", **number),
                   Column("ms", **number), *([Column("error", **number)] if errors else []),
                   Column("rules fired", overflow="fold")]
        table = Table(*columns, title="graphopt pipeline", title_justify="left")
        for r in self.records:
            # "canonicalize/neg-neg" is shown as "neg-neg" on the canonicalize row
            rules = [f"{k.removeprefix(r.name + '/')}×{v}" for k, v in r.fired.most_common(4)]
            if len(r.fired) > 4:
                rules.append(f"+{len(r.fired) - 4} more")
            error = [("" if r.error is None else f"{r.error:.2g}")] if errors else []
            name = r.name if r.status == "ok" else f"{r.name} ({r.status})"
            table.add_row(name, r.contract, _arrow(*r.nodes), _arrow(*r.flops, _count), _arrow(*r.bytes, size_str),
                          f"{r.seconds * 1e3:.1f}", *error, "\n".join(rules))
        return table

    def __str__(self):
        import io

        from rich.console import Console

        buffer = io.StringIO()
        Console(file=buffer, width=160, color_system=None).print(self)
        return buffer.getvalue().rstrip()


def _arrow(before: int, after: int, fmt=lambda n: f"{n:,}") -> str:
    """`before → after`, or one figure if they are equal; a unit both share is written once
    (`3.34 → 3.37 MiB`)."""
    if before == after:
        return fmt(before)
    old, new = fmt(before), fmt(after)
    old_number, _, old_unit = old.rpartition(" ")
    if old_unit and old_number and new.endswith(" " + old_unit):
        return f"{old_number} → {new}"
    return f"{old} → {new}"


def _count(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def size_str(n: float) -> str:
    """Bytes for people: `size_str(3 * 2**20)` → '3 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


@dataclasses.dataclass
class PipelineResult:
    graph: Any
    report: Report


# Graphs from this many nodes up have their repeated layers stamped (graphopt.stamp).
STAMP_MIN_NODES = 5000


def run_pipeline(graph, pipeline: PipelineSpec = "default", *, disable: Sequence[str] = (),
                 debug: bool = False, validator=None,
                 stamp_min_nodes: int | None = STAMP_MIN_NODES) -> PipelineResult:
    """Run the passes of `pipeline` over `graph` (in place) and report on each.

    `debug=True` runs `graph.verify()` after every pass. `validator` (see graphopt.validate) checks
    each pass's result against the graph before it and may revert the pass.

    In a graph of `stamp_min_nodes` nodes or more (None: never) whose layers repeat, the leading
    layerwise passes run on three of the layers, whose result is copied to the others
    (graphopt.stamp); the graph given is then left as it was. Use the result's graph. Not with a
    validator, which checks every pass on the whole graph.
    """
    with gc_paused():  # the whole run: between passes too (the report walks the graph)
        passes, records = resolve(pipeline, disable), []
        head = next((i for i, (info, _) in enumerate(passes) if not info.layerwise), len(passes))
        if stamp_min_nodes is not None and validator is None and head:
            from graphopt.stamp import run_layerwise

            stamped = run_layerwise(graph, passes[:head], lambda g, p: _run(g, p, debug, None),
                                    min_nodes=stamp_min_nodes)
            if stamped is not None:
                graph, records = stamped
                passes = passes[head:]
                if debug:
                    graph.verify()
        result = _run(graph, passes, debug, validator)
        result.report.records[:0] = records
        return result


def _run(graph, passes, debug, validator) -> PipelineResult:
    records = []
    after = None
    for info, spec in passes:
        ctx = PassContext(info.name)
        before = after or graph_stats(graph)
        snapshot = validator.snapshot(graph) if validator is not None else None
        start = time.perf_counter()
        graph = info.fn(graph, ctx, *spec.args, **spec.options)
        seconds = time.perf_counter() - start
        if graph is None:
            raise GraphoptError(f"pass {info.name!r} returned None; a pass returns the graph")
        if debug:
            graph.verify()
        after = graph_stats(graph)
        record = PassRecord(info.name, str(info.contract), (before[0], after[0]), (before[1], after[1]),
                            (before[2], after[2]), seconds, ctx.fired, notes=ctx.notes)
        if validator is not None:
            checked = validator.check(info, snapshot, graph, record)
            if checked is not graph:  # reverted to the graph before the pass
                graph, after = checked, before
        records.append(record)
    return PipelineResult(graph, Report(records))


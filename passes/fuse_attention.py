"""fuse_attention: run each attention node on the fastest kernel of the target backend.

    %o = attention %q, %k, %v, %mask {scale=0.125, is_causal=True, implementation=None}
           decomposition { dot_general, mul, select_n, reduce_max, exp, ..., dot_general }
  →
    %o = attention %q, %k, %v, %mask {..., implementation="cudnn"}      (decomposition kept)

raise_ops recognizes attention and keeps the source's primitives as the node's decomposition, so
it changes nothing. This pass picks, per node, what the lowering runs: the decomposition (or the
reference, without one) or a kernel from `graphopt.implementations` (jax.nn.dot_product_attention
"xla" anywhere, "cudnn" on GPU, "pallas_flash" on TPU), among those that support the node's shapes,
dtypes and params (`Kernel.unsupported`). XLA cannot make this choice itself: it never turns a
softmax(QKᵀ)V chain into a flash-attention custom call.

How it chooses (`measure=True`, the default, on the backend this process runs):
    each distinct (backend, input types, params, decomposition ops) is compiled alone with
    jax.jit on random inputs for the decomposition and every candidate kernel; the median of
    `repeats` runs, interleaved across the candidates, decides. A kernel is taken only if it beats the decomposition by `margin`
    (5%), so the result is never slower than the unfused program by more than measurement
    noise. Where no kernel is that much faster, a kernel within the margin of the
    decomposition's time (the same noise, either way) that needs at most half its temporary
    memory is taken (the least memory first: at 8192 tokens on CPU "chunked" needs 141 MiB where
    the scores take 2 GiB); otherwise the node keeps implementation None. Measurements are
    cached in-process.
With `measure=False`, for a `backend=` other than this process's, or in a multi-process run
(`jax.process_count() > 1`: timings differ between processes, programs must not): a static preference table
(cuDNN on GPU, Pallas flash then XLA's attention on TPU, nothing on CPU: "xla" is never chosen
there unmeasured).

Plumbing: passes/ never imports lowering/. The kernels live in lowering/kernels.py and register
into the table in graphopt/implementations.py; this pass only reads the table and sets the node's
`implementation` param, and times nodes with `graphopt.implementations.measure` (which lowers
one node; graphopt/ may use the lowering, as param_prep does). `timer(node, names) -> {name: seconds,
(seconds, temporary bytes) or exception}` replaces that function (tests inject fake timings:
decisions are deterministic).

Trade-offs: measurement costs one compile per candidate per distinct shape (seconds for large
sequences) and times the node alone, not inside the model (fusion with neighbours can differ).
The kernels round differently from the source: contract approximate(0.03), 4 bf16 ulps relative to
the largest output; NaN and ±Inf positions are kept (kernels refuse fills that would change them).
Decisions are reported with ctx.note and counted per implementation.

Example (a fake timer: "xla" takes half the time of the decomposition):
    >>> import numpy as np
    >>> from graphopt import nn_ops
    >>> from graphopt.ir import Graph
    >>> from graphopt.pipeline import PassSpec, run_pipeline
    >>> from graphopt.types import TensorType
    >>> g = Graph()
    >>> q, k, v = (g.add_input(TensorType((1, 16, 2, 8), np.float32)) for _ in range(3))
    >>> g.set_outputs([nn_ops.attention_node(g, q, k, v, is_causal=True)])
    >>> fake = lambda node, names: {name: 1.0 if name is None else 0.5 for name in names}
    >>> result = run_pipeline(g, [PassSpec("fuse_attention", options={"timer": fake})])
    >>> next(result.graph.nodes).params["implementation"], dict(result.report.records[0].fired)
    ('xla', {'fuse_attention/xla': 1})
"""

from __future__ import annotations

from collections import Counter

import jax

from graphopt import implementations
from graphopt.ops import params_key
from graphopt.pipeline import approximate, register_pass

BOUND = 0.03

# The kernel to take without measuring, in order of preference, per backend. TPU: where the
# Pallas kernel does not apply (sequences under its 128-token blocks), XLA's own attention: its
# TPU cost analysis on the demo transformer reads 14% fewer bytes and time than the decomposition
# (graphopt.compile for tpu:v5e:2x2 and tpu:v4:2x2x1; no TPU was at hand to time it).
STATIC_PREFERENCE: dict[str, tuple[str, ...]] = {
    "gpu": ("cudnn",),
    "tpu": ("pallas_flash", "xla"),
    "cpu": (),
}

# (node key, implementation) -> (median seconds, temporary bytes or None), or the compile error;
# for the default timer only.
_MEASURED: dict[tuple, tuple | Exception] = {}


@register_pass("fuse_attention", contract=approximate(BOUND), layerwise=True)
def fuse_attention(graph, ctx, *, backend: str | None = None, measure: bool = True, repeats: int = 5,
                   margin: float = 0.05, timer=None):
    """Set each attention node's implementation to the fastest supported kernel, or keep None."""
    here = jax.default_backend()
    backend = backend or here
    if measure and backend != here:
        ctx.note(f"cannot measure for backend {backend!r} from {here!r}: static choice")
        measure = False
    if measure and jax.process_count() > 1:
        # Timings differ between processes; every process of a multi-process run must compile
        # the same program, or their collectives would not match.
        ctx.note(f"{jax.process_count()} processes: static choice, the same in every process")
        measure = False
    nodes = [n for n in graph.walk() if n.op.name == "attention" and n.params["implementation"] is None]
    chosen: Counter = Counter()
    decisions: dict[tuple, str | None] = {}
    for node in nodes:
        key = _key(node, backend)
        if key not in decisions:
            candidates = _candidates(node, backend, ctx)
            decisions[key] = (_measured_choice(node, key, candidates, ctx, timer, repeats, margin)
                              if measure else _static_choice(candidates, backend))
        name = decisions[key]
        chosen[f"fuse_attention/{name or 'decomposition'}"] += 1
        if name is not None:
            _set_implementation(node, name)
    ctx.count(chosen)
    return graph


def _key(node, backend: str) -> tuple:
    params = {k: v for k, v in node.params.items() if k != "implementation"}
    # The decomposition's ops, counted: outlining lists a mask shared between layers first in
    # the regions it is copied into and in program order in the last one, which it moves into.
    ops = tuple(sorted(Counter(n.op.name for r in node.regions for n in r.walk()).items()))
    return (backend, tuple(node.input_types), params_key(params), ops)


def _candidates(node, backend: str, ctx) -> list[str]:
    names = []
    for kernel in implementations.available("attention", backend):
        reason = kernel.unsupported(node.input_types, node.params)
        if reason:
            ctx.note(f"{_what(node)}: {kernel.implementation} not supported: {reason}")
        else:
            names.append(kernel.implementation)
    return names


def _static_choice(candidates: list[str], backend: str) -> str | None:
    for name in STATIC_PREFERENCE.get(backend, ()):
        if name in candidates:
            return name
    return None


def _measured_choice(node, key, candidates, ctx, timer, repeats, margin) -> str | None:
    if not candidates:
        return None
    cache = _MEASURED if timer is None else {}
    timer = timer or _default_timer(repeats)
    todo = [name for name in [None, *candidates] if (key, name) not in cache]
    if todo:
        cache.update({(key, name): r if isinstance(r, (Exception, tuple)) else (r, None)
                      for name, r in timer(node, todo).items()})
    found = {name: cache[(key, name)] for name in [None, *candidates]}
    for name, r in list(found.items()):
        if isinstance(r, Exception):
            if name is None:
                raise r
            ctx.note(f"{_what(node)}: {name} failed to compile, skipped: {type(r).__name__}: {r}")
            del found[name]
    (base, base_bytes), kernels = found.pop(None), found
    best = min((t, name) for name, (t, _) in kernels.items()) if kernels else None
    pick = best[1] if best is not None and best[0] < base * (1 - margin) else None
    why = ""
    if pick is None and base_bytes:  # as fast within noise, far less memory
        lighter = sorted((b, name) for name, (t, b) in kernels.items()
                         if b is not None and t <= base * (1 + margin) and 2 * b <= base_bytes)
        if lighter:
            pick = lighter[0][1]
            why = f" (as fast within {margin:.0%}; temporaries {_mib(lighter[0][0])} instead of {_mib(base_bytes)})"
    shown = ", ".join(f"{name} {t * 1e3:.3g} ms" for name, (t, _) in kernels.items())
    ctx.note(f"{_what(node)}: decomposition {base * 1e3:.3g} ms, {shown} -> {pick or 'decomposition'}{why}")
    return pick


def _default_timer(repeats: int):
    def timer(node, names):
        temp_bytes: dict = {}
        times = implementations.measure(node, names, repeats=repeats, temp_bytes=temp_bytes)
        return {name: t if isinstance(t, Exception) else (t, temp_bytes.get(name)) for name, t in times.items()}
    return timer


def _mib(n: int) -> str:
    return f"{n / 2**20:.3g} MiB"


def _set_implementation(node, name: str) -> None:
    """Replace `node` by a copy with `implementation=name` (params are never mutated in place:
    graph copies share them), holding the same decomposition."""
    graph = node.graph
    new = graph.add_node(node.op, node.inputs, {**node.params, "implementation": name}, node.regions,
                         node.provenance.derived("fuse_attention"), before=node)
    for old, value in zip(node.outputs, new.outputs):
        graph.replace_all_uses(old, value)
    graph.erase(node)


def _what(node) -> str:
    types = ", ".join(str(t) for t in node.input_types)
    where = node.provenance.describe()
    return f"attention({types}) at {where}"

"""The kernels of graphopt's ops, by op, implementation name and backend (the one kernel table).

A composite op (`graphopt.nn_ops`) lowers to its decomposition or reference implementation unless
its `implementation` param names a kernel. This module is the table of those kernels: the lowering
(`lowering/kernels.py`) fills it, `lowering/emit.py` dispatches on it, and passes
(`passes/fuse_attention.py`) read it to know which kernels exist on a backend, whether one supports
a node's shapes (`Kernel.unsupported`), and how fast each is (`measure`). The table lives here, in
graphopt/, because passes/ must not import lowering/: data flows trace → IR → passes → lowering,
and a pass only *names* a kernel; the lowering runs it.

    key (op, implementation, backend)      backend None: any backend
    ("attention", "xla", None)             jax.nn.dot_product_attention(implementation="xla")
    ("attention", "chunked", None)         key blocks with an online softmax (lowering/chunked_attention.py)
    ("attention", "cudnn", "gpu")          ... implementation="cudnn"
    (op, "default", backend)               a non-composite op's kernel (lowering.emit.register_kernel)

Example:
    >>> [k.implementation for k in available("attention", "cpu")]
    ['chunked', 'xla']
    >>> find("attention", "cudnn", "cpu") is None, find("attention", "cudnn", "gpu") is not None
    (True, True)
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel: `fn(*args, regions, **params) -> list of arrays`, as an op's reference impl.

    `supports(in_types, params) -> str | None` says why the kernel cannot run these inputs (None:
    it can); passes skip unsupported kernels and the lowering refuses them with that reason.
    """

    op: str
    implementation: str
    backend: str | None
    fn: Callable
    supports: Callable | None = None

    def unsupported(self, in_types, params) -> str | None:
        return None if self.supports is None else self.supports(list(in_types), params)


KERNELS: dict[tuple[str, str, str | None], Kernel] = {}


def register(op: str, implementation: str, backend: str | None = None, *, supports=None):
    """Decorator: `fn` is kernel `implementation` of graphopt op `op` on `backend` (None: any).
    Composites name their kernels (passes choose); other ops have a "default" (see lowering.emit)."""
    def decorate(fn):
        KERNELS[(op, implementation, backend)] = Kernel(op, implementation, backend, fn, supports)
        return fn
    return decorate


def _load_builtin_kernels() -> None:
    import graphopt.lowering.chunked_attention  # noqa: F401  (registers the built-in kernels)
    import graphopt.lowering.kernels  # noqa: F401
    import graphopt.lowering.quant_kernels  # noqa: F401


def find(op: str, implementation: str, backend: str) -> Kernel | None:
    """The kernel `implementation` of `op` for `backend`, or None if there is none."""
    _load_builtin_kernels()
    return KERNELS.get((op, implementation, backend)) or KERNELS.get((op, implementation, None))


def available(op: str, backend: str) -> list[Kernel]:
    """The kernels of `op` that run on `backend`, by implementation name."""
    _load_builtin_kernels()
    names = sorted({impl for (o, impl, b) in KERNELS if o == op and b in (backend, None)})
    return [find(op, name, backend) for name in names]


def missing(op: str, implementation: str, backend: str) -> str:
    """The error text for a kernel that is not registered on this backend."""
    names = [k.implementation for k in available(op, backend)]
    return (f"{op}: implementation {implementation!r} has no kernel on backend {backend!r} "
            f"(available here: {names or 'none'}). Run fuse_attention for this backend "
            f"(fuse_attention(backend={backend!r})), set the node's implementation to None to use "
            "its decomposition, or register a kernel with graphopt.implementations.register.")


def measure(node, candidates: Sequence[str | None], *, repeats: int = 5, seed: int = 0,
            temp_bytes: dict | None = None) -> dict[str | None, float | Exception]:
    """Median seconds of one run of `node`, alone and jitted on the default backend, for each
    implementation in `candidates` (None: its decomposition or reference), on the same random
    inputs of its types. A candidate that fails to compile maps to the exception it raised.
    See `time_graphs` for how the runs are timed, and the temporary memory in `temp_bytes`."""
    graphs = {}
    for name in candidates:
        graphs[name] = single_node_graph(node, {**node.params, "implementation": name})
    return time_graphs(graphs, repeats=repeats, seed=seed, temp_bytes=temp_bytes)


def single_node_graph(node, params: dict | None = None, op=None):
    """A graph holding a copy of `node` alone (with `params` / `op` in place of its own), its
    inputs the node's inputs."""
    from graphopt.ir import Graph

    graph = Graph(f"measure_{node.op.name}")
    inputs = [graph.add_input(t) for t in node.input_types]
    regions = [r.clone()[0] for r in node.regions]
    new = graph.add_node(op or node.op, inputs, node.params if params is None else params, regions)
    graph.set_outputs(list(new.outputs))
    return graph


def time_graphs(graphs: dict, *, repeats: int = 5, seed: int = 0, sample_seconds: float = 2e-3,
                temp_bytes: dict | None = None) -> dict:
    """Median seconds of one jitted run of each graph (label → Graph) on random inputs of its
    input types (the same inputs for graphs with the same input types). A graph that fails to
    compile maps to the exception it raised. Given a dict `temp_bytes`, also fills it with each
    compiled graph's temporary memory (XLA's memory analysis; absent where it has none).

    Neither compilation nor the warm-up run counts. Each of the `repeats` samples times enough
    back-to-back calls to last about `sample_seconds` (a 20 µs kernel is timed over ~100 calls,
    so the timer's resolution and the call overhead do not decide between candidates). A second
    run after the warm-up tells how many; where the warm-up itself lasts 10 samples or more, it
    does (one call per sample: at 8192 tokens on CPU a second run would cost a second or more per
    candidate). Samples are interleaved (round-robin), so a change of machine load hits every
    candidate alike. Uses the lowering (imported here: graphopt/ may, as param_prep does; passes/
    may not), so what is timed is what the program will run.
    """
    # Under an outer trace (a user's jax.jit of an optimized model) JAX would stage these runs
    # into the caller's program; measure eagerly instead.
    with jax.ensure_compile_time_eval():
        return _time_graphs(graphs, repeats, seed, sample_seconds, temp_bytes)


def _time_graphs(graphs: dict, repeats: int, seed: int, sample_seconds: float, temp_bytes: dict | None) -> dict:
    from graphopt.lowering.emit import lower

    runs: dict = {}
    results: dict = {}
    for label, graph in graphs.items():
        rng = np.random.default_rng(seed)
        args = [_random(rng, a.type) for a in graph.inputs]
        try:
            compiled = jax.jit(lower(graph).flat).lower(*args).compile()
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            once = time.perf_counter() - start
        except Exception as err:  # e.g. cuDNN refusing a shape at compile time
            results[label] = err
            continue
        memory = None if temp_bytes is None else compiled.memory_analysis()
        if memory is not None:
            temp_bytes[label] = int(memory.temp_size_in_bytes)
        if once < 10 * sample_seconds:  # a short run: time one past the first run's one-time costs
            start = time.perf_counter()  # (a long one is timed one call per sample anyway)
            jax.block_until_ready(compiled(*args))
            once = time.perf_counter() - start
        calls = int(min(1000, max(1, sample_seconds // max(once, 1e-7))))
        runs[label] = (compiled, args, calls, [])
    for _ in range(max(1, repeats)):
        for compiled, args, calls, times in runs.values():
            start = time.perf_counter()
            for _ in range(calls):
                out = compiled(*args)
            jax.block_until_ready(out)
            times.append((time.perf_counter() - start) / calls)
    results.update({label: statistics.median(times) for label, (_, _, _, times) in runs.items()})
    return results


def _random(rng, t):
    if t.dtype == np.bool_:
        return jax.numpy.asarray(rng.random(t.shape) < 0.9)
    if np.issubdtype(t.dtype, np.integer):
        return jax.numpy.asarray(rng.integers(0, 4, t.shape), t.dtype)
    return jax.numpy.asarray(rng.standard_normal(t.shape, np.float32)).astype(t.dtype)

"""`@graphopt.optimize`: trace on first call, run the pipeline, lower, jit; once per signature.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> @graphopt.optimize
    ... def f(x):
    ...     return jnp.tanh(x) * 2
    >>> f(jnp.zeros(3)).tolist()
    [0.0, 0.0, 0.0]
    >>> print(f.graph)  # doctest: +ELLIPSIS
    graph f(%x: f32[3]) {
      %0 = tanh %x : f32[3]  # ...
      %1 = mul %0, 2.0 : f32[3]  # ...
      return %1
    }
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import jax
import numpy as np

from graphopt.frameworks import adapt
from graphopt.gc_pause import gc_paused
from graphopt.ir import Graph
from graphopt.lowering import cache, program_cache
from graphopt.lowering.emit import lower
from graphopt.lowering.fingerprint import fingerprint
from graphopt.param_prep import PreparedParams
from graphopt.pipeline import PipelineSpec, resolve, run_pipeline
from graphopt.trace import trace
from graphopt.validate import Validator


def optimize(fn: Callable | None = None, *, pipeline: PipelineSpec = "default", params_argnums=None,
             static_argnums=(), jit: bool = True, verify: bool | Sequence[tuple] = False,
             cache: bool = True):
    """Optimize a model function (or nnx / Equinox module); use as `@optimize` or `@optimize(...)`.

    Each new input signature (tree structure, shapes, dtypes, static values) is traced, rewritten
    by `pipeline` and lowered once; later calls with that signature reuse the compiled function.
    `.graph` is the optimized graph of the latest signature, `.graphs` all of them, `.report`
    the pipeline's report.

    `verify=True` checks every pass by translation validation (`graphopt.validate`): the graphs
    before and after it run on the call's arguments and on random inputs, and a pass that changes
    the results beyond its contract is reverted with a warning. `verify=[args, ...]` uses these
    example argument tuples (those matching the call's signature) in place of the call's.

    `cache=True` (the default, while `graphopt.cache` is on: see `graphopt.lowering.cache`) keeps
    the optimized program on disk, keyed by the model's jaxpr, argument types, pipeline, backend
    and versions: another process calling the same model with the same argument types loads it
    and skips tracing into a Graph, the passes and the lowering (its XLA compile then hits JAX's
    persistent compilation cache). It applies to calls with concrete arrays on one device, with
    `jit=True` and without `verify`; others take the usual path. After a load, `.graph`, `.graphs`
    and `.report` are rebuilt on first access (tracing and running the passes again; a pass that
    measures kernels may then choose differently from the stored program). `cache=False` turns it
    off for this model.
    """
    if fn is None:
        return functools.partial(optimize, pipeline=pipeline, params_argnums=params_argnums,
                                 static_argnums=static_argnums, jit=jit, verify=verify, cache=cache)
    resolve(pipeline)  # reject unknown pipelines at decoration time, not on first call
    if not isinstance(verify, (bool, Sequence)) or isinstance(verify, str):
        raise TypeError(f"verify must be True, False or a sequence of argument tuples, got {verify!r}")
    return Optimized(fn, pipeline, params_argnums, static_argnums, jit, verify=verify, cache=cache)


class Optimized:
    """A model wrapped by `optimize`. Call it like the model."""

    def __init__(self, fn, pipeline, params_argnums, static_argnums, jit, verify=False, cache=True):
        self.fn = fn
        self.verify = verify
        self.cache = cache
        self.pipeline = pipeline
        self.params_argnums = params_argnums
        self.static_argnums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
        self.jit = jit
        self._graphs: dict[Any, Graph] = {}
        self._reports: dict[Any, Any] = {}
        self._examples: dict[Any, tuple] = {}   # signature -> abstract arguments, to rebuild a graph
        self._compiled: dict[Any, Callable] = {}
        self._programs: dict[Any, Any] = {}     # signature -> StoredProgram, or None: not cached
        self._prepared = PreparedParams()  # fold_params' prep runs once per set of weights
        self._latest = None
        functools.update_wrapper(self, fn, updated=())

    @property
    def graph(self) -> Graph | None:
        """The optimized graph of the latest call's signature (None before the first call).
        Rebuilt on first access when the program came from the program cache."""
        return None if self._latest is None else self._graph_for(self._latest)

    @property
    def graphs(self) -> Mapping[Any, Graph]:
        """The optimized graph of every signature seen; a graph loaded from the program cache is
        rebuilt when it is read."""
        return _Graphs(self)

    @property
    def report(self):
        """The pipeline's report (`graphopt.pipeline.Report`) for the latest signature."""
        if self._latest is None:
            return None
        self._graph_for(self._latest)
        return self._reports[self._latest]

    def __call__(self, *args):
        fn, fn_args = self.program(*args)
        return fn(*fn_args)

    def program(self, *args) -> tuple[Callable, tuple]:
        """(the compiled program a call with `args` runs, the arguments it passes to it): for
        timing the program without this wrapper's per-call work (signature, parameter checks).
        Builds (or loads) the program for this signature if needed.

        Example:
            >>> import graphopt, jax.numpy as jnp
            >>> f = graphopt.optimize(lambda x: jnp.cos(x) + 1)
            >>> fn, fn_args = f.program(jnp.zeros(2))
            >>> fn(*fn_args).tolist()
            [2.0, 2.0]
        """
        key, call_args = self._call_args(args)
        new = key not in self._examples
        if new:
            self._examples[key] = self._abstract(args)
        try:
            found = self._program(key, args, call_args)
        except BaseException:
            if new and key not in self._graphs and self._programs.get(key) is None:
                del self._examples[key]  # a failed build leaves no trace of its signature
            raise
        self._latest = key
        return found

    def _program(self, key, args: tuple, call_args: tuple) -> tuple[Callable, tuple]:
        leaves = jax.tree_util.tree_leaves(call_args)
        if key not in self._programs and self._program_cache_applies(leaves):
            self._programs[key] = self._load_or_store(key, args, call_args)
        program = self._programs.get(key)
        if program is not None and not _tracing(leaves):
            return program, self._prepared.arguments(program.prep, call_args, key)
        compiled = self._compiled.get(key)
        if compiled is None:
            lowered = lower(self._graph_for(key, call_args, args))
            compiled = self._compiled[key] = jax.jit(lowered) if self.jit else lowered
        return compiled, self._prepared.arguments(self._graphs[key].prep, call_args, key)

    def _graph_for(self, key, call_args: tuple | None = None, args: tuple | None = None) -> Graph:
        """The optimized graph of signature `key`, built now if it is not built yet (from the
        call's `args`, or, rebuilding later, from their types)."""
        graph = self._graphs.get(key)
        if graph is None:
            cache.enable_compilation_cache()
            args = self._examples[key] if args is None else args
            with gc_paused():  # one pause over the whole build: no full collections in between
                graph = trace(self.fn, *args, params_argnums=self.params_argnums,
                              static_argnums=self.static_argnums)
                validator = None if call_args is None else self._validator(key, call_args)
                result = run_pipeline(graph, self.pipeline, validator=validator)
            graph = self._graphs[key] = result.graph
            self._reports[key] = result.report
        return graph

    def _program_cache_applies(self, leaves: list) -> bool:
        if not (self.cache and self.jit and self.verify is False and cache.settings().enabled):
            return False
        if _tracing(leaves) or any(isinstance(x, jax.Array) and len(x.sharding.device_set) > 1 for x in leaves):
            cache.count("program_skipped")
            return False
        return True

    def _load_or_store(self, key, args: tuple, call_args: tuple):
        """The stored program for this call, storing it first if there is none; None when the
        program cannot be cached (no sound key, or jax.export refuses it)."""
        cache.enable_compilation_cache()
        fp = fingerprint(self.fn, *args, params_argnums=self.params_argnums,
                         static_argnums=self.static_argnums, pipeline=self.pipeline)
        if fp is None:
            cache.count("program_skipped")
            return None
        current = cache.settings()
        folder = current.programs_dir
        program = program_cache.load(folder, fp)
        if program is not None:
            cache.count("program_hits")
            cache.logger.debug("program cache hit: %s", fp.key)
            return program
        cache.count("program_misses")
        graph = self._graph_for(key, call_args, args)
        try:
            data = program_cache.build_entry(graph, fp)
            program = program_cache.parse(data, fp)  # run what the next process will load
            program_cache.write(folder, fp, data, max_bytes=current.max_bytes)
        except Exception as err:  # noqa: BLE001  (not exportable, disk full: run uncached)
            cache.logger.debug("program cache: not storing %s (%s: %s)", fp.key, type(err).__name__, err)
            cache.count("program_skipped")
            return None
        cache.count("program_stores")
        cache.logger.debug("program cache store: %s", fp.key)
        return program

    def _abstract(self, args: tuple) -> tuple:
        """`args` with array leaves of non-static arguments as ShapeDtypeStructs (for rebuilds)."""
        static = {i % len(args) for i in self.static_argnums}
        return tuple(a if i in static else jax.tree_util.tree_map(_abstract_leaf, a)
                     for i, a in enumerate(args))

    def _call_args(self, args: tuple) -> tuple:
        """(signature key, arguments of the traced function) for a call with `args`."""
        static = {i % len(args) for i in self.static_argnums}
        dynamic = tuple(a for i, a in enumerate(args) if i not in static)
        # nnx / Equinox modules: read the module's current state on every call.
        call_args = adapt(self.fn, dynamic, self.params_argnums).args \
            if not static else dynamic
        key = (_signature_key(call_args), tuple((i, _static_key(args[i])) for i in sorted(static)))
        return key, call_args

    def _validator(self, key, call_args: tuple) -> Validator | None:
        """The translation validator `verify=` asks for, with its inputs; None when off."""
        if self.verify is False:
            return None
        if self.verify is True:  # the call's own arguments, unless they are abstract (under jit)
            tracing = any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(call_args))
            return Validator([] if tracing else [call_args])
        examples = [self._call_args(tuple(example)) for example in self.verify]
        return Validator([args for k, args in examples if k == key])


class _Graphs(Mapping):
    """`Optimized.graphs`: signature → graph; a graph is (re)built when it is read."""

    def __init__(self, optimized: Optimized):
        self._optimized = optimized

    def __getitem__(self, key) -> Graph:
        if key not in self._optimized._examples:
            raise KeyError(key)
        return self._optimized._graph_for(key)

    def __iter__(self):
        return iter(list(self._optimized._examples))

    def __len__(self) -> int:
        return len(self._optimized._examples)


def _tracing(leaves) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in leaves)


def _abstract_leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct) or not hasattr(x, "shape") and not isinstance(x, (bool, int, float, complex)):
        return x
    dtype = getattr(x, "dtype", None)
    if dtype is None:  # a Python scalar: weakly typed
        return jax.ShapeDtypeStruct((), jax.numpy.result_type(x), weak_type=True)
    return jax.ShapeDtypeStruct(np.shape(x), dtype, weak_type=bool(getattr(x, "weak_type", False)),
                                sharding=_concrete_sharding(x))


def _concrete_sharding(x):
    concrete = isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
    return x.sharding if concrete else None


def _signature_key(args) -> tuple:
    leaves, tree = jax.tree_util.tree_flatten(args)
    return tree, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x).__name__)),
                        bool(getattr(x, "weak_type", False))) for x in leaves)


def _static_key(value):
    try:
        hash(value)
        return value
    except TypeError:
        return id(value)

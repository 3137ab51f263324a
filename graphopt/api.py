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
from typing import Any, Callable, Sequence

import jax
import numpy as np

from graphopt.frameworks import adapt
from graphopt.ir import Graph, gc_paused
from graphopt.lowering.emit import lower
from graphopt.pipeline import PipelineSpec, resolve, run_pipeline
from graphopt.trace import trace
from graphopt.validate import Validator


def optimize(fn: Callable | None = None, *, pipeline: PipelineSpec = "default", params_argnums=None,
             static_argnums=(), jit: bool = True, verify: bool | Sequence[tuple] = False):
    """Optimize a model function (or nnx / Equinox module); use as `@optimize` or `@optimize(...)`.

    Each new input signature (tree structure, shapes, dtypes, static values) is traced, rewritten
    by `pipeline` and lowered once; later calls with that signature reuse the compiled function.
    `.graph` is the optimized graph of the latest signature, `.graphs` all of them.

    `verify=True` checks every pass by translation validation (`graphopt.validate`): the graphs
    before and after it run on the call's arguments and on random inputs, and a pass that changes
    the results beyond its contract is reverted with a warning. `verify=[args, ...]` uses these
    example argument tuples (those matching the call's signature) in place of the call's.
    """
    if fn is None:
        return functools.partial(optimize, pipeline=pipeline, params_argnums=params_argnums,
                                 static_argnums=static_argnums, jit=jit, verify=verify)
    resolve(pipeline)  # reject unknown pipelines at decoration time, not on first call
    if not isinstance(verify, (bool, Sequence)) or isinstance(verify, str):
        raise TypeError(f"verify must be True, False or a sequence of argument tuples, got {verify!r}")
    return Optimized(fn, pipeline, params_argnums, static_argnums, jit, verify=verify)


class Optimized:
    """A model wrapped by `optimize`. Call it like the model."""

    def __init__(self, fn, pipeline, params_argnums, static_argnums, jit, verify=False):
        self.fn = fn
        self.verify = verify
        self.pipeline = pipeline
        self.params_argnums = params_argnums
        self.static_argnums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
        self.jit = jit
        self.graphs: dict[Any, Graph] = {}
        self._compiled: dict[Any, Callable] = {}
        self._prepared: dict[Any, tuple] = {}  # signature -> (param leaves, prepared arguments)
        self.graph: Graph | None = None
        functools.update_wrapper(self, fn, updated=())

    def __call__(self, *args):
        key, call_args = self._call_args(args)
        compiled = self._compiled.get(key)
        if compiled is None:
            with gc_paused():  # one pause over the whole build: no full collections in between
                graph = trace(self.fn, *args, params_argnums=self.params_argnums,
                              static_argnums=self.static_argnums)
                validator = self._validator(key, call_args)
                graph = run_pipeline(graph, self.pipeline, validator=validator).graph
                lowered = lower(graph)
                compiled = jax.jit(lowered) if self.jit else lowered
            self.graphs[key], self._compiled[key] = graph, compiled
        self.graph = self.graphs[key]
        return compiled(*self._prepare(key, self.graph, call_args))

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

    def _prepare(self, key, graph: Graph, args: tuple) -> tuple:
        """Arguments for the optimized graph. Parameter preprocessing (fold_params) runs once per
        set of weights: it is redone only when the parameter arrays are not the ones seen last."""
        if graph.prep is None:
            return args
        leaves = jax.tree_util.tree_leaves(args)
        params = [leaves[i] for i in graph.prep.param_leaf_indices]
        cached = self._prepared.get(key)
        if cached is not None and len(cached[0]) == len(params) and all(
                a is b for a, b in zip(cached[0], params)):
            prepared_params = cached[1]
        else:
            prepared_params = graph.prep.params(*args)
            self._prepared[key] = (params, prepared_params)  # holds the leaves: ids stay unique
        return graph.prep.arguments(prepared_params, args)


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

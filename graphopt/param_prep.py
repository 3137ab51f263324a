"""ParamPrep: how an optimized graph's parameters are computed from the user's parameters.

Passes that precompute work on frozen weights (fold_params; later quantization) move that work out
of the graph into a *prep graph* that maps the original parameter leaves to the optimized graph's
parameter inputs. It runs once per set of weights (jitted), never per call, and never touches the
user's arrays. After such a pass the lowered graph takes the parameters as one dict
`{path: array}` in place of the first parameter argument:

    traced:     f(variables, tokens)
    optimized:  lower(graph)(prepared_params, tokens)     prepared_params = graph.prep(variables, tokens)[0]

`prepare(graph, *args)` turns the traced function's arguments into the optimized graph's arguments.

Example:
    >>> import graphopt, jax, jax.numpy as jnp
    >>> from graphopt.pipeline import run_pipeline
    >>> g = graphopt.trace(lambda w, x: x @ w.T, jnp.ones((2, 3)), jnp.ones(3), params_argnums=0)
    >>> g = run_pipeline(g, ["fold_params"]).graph
    >>> args = prepare(g, jnp.ones((2, 3)), jnp.ones(3))
    >>> sorted(args[0]), jax.jit(graphopt.lower(g))(*args).tolist()
    (['w:transpose'], [3.0, 3.0])
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from graphopt.errors import PrepError, SignatureError


@dataclasses.dataclass(frozen=True)
class ParamPrep:
    """Original parameter leaves → the optimized graph's parameter inputs. Immutable."""

    graph: Any                        # prep Graph: inputs = original param leaves, outputs = new params
    original_in_tree: Any             # argument structure of the traced function
    param_leaf_indices: tuple         # flat positions of the original parameter leaves
    param_argnums: tuple              # original top-level arguments that held parameters
    keys: tuple                       # dict keys of the new parameters, in graph-input order
    _compiled: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def params(self, *args) -> dict:
        """The optimized graph's parameter dict, computed from the traced function's arguments."""
        flat, tree = jax.tree_util.tree_flatten(args)
        if tree != self.original_in_tree:
            raise SignatureError(f"expected arguments structured as {self.original_in_tree}, got {tree}")
        leaves = [flat[i] for i in self.param_leaf_indices]
        # Parameters the prep passes through unchanged are taken as they are, not copied by XLA.
        passed = {id(a): a.index for a in self.graph.inputs}
        computed = [v for v in self.graph.outputs if id(v) not in passed]
        results = iter(self._compiled_fn()(*leaves) if computed else ())
        params = {key: leaves[passed[id(v)]] if id(v) in passed else next(results)
                  for key, v in zip(self.keys, self.graph.outputs)}
        self._check_finite(params)
        return params

    def _check_finite(self, params: dict) -> None:
        for key, reason in self.finite_requirements().items():
            check_finite(key, params[key], reason)

    def finite_requirements(self) -> dict[str, str]:
        """key -> why, for each output its op requires finite (`OpDef.finite_outputs`: a
        quantization scale): NaN or ±Inf there means the parameters it comes from are not valid."""
        found = {}
        for key, v in zip(self.keys, self.graph.outputs):
            if v.node is not None and v.index in v.node.op.finite_outputs:
                sources = ", ".join(a.path for a in self.graph.inputs if _depends_on(v, a))
                found[key] = (f"because parameter {sources} holds NaN or ±Inf; {v.node.op.name} needs finite "
                              f"values ({v.node.describe()}). Fix those weights, or leave this layer out "
                              "(a quantization rule with scheme=None).")
        return found

    def _compiled_fn(self):
        """The prep graph, without its pass-through outputs, jitted once."""
        fn = self._compiled.get("fn")
        if fn is None:
            from graphopt.lowering.emit import evaluate

            inputs = {id(a) for a in self.graph.inputs}
            computed = [i for i, v in enumerate(self.graph.outputs) if id(v) not in inputs]

            def prep(*leaves):
                outs = evaluate(self.graph, leaves)
                return [outs[i] for i in computed]

            fn = self._compiled["fn"] = jax.jit(prep)
        return fn

    def __call__(self, *args) -> tuple:
        """The optimized graph's arguments from the traced function's arguments."""
        return self.arguments(self.params(*args), args)

    def arguments(self, params: dict, args: tuple) -> tuple:
        """The traced function's arguments with the parameter arguments replaced by `params`."""
        return replace_params(self.param_argnums, params, args)


class PreparedParams:
    """Prepared parameters remembered per prep (and caller's key) for the parameter arrays seen
    last: the prep runs again only when a call brings other arrays. Arrays are compared by
    identity, and only immutable ones (jax.Array) are remembered: a numpy array can be changed in
    place between calls, so with numpy parameters the prep runs on every call.

    >>> import graphopt, jax.numpy as jnp
    >>> g = graphopt.run_pipeline(graphopt.trace(lambda w, x: x @ w.T, jnp.ones((2, 3)), jnp.ones(3),
    ...                                          params_argnums=0), ["fold_params"]).graph
    >>> cache, w, x = PreparedParams(), jnp.ones((2, 3)), jnp.ones(3)
    >>> cache.arguments(g.prep, (w, x))[0] is cache.arguments(g.prep, (w, x))[0]
    True
    """

    def __init__(self):
        self._last: dict = {}  # (key, id(prep)) -> (prep, param leaves, prepared params)

    def arguments(self, prep, args: tuple, key=None) -> tuple:
        """`prep(*args)` (a ParamPrep or its stored form; None: `args` as they are), reusing the
        prepared parameters when the parameter leaves are the same immutable arrays as last time."""
        if prep is None:
            return args
        leaves = jax.tree_util.tree_leaves(args)
        params = [leaves[i] for i in prep.param_leaf_indices]
        last = self._last.get((key, id(prep)))
        if last is not None and len(last[1]) == len(params) and all(a is b for a, b in zip(last[1], params)):
            prepared = last[2]
        else:
            prepared = prep.params(*args)
            if all(isinstance(a, jax.Array) for a in params):  # held: the ids stay unique
                self._last[(key, id(prep))] = (prep, params, prepared)
            else:
                self._last.pop((key, id(prep)), None)
        return prep.arguments(prepared, args)


def replace_params(param_argnums: tuple, params: dict, args: tuple) -> tuple:
    """`args` with the parameter arguments (`param_argnums`) replaced by one `params` dict."""
    first = param_argnums[0]
    return tuple(params if i == first else a for i, a in enumerate(args) if i == first or i not in param_argnums)


def check_finite(key: str, value, reason: str) -> None:
    """PrepError naming `key` and `reason` if `value` holds NaN or ±Inf."""
    values = np.asarray(jax.device_get(value), np.float32)
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if bad:
        raise PrepError(f"{key}: {bad} of {values.size} values are NaN or ±Inf {reason}")


def _depends_on(value, arg) -> bool:
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v is arg:
            return True
        if v.node is not None and id(v.node) not in seen:
            seen.add(id(v.node))
            stack.extend(v.node.inputs)
    return False


def prepare(graph, *args) -> tuple:
    """Arguments for `lower(graph)` from the traced function's arguments (identity when no pass
    moved work into a prep graph)."""
    return args if graph.prep is None else graph.prep(*args)

"""Tracing: a JAX model → a graphopt Graph. The only module that reads jaxprs.

`trace` runs the model once with `jax.make_jaxpr` and converts the jaxpr:
- every equation becomes a node, with its params and provenance (module path from JAX's name
  stack, source line from its traceback);
- nested `jit` and plain calls are inlined;
- scan / while / cond / checkpoint / custom_jvp / custom_vjp become region ops holding sub-graphs;
- any other primitive with jaxprs in its params (shard_map, pallas_call, ...) becomes an opaque node
  that lowers back exactly as traced: never dropped, never an error;
- literals and closed-over arrays become constant nodes (the arrays themselves, not copies).

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> g = graphopt.trace(lambda w, x: jnp.tanh(x @ w), jnp.ones((4, 2)), jnp.ones(4), params_argnums=0)
    >>> [(a.role, a.path) for a in g.inputs]
    [('param', 'w'), ('input', 'x')]
    >>> [n.op.name for n in g.nodes]
    ['dot_general', 'tanh']
"""

from __future__ import annotations

import dataclasses

import os
import traceback as pytraceback
from typing import Any, Callable

import jax
import numpy as np

from graphopt import _jax_compat as compat
from graphopt import control_flow
from graphopt.errors import TraceError
from graphopt.frameworks import Adapted, adapt
from graphopt.gc_pause import gc_paused
from graphopt.ir import Graph, Value
from graphopt.provenance import Provenance, _library_dirs
from graphopt.ops import primitive_op
from graphopt.types import TensorType


def trace(fn: Callable, *example_args, params_argnums=None, static_argnums=()) -> Graph:
    """Trace `fn(*example_args)` into a Graph.

    Args:
        fn: a function of arrays, a Flax linen `module.apply`, a Flax nnx Module, or an Equinox
            Module (see `graphopt.frameworks`).
        example_args: arrays or `jax.ShapeDtypeStruct`s (pytrees of them) fixing shapes and dtypes.
        params_argnums: which positional arguments hold parameters (weights); their leaves become
            inputs with role "param". Defaults: argument 0 for linen `apply`, the module state for
            nnx and Equinox, none for plain functions.
        static_argnums: positional arguments that are Python values, not arrays; the graph is
            specialized on them and the lowered function does not take them.

    Returns:
        The Graph; `graphopt.lower(graph)` takes the non-static arguments (for nnx and Equinox
        modules: the module state, then the call arguments).
    """
    traced = trace_jaxpr(fn, *example_args, params_argnums=params_argnums, static_argnums=static_argnums)
    graph = Graph(traced.name)
    graph.in_tree = traced.in_tree
    graph.param_argnums = traced.adapted.params_argnums
    graph.out_tree = jax.tree_util.tree_structure(traced.out_shape)
    for (path, _), var in zip(traced.leaves, compat.jaxpr_parts(traced.jaxpr)[2]):
        role, name = _role_and_path(traced.adapted, path)
        graph.add_input(TensorType.of_aval(compat.aval_of(var)), role, name)
    with gc_paused():
        graph.set_outputs(_Converter().convert(graph, traced.jaxpr, graph.inputs, ""))
    return graph


@dataclasses.dataclass(frozen=True)
class TracedJaxpr:
    """JAX's trace of a model, before graphopt converts it (see `trace_jaxpr`)."""

    name: str            # the model's name ("Transformer.apply")
    adapted: Adapted     # the framework adapter's pure function and arguments
    leaves: list         # (key path, leaf) of every array argument
    in_tree: Any
    jaxpr: Any           # the closed jaxpr
    out_shape: Any       # output pytree of ShapeDtypeStructs


def trace_jaxpr(fn: Callable, *example_args, params_argnums=None, static_argnums=()) -> TracedJaxpr:
    """The first half of `trace`: static arguments dropped, the framework adapted, the arguments
    checked and the model traced by JAX, with graphopt's error messages (`TraceError` naming the
    argument or the model's source line). The program cache keys on it too."""
    model_name = _model_name(fn)
    fn, example_args, params_argnums = drop_static(fn, example_args, params_argnums, static_argnums)
    adapted = adapt(fn, example_args, params_argnums)
    leaves, in_tree = _check_leaves(adapted)
    try:
        closed_jaxpr, out_shape = compat.make_jaxpr_with_shape(adapted.fn, adapted.args)
    except Exception as err:
        raise _explain_trace_failure(model_name, err) from err
    return TracedJaxpr(model_name, adapted, leaves, in_tree, closed_jaxpr, out_shape)


def _model_name(fn) -> str:
    owner = getattr(fn, "__self__", None)
    if owner is not None and not isinstance(owner, type):  # a bound method: Transformer.apply
        return f"{type(owner).__name__}.{fn.__name__}"
    if not hasattr(fn, "__qualname__"):  # a module instance
        return type(fn).__name__
    return fn.__qualname__.rsplit("<locals>.", 1)[-1]


def inline_function(graph: Graph, fn: Callable, inputs: list[Value], static: dict,
                    provenance: Provenance) -> list[Value]:
    """Trace `fn(*inputs, **static)` on the inputs' types and add its nodes to `graph` (at the
    graph's insertion point), all with `provenance`. For rewrite rules (see graphopt.builder)."""
    key = None
    if hasattr(fn, "__code__"):
        # Rules often close over a shape or axis (`lambda a: a.reshape(shape)`): the closure's
        # values are part of the key, so such rules hit the cache too.
        cells = tuple(c.cell_contents for c in fn.__closure__ or ())
        try:
            key = (fn.__code__, cells, tuple(v.type for v in inputs), tuple(sorted(static.items())))
            hash(key)
        except (TypeError, ValueError):
            key = None
    traced = _INLINE_CACHE.get(key) if key is not None else None
    if traced is None:
        avals = [v.type.aval() for v in inputs]
        jaxpr = jax.make_jaxpr(lambda *xs: fn(*xs, **static))(*avals)
        traced = (jaxpr, _single_primitive(jaxpr))
        if key is not None:
            _INLINE_CACHE[key] = traced
    jaxpr, single = traced
    if single is not None:  # the common case in rewrite rules: one primitive on the inputs
        primitive, params, types = single
        node = graph.add_node(primitive_op(primitive), inputs, params, (), provenance, _types=types)
        return list(node.outputs)
    return _Converter(provenance).convert(graph, jaxpr, inputs, provenance.module_path)


def _single_primitive(jaxpr):
    """(primitive, params, out types) if `jaxpr` is one plain primitive applied to its inputs in
    order and returning its outputs, else None."""
    constvars, _, invars, eqns, outvars = compat.jaxpr_parts(jaxpr)
    if constvars or len(eqns) != 1:
        return None
    eqn = eqns[0]
    if (list(eqn.invars) != list(invars) or list(eqn.outvars) != list(outvars)
            or compat.primitive_kind(eqn.primitive) != "primitive" or compat.has_subjaxprs(eqn.params)):
        return None
    return eqn.primitive, eqn.params, [TensorType.of_aval(compat.aval_of(v)) for v in eqn.outvars]


# (fn code, closure values, input types, static args) -> (jaxpr, its single primitive or None)
_INLINE_CACHE: dict = {}


# --- arguments -----------------------------------------------------------------------------------

def drop_static(fn, args, params_argnums, static_argnums):
    """`fn` with its static arguments bound to their values in `args`: returns the function of
    the other arguments, those arguments, and `params_argnums` renumbered among them.

    >>> f, rest, params = drop_static(lambda w, n, x: x * w * n, (2.0, 3, 5.0), 0, 1)
    >>> rest, params, f(*rest)
    ((2.0, 5.0), (0,), 30.0)
    """
    static = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
    if not static:
        return fn, tuple(args), params_argnums
    static = {i % len(args) for i in static}
    kept = [i for i in range(len(args)) if i not in static]

    def with_static(*dynamic):
        full = list(args)
        for i, value in zip(kept, dynamic):
            full[i] = value
        return fn(*full)

    with_static.__qualname__ = getattr(fn, "__qualname__", "fn")
    if params_argnums is not None:
        params = (params_argnums,) if isinstance(params_argnums, int) else params_argnums
        params_argnums = tuple(kept.index(i % len(args)) for i in params if i % len(args) in kept)
    return with_static, tuple(args[i] for i in kept), params_argnums


_ARRAY_LIKE = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct, bool, int, float, complex)


def _check_leaves(adapted: Adapted):
    leaves, in_tree = jax.tree_util.tree_flatten_with_path(adapted.args)
    for path, leaf in leaves:
        if not isinstance(leaf, _ARRAY_LIKE):
            where = _path_string(adapted, path)
            raise TraceError(
                f"argument {where!r} is a {type(leaf).__name__}, not an array: graphopt traces array "
                "arguments only. Pass Python values (configs, flags, strings) with static_argnums=..., "
                "or close over them in the function.")
    return leaves, in_tree


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def key_path_name(path) -> str:
    """'/'-joined names of a pytree key path: `(DictKey('params'), DictKey('up'))` → `params/up`
    (the spelling of parameter paths in graphs, checkpoints and sharding rules)."""
    return "/".join(_key_name(k) for k in path)


def _path_string(adapted: Adapted, path) -> str:
    argnum, rest = path[0].idx, [_key_name(k) for k in path[1:]]
    if adapted.framework == "nnx" and rest and rest[-1] == "value":
        rest = rest[:-1]  # nnx.Variable leaves end in .value
    is_param = argnum in adapted.params_argnums
    if is_param and len(adapted.params_argnums) == 1 and rest:
        return "/".join(rest)
    return "/".join([adapted.arg_names[argnum], *rest])


def _role_and_path(adapted: Adapted, path) -> tuple[str, str]:
    return ("param" if path[0].idx in adapted.params_argnums else "input"), _path_string(adapted, path)


# --- errors --------------------------------------------------------------------------------------

_CONTROL_FLOW_ERRORS = tuple(getattr(jax.errors, n) for n in (
    "ConcretizationTypeError", "TracerBoolConversionError", "TracerIntegerConversionError",
    "TracerArrayConversionError") if hasattr(jax.errors, n))


def _explain_trace_failure(name: str, err: Exception) -> TraceError:
    where = _user_location(err)
    at = f" at {where}" if where else ""
    if isinstance(err, _CONTROL_FLOW_ERRORS):
        why = ("it uses the value of a traced array in Python (an `if`/`while` on an array, int() or "
               "np.asarray() of one). Use jax.lax.cond / jnp.where / lax.while_loop, or pass that "
               "argument with static_argnums so it is a Python value")
    else:
        why = f"it raised {type(err).__name__}"
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return TraceError(f"cannot trace {name}{at}: {why}.\n  JAX said: {first_line}")


def _user_location(err: Exception) -> str:
    library = _library_dirs() + (os.path.dirname(os.path.realpath(__file__)) + os.sep,)
    for frame in reversed(pytraceback.extract_tb(err.__traceback__)):
        if not os.path.realpath(frame.filename).startswith(library):
            return f"{os.path.basename(frame.filename)}:{frame.lineno} ({frame.name})"
    return ""


# --- jaxpr → graph -------------------------------------------------------------------------------

class _Converter:
    """Walks jaxprs and builds graphs; scalar literals are shared per graph."""

    def __init__(self, provenance: Provenance | None = None):
        self._literals: dict[tuple, Value] = {}
        self._provenance = provenance  # given: every node gets it (inlined rewrites)

    def convert(self, graph: Graph, jaxpr, in_values, module_path: str) -> list[Value]:
        constvars, consts, invars, eqns, outvars = compat.jaxpr_parts(jaxpr)
        env: dict[Any, Value] = {}
        for var, const in zip(constvars, consts):
            env[var] = graph.constant(const, compat.aval_of(var).dtype,
                                      provenance=self._provenance or Provenance(module_path))
        env.update(zip(invars, in_values))
        for eqn in eqns:
            inputs = [self._read(graph, env, atom) for atom in eqn.invars]
            path = _join(module_path, compat.name_stack(eqn.source_info))
            outs = self._equation(graph, eqn, inputs, path)
            for var, value in zip(eqn.outvars, outs):
                if not isinstance(var, compat.DropVar):
                    env[var] = value
        return [self._read(graph, env, atom) for atom in outvars]

    def _equation(self, graph, eqn, inputs, path) -> list[Value]:
        primitive, params = eqn.primitive, eqn.params
        kind = compat.primitive_kind(primitive)
        if kind == "inline":
            return self.convert(graph, compat.inlined_jaxpr(params), inputs, path)
        provenance = self._provenance or Provenance(path, compat.traceback_of(eqn.source_info))
        types = [TensorType.of_aval(compat.aval_of(v)) for v in eqn.outvars]
        if kind in control_flow.REGION_OPS:
            op = control_flow.REGION_OPS[kind]
            region_params = _REGION_PARAMS[kind]
            jaxprs = params[region_params[0]] if kind == "cond" else [params[p] for p in region_params]
            regions = [self._region(j, f"{kind}.{name}", path)
                       for j, name in zip(jaxprs, _region_names(op, len(jaxprs)))]
            rest = _region_op_params(kind, params, len(inputs))
            node = graph.add_node(op, inputs, rest, regions, provenance, _types=types, _effects=eqn.effects)
        else:
            op = primitive_op(primitive, opaque=compat.has_subjaxprs(params))
            node = graph.add_node(op, inputs, params, (), provenance, _types=types, _effects=eqn.effects)
        return list(node.outputs)

    def _region(self, jaxpr, name: str, module_path: str) -> Graph:
        region = Graph(name)
        for var in compat.jaxpr_parts(jaxpr)[2]:
            region.add_input(TensorType.of_aval(compat.aval_of(var)))
        region.set_outputs(self.convert(region, jaxpr, region.inputs, module_path))
        return region

    def _read(self, graph: Graph, env, atom) -> Value:
        if not isinstance(atom, compat.Literal):
            return env[atom]
        value, aval = compat.literal_value(atom), compat.aval_of(atom)
        if np.ndim(value) != 0:
            return graph.constant(value, aval.dtype, aval.weak_type, provenance=self._provenance)
        key = (id(graph), str(aval.dtype), aval.weak_type, np.asarray(value, aval.dtype).tobytes())
        cached = self._literals.get(key)
        if cached is None:
            cached = self._literals[key] = graph.constant(
                np.asarray(value, aval.dtype), aval.dtype, aval.weak_type, provenance=self._provenance)
        return cached


# Which params of each control-flow primitive are jaxprs (they become the node's regions).
_REGION_PARAMS = {
    "scan": ("jaxpr",), "while": ("cond_jaxpr", "body_jaxpr"), "cond": ("branches",),
    "remat": ("jaxpr",), "custom_jvp_call": ("call_jaxpr",), "custom_vjp_call": ("call_jaxpr",),
}


def _region_op_params(kind: str, params: dict, num_operands: int) -> dict:
    """graphopt's params for a region op: JAX's, less the jaxprs (now regions); for scan, the
    canonical layout (num_consts, num_carry) whatever the JAX version's own encoding."""
    if kind != "scan":
        return {k: v for k, v in params.items() if k not in _REGION_PARAMS[kind]}
    num_consts, num_carry = compat.scan_layout(params, num_operands)
    return {"num_consts": num_consts, "num_carry": num_carry, "length": params["length"],
            "reverse": params["reverse"], "unroll": params["unroll"],
            "_split_transpose": bool(params.get("_split_transpose", False))}


def _region_names(op, count: int) -> list[str]:
    if len(op.region_names) == count:
        return list(op.region_names)
    return [f"{op.region_names[0]}{i}" for i in range(count)]


def _join(prefix: str, name: str) -> str:
    if not name:
        return prefix
    return f"{prefix}/{name}" if prefix else name

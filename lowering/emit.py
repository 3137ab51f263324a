"""Lowering: a graphopt Graph → an ordinary JAX function.

Each node is replayed on whatever JAX trace is active: a JAX primitive is re-bound with its params,
a region op gets its sub-graphs as Python callables, and a graphopt op runs

- a composite (`graphopt.nn_ops`: attention, layer_norm, ...), by its `implementation` param:
  None → its "decomposition" region if it holds one (bit-exact with the source), else its
  reference implementation; a name → that kernel from `graphopt.implementations` for this backend
  (or any backend). A kernel missing on this backend, or one that does not support the node's
  shapes, is an error naming the op, the implementation, the backend and what to do: never a
  silent fallback to something else;
- any other op: its backend's default kernel if one is registered (`register_kernel`), else
  its reference implementation.

The result can be jitted, differentiated, vmapped and exported like any JAX function.

Example:
    >>> import graphopt, jax, jax.numpy as jnp
    >>> g = graphopt.trace(lambda x: jnp.sin(x) * 2, jnp.ones(3))
    >>> f = graphopt.lower(g)
    >>> jax.jit(f)(jnp.zeros(3)).tolist()
    [0.0, 0.0, 0.0]
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Sequence

import jax

from graphopt import _jax_compat as compat
from graphopt import implementations
from graphopt.errors import GraphError, SignatureError
from graphopt.gc_pause import gc_paused
from graphopt.ir import Graph, Node
from graphopt.nn_ops import CompositeOp
from graphopt.ops import OpDef, PrimitiveOp
from graphopt.types import dtype_name

# A non-composite graphopt op's per-backend default kernel is its "default" implementation in
# graphopt.implementations, the one kernel table (composites' kernels are named, chosen by passes).
DEFAULT = "default"


def register_kernel(op_name: str, backend: str | None = None):
    """Decorator: use this function to lower graphopt op `op_name` on `backend` ('cpu', 'gpu', 'tpu';
    None: any), instead of the op's reference implementation."""
    return implementations.register(op_name, DEFAULT, backend)


class RegionFunction:
    """A region sub-graph as a callable `(*args) -> list`, for region ops' implementations."""

    __slots__ = ("graph", "module_path")

    def __init__(self, graph: Graph, module_path: str):
        self.graph = graph
        self.module_path = module_path

    def __call__(self, *args) -> list:
        return evaluate(self.graph, args, self.module_path)


def evaluate(graph: Graph, flat_args: Sequence[Any], module_path: str = "") -> list:
    """Run `graph` on flat arguments under the current JAX trace; return the flat outputs.

    Each node is replayed with its original traceback and module path, so the lowered program's
    HLO metadata and profiles point at the user's source, as the original's do. `module_path` is
    the path already entered by the enclosing region op.
    """
    env: dict[int, Any] = {}
    for arg, value in zip(graph.inputs, flat_args, strict=True):
        env[id(arg)] = value
    backend = None
    prefix = module_path + "/" if module_path else ""
    for node in graph.nodes:
        args = [env[id(v)] for v in node.inputs]
        op = node.op
        path = node.provenance.module_path
        with compat.source_context(node.provenance.traceback, path[len(prefix):] if path.startswith(prefix) else path):
            if isinstance(op, PrimitiveOp):
                outs = compat.bind(op.primitive, args, node.params)
            else:
                backend = backend or _TARGET_BACKEND.get() or jax.default_backend()
                outs = _run_opdef(node, op, args, backend)
        if len(outs) != len(node.outputs):
            raise GraphError(f"{op.name} lowered to {len(outs)} results, expected {len(node.outputs)}", node)
        for value, out in zip(node.outputs, outs):
            env[id(value)] = out
    return [env[id(v)] for v in graph.outputs]


def _run_opdef(node: Node, op: OpDef, args, backend: str) -> list:
    if isinstance(op, CompositeOp):
        kernel = _composite_kernel(node, op, backend)
    else:
        found = implementations.find(op.name, DEFAULT, backend)
        kernel = found.fn if found is not None else op.impl
    regions = [RegionFunction(r, node.provenance.module_path) for r in node.regions]
    return list(kernel(*args, regions=regions, **node.params))


def _composite_kernel(node: Node, op: CompositeOp, backend: str) -> Callable:
    name = node.params["implementation"]
    if name is None:
        return _run_decomposition if node.regions else op.impl
    kernel = implementations.find(op.name, name, backend)
    if kernel is None:
        raise GraphError(implementations.missing(op.name, name, backend), node)
    reason = kernel.unsupported(node.input_types, node.params)
    if reason:
        raise GraphError(f"{op.name}: kernel {name!r} on backend {backend!r} does not support this "
                         f"node: {reason}. Set its implementation to None (its decomposition or "
                         "reference) or re-run fuse_attention, which only picks supported kernels.", node)
    return kernel.fn


def _run_decomposition(*args, regions, **params) -> list:
    return regions[0](*args)


class GraphFunction:
    """The lowered graph as a function of the traced pytree arguments.

    Calls are checked against the traced signature: a wrong tree structure, shape or dtype raises
    SignatureError naming the expected and the given signature.
    """

    def __init__(self, graph: Graph):
        self.graph = graph
        self.__name__ = f"lowered_{graph.name}".replace(".", "_").replace("<", "").replace(">", "")

    def __call__(self, *args):
        flat, tree = jax.tree_util.tree_flatten(args)
        self._check(flat, tree)
        with gc_paused():
            outs = evaluate(self.graph, flat)
        if self.graph.out_tree is None:
            return outs
        return jax.tree_util.tree_unflatten(self.graph.out_tree, outs)

    def flat(self, *flat_args) -> list:
        """Call with the flat list of inputs (in `graph.inputs` order); returns flat outputs."""
        self._check(list(flat_args), None)
        return evaluate(self.graph, flat_args)

    def _check(self, flat, tree) -> None:
        inputs = self.graph.inputs
        if tree is not None and self.graph.in_tree is not None and tree != self.graph.in_tree:
            raise SignatureError(
                f"{self.__name__} was traced for arguments structured as {self.graph.in_tree} but "
                f"was called with {tree}. Pass arguments with the traced structure, or re-trace.")
        if len(flat) != len(inputs):
            raise SignatureError(f"{self.__name__} takes {len(inputs)} array leaves, got {len(flat)}")
        for arg, value in zip(inputs, flat):
            shape, dtype = _shape_dtype(value)
            if shape != arg.type.shape or dtype != arg.type.dtype:
                raise SignatureError(
                    f"argument {arg.path or arg.index!r} has type {_type_str(value)}, but the graph was traced for "
                    f"{arg.type}.\n  expected signature: {signature(self.graph)}\n  given:"
                    f"              {_given_signature(inputs, flat)}\n"
                    "Re-trace for the new shapes (graphopt.trace), or use @graphopt.optimize, which "
                    "traces once per signature.")


def signature(graph: Graph) -> str:
    """'(x: f32[2,4], params/Dense_0/kernel: f32[4,8], ...)' for a graph's inputs."""
    return "(" + ", ".join(f"{a.path or a.index}: {a.type}" for a in graph.inputs) + ")"


def _shape_dtype(value):
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None or dtype is None:  # Python scalars
        return tuple(jax.numpy.shape(value)), jax.numpy.result_type(value)
    return tuple(shape), dtype


def _type_str(value) -> str:
    shape, dtype = _shape_dtype(value)
    return f"{dtype_name(dtype)}[{','.join(map(str, shape))}]"


def _given_signature(inputs, flat) -> str:
    return "(" + ", ".join(f"{a.path or a.index}: {_type_str(v)}" for a, v in zip(inputs, flat)) + ")"


_TARGET_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("graphopt_backend", default=None)


@contextlib.contextmanager
def target_backend(platform: str):
    """Lower graphopt ops with `platform`'s kernels while tracing in this context, instead of the
    default backend's: for compiling on one machine for another (`graphopt.compile` for a TPU
    topology from a CPU host)."""
    token = _TARGET_BACKEND.set(platform)
    try:
        yield
    finally:
        _TARGET_BACKEND.reset(token)


def lower(graph: Graph) -> GraphFunction:
    """The graph as a JAX function taking the traced (non-static) arguments. Not jitted: wrap it in
    `jax.jit`, `jax.grad`, `jax.vmap` as you would the original."""
    return GraphFunction(graph)

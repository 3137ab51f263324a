"""Structured pruning's rewrite: rebuild a graph with the chosen channels physically removed.

Given the kept channels of some groups (`passes/prune/deps.py`), every value's shape shrinks along
the axes that hold those groups; parameters become smaller graph inputs (same paths), constants
are sliced, and ops whose params spell out a shape (reshape, broadcast_in_dim, iota, slice, split,
depthwise convolutions) get the new one; nodes whose types do not change (loops the analysis
blocked, opaque ops) are copied as they are. A custom-derivative call (`jax.nn.relu`) whose shapes
change is inlined: its derivative rule was traced for the old shapes, so the pruned graph is
differentiated through the primal body (the same derivative except at ties such as relu's 0). Each rebuilt node's type comes from its shape rule as
always, and is checked against the expected shape, so a dependency the analysis missed is an
error here, never a silently wrong graph.

    before:  %h = dot_general %x, %w1 : f32[B,512]    %y = dot_general %h, %w2 : f32[B,10]
    after:   %h = dot_general %x, %w1 : f32[B,256]    %y = dot_general %h, %w2 : f32[B,10]
             (w1: f32[64,512] -> f32[64,256], w2: f32[512,10] -> f32[256,10])

Example:
    >>> import graphopt, jax, jax.numpy as jnp, numpy as np
    >>> from graphopt.passes.prune.deps import analyze
    >>> p = {"w1": jnp.ones((4, 16)), "w2": jnp.ones((16, 3))}
    >>> g = graphopt.trace(lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"], p, jnp.ones((2, 4)),
    ...                    params_argnums=0)
    >>> deps = analyze(g)
    >>> small, slices = shrink(deps, {"w1:1": np.arange(8)})
    >>> [str(a.type) for a in small.params()]
    ['f32[4,8]', 'f32[8,3]']
"""

from __future__ import annotations

import numpy as np

from graphopt.errors import GraphError
from graphopt.gc_pause import gc_paused
from graphopt.ir import Graph
from graphopt.passes.prune.deps import Dependencies, PruneError
from graphopt.types import TensorType


def shrink(deps: Dependencies, keep: dict) -> tuple[Graph, dict]:
    """The graph with only the `keep[name]` channels (sorted indices) of each named group, and
    `{input index: [(axis, kept indices), ...]}` saying how each shrunk input is sliced."""
    keep_by_dim = {id(group.dim): index for group, index in deps.resolve(keep).items()
                   if index.size < group.size}
    with gc_paused():
        return _Shrinker(deps, keep_by_dim).run(deps.graph)


def take(array, slices) -> np.ndarray:
    """`array` with `slices` ([(axis, kept indices)]) applied; a new array, the input untouched."""
    out = np.asarray(array)
    for axis, index in slices:
        out = np.take(out, index, axis=axis)
    return out


class _Shrinker:
    def __init__(self, deps: Dependencies, keep: dict):
        self.deps, self.keep = deps, keep
        self.map: dict[int, object] = {}

    def kept_axes(self, value) -> list:
        """Per axis: the kept indices, or None when the axis keeps everything."""
        out = []
        for axis, size in enumerate(value.type.shape):
            index = self.deps.kept(self.deps.dims[id(value)][axis], self.keep)
            out.append(None if index.size == size else index)
        return out

    def new_type(self, value) -> TensorType:
        t = value.type
        shape = tuple(n if k is None else k.size for n, k in zip(t.shape, self.kept_axes(value)))
        return TensorType(shape, t.dtype, t.weak_type) if shape != t.shape else t

    def run(self, graph: Graph) -> tuple[Graph, dict]:
        new = Graph(graph.name)
        new.in_tree, new.out_tree, new.param_argnums = graph.in_tree, graph.out_tree, graph.param_argnums
        new.metadata = dict(graph.metadata)
        slices = {}
        for arg in graph.inputs:
            kept = self.kept_axes(arg)
            if any(k is not None for k in kept):
                slices[arg.index] = [(axis, k) for axis, k in enumerate(kept) if k is not None]
            self.map[id(arg)] = new.add_input(self.new_type(arg), arg.role, arg.path)
        self.rebuild_nodes(graph, new)
        new.set_outputs([self.map[id(v)] for v in graph.outputs])
        return new, slices

    def rebuild_nodes(self, graph: Graph, new: Graph) -> None:
        for node in graph.nodes:
            inputs = [self.map[id(v)] for v in node.inputs]
            expected = [self.new_type(v) for v in node.outputs]
            same = not self.changes(node)
            if node.op.name in _CUSTOM_DERIVATIVES and not same:
                self.inline(node, inputs, new)
                continue
            params = self.params(node, expected)
            regions = [self.region(r) for r in node.regions]
            # A node pruning leaves alone is copied with its types and effects (an opaque op has
            # no shape rule); a changed one gets its types from its shape rule, checked below.
            try:
                built = new.add_node(node.op, inputs, params, regions, node.provenance.derived("prune"),
                                     _types=[v.type for v in node.outputs] if same else None,
                                     _effects=node.effects if same else None)
            except GraphError as err:
                raise PruneError(f"pruning cannot rebuild {node.describe()}: {err}") from err
            for old, value, want in zip(node.outputs, built.outputs, expected):
                if value.type.shape != want.shape:
                    raise PruneError(f"pruning rebuilt {node.describe()} as {value.type}, expected {want}: "
                                     "a channel dependency was missed; please report this model")
                self.map[id(old)] = value

    def changes(self, node) -> bool:
        return any(v.type != self.new_type(v) for v in (*node.inputs, *node.outputs))

    def inline(self, node, inputs, new: Graph) -> None:
        """Splice a custom-derivative call's primal body in: its derivative rule was traced for
        the unpruned shapes, so the shrunk call is differentiated through its body instead."""
        (body,) = node.regions
        for arg, value in zip(body.inputs, inputs):
            self.map[id(arg)] = value
        self.rebuild_nodes(body, new)
        for old, inner in zip(node.outputs, body.outputs):
            self.map[id(old)] = self.map[id(inner)]

    def region(self, body: Graph) -> Graph:
        new = Graph(body.name)
        for arg in body.inputs:
            self.map[id(arg)] = new.add_input(self.new_type(arg), arg.role, arg.path)
        self.rebuild_nodes(body, new)
        new.set_outputs([self.map[id(v)] for v in body.outputs])
        return new

    def params(self, node, expected: list[TensorType]) -> dict:
        p = node.params
        name = node.op.name
        if name == "constant":
            value = take(p["value"], [(a, k) for a, k in enumerate(self.kept_axes(node.outputs[0]))
                                      if k is not None])
            return {**p, "value": value} if value.shape != np.shape(p["value"]) else p
        if expected == [v.type for v in node.outputs] and all(
                v.type == self.new_type(v) for v in node.inputs):
            return p
        shape = expected[0].shape
        if name == "reshape":
            return {**p, "new_sizes": shape}
        if name in ("broadcast_in_dim", "iota"):
            return {**p, "shape": shape}
        if name == "slice":
            kept = self.kept_axes(node.inputs[0])
            start = [_count_below(k, s) for k, s in zip(kept, p["start_indices"])]
            limit = [_count_below(k, s) for k, s in zip(kept, p["limit_indices"])]
            return {**p, "start_indices": tuple(start), "limit_indices": tuple(limit)}
        if name == "split":
            return {**p, "sizes": tuple(t.shape[p["axis"]] for t in expected)}
        if name == "conv_general_dilated" and p["feature_group_count"] > 1:
            lhs_spec = p["dimension_numbers"][0]
            return {**p, "feature_group_count": self.new_type(node.inputs[0]).shape[lhs_spec[1]]}
        return p


_CUSTOM_DERIVATIVES = ("custom_jvp_call", "custom_vjp_call")


def _count_below(kept, bound: int) -> int:
    return bound if kept is None else int(np.searchsorted(kept, bound))

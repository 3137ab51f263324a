"""Channel dependencies: which dimensions of a traced graph must be pruned together.

Every axis of every value gets a *dimension*; each op's rule says which of its operands' and
results' axes are the same dimension (union-find), so coupled channels fall out of the dataflow
without per-model configuration:

    x @ W1 (+ b1) -> gelu -> @ W2        W1 axis 1 ~ b1 axis 0 ~ hidden axis ~ W2 axis 0
    x + attn(x) + mlp(x)                 residual adds: the operands' axes are one dimension
    reshape [B,T,H*D] -> [B,T,H,D]       H*D = H x D (a product of two dimensions)
    concatenate / slice / split          the axis is a concatenation of segments (qkv splits)
    repeat KV heads for GQA              query heads = KV heads x group (a broadcast dimension)

A *group* is an atomic dimension (not itself a product or concatenation) whose channels reach the
outputs only through contractions (a dot_general's contracting axis, a convolution's input
feature axis): the *exits*. Removing such channels is then exact in a precise sense: the pruned
graph computes what the unpruned graph computes with those channels zeroed at every exit
(`passes/prune/masked.py` builds that reference). A dimension is *blocked*, with the reason kept
for the report, when its channels reach a model output or come from a model input, when a
reduction other than a contraction runs over it (layer norm statistics, softmax), or when an op
has no rule for it (gathers, pads, loops, graphopt's fused ops: prune before fusion passes).
The dimensions are in `passes/prune/dims.py`, the per-op rules in `passes/prune/rules.py`; this
module forms and names the groups and estimates FLOPs as groups shrink.

Example:
    >>> import graphopt, jax, jax.numpy as jnp
    >>> p = {"w1": jnp.ones((4, 16)), "w2": jnp.ones((16, 3))}
    >>> g = graphopt.trace(lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"], p, jnp.ones((2, 4)),
    ...                    params_argnums=0)
    >>> [(grp.name, grp.size) for grp in analyze(g).groups]
    [('w1:1', 16)]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np

from graphopt.cost import ELEMENTWISE, REDUCTIONS, node_flops
from graphopt.errors import GraphoptError
from graphopt.param_derived import unique_name
from graphopt.passes.prune.dims import Dim, block
from graphopt.passes.prune.rules import all_values, analyze_nodes, is_call


class PruneError(GraphoptError, ValueError):
    """A pruning request that cannot be carried out as asked (it names the group or layer)."""


@dataclasses.dataclass(eq=False)
class Group:
    """A prunable dimension: channels that are removed together.

    `members` are the (value, axis) pairs whose axis holds this group (maybe as one factor of a
    flattened axis); `params` the parameter inputs among them; `exits` the contractions through
    which its channels reach the rest of the model."""

    name: str
    size: int
    dim: Dim
    members: list
    params: list
    exits: list
    removable: bool = False       # on a residual branch: may lose every channel (passes/prune/residual.py)

    def describe(self) -> str:
        paths = ", ".join(dict.fromkeys(f"{a.path}:{axis}" for a, axis in self.params)) or "no parameters"
        return f"{self.name} ({self.size} channels; {paths})"


@dataclasses.dataclass
class Dependencies:
    """The result of `analyze`: prunable groups and the blocked dimensions with their reasons."""

    graph: object
    dims: dict                    # id(value) -> [Dim per axis]
    groups: list[Group]
    blocked: list[tuple[str, int, list[str]]]  # (name, size, reasons) of parameter dimensions not prunable

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        known = ", ".join(g.name for g in self.groups) or "none"
        reasons = [f"{n}: {'; '.join(r)}" for n, _, r in self.blocked if n == name]
        why = f" It is blocked: {reasons[0]}." if reasons else ""
        raise PruneError(f"no prunable group named {name!r}.{why} Prunable groups: {known}.")

    def resolve(self, keep: dict) -> dict[Group, np.ndarray]:
        """{group: its kept channels, sorted} for `keep` = {group name: kept channel indices},
        checked: every name a prunable group, integer indices in range, at least one kept (none:
        only for a removable group, a layer on a residual branch)."""
        out = {}
        for name, index in keep.items():
            group = self.group(name)
            index = np.asarray(sorted(index) if isinstance(index, (set, frozenset)) else index)
            if index.size == 0 and not group.removable:
                raise PruneError(f"pruning would remove every channel of {group.describe()}; keep at least "
                                 "one (only a layer on a residual branch can be removed whole)")
            if index.size == 0:
                out[group] = np.zeros(0, np.int64)
                continue
            if not np.issubdtype(index.dtype, np.integer):
                raise PruneError(f"kept channels of {group.name} must be integer indices, got {index.dtype} "
                                 "(for a boolean mask, pass np.flatnonzero(mask))")
            index = np.unique(index.astype(np.int64))
            if index[0] < 0 or index[-1] >= group.size:
                raise PruneError(f"kept channels of {group.name} must lie in [0, {group.size}), "
                                 f"got {index.tolist()}")
            out[group] = index
        return out

    def kept(self, dim: Dim, keep: dict) -> np.ndarray:
        """Indices along a dimension that survive when each group keeps `keep[group.dim]`."""
        dim = dim.find()
        found = keep.get(id(dim))
        if found is not None:
            return found
        if dim.parts is None:
            return np.arange(dim.size)
        kind, parts = dim.parts
        if kind == "concat":
            offsets = np.cumsum([0] + [p.size for p in parts])
            return np.concatenate([self.kept(p, keep) + o for p, o in zip(parts, offsets)])
        index = np.zeros(1, np.int64)
        for part in parts:
            index = (index[:, None] * part.size + self.kept(part, keep)[None, :]).ravel()
        return index



def analyze(graph) -> Dependencies:
    """Group the coupled dimensions of `graph` (see the module docstring)."""
    if graph.prep is not None:  # its parameters are not the user's: shrinking them would drop prep
        raise PruneError("this graph's parameters are computed from the model's by a prep graph "
                         "(fold_params ran): prune the traced graph, before fold_params")
    dims: dict[int, list[Dim]] = {}
    for arg in graph.inputs:
        dims[id(arg)] = [Dim(n) for n in arg.type.shape]
        if arg.role != "param":
            for d in dims[id(arg)]:
                block(d, f"it comes from model input {arg.path or arg.index}")
    analyze_nodes(graph, dims)
    for value in graph.outputs:
        for d in dims[id(value)]:
            block(d, "it reaches a model output")
    deps = _collect(graph, dims)
    from graphopt.passes.prune.residual import removable_groups

    removable = removable_groups(deps)
    for group in deps.groups:
        group.removable = group.name in removable
    return deps


def _collect(graph, dims) -> Dependencies:
    roots: dict[int, Dim] = {}
    for axes in dims.values():
        for d in axes:
            r = d.find()
            roots[id(r)] = r
    # A blocked composite blocks its parts: pruning a factor of it would change it.
    for r in list(roots.values()):
        if r.blocked and r.parts is not None:
            _block_parts(r, r.blocked)
    members: dict[int, list] = {}
    params: dict[int, list] = {}
    values = {id(v): v for v in all_values(graph)}
    for vid, axes in dims.items():
        value = values[vid]
        for axis, d in enumerate(axes):
            for atom in atoms(d):
                members.setdefault(id(atom), []).append((value, axis))
                if getattr(value, "role", None) == "param":
                    params.setdefault(id(atom), []).append((value, axis))
    exits: dict[int, list] = {}
    for r in roots.values():
        for node, operand, axis in r.exits:
            for atom in atoms(dims[id(node.inputs[operand])][axis]):
                exits.setdefault(id(atom), []).append((node, operand, axis))
    groups, blocked, names = [], [], set()
    found = {id(a): a for r in roots.values() for a in atoms(r)}
    for key, atom in sorted(found.items(), key=lambda kv: kv[1].serial):
        atom_params = params.get(key, [])
        if atom.size <= 1 or not atom_params:
            continue  # dimensions no parameter holds are not worth naming (batch, sequence)
        producer = min(atom_params, key=lambda m: (_contracted(*m), -m[0].type.ndim))
        name = unique_name(f"{producer[0].path}:{producer[1]}", names)
        if atom.blocked or key not in exits:
            reasons = atom.blocked or ["no contraction reads it (nothing to save)"]
            blocked.append((name, atom.size, list(dict.fromkeys(reasons))))
            continue
        groups.append(Group(name, atom.size, atom, members[key], atom_params,
                            list(dict.fromkeys(exits[key]))))
    return Dependencies(graph, dims, groups, blocked)


def _contracted(value, axis: int) -> bool:
    """Whether a reader of `value` contracts over `axis` (a consumer's weight, not a producer's)."""
    for node in value.users():
        for operand, v in enumerate(node.inputs):
            if v is not value:
                continue
            if node.op.name == "dot_general" and axis in node.params["dimension_numbers"][0][operand]:
                return True
            if node.op.name == "conv_general_dilated" and operand == 1 and \
                    axis == node.params["dimension_numbers"][1][1]:
                return True
    return False


def atoms(dim: Dim) -> Iterator[Dim]:
    """The atomic dimensions a dimension is made of, through products and concatenations
    (itself if atomic)."""
    dim = dim.find()
    if dim.parts is None:
        yield dim
    else:
        for part in dim.parts[1]:
            yield from atoms(part)


def _block_parts(dim: Dim, reasons) -> None:
    for part in dim.parts[1]:
        for reason in reasons:
            block(part, reason)
        p = part.find()
        if p.parts is not None:
            _block_parts(p, reasons)


def flops_weights(deps: Dependencies) -> list[tuple[int, list]]:
    """For each node, (its FLOPs, the sizes of the axes its count multiplies over that hold a
    group): each size an expression in the groups' kept counts, which `estimate_flops` evaluates:
    i (group i's count), ("size", n) or ("product" | "concat", [expressions])."""
    index = {id(g.dim): i for i, g in enumerate(deps.groups)}
    rows = []
    for node in _flops_nodes(deps.graph):
        flops = node_flops(node)[0]
        if flops:
            axes = [_size_expr(deps.dims[id(v)][axis], index) for v, axis in _iteration_axes(node)]
            rows.append((flops, [e for e in axes if not _fixed(e)]))
    return rows


def estimate_flops(rows, sizes: list[int], kept: list[int]) -> float:
    """FLOPs when group i keeps kept[i] of sizes[i] channels: each node's count scaled by how
    much each of its axes shrinks (exact for the elementwise ops, reductions and contractions
    whose counts `graphopt.cost` gives)."""
    return sum(f * math.prod(_count(e, kept) / _count(e, sizes) for e in axes) for f, axes in rows)


def _flops_nodes(graph):
    """The nodes whose FLOPs make up the graph's: a call's body instead of the call (pruning
    reaches into it); a loop or branch as a whole (its count is not its body's, and fixed)."""
    for node in graph.nodes:
        if is_call(node):
            yield from _flops_nodes(node.regions[0])
        else:
            yield node


def _iteration_axes(node) -> list[tuple]:
    """(value, axis) for each axis the node's FLOP count (`graphopt.cost.node_flops`) multiplies."""
    name, out = node.op.name, node.outputs[0]
    if name == "dot_general":
        (lhs_contract, _), _ = node.params["dimension_numbers"]
        return [(out, a) for a in range(out.type.ndim)] + [(node.inputs[0], a) for a in lhs_contract]
    if name == "conv_general_dilated":
        rhs = node.inputs[1]
        out_feature = node.params["dimension_numbers"][1][0]
        return [(out, a) for a in range(out.type.ndim)] + [(rhs, a) for a in range(rhs.type.ndim)
                                                            if a != out_feature]
    if name in REDUCTIONS:
        return [(node.inputs[0], a) for a in range(node.inputs[0].type.ndim)]
    if name in ELEMENTWISE:
        return [(out, a) for a in range(out.type.ndim)]
    return []  # a loop or branch: no group reaches into it


def _size_expr(dim: Dim, index: dict):
    dim = dim.find()
    if id(dim) in index:
        return index[id(dim)]
    if dim.parts is None:
        return ("size", dim.size)
    kind, parts = dim.parts
    exprs = [_size_expr(p, index) for p in parts]
    return ("size", dim.size) if all(map(_fixed, exprs)) else (kind, exprs)


def _fixed(expr) -> bool:
    return isinstance(expr, tuple) and expr[0] == "size"


def _count(expr, counts: list[int]) -> int:
    if isinstance(expr, int):
        return counts[expr]
    kind, arg = expr
    if kind == "size":
        return arg
    found = [_count(e, counts) for e in arg]
    return math.prod(found) if kind == "product" else sum(found)

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


class PruneError(GraphoptError, ValueError):
    """A pruning request that cannot be carried out as asked (it names the group or layer)."""


class Dim:
    """A union-find node: one dimension of `size`, maybe a product or concatenation of others."""

    __slots__ = ("parent", "size", "parts", "blocked", "exits", "serial")
    _count = 0

    def __init__(self, size: int, parts: tuple | None = None):
        self.parent = self
        self.size = size
        self.parts = parts          # None, ("product", dims) or ("concat", dims), outermost first
        self.blocked: list[str] = []
        self.exits: list[tuple] = []  # (node, operand index, axis)
        Dim._count += 1
        self.serial = Dim._count

    def find(self) -> "Dim":
        root = self
        while root.parent is not root:
            root = root.parent
        node = self
        while node.parent is not root:  # path compression
            node.parent, node = root, node.parent
        return root


def unify(a: Dim, b: Dim, where: str = "") -> Dim:
    """Make `a` and `b` one dimension (their parts unified in turn); the root."""
    a, b = a.find(), b.find()
    if a is b:
        return a
    if a.serial > b.serial:  # the older dimension stays the root: names follow graph order
        a, b = b, a
    if a.size != b.size:
        block(a, f"sizes {a.size} and {b.size} meet {where}")
        block(b, f"sizes {a.size} and {b.size} meet {where}")
        return a
    b.parent = a
    a.blocked += b.blocked
    a.exits += b.exits
    if a.parts is None:
        a.parts = b.parts
    elif b.parts is not None:
        (kind_a, dims_a), (kind_b, dims_b) = a.parts, b.parts
        if kind_a != kind_b or [d.size for d in dims_a] != [d.size for d in dims_b]:
            block(a, f"it is split two ways ({_spelled(a.parts)} and {_spelled(b.parts)}) {where}")
        else:
            for x, y in zip(dims_a, dims_b):
                unify(x, y, where)
    return a


def block(dim: Dim, reason: str) -> None:
    """Mark the dimension (and, when the groups are formed, all its parts) as not prunable."""
    root = dim.find()
    if reason not in root.blocked:
        root.blocked.append(reason)


def decompose(dim: Dim, kind: str, parts: list[Dim], where: str = "") -> None:
    """State that `dim` is the product (or concatenation) of `parts`, outermost first."""
    # Unit factors and empty segments carry no channels (and would let a dimension contain itself).
    parts = [p for p in parts if p.size != (1 if kind == "product" else 0)]
    if len(parts) == 1:
        unify(dim, parts[0], where)
    elif parts:
        unify(dim, Dim(dim.size, (kind, parts)), where)


def _spelled(parts) -> str:
    kind, dims = parts
    return ("x" if kind == "product" else "+").join(str(d.size) for d in dims)


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

    def axis_dim(self, value, axis: int) -> Dim:
        return self.dims[id(value)][axis].find()

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

    def atoms(self, dim: Dim) -> Iterator[Dim]:
        """The atomic dimensions a dimension is made of (itself if atomic)."""
        dim = dim.find()
        if dim.parts is None:
            yield dim
        else:
            for part in dim.parts[1]:
                yield from self.atoms(part)


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
    _analyze_nodes(graph, dims)
    for value in graph.outputs:
        for d in dims[id(value)]:
            block(d, "it reaches a model output")
    deps = _collect(graph, dims)
    from graphopt.passes.prune.residual import removable_groups

    removable = removable_groups(deps)
    for group in deps.groups:
        group.removable = group.name in removable
    return deps


def _analyze_nodes(graph, dims) -> None:
    for node in graph.nodes:
        for value in node.outputs:
            dims[id(value)] = [Dim(n) for n in value.type.shape]
        rule = RULES.get(node.op.name)
        if rule is None and node.op.name in ELEMENTWISE:
            rule = _elementwise
        if rule is None:
            _block_all(node, dims, f"{node.op.name} has no pruning rule ({node.provenance.describe()})")
        else:
            rule(node, [dims[id(v)] for v in node.inputs], [dims[id(v)] for v in node.outputs], dims)


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
    values = {id(v): v for v in _all_values(graph)}
    for vid, axes in dims.items():
        value = values[vid]
        for axis, d in enumerate(axes):
            for atom in _atoms(d):
                members.setdefault(id(atom), []).append((value, axis))
                if getattr(value, "role", None) == "param":
                    params.setdefault(id(atom), []).append((value, axis))
    exits: dict[int, list] = {}
    for r in roots.values():
        for node, operand, axis in r.exits:
            for atom in _atoms(dims[id(node.inputs[operand])][axis]):
                exits.setdefault(id(atom), []).append((node, operand, axis))
    groups, blocked, names = [], [], set()
    atoms = {id(a): a for r in roots.values() for a in _atoms(r)}
    for key, atom in sorted(atoms.items(), key=lambda kv: kv[1].serial):
        atom_params = params.get(key, [])
        if atom.size <= 1 or not atom_params:
            continue  # dimensions no parameter holds are not worth naming (batch, sequence)
        producer = min(atom_params, key=lambda m: (_contracted(*m), -m[0].type.ndim))
        name = _unique(f"{producer[0].path}:{producer[1]}", names)
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


def _unique(name: str, taken: set) -> str:
    base, n = name, 1
    while name in taken:
        n += 1
        name = f"{base}#{n}"
    taken.add(name)
    return name


def _atoms(dim: Dim) -> Iterator[Dim]:
    dim = dim.find()
    if dim.parts is None:
        yield dim
    else:
        for part in dim.parts[1]:
            yield from _atoms(part)


def _block_parts(dim: Dim, reasons) -> None:
    for part in dim.parts[1]:
        for reason in reasons:
            block(part, reason)
        p = part.find()
        if p.parts is not None:
            _block_parts(p, reasons)


def _all_values(graph):
    yield from graph.inputs
    for node in graph.nodes:
        yield from node.outputs
        for region in node.regions:
            yield from _all_values(region)


def _block_all(node, dims, reason: str) -> None:
    for value in (*node.inputs, *node.outputs):
        for d in dims[id(value)]:
            block(d, reason)
    for region in node.regions:  # a loop or branch body: kept as it is, but shrink copies it
        for value in _all_values(region):
            dims[id(value)] = [Dim(n) for n in value.type.shape]
            for d in dims[id(value)]:
                block(d, reason)


# --- rules: (node, input dims, output dims, all dims) ----------------------------------------------

def _where(node) -> str:
    return f"at {node.op.name} ({node.provenance.describe()})"


def _elementwise(node, ins, outs, dims):
    out = outs[0]
    for dims_in, value in zip(ins, node.inputs):
        if len(dims_in) != len(out):
            continue  # a scalar operand
        for d_in, d_out in zip(dims_in, out):
            if d_in.size == d_out.size:
                unify(d_in, d_out, _where(node))
    for extra in outs[1:]:
        for a, b in zip(extra, out):
            unify(a, b, _where(node))


def _identity(node, ins, outs, dims):
    for a, b in zip(ins[0], outs[0]):
        unify(a, b, _where(node))


def _transpose(node, ins, outs, dims):
    for out_axis, in_axis in enumerate(node.params["permutation"]):
        unify(ins[0][in_axis], outs[0][out_axis], _where(node))


def _broadcast_in_dim(node, ins, outs, dims):
    for in_axis, out_axis in enumerate(node.params["broadcast_dimensions"]):
        if ins[0][in_axis].size == outs[0][out_axis].size:
            unify(ins[0][in_axis], outs[0][out_axis], _where(node))


def _squeeze(node, ins, outs, dims):
    dropped = {d % len(ins[0]) for d in node.params["dimensions"]}
    for a, b in zip([d for i, d in enumerate(ins[0]) if i not in dropped], outs[0]):
        unify(a, b, _where(node))


def _reshape(node, ins, outs, dims):
    if node.params.get("dimensions") is not None:
        return _block_all(node, dims, f"reshape with dimensions {_where(node)}")
    if node.inputs[0].type.size == 0:  # no element to follow; the factor matching below needs some
        return _block_all(node, dims, f"a reshape of an empty array {_where(node)}")
    src = [d for d in ins[0] if d.size != 1]
    dst = [d for d in outs[0] if d.size != 1]
    i = j = 0
    while i < len(src) and j < len(dst):
        a, b = [src[i]], [dst[j]]
        pa, pb = src[i].size, dst[j].size
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                pa *= src[i].size
                a.append(src[i])
                i += 1
            else:
                pb *= dst[j].size
                b.append(dst[j])
                j += 1
        if len(a) == 1 and len(b) == 1:
            unify(a[0], b[0], _where(node))
        elif len(a) == 1:
            decompose(a[0], "product", b, _where(node))
        elif len(b) == 1:
            decompose(b[0], "product", a, _where(node))
        else:
            for d in a + b:
                block(d, f"a reshape regroups {[x.size for x in a]} as {[x.size for x in b]} {_where(node)}")


def _reduce(node, ins, outs, dims):
    axes = set(node.params["axes"])
    kept = [d for i, d in enumerate(ins[0]) if i not in axes]
    for a, b in zip(kept, outs[0]):
        unify(a, b, _where(node))
    for axis in axes:
        block(ins[0][axis], f"{node.op.name} reduces over it {_where(node)}")


def _argminmax(node, ins, outs, dims):
    axes = set(node.params["axes"])
    for a, b in zip([d for i, d in enumerate(ins[0]) if i not in axes], outs[0]):
        unify(a, b, _where(node))
    for axis in axes:
        block(ins[0][axis], f"{node.op.name} reduces over it {_where(node)}")


def _cumulative(node, ins, outs, dims):
    _identity(node, ins, outs, dims)
    block(ins[0][node.params["axis"]], f"{node.op.name} accumulates along it {_where(node)}")


def _dot_general(node, ins, outs, dims):
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    lhs, rhs = ins
    out = iter(outs[0])
    for a, b in zip(lb, rb):
        d = next(out)
        unify(lhs[a], d, _where(node))
        unify(rhs[b], d, _where(node))
    for i, d in enumerate(lhs):
        if i not in lc and i not in lb:
            unify(d, next(out), _where(node))
    for i, d in enumerate(rhs):
        if i not in rc and i not in rb:
            unify(d, next(out), _where(node))
    for a, b in zip(lc, rc):
        root = unify(lhs[a], rhs[b], _where(node))
        root.exits.append((node, 0, a))


def _conv(node, ins, outs, dims):
    p = node.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    lhs, rhs = ins
    out = outs[0]
    where = _where(node)
    if p["batch_group_count"] != 1:
        return _block_all(node, dims, f"a batch-grouped convolution {where}")
    unify(lhs[lhs_spec[0]], out[out_spec[0]], where)
    for d in [lhs[i] for i in lhs_spec[2:]] + [rhs[i] for i in rhs_spec[2:]] + [out[i] for i in out_spec[2:]]:
        block(d, f"it is a spatial axis of a convolution {where}")
    groups = p["feature_group_count"]
    c_in, c_out = lhs[lhs_spec[1]], out[out_spec[1]]
    k_in, k_out = rhs[rhs_spec[1]], rhs[rhs_spec[0]]
    unify(k_out, c_out, where)
    if groups == 1:
        root = unify(c_in, k_in, where)
        root.exits.append((node, 0, lhs_spec[1]))
    elif groups == c_in.size and k_in.size == 1 and c_out.size == c_in.size:
        unify(c_in, c_out, where)  # depthwise: channel c in, channel c out
    else:
        for d in (c_in, c_out, k_in, k_out):
            block(d, f"a grouped convolution (feature_group_count={groups}) {where}")


def _reduce_window(node, ins, outs, dims):
    p = node.params
    for axis, (a, b) in enumerate(zip(ins[0], outs[0])):
        window = (p["window_dimensions"][axis], p["window_strides"][axis], tuple(p["padding"][axis]),
                  p["base_dilation"][axis], p["window_dilation"][axis])
        if window == (1, 1, (0, 0), 1, 1):
            unify(a, b, _where(node))
        else:
            block(a, f"{node.op.name} pools over it {_where(node)}")
            block(b, f"{node.op.name} pools over it {_where(node)}")


def _concatenate(node, ins, outs, dims):
    axis = node.params["dimension"]
    for i, d in enumerate(outs[0]):
        if i != axis:
            for dims_in in ins:
                unify(dims_in[i], d, _where(node))
    decompose(outs[0][axis], "concat", [dims_in[axis] for dims_in in ins], _where(node))


def _slice(node, ins, outs, dims):
    p = node.params
    strides = p.get("strides") or (1,) * len(ins[0])
    for axis, (a, b) in enumerate(zip(ins[0], outs[0])):
        start, limit = p["start_indices"][axis], p["limit_indices"][axis]
        if (start, limit, b.size) == (0, a.size, a.size):
            unify(a, b, _where(node))
        elif strides[axis] != 1:
            block(a, f"a strided slice {_where(node)}")
            block(b, f"a strided slice {_where(node)}")
        else:
            unify(segment(a, start, limit, _where(node)), b, _where(node))


def _split(node, ins, outs, dims):
    """`jnp.split` (the split primitive): each result is a segment of the input's axis."""
    axis = node.params["axis"]
    start = 0
    for out in outs:
        for i, (a, b) in enumerate(zip(ins[0], out)):
            if i != axis:
                unify(a, b, _where(node))
        stop = start + out[axis].size
        unify(segment(ins[0][axis], start, stop, _where(node)), out[axis], _where(node))
        start = stop


def segment(dim: Dim, start: int, stop: int, where: str) -> Dim:
    """The dimension of `dim[start:stop]`, splitting `dim` into a concatenation if needed."""
    root = dim.find()
    if (start, stop) == (0, root.size):
        return root
    if start == stop:
        return Dim(0)  # an empty slice holds no channel to tie to anything
    if root.parts is None:
        pieces = [Dim(n) for n in (start, stop - start, root.size - stop)]
        decompose(root, "concat", pieces, where)
        return pieces[1]
    kind, parts = root.parts
    offsets = np.cumsum([0] + [p.size for p in parts]).tolist()
    if kind == "concat":
        for part, lo, hi in zip(parts, offsets, offsets[1:]):
            if lo <= start and stop <= hi:
                return segment(part, start - lo, stop - lo, where)
        if start in offsets and stop in offsets:
            covered = parts[offsets.index(start):offsets.index(stop)]
            return Dim(stop - start, ("concat", covered))
    elif start % (inner := root.size // parts[0].size) == 0 and stop % inner == 0:
        outer = segment(parts[0], start // inner, stop // inner, where)
        return Dim(stop - start, ("product", [outer, *parts[1:]]))
    piece = Dim(stop - start)
    block(root, f"a slice [{start}:{stop}] cuts across its parts {where}")
    block(piece, f"a slice [{start}:{stop}] cuts across its parts {where}")
    return piece


def _pass_region(node, ins, outs, dims):
    """Call-like regions (custom_jvp/vjp, remat): the body's inputs and outputs are the node's."""
    (body,) = node.regions
    for arg, d_in in zip(body.inputs, ins):
        dims[id(arg)] = [Dim(n) for n in arg.type.shape]
        for a, b in zip(dims[id(arg)], d_in):
            unify(a, b, _where(node))
    _analyze_nodes(body, dims)
    for value, d_out in zip(body.outputs, outs):
        for a, b in zip(dims[id(value)], d_out):
            unify(a, b, _where(node))


def _constant(node, ins, outs, dims):
    pass  # its axes join whatever it is combined with; shrinking slices its value


def _iota(node, ins, outs, dims):
    block(outs[0][node.params["dimension"]], f"iota counts along it {_where(node)}")


RULES = {
    "convert_element_type": _identity, "copy": _identity, "copy_p": _identity,
    "reduce_precision": _identity, "stop_gradient": _identity, "optimization_barrier": _identity,
    "transpose": _transpose, "broadcast_in_dim": _broadcast_in_dim, "squeeze": _squeeze,
    "reshape": _reshape, "dot_general": _dot_general, "conv_general_dilated": _conv,
    "reduce_window_max": _reduce_window, "reduce_window_min": _reduce_window,
    "reduce_window_sum": _reduce_window, "concatenate": _concatenate, "slice": _slice,
    "split": _split,
    "custom_jvp_call": _pass_region, "custom_vjp_call": _pass_region, "remat": _pass_region,
    "constant": _constant, "iota": _iota,
    **{name: _reduce for name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
                                  "reduce_and", "reduce_or", "reduce_xor")},
    "argmax": _argminmax, "argmin": _argminmax,
    **{name: _cumulative for name in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")},
}


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
        if RULES.get(node.op.name) is _pass_region:
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

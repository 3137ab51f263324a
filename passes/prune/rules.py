"""Per-op channel coupling rules: which axes of an op's operands and results are one dimension.

`analyze_nodes(graph, dims)` gives every value's axes a `Dim` (`passes/prune/dims.py`) and applies
each node's rule: elementwise ops unify operand and result axes; transposes, broadcasts,
squeezes and reshapes map them (a reshape as a product of dimensions); dot_general unifies batch
and free dims and records each contraction as an *exit* of the contracted dimension; a
convolution couples features (depthwise too) and blocks its spatial axes; concatenate, slice and
split make concatenations; reductions other than contractions, pooling windows, cumulative ops
and iota block the axes they run along; call regions (custom_jvp/vjp, remat) are analyzed
through. An op with no rule blocks every axis it touches (gathers, pads, loops, graphopt's fused
ops), so pruning is never wrong, only sometimes not possible.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> g = graphopt.trace(lambda w, x: jnp.tanh(x @ w), jnp.ones((4, 8)), jnp.ones((2, 4)), params_argnums=0)
    >>> dims = {id(a): [Dim(n) for n in a.type.shape] for a in g.inputs}
    >>> analyze_nodes(g, dims)
    >>> w, x = g.inputs
    >>> dims[id(w)][0].find() is dims[id(x)][1].find(), len(dims[id(w)][0].find().exits)
    (True, 1)
"""

from __future__ import annotations

from graphopt.cost import ELEMENTWISE
from graphopt.passes.prune.dims import Dim, block, decompose, segment, unify


def analyze_nodes(graph, dims) -> None:
    """Give every value of `graph` (regions included) its dims and apply each node's rule."""
    for node in graph.nodes:
        for value in node.outputs:
            dims[id(value)] = [Dim(n) for n in value.type.shape]
        rule = RULES.get(node.op.name)
        if rule is None and node.op.name in ELEMENTWISE:
            rule = _elementwise
        if rule is None:
            block_all(node, dims, f"{node.op.name} has no pruning rule ({node.provenance.describe()})")
        else:
            rule(node, [dims[id(v)] for v in node.inputs], [dims[id(v)] for v in node.outputs], dims)


def all_values(graph):
    yield from graph.inputs
    for node in graph.nodes:
        yield from node.outputs
        for region in node.regions:
            yield from all_values(region)


def block_all(node, dims, reason: str) -> None:
    for value in (*node.inputs, *node.outputs):
        for d in dims[id(value)]:
            block(d, reason)
    for region in node.regions:  # a loop or branch body: kept as it is, but shrink copies it
        for value in all_values(region):
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
        return block_all(node, dims, f"reshape with dimensions {_where(node)}")
    if node.inputs[0].type.size == 0:  # no element to follow; the factor matching below needs some
        return block_all(node, dims, f"a reshape of an empty array {_where(node)}")
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
        return block_all(node, dims, f"a batch-grouped convolution {where}")
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


def _pass_region(node, ins, outs, dims):
    """Call-like regions (custom_jvp/vjp, remat): the body's inputs and outputs are the node's."""
    (body,) = node.regions
    for arg, d_in in zip(body.inputs, ins):
        dims[id(arg)] = [Dim(n) for n in arg.type.shape]
        for a, b in zip(dims[id(arg)], d_in):
            unify(a, b, _where(node))
    analyze_nodes(body, dims)
    for value, d_out in zip(body.outputs, outs):
        for a, b in zip(dims[id(value)], d_out):
            unify(a, b, _where(node))


def _constant(node, ins, outs, dims):
    """A constant couples nothing by itself: its axes join whatever it is combined with, and
    shrinking slices its value."""


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
    "argmax": _reduce, "argmin": _reduce,
    **{name: _cumulative for name in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")},
}


def is_call(node) -> bool:
    """Whether `node` is a call analyzed through (custom_jvp/vjp, remat): its body's nodes are
    the ones that count."""
    return RULES.get(node.op.name) is _pass_region

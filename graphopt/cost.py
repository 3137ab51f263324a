"""FLOP and byte estimates per node and per graph, for summaries and pass reports.

Conventions (those of XLA's cost analysis and most papers): a multiply-add is 2 FLOPs, so
`dot_general` costs 2·|out|·K and a convolution 2·|out|·(kernel elements per output feature);
elementwise arithmetic costs 1 per output element; reductions 1 per input element; data movement
(reshape, transpose, slice, convert, ...) costs 0. A scan body counts `length` times, a cond its
most expensive branch; a while loop's trip count is unknown, so its body counts once and the total
is marked a lower bound.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> g = graphopt.trace(lambda a, b: a @ b, jnp.ones((8, 16)), jnp.ones((16, 4)))
    >>> graph_flops(g)
    (1024, True)
"""

from __future__ import annotations

import math

from graphopt.ops import CONSTANT

ELEMENTWISE = frozenset("""
add sub mul div rem pow integer_pow max min neg abs sign floor ceil round nextafter
exp exp2 log log1p expm1 tanh logistic sin cos tan asin acos atan atan2 sinh cosh asinh acosh atanh
sqrt rsqrt cbrt square erf erfc erf_inv lgamma digamma igamma is_finite
eq ne lt le gt ge and or not xor select_n clamp add_any
""".split())

REDUCTIONS = frozenset("""
reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin
cumsum cumprod cummax cummin cumlogsumexp
""".split())


def node_flops(node) -> tuple[int, bool]:
    """(FLOPs of this node including its regions, whether the count is exact)."""
    if node.regions:
        return _region_flops(node, [graph_flops(r) for r in node.regions])
    return plain_flops(node), node.op.kind != "opaque"


def plain_flops(node) -> int:
    """FLOPs of a node without regions (exact unless the op is opaque: counted as 0)."""
    name = node.op.name
    if name == "dot_general":
        (lhs_contract, _), _ = node.params["dimension_numbers"]
        k = math.prod(node.inputs[0].type.shape[d] for d in lhs_contract)
        return 2 * node.outputs[0].type.size * k
    if name == "conv_general_dilated":
        rhs = node.inputs[1].type.shape
        out_feature_dim = node.params["dimension_numbers"].rhs_spec[0]
        per_output = math.prod(rhs) // max(rhs[out_feature_dim], 1)
        return 2 * node.outputs[0].type.size * per_output
    if name in ELEMENTWISE:
        return node.outputs[0].type.size
    if name in REDUCTIONS:
        return node.inputs[0].type.size
    return 0


def _region_flops(node, counts: list) -> tuple[int, bool]:
    """A region op's FLOPs from its regions' (FLOPs, exact) counts."""
    exact = all(e for _, e in counts)
    if node.op.name == "scan":
        return counts[0][0] * node.params["length"], exact
    if node.op.name == "cond":
        return max(c for c, _ in counts), False if len(counts) > 1 else exact
    if node.op.name == "while":
        return sum(c for c, _ in counts), False
    return sum(c for c, _ in counts), exact


def graph_flops(graph) -> tuple[int, bool]:
    """(total FLOPs, whether exact) over the graph's nodes."""
    return _sweep(graph)[1]


def param_stats(graph) -> tuple[int, int]:
    """(number of parameter elements, parameter bytes) over the graph's `param` inputs."""
    totals = graph._param_totals  # None after the inputs change
    if totals is None:
        params = graph.params()
        totals = graph._param_totals = (sum(p.type.size for p in params), sum(p.type.nbytes for p in params))
    return totals


def graph_bytes(graph) -> int:
    """Bytes of the weights the program carries: parameter inputs plus constants (regions included)."""
    return graph_stats(graph)[2]


def graph_stats(graph) -> tuple[int, int, int]:
    """(nodes, regions included; FLOPs; weight bytes as graph_bytes) in one sweep, for pass reports.

    >>> import graphopt, jax.numpy as jnp
    >>> graph_stats(graphopt.trace(lambda x: x * 2.0, jnp.ones(4)))
    (2, 4, 4)
    """
    nodes, (flops, _), constant_bytes = _sweep(graph)
    return nodes, flops, param_stats(graph)[1] + constant_bytes


def _sweep(graph) -> tuple[int, tuple[int, bool], int]:
    """(nodes, (FLOPs, exact), constant bytes) of `graph`, regions included. The graph keeps
    running totals over its own nodes (ir.Graph._count: a node's FLOPs are fixed by its op,
    params and types); only the nodes holding regions are visited, their regions swept, since
    a rewrite inside a region changes them."""
    nodes, flops, constant_bytes = len(graph), graph._plain_flops, graph._constant_bytes
    exact = not graph._opaque
    for node in graph._holders:
        counts = []
        for region in node.regions:
            n, count, b = _sweep(region)
            nodes, constant_bytes = nodes + n, constant_bytes + b
            counts.append(count)
        count, count_exact = _region_flops(node, counts)
        flops += count - node._flops  # its own count is in the total, as if it held no region
        exact = exact and count_exact
    return nodes, (flops, exact), constant_bytes

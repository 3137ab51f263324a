"""dce: remove nodes whose results nothing reads.

    %1 = sin %x          ─┐
    %2 = cos %x           │   %2 = cos %x
    return %2            ─┘   return %2

A node stays if any output is read (by a node or as a graph output) or it has effects (callbacks,
prints, RNG state). Dead nodes inside regions are removed too; a region's interface (its inputs
and outputs) is left as is, since the op holding it defines it. XLA removes dead code from the
compiled program anyway: this pass keeps graphopt's own graph small, so later passes, reports and
lowering do less work.

Contract: exact.
"""

from __future__ import annotations

from graphopt.ir import is_read
from graphopt.pipeline import register_pass


@register_pass("dce", layerwise=True)
def dce(graph, ctx):
    """Remove nodes whose results are unused and that have no effects."""
    removed = _dce(graph)
    if removed:
        ctx.count({"dead-node": removed})
    return graph


def _dce(graph) -> int:
    removed = 0
    node = graph._last
    while node is not None:
        prev = node._prev
        if not node.effects and not is_read(node):
            graph.erase(node)
            removed += 1
        else:
            for region in node.regions:
                removed += _dce(region)
        node = prev
    return removed

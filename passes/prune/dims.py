"""Dimensions for channel-dependency analysis: a union-find over axes, with products and concatenations.

Each axis of each value gets a `Dim`; `unify` makes two dims one (and unifies their parts, so
`[H*D] = [H, D]` meeting `[H'*D'] = [H', D']` gives H = H', D = D'); `decompose` states that a dim
is the product (a reshape) or concatenation (concatenate, slice, split) of others; `segment` finds
or makes the dim of a slice of another; `block` marks a dim as not prunable, with the reason.
The rules that apply these per op are in `passes/prune/rules.py`; the groups they give, in
`passes/prune/deps.py`.

Example:
    >>> hd, h, d = Dim(12), Dim(3), Dim(4)
    >>> decompose(hd, "product", [h, d])
    >>> head = segment(h, 1, 2, "at an example")
    >>> [hd.find().parts[0], h.find().parts[0], head.size]
    ['product', 'concat', 1]
"""

from __future__ import annotations

import numpy as np


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

"""What changed between two graphs, grouped by module path and by the pass that made the nodes.

`diff(before, after)` pairs the nodes of the two graphs (regions included) in program order by
what they compute: op, params, output types, module path and region; not by their operands, so
a node that a pass kept but rewired counts as kept. Nodes that stay unpaired are looked up once
more by that key alone, so a node a pass moved is kept too. What remains is removed (from
`before`) or added (to `after`); an added node's provenance names the pass that made it.
Scalar constants, which the listing shows inline at their uses, are left out, and so are the
nodes in a composite op's decomposition (raise_ops moves the nodes it matched there; the op
stands for them). Graph inputs are
compared by path, type and role (fold_params replaces weights by precomputed ones).

Passes rewrite a graph in place: keep a copy to compare with, `before = graph.clone()[0]`.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> from graphopt.pipeline import run_pipeline
    >>> before = graphopt.trace(lambda x: jnp.exp(-(-x)) * 2.0, jnp.ones(3))
    >>> after = run_pipeline(before.clone()[0], ["canonicalize", "dce"]).graph
    >>> d = diff(before, after)
    >>> [n.op.name for n in d.removed], [n.op.name for n in d.added]
    (['neg', 'neg'], [])
    >>> print(d)  # doctest: +ELLIPSIS
    diff <lambda>: 4 → 2 nodes (2 removed, 0 added)
    by module
      (top level)  −2
        − neg : f32[3]  ×2  # ...
"""

from __future__ import annotations

import dataclasses
import difflib
from collections import Counter
from typing import Iterator

from graphopt.nn_ops import CompositeOp
from graphopt.show import _format_params, _is_inline_constant

TOP_LEVEL = "(top level)"  # the module path of nodes outside any module


@dataclasses.dataclass
class Changes:
    """The nodes removed and added under one module path (or by one pass)."""

    removed: list = dataclasses.field(default_factory=list)
    added: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class GraphDiff:
    """The result of `diff`. `str()` renders it grouped by module path."""

    name: str
    nodes: tuple[int, int]      # (before, after), scalar constants left out
    removed: list               # nodes of `before` with no counterpart, in program order
    added: list                 # nodes of `after` with no counterpart, in program order
    inputs_removed: list        # graph inputs (Arguments) of `before` not in `after`
    inputs_added: list

    @property
    def by_module(self) -> dict[str, Changes]:
        """Module path → its removed and added nodes; modules in order of first appearance."""
        groups: dict[str, Changes] = {}
        for kind, nodes in (("removed", self.removed), ("added", self.added)):
            for node in nodes:
                path = node.provenance.module_path or TOP_LEVEL
                getattr(groups.setdefault(path, Changes()), kind).append(node)
        return groups

    @property
    def by_pass(self) -> dict[str, list]:
        """Pass name → the added nodes it made ("(traced)" for nodes no pass made). A node's
        `made_by` may name the rule too ("raise_ops/linear"); the pass is the part before "/"."""
        groups: dict[str, list] = {}
        for node in self.added:
            made_by = node.provenance.made_by or "(traced)"
            groups.setdefault(made_by.split("/")[0], []).append(node)
        return groups

    def __bool__(self) -> bool:
        return bool(self.removed or self.added or self.inputs_removed or self.inputs_added)

    def __str__(self) -> str:
        return self.format()

    def format(self, *, show_source: bool = True) -> str:
        """The text `str()` gives; `show_source=False` leaves out source lines."""
        lines = [f"diff {self.name}: {self.nodes[0]} → {self.nodes[1]} nodes "
                 f"({len(self.removed)} removed, {len(self.added)} added)"]
        if not self:
            return lines[0] + "\nno changes"
        if self.inputs_removed or self.inputs_added:
            lines.append("inputs")
            lines += [f"  − {_input_text(a)}" for a in self.inputs_removed]
            lines += [f"  + {_input_text(a)}" for a in self.inputs_added]
        by_pass, groups = self.by_pass, self.by_module
        if by_pass:
            lines.append("added by pass")
            lines += [f"  {name} +{len(nodes)}{_rules(name, nodes)}" for name, nodes in by_pass.items()]
        if groups:
            lines.append("by module")
        width = max(len(path) for path in groups) if groups else 0
        for path, changes in groups.items():
            counts = " ".join(f"{sign}{len(nodes)}" for sign, nodes in (("−", changes.removed), ("+", changes.added))
                              if nodes)
            lines.append(f"  {path:<{width}}  {counts}")
            lines += [f"    {line}" for line in summarize_nodes(changes.removed, "−", show_source)]
            lines += [f"    {line}" for line in summarize_nodes(changes.added, "+", show_source)]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from graphopt.show import diff_html

        return diff_html(self)


def diff(before, after) -> GraphDiff:
    """The nodes and inputs `after` lacks (removed) and has in addition (added), see the module doc."""
    old, new = list(_nodes(before)), list(_nodes(after))
    old_keys, new_keys = [k for k, _ in old], [k for k, _ in new]
    matcher = difflib.SequenceMatcher(None, old_keys, new_keys, autojunk=False)
    removed_at, added_at = [], []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            removed_at += range(i1, i2)
            added_at += range(j1, j2)
    # moved nodes: the same key removed in one place and added in another
    moved = Counter(old_keys[i] for i in removed_at) & Counter(new_keys[j] for j in added_at)
    removed = _drop_moved([old[i] for i in removed_at], Counter(moved))
    added = _drop_moved([new[j] for j in added_at], Counter(moved))
    old_inputs = Counter(_input_key(a) for a in before.inputs)
    new_inputs = Counter(_input_key(a) for a in after.inputs)
    return GraphDiff(
        name=after.name, nodes=(len(old), len(new)), removed=removed, added=added,
        inputs_removed=_drop_moved([(_input_key(a), a) for a in before.inputs], Counter(new_inputs)),
        inputs_added=_drop_moved([(_input_key(a), a) for a in after.inputs], Counter(old_inputs)))


def summarize_nodes(nodes: list, sign: str, show_source: bool = True) -> list[str]:
    """One line per distinct node text, with a count when it repeats: '− neg : f32[3]  ×2  # f.py:3'.
    An added node's line names the pass (and rule) that made it."""
    groups: dict[str, list] = {}
    for node in nodes:
        groups.setdefault(node_text(node), []).append(node)
    lines = []
    for text, group in groups.items():
        count = f"  ×{len(group)}" if len(group) > 1 else ""
        sources = list(dict.fromkeys(n.provenance.source for n in group if n.provenance.source))
        where = ", ".join(sources[:2]) + (", ..." if len(sources) > 2 else "") if show_source else ""
        made_by = group[0].provenance.made_by if sign == "+" else None
        notes = [s for s in (where, f"by {made_by}" if made_by else "") if s]
        lines.append(f"{sign} {text}{count}" + (f"  # {' · '.join(notes)}" if notes else ""))
    return lines


def node_text(node) -> str:
    """'op[params] : types', as in the listing, without operands."""
    return f"{node.op.name}{_format_params(node.params)} : {', '.join(str(v.type) for v in node.outputs)}"


def _nodes(graph, region: str = "") -> Iterator[tuple[tuple, object]]:
    """(key, node) for every node, regions included, in program order. A composite op's
    decomposition is not walked: the op stands for it (raise_ops moves the nodes it matched there)."""
    for node in graph.nodes:
        if not _is_inline_constant(node):
            yield (region, node_text(node), node.provenance.module_path), node
        if isinstance(node.op, CompositeOp):
            continue
        for r in node.regions:
            yield from _nodes(r, f"{region}/{node.op.name}.{r.name.split('.')[-1]}")


def _rules(pass_name: str, nodes: list) -> str:
    """' (linear ×7, layer-norm ×3)': the rules of `pass_name` that made the nodes, if named."""
    rules = Counter(n.provenance.made_by.partition("/")[2] for n in nodes if n.provenance.made_by)
    rules.pop("", None)
    return f" ({', '.join(f'{r} ×{c}' for r, c in rules.most_common())})" if rules else ""


def _drop_moved(items: list[tuple], moved: Counter) -> list:
    kept = []
    for key, item in items:
        if moved[key] > 0:
            moved[key] -= 1
        else:
            kept.append(item)
    return kept


def _input_key(arg) -> tuple:
    return (arg.path or f"arg{arg.index}", str(arg.type), arg.role)


def _input_text(arg) -> str:
    return f"%{arg.path or f'arg{arg.index}'}: {arg.type}" + (" param" if arg.role == "param" else "")

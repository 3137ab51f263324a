"""The quantizable layers of a graph, and the dry run: which rule picks which layer.

A *layer* is a top-level `dot_general`, `linear` (raise_ops' matmul + bias) or
`conv_general_dilated` node with one float operand computed from parameters only (its weight;
fold_params precomputes anything done to it) and one that is not (its activation). A layer is
named by its weight's largest source parameter (`params/block_0/mlp/Dense_0/kernel`): the path
layer rules (`graphopt.quant.rules`) match. A weight read by several dots (tied embeddings) gives
several layers with the same path, told apart by their order.

`dry_run(graph, scheme, rules)` says, without changing the graph, which rule matched each layer,
what scheme it gets, and which rules matched nothing (usually a typo in a path); `print()` it.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> from graphopt.quant.rules import Rule
    >>> params = {"body": jnp.ones((64, 64)), "head": jnp.ones((64, 10))}
    >>> g = graphopt.trace(lambda p, x: (x @ p["body"]) @ p["head"], params, jnp.ones((4, 64)),
    ...                    params_argnums=0)
    >>> plan = dry_run(g, "int8", [Rule(path="head$", scheme=None), Rule(path="typo", scheme="int4")])
    >>> [(d.layer.path, d.scheme) for d in plan.decisions]
    [('body', 'int8'), ('head', None)]
    >>> plan.unused
    [1]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp

from graphopt.param_derived import largest_source, param_derived_values
from graphopt.quant.rules import Decision, Layer, Rule, as_rule, plan

# graph op → (the quantized op that replaces it, the op kind rules match)
KINDS = {"dot_general": ("quantized_dot", "dot_general"), "linear": ("quantized_dot", "dot_general"),
         "conv_general_dilated": ("quantized_conv", "conv")}


@dataclasses.dataclass(frozen=True)
class Site:
    """A layer found in a graph: its node and which operand (0 or 1) is the weight."""

    layer: Layer
    node: Any
    side: int
    occurrence: int = 0   # among the layers reading the same parameter, in program order

    @property
    def kind(self) -> str:
        """'quantized_dot' or 'quantized_conv'."""
        return KINDS[self.node.op.name][0]


def find_layers(graph) -> list[Site]:
    """The layers of `graph` (top level), in program order."""
    derived, _ = param_derived_values(graph)
    found, occurrences = [], {}
    for node in graph.nodes:
        kind = KINDS.get(node.op.name)
        if kind is None:
            continue
        weights = [id(v) in derived for v in node.inputs[:2]]
        if weights[0] == weights[1]:
            continue
        side = weights.index(True)
        if side == 0 and node.op.name != "dot_general":
            continue  # a conv (or linear) whose *input* is the parameter: not a layer
        if not all(jnp.issubdtype(v.type.dtype, jnp.floating) for v in node.inputs[:2]):
            continue
        weight = node.inputs[side]
        source = largest_source(weight)
        path = source.path or f"input {source.index}"
        occurrence = occurrences[path] = occurrences.get(path, -1) + 1
        found.append(Site(Layer(path, kind[1], tuple(weight.type.shape)), node, side, occurrence))
    return found


@dataclasses.dataclass
class Plan:
    """Per layer: the rule that matched (None: the default scheme) and the scheme it gets."""

    sites: list[Site]
    decisions: list[Decision]
    rules: list[Rule]
    unused: list[int]           # indices of rules that matched no layer

    def __rich__(self):
        from rich.table import Table

        table = Table("layer", "op", "weight", "rule", "scheme", title="quantization plan", title_justify="left")
        for site, decision in zip(self.sites, self.decisions):
            rule = "default" if decision.rule is None else f"{decision.rule}: {self.rules[decision.rule].describe()}"
            scheme = "float (skipped)" if decision.scheme is None else getattr(decision.scheme, "name",
                                                                               decision.scheme)
            table.add_row(site.layer.path, site.layer.op, "×".join(map(str, site.layer.shape)), rule, str(scheme))
        return table

    def __str__(self):
        import io

        from rich.console import Console

        buffer = io.StringIO()
        console = Console(file=buffer, width=160, color_system=None)
        console.print(self)
        for index in self.unused:
            console.print(f"rule {index} ({self.rules[index].describe()}) matched no layer")
        return buffer.getvalue().rstrip()


def dry_run(graph, scheme="int8", rules: Sequence = ()) -> Plan:
    """What `quantize(scheme, rules=rules)` would do to each layer of `graph`, changing nothing.

    Run it on the graph as the quantize pass would see it (after the passes before it)."""
    return plan_sites(find_layers(graph), scheme, rules)


def plan_sites(sites: Sequence[Site], scheme, rules: Sequence) -> Plan:
    """The plan for layers already found (the quantize pass's own planning step)."""
    rules = [as_rule(r) for r in rules]
    decisions, unused = plan([s.layer for s in sites], rules, scheme)
    return Plan(list(sites), decisions, rules, unused)

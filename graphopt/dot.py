"""Graphviz DOT text of a graph: one cluster per module path (nested), regions as sub-clusters.

`to_dot(graph)` returns the text; render it with Graphviz (`dot -Tsvg graph.dot -o graph.svg`),
no Python package needed. Values are named as in the listing (`print(graph)`), so `%7` in the
picture is `%7` in the text. Each node shows its op and output type; its tooltip holds the full
listing line, module path, source line and the pass that made it. Nodes a pass made are shaded.
Scalar constants appear in the label of the node that reads them, as in the listing. A composite
op (layer_norm, attention, ...) is one node; `decompositions=True` also draws the nodes it stands
for, as a region.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> g = graphopt.trace(lambda x: jnp.tanh(x) * 2.0, jnp.ones(3))
    >>> print(to_dot(g, show_source=False))
    digraph "<lambda>" {
      graph [compound=true, fontname="Helvetica", fontsize=10, rankdir=TB];
      node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname="Helvetica", fontsize=10];
      edge [color="#555555"];
      v0 [label="%x\\nf32[3]", shape=ellipse, fillcolor="#dbe9f7", tooltip="input %x: f32[3]"];
      v1 [label="%0 = tanh\\nf32[3]", tooltip="%0 = tanh %x : f32[3]"];
      v2 [label="%1 = mul (2.0)\\nf32[3]", tooltip="%1 = mul %0, 2.0 : f32[3]"];
      v3 [label="return", shape=plain, style=""];
      v0 -> v1;
      v1 -> v2;
      v2 -> v3;
    }
"""

from __future__ import annotations

from graphopt.nn_ops import CompositeOp
from graphopt.show import _format_params, _is_inline_constant, _Namer, _scalar_text, _where

_INPUT_FILL = "#dbe9f7"
_PARAM_FILL = "#e6f4ea"
_MADE_BY_PASS_FILL = "#fff2cc"


def to_dot(graph, *, show_source: bool = True, decompositions: bool = False) -> str:
    """The graph as Graphviz DOT text; see the module docstring."""
    writer = _Writer(show_source, decompositions)
    lines = [
        f"digraph {_q(graph.name)} {{",
        '  graph [compound=true, fontname="Helvetica", fontsize=10, rankdir=TB];',
        '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname="Helvetica", fontsize=10];',
        '  edge [color="#555555"];',
    ]
    for arg in graph.inputs:
        name = writer.namer.input(arg)
        fill = _PARAM_FILL if arg.role == "param" else _INPUT_FILL
        kind = "param" if arg.role == "param" else "input"
        label, tooltip = _q(f"{name}\n{arg.type}"), _q(f"{kind} {name}: {arg.type}")
        lines.append(f"  {writer.id_of(arg)} [label={label}, shape=ellipse, fillcolor=\"{fill}\", "
                     f"tooltip={tooltip}];")
    lines += writer.body(graph, "  ", module_prefix="")
    lines += [f"  {edge}" for edge in writer.edges]
    lines.append("}")
    return "\n".join(lines)


class _Writer:
    def __init__(self, show_source: bool, decompositions: bool):
        self.namer = _Namer()
        self.show_source, self.decompositions = show_source, decompositions
        self.ids: dict[int, str] = {}
        self.clusters = 0
        self.edges: list[str] = []

    def id_of(self, value_or_node) -> str:
        key = id(value_or_node)
        if key not in self.ids:
            self.ids[key] = f"v{len(self.ids)}"
        return self.ids[key]

    def body(self, graph, indent: str, module_prefix: str) -> list[str]:
        """The nodes of `graph` in nested module clusters, then its return node."""
        tree = _Module(module_prefix)
        for node in graph.nodes:
            if _is_inline_constant(node):
                self.namer.inline(node.output, _scalar_text(node.params["value"], node.output.type))
                continue
            path = _relative(node.provenance.module_path, module_prefix)
            tree.at(path).items.append(self.node(node, indent))
        lines = self.render(tree, indent)
        ret = self.id_of(graph)
        lines.append(f"{indent}{ret} [label=\"return\", shape=plain, style=\"\"];")
        for value in dict.fromkeys(v for v in graph.outputs if _drawn(v)):
            self.edges.append(f"{self.source(value)} -> {ret};")
        return lines

    def node(self, node, indent: str):
        """A node's lines (its own, then its regions' clusters); deferred so that module clusters
        can be written in one piece. Names are given here, in program order, as in the listing."""
        outs = ", ".join(self.namer.define(v) for v in node.outputs)
        types = ", ".join(str(v.type) for v in node.outputs)
        constants = [self.namer.use(v) for v in node.inputs if not _drawn(v)]
        label = f"{outs} = {node.op.name}" + (f" ({', '.join(constants)})" if constants else "") + f"\n{types}"
        operands = ", ".join(self.namer.use(v) for v in node.inputs)
        tooltip = f"{outs} = {node.op.name}{_format_params(node.params)}{' ' if operands else ''}{operands} : {types}"
        where = _where(node) if self.show_source else ""
        tooltip += f"\n{where}" if where else ""
        me = self.id_of(node)
        style = f", fillcolor=\"{_MADE_BY_PASS_FILL}\"" if node.provenance.made_by else ""
        for value in dict.fromkeys(v for v in node.inputs if _drawn(v)):
            self.edges.append(f"{self.source(value)} -> {me};")
        lines = [f"{me} [label={_q(label)}, tooltip={_q(tooltip)}{style}];"]
        if isinstance(node.op, CompositeOp) and not self.decompositions:
            return lines
        for region in node.regions:
            lines += self.region(node, region)
        return lines

    def region(self, holder, region) -> list[str]:
        self.clusters += 1
        cluster = f"cluster_{self.clusters}"
        title = f"{holder.op.name} {region.name.split('.')[-1]}"
        lines = [f"subgraph {cluster} {{",
                 f"  label={_q(title)}; style=\"dashed,rounded\"; color=\"#888888\";"]
        for arg in region.inputs:
            name = self.namer.define(arg)
            label, tooltip = _q(f"{name}\n{arg.type}"), _q(f"region input {name}: {arg.type}")
            lines.append(f"  {self.id_of(arg)} [label={label}, shape=ellipse, fillcolor=\"{_INPUT_FILL}\", "
                         f"tooltip={tooltip}];")
        lines += self.body(region, "  ", holder.provenance.module_path)
        anchor = self.id_of(region.inputs[0]) if region.inputs else self.id_of(region)
        self.edges.append(f"{self.id_of(holder)} -> {anchor} [style=dashed, lhead={cluster}];")
        lines.append("}")
        return lines

    def source(self, value) -> str:
        return self.id_of(value) if value.node is None else self.id_of(value.node)

    def render(self, tree: "_Module", indent: str) -> list[str]:
        lines = []
        for item in tree.items:
            lines += [indent + line for line in item]
        for name, child in tree.children.items():
            self.clusters += 1
            lines.append(f"{indent}subgraph cluster_{self.clusters} {{")
            lines.append(f"{indent}  label={_q(name)}; tooltip={_q(child.path)}; style=rounded; "
                         "color=\"#4a6fa5\";")
            lines += self.render(child, indent + "  ")
            lines.append(f"{indent}}}")
        return lines


def _drawn(value) -> bool:
    """Whether the value is drawn (a graph or region input, or a node's output), not inlined."""
    return not (value.node is not None and _is_inline_constant(value.node))


class _Module:
    """A tree of module path segments; `items` are the nodes directly in this module."""

    def __init__(self, path: str = ""):
        self.path = path
        self.items: list[list[str]] = []
        self.children: dict[str, _Module] = {}

    def at(self, path: str) -> "_Module":
        module = self
        for part in [p for p in path.split("/") if p]:
            if part not in module.children:
                module.children[part] = _Module(f"{module.path}/{part}" if module.path else part)
            module = module.children[part]
        return module


def _relative(path: str, prefix: str) -> str:
    """`path` inside the module `prefix` (a region's nodes sit in their holder's cluster)."""
    if prefix and (path == prefix or path.startswith(prefix + "/")):
        return path[len(prefix):].lstrip("/")
    return path


def _q(text: str) -> str:
    """A DOT double-quoted string; newlines become DOT's centred line breaks."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

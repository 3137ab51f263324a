"""Views of a graph: the text listing (`print(graph)`), the summary (`graph.summary()`), and HTML.

The HTML views (`graph_html`, `summary_html`, `report_html`, `diff_html`) are self-contained
fragments (inline styles, no scripts, no network) for notebooks' `_repr_html_`. The DOT export is
in `graphopt.dot`, graph diffs in `graphopt.diff`.

The listing reads like a program: one line per node with its op, params, operands, output type,
and a trailing comment with its module path and source line. Scalar constants are shown inline at
their uses; regions are indented under the node that holds them.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> print(graphopt.trace(lambda x: jnp.tanh(x) * 2.0, jnp.ones(3)))  # doctest: +ELLIPSIS
    graph <lambda>(%x: f32[3]) {
      %0 = tanh %x : f32[3]  # ...
      %1 = mul %0, 2.0 : f32[3]  # ...
      return %1
    }
"""

from __future__ import annotations

import dataclasses
import html
import io
from collections import Counter

import numpy as np

from graphopt.cost import graph_flops, param_stats
from graphopt.types import dtype_name

_MAX_PARAM_CHARS = 60
_MAX_HEADER_CHARS = 120


def format_graph(graph, *, show_source: bool = True, decompositions: bool = True) -> str:
    """The text listing of a graph and its regions.

    `decompositions=False` leaves out the nodes a composite op (layer_norm, attention, ...) stands
    for: the op's line is kept, its "decomposition" region is not printed.
    """
    namer = _Namer()
    lines: list[str] = []
    inputs = [f"{namer.input(a)}: {a.type}" + (" param" if a.role == "param" and a.path else "")
              for a in graph.inputs]
    title = f"graph {graph.name}" if graph.name and graph.name != "graph" else "graph"
    header = f"{title}({', '.join(inputs)}) {{"
    if len(header) > _MAX_HEADER_CHARS:  # one input per line
        header = f"{title}(\n" + ",\n".join(f"    {i}" for i in inputs) + ") {"
    lines.append(header)
    _format_body(graph, namer, lines, "  ", show_source, decompositions)
    lines.append("}")
    return "\n".join(lines)


def _format_body(graph, namer, lines, indent, show_source, decompositions=True):
    for node in graph.nodes:
        if _is_inline_constant(node):
            namer.inline(node.output, _scalar_text(node.params["value"], node.output.type))
            continue
        outs = ", ".join(namer.define(v) for v in node.outputs)
        params = _format_params(node.params)
        operands = ", ".join(namer.use(v) for v in node.inputs)
        types = ", ".join(str(v.type) for v in node.outputs)
        line = f"{indent}{outs} = {node.op.name}{params}{' ' if operands else ''}{operands} : {types}"
        where = _where(node) if show_source else ""
        if node.regions and (decompositions or not _is_composite(node)):
            lines.append(line + " {" + (f"  # {where}" if where else ""))
            for region in node.regions:
                args = ", ".join(f"{namer.define(a)}: {a.type}" for a in region.inputs)
                lines.append(f"{indent}  {region.name.split('.')[-1]}({args}) {{")
                _format_body(region, namer, lines, indent + "    ", show_source, decompositions)
                lines.append(f"{indent}  }}")
            lines.append(f"{indent}}}")
        else:
            lines.append(line + (f"  # {where}" if where else ""))
    lines.append(f"{indent}return {', '.join(namer.use(v) for v in graph.outputs)}")


def _where(node) -> str:
    prov = node.provenance
    parts = [p for p in (prov.module_path, prov.source) if p]
    if prov.made_by:
        parts.append(f"by {prov.made_by}")
    return " · ".join(parts)


def _is_composite(node) -> bool:
    """A graphopt op whose region is only its decomposition (what it stands for)."""
    from graphopt.nn_ops import CompositeOp

    return isinstance(node.op, CompositeOp)


def _is_inline_constant(node) -> bool:
    return node.op.name == "constant" and node.output.type.ndim == 0


def _scalar_text(value, type) -> str:
    v = np.asarray(value).item()
    text = repr(v) if not isinstance(v, float) else (repr(v) if np.isfinite(v) else str(v))
    return text if type.dtype in (np.float32, np.int32, np.bool_) else f"{text}:{dtype_name(type.dtype)}"


def _format_params(params: dict) -> str:
    shown = []
    for key, value in sorted(params.items()):
        if value is None or key == "value":
            continue
        text = _param_text(value)
        if len(text) > _MAX_PARAM_CHARS:
            text = text[:_MAX_PARAM_CHARS - 3] + "..."
        shown.append(f"{key}={text}")
    if "value" in params:
        shown.insert(0, f"value=<{np.shape(params['value'])}>")
    return f"[{' '.join(shown)}]" if shown else ""


def _param_text(value) -> str:
    if isinstance(value, np.dtype) or type(value).__name__ == "dtype":
        return dtype_name(value)
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_param_text(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if callable(value) and hasattr(value, "__name__"):
        return value.__name__
    text = str(value)
    return "{...}" if "\n" in text else text


class _Namer:
    """Names values %0, %1, ... in order of definition; inputs by their path."""

    def __init__(self):
        self.names: dict[int, str] = {}
        self.count = 0

    def input(self, arg) -> str:
        base = arg.path or f"arg{arg.index}"
        name = "%" + base
        self.names[id(arg)] = name
        return name

    def define(self, value) -> str:
        name = f"%{self.count}"
        self.count += 1
        self.names[id(value)] = name
        return name

    def inline(self, value, text: str) -> None:
        self.names[id(value)] = text

    def use(self, value) -> str:
        return self.names.get(id(value), "%?")


@dataclasses.dataclass
class Summary:
    """Counts by op, parameter count and bytes, FLOPs. `str()` renders a table."""

    name: str
    nodes: int                 # including nodes inside regions
    op_counts: Counter
    params: int
    param_bytes: int
    flops: int
    flops_exact: bool
    inputs: int
    outputs: int

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table

        head = Table.grid(padding=(0, 2))
        head.add_row("graph", self.name)
        head.add_row("nodes", f"{self.nodes:,} (regions included)")
        head.add_row("parameters", f"{self.params:,} ({_bytes(self.param_bytes)})")
        head.add_row("FLOPs", f"{self.flops:,}" + ("" if self.flops_exact else " (lower bound)"))
        head.add_row("inputs / outputs", f"{self.inputs} / {self.outputs}")
        ops = Table("op", "count", box=None, pad_edge=False)
        for op, count in self.op_counts.most_common():
            ops.add_row(op, str(count))
        return Group(head, ops)

    def __str__(self) -> str:
        from rich.console import Console

        buffer = io.StringIO()
        Console(file=buffer, width=100, color_system=None, force_terminal=False).print(self)
        return buffer.getvalue().rstrip()

    def _repr_html_(self) -> str:
        return summary_html(self)


def summarize(graph) -> Summary:
    counts = Counter(node.op.name for node in graph.walk())
    flops, exact = graph_flops(graph)
    params, param_bytes = param_stats(graph)
    return Summary(graph.name, sum(counts.values()), counts, params, param_bytes, flops, exact,
                   len(graph.inputs), len(graph.outputs))


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# --- HTML ----------------------------------------------------------------------------------------

_TABLE = 'style="border-collapse:collapse;font-family:monospace;font-size:12px"'
_CELL = 'style="border:1px solid #ccc;padding:2px 6px;text-align:{align}"'


def _html_table(header: list[str], rows: list[list], caption: str = "", numeric: set[int] = frozenset()) -> str:
    def cell(tag, text, i):
        align = "right" if i in numeric else "left"
        return f"<{tag} {_CELL.format(align=align)}>{html.escape(str(text))}</{tag}>"

    head = "".join(cell("th", h, i) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", c, i) for i, c in enumerate(row)) + "</tr>" for row in rows)
    title = f"<caption style=\"text-align:left;font-weight:bold\">{html.escape(caption)}</caption>" if caption else ""
    return f"<table {_TABLE}>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def summary_html(summary: Summary) -> str:
    """A Summary as an HTML fragment: the totals, then the op counts.

    >>> import graphopt, jax.numpy as jnp
    >>> text = summary_html(graphopt.trace(lambda x: jnp.tanh(x) * 2, jnp.ones(3)).summary())
    >>> text.startswith("<div") and "<td" in text and "tanh" in text
    True
    """
    flops = f"{summary.flops:,}" + ("" if summary.flops_exact else " (lower bound)")
    totals = [["nodes", f"{summary.nodes:,} (regions included)"],
              ["parameters", f"{summary.params:,} ({_bytes(summary.param_bytes)})"],
              ["FLOPs", flops], ["inputs / outputs", f"{summary.inputs} / {summary.outputs}"]]
    ops = [[op, count] for op, count in summary.op_counts.most_common()]
    return (f"<div>{_html_table(['graph', summary.name], totals)}<br>"
            f"{_html_table(['op', 'count'], ops, numeric={1})}</div>")


def report_html(report) -> str:
    """A pipeline Report (graphopt.pipeline.Report) as an HTML table, with the columns of `str(report)`.

    >>> import graphopt, jax.numpy as jnp
    >>> from graphopt.pipeline import run_pipeline
    >>> result = run_pipeline(graphopt.trace(lambda x: -(-x), jnp.ones(3)), ["canonicalize", "dce"])
    >>> "canonicalize" in report_html(result.report) and "neg-neg" in report_html(result.report)
    True
    """
    from graphopt.pipeline import _arrow, _count, size_str

    rows = []
    for r in report.records:
        rules = ", ".join(f"{k.removeprefix(r.name + '/')}×{v}" for k, v in r.fired.most_common())
        name = r.name if r.status == "ok" else f"{r.name} ({r.status})"
        rows.append([name, r.contract, _arrow(*r.nodes), _arrow(*r.flops, _count), _arrow(*r.bytes, size_str),
                     f"{r.seconds * 1e3:.1f}", "" if r.error is None else f"{r.error:.2g}", rules])
    header = ["pass", "contract", "nodes", "FLOPs", "bytes", "ms", "error", "rules fired"]
    return f"<div>{_html_table(header, rows, 'graphopt pipeline', numeric={2, 3, 4, 5, 6})}</div>"


def graph_html(graph, *, max_lines: int = 2000) -> str:
    """A graph as HTML: its summary and its listing (the first `max_lines` lines), collapsible.

    >>> import graphopt, jax.numpy as jnp
    >>> "%0 = tanh %x" in graph_html(graphopt.trace(lambda x: jnp.tanh(x), jnp.ones(3)))
    True
    """
    lines = format_graph(graph).splitlines()
    more = f"\n... {len(lines) - max_lines} more lines" if len(lines) > max_lines else ""
    listing = html.escape("\n".join(lines[:max_lines]) + more)
    return (f"<div>{summary_html(summarize(graph))}<details><summary>listing ({len(lines)} lines)</summary>"
            f"<pre style=\"font-size:12px\">{listing}</pre></details></div>")


def diff_html(d) -> str:
    """A GraphDiff (graphopt.diff) as HTML: added nodes by pass, then changes by module path.

    >>> import graphopt, jax.numpy as jnp
    >>> from graphopt.diff import diff
    >>> g = graphopt.trace(lambda x: -(-x), jnp.ones(3))
    >>> "neg" in diff_html(diff(g, graphopt.trace(lambda x: x + 0, jnp.ones(3))))
    True
    """
    from graphopt.diff import summarize_nodes

    head = (f"<p style=\"font-family:monospace\">diff {html.escape(d.name)}: {d.nodes[0]} → {d.nodes[1]} nodes "
            f"({len(d.removed)} removed, {len(d.added)} added)</p>")
    by_pass = [[name, len(nodes)] for name, nodes in d.by_pass.items()]
    rows = []
    for path, changes in d.by_module.items():
        for sign, nodes in (("−", changes.removed), ("+", changes.added)):
            rows += [[path, line] for line in summarize_nodes(nodes, sign)]
    inputs = [["inputs", f"− {a.path or a.index}: {a.type}"] for a in d.inputs_removed] + \
             [["inputs", f"+ {a.path or a.index}: {a.type}"] for a in d.inputs_added]
    parts = [head]
    if by_pass:
        parts.append(_html_table(["pass", "nodes added"], by_pass, numeric={1}) + "<br>")
    parts.append(_html_table(["module", "change"], inputs + rows))
    return "<div>" + "".join(parts) + "</div>"


def treescope_rendering(graph, path, subtree_renderer):
    """The graph for treescope (`Graph.__treescope_repr__`): its inputs, its listing lines grouped
    by module path (foldable in a notebook), and its outputs. Regions stay under their node."""
    from treescope import repr_lib

    listing = format_graph(graph, decompositions=False).splitlines()
    modules: dict[str, list[str]] = {}
    current = None
    for line in listing[1:-1]:
        if line.startswith("  %"):  # a top-level node; deeper lines belong to its regions
            module = line.split("  # ", 1)[1].split(" · ")[0] if "  # " in line else ""
            if ":" in module and "/" not in module:
                module = ""  # only a source line: no module path
            current = modules.setdefault(module or "(no module)", [])
        if current is not None and not line.lstrip().startswith("return"):
            current.append(line.strip())
    attributes = {"name": graph.name,
                  "inputs": [f"{a.path or a.index}: {a.type}" + (" param" if a.role == "param" else "")
                             for a in graph.inputs],
                  "nodes by module": modules,
                  "outputs": [str(v.type) for v in graph.outputs]}
    return repr_lib.render_object_constructor(type(graph), attributes, path, subtree_renderer)

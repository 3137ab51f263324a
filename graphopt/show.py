"""Views of a graph: the text listing (`print(graph)`) and the summary (`graph.summary()`).

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
import io
from collections import Counter

import numpy as np

from graphopt.cost import graph_flops, param_stats
from graphopt.types import dtype_name

_MAX_PARAM_CHARS = 60


def format_graph(graph, *, show_source: bool = True) -> str:
    """The text listing of a graph and its regions."""
    namer = _Namer()
    lines: list[str] = []
    header = ", ".join(f"{namer.input(a)}: {a.type}" + (" param" if a.role == "param" and a.path else "")
                       for a in graph.inputs)
    title = f"graph {graph.name}" if graph.name and graph.name != "graph" else "graph"
    lines.append(f"{title}({header}) {{")
    _format_body(graph, namer, lines, "  ", show_source)
    lines.append("}")
    return "\n".join(lines)


def _format_body(graph, namer, lines, indent, show_source):
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
        if node.regions:
            lines.append(line + " {" + (f"  # {where}" if where else ""))
            for region in node.regions:
                args = ", ".join(f"{namer.define(a)}: {a.type}" for a in region.inputs)
                lines.append(f"{indent}  {region.name.split('.')[-1]}({args}) {{")
                _format_body(region, namer, lines, indent + "    ", show_source)
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

"""A self-contained HTML report of an optimization: the graph, the per-pass table, the changes.

`html_report(before, after, report)` returns one HTML file (inline CSS and script, nothing fetched
from the network) with three sections:

- the graph (`after`, or `before` alone): its nodes grouped by module path in sections that fold
  and unfold, a search box that keeps the nodes whose name, op or module path contains the text,
  and a details panel that shows the clicked node's op, output types, params, module path, source
  line, the pass that made it, and its operands and users (click one to go there);
- the per-pass table of a `graphopt.pipeline.Report`: nodes, FLOPs, bytes and time of each pass,
  the error translation validation measured, and the rules that fired;
- what changed from `before` to `after` (`graphopt.diff`): node counts, FLOPs and parameters,
  the nodes added by each pass, and the nodes removed and added under each module path.

Values are named as in the listing (`print(graph)`), so `%7` in the report is `%7` in the text.
The data travels as one JSON blob (`<script type="application/json" id="graphopt-data">`, with
`<`, `>` and `&` escaped) that the page's script renders with `textContent`: a param holding
markup stays text. `graphopt optimize MODEL --html FILE` writes the report from the command line.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> from graphopt.pipeline import run_pipeline
    >>> before = graphopt.trace(lambda x: jnp.tanh(-(-x)), jnp.ones(3))
    >>> result = run_pipeline(before.clone()[0], ["canonicalize", "dce"])
    >>> page = html_report(before, result.graph, result.report)
    >>> page.startswith("<!DOCTYPE html>"), "http://" in page or "https://" in page
    (True, False)
    >>> [n["line"] for n in report_data(before, result.graph, result.report)["graph"]["nodes"]]
    ['%0 = tanh %x : f32[3]']
"""

from __future__ import annotations

import html
import json

from graphopt.show import _format_params, _is_composite, _is_inline_constant, _Namer, _param_text, _scalar_text

_MAX_PARAM_CHARS = 2000  # the listing cuts params at 60 characters; the details panel shows more


def html_report(before, after=None, report=None, *, title: str | None = None,
                decompositions: bool = False) -> str:
    """The report as one HTML page; see the module docstring. `decompositions=True` also shows the
    nodes each composite op (layer_norm, attention, ...) stands for, as `format_graph` does."""
    data = report_data(before, after, report, decompositions=decompositions)
    title = title or f"graphopt: {data['graph']['name']}"
    blob = json.dumps(data, ensure_ascii=True).replace("<", "\\u003c").replace(">", "\\u003e") \
        .replace("&", "\\u0026")
    return _PAGE.format(title=html.escape(title), css=_CSS, data=blob, script=_SCRIPT)


def write_html_report(path, before, after=None, report=None, **options) -> None:
    """Write `html_report(before, after, report, **options)` to the file `path`."""
    with open(path, "w", encoding="utf-8") as file:
        file.write(html_report(before, after, report, **options))


def report_data(before, after=None, report=None, *, decompositions: bool = False) -> dict:
    """The JSON-ready data the page renders: {"graph", "passes", "diff", "summary"}."""
    graph = before if after is None else after
    data = {"graph": _graph_data(graph, decompositions), "passes": _passes_data(report),
            "diff": None if after is None else _diff_data(before, after),
            "summary": [_summary_data(g) for g in ((before,) if after is None else (before, after))]}
    return data


def _graph_data(graph, decompositions: bool) -> dict:
    """Nodes in program order, named as `format_graph(graph, decompositions=...)` names them."""
    namer, nodes, ids = _Namer(), [], {}
    inputs = [{"name": namer.input(a), "type": str(a.type), "role": a.role} for a in graph.inputs]

    def walk(g, region):
        for node in g.nodes:
            if _is_inline_constant(node):
                namer.inline(node.output, _scalar_text(node.params["value"], node.output.type))
                continue
            outs = ", ".join(namer.define(v) for v in node.outputs)
            operands = [namer.use(v) for v in node.inputs]
            types = ", ".join(str(v.type) for v in node.outputs)
            ids.update({id(v): len(nodes) for v in node.outputs})
            prov = node.provenance
            nodes.append({
                "name": outs, "op": node.op.name, "types": types, "module": prov.module_path,
                "line": f"{outs} = {node.op.name}{_format_params(node.params)}"
                        f"{' ' if operands else ''}{', '.join(operands)} : {types}",
                "params": _params(node.params), "source": prov.source, "made_by": prov.made_by or "",
                "region": region, "operands": [[name, ids.get(id(v))] for name, v in zip(operands, node.inputs)],
                "users": [id(u) for v in node.outputs for u in v.users()]})
            nodes[-1]["_node"] = id(node)
            if node.regions and (decompositions or not _is_composite(node)):
                for r in node.regions:
                    for a in r.inputs:
                        namer.define(a)
                    walk(r, f"{outs} = {node.op.name} · {r.name.split('.')[-1]}")

    walk(graph, "")
    index = {n.pop("_node"): i for i, n in enumerate(nodes)}
    for n in nodes:
        n["users"] = list(dict.fromkeys(index[u] for u in n["users"] if u in index))
    outputs = [namer.use(v) for v in graph.outputs]
    return {"name": graph.name, "inputs": inputs, "nodes": nodes, "outputs": outputs}


def _params(params: dict) -> list[list[str]]:
    shown = []
    for key, value in sorted(params.items()):
        if value is None:
            continue
        if key == "value":
            import numpy as np

            text = f"<array of shape {np.shape(value)}>"
        else:
            text = _param_text(value)
        if len(text) > _MAX_PARAM_CHARS:
            text = text[:_MAX_PARAM_CHARS - 3] + "..."
        shown.append([key, text])
    return shown


def _passes_data(report) -> list[dict]:
    from graphopt.pipeline import _arrow, _count, size_str

    rows = []
    for r in (report.records if report is not None else []):
        rules = ", ".join(f"{k.removeprefix(r.name + '/')}×{v}" for k, v in r.fired.most_common())
        rows.append({"pass": r.name, "status": r.status, "contract": r.contract,
                     "nodes": _arrow(*r.nodes), "flops": _arrow(*r.flops, _count),
                     "bytes": _arrow(*r.bytes, size_str), "ms": f"{r.seconds * 1e3:.1f}",
                     "error": "" if r.error is None else f"{r.error:.2g}", "rules": rules,
                     "notes": [str(n) for n in r.notes]})
    return rows


def _diff_data(before, after) -> dict:
    from graphopt.diff import _input_text, _rules, diff, summarize_nodes

    d = diff(before, after)
    return {
        "nodes": list(d.nodes), "removed": len(d.removed), "added": len(d.added),
        "inputs": [f"− {_input_text(a)}" for a in d.inputs_removed] + [f"+ {_input_text(a)}" for a in d.inputs_added],
        "by_pass": [{"pass": name, "added": len(nodes), "rules": _rules(name, nodes).strip(" ()")}
                    for name, nodes in d.by_pass.items()],
        "by_module": [{"module": path, "removed": len(c.removed), "added": len(c.added),
                       "lines": summarize_nodes(c.removed, "−") + summarize_nodes(c.added, "+")}
                      for path, c in d.by_module.items()]}


def _summary_data(graph) -> dict:
    from graphopt.show import _bytes

    s = graph.summary()
    return {"name": s.name, "nodes": s.nodes, "flops": f"{s.flops:,}" + ("" if s.flops_exact else " (lower bound)"),
            "params": f"{s.params:,} ({_bytes(s.param_bytes)})"}


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<h1 id="title">{title}</h1>
<div id="summary"></div>
<h2>Graph</h2>
<div id="graph-view">
  <div id="graph-pane">
    <div id="toolbar"><input id="search" type="search" placeholder="search name, op or module path"
      autocomplete="off"> <button id="expand-all">expand all</button> <button id="collapse-all">collapse
      all</button> <span id="matches"></span></div>
    <div id="tree"></div>
  </div>
  <aside id="details"><p class="hint">Click a node to see its details.</p></aside>
</div>
<h2>Passes</h2>
<div id="passes"></div>
<h2>Before and after</h2>
<div id="diff"></div>
<script type="application/json" id="graphopt-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""

_CSS = """
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 1em 2em; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 17px; margin-top: 1.5em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-family: monospace; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
td.num { text-align: right; } tr.failed td { background: #fde2e1; }
#graph-view { display: flex; gap: 1em; align-items: flex-start; }
#graph-pane { flex: 3; min-width: 0; }
#details { flex: 2; position: sticky; top: 0.5em; border: 1px solid #ccc; padding: 0.5em 1em;
  background: #fafafa; max-height: 90vh; overflow: auto; font-size: 13px; }
#details table { margin-top: 0.3em; } #details pre { white-space: pre-wrap; word-break: break-all; } #details .label { color: #666; }
#toolbar { margin-bottom: 0.5em; } #search { width: 22em; } #matches { color: #666; }
#tree { font-family: monospace; font-size: 12px; max-height: 75vh; overflow: auto;
  border: 1px solid #eee; padding: 0.3em; }
details.module { margin-left: 1em; } details.module > summary { cursor: pointer; color: #2a4f86;
  font-weight: bold; } .count { color: #888; font-weight: normal; }
.node { white-space: pre; cursor: pointer; padding: 0 0.3em; margin-left: 1em; }
.node:hover { background: #eef3fb; } .node.selected { background: #cfe0fb; }
.node.made { background: #fff2cc; } .node.match { outline: 1px solid #e0a800; }
.node .region { color: #888; } .hidden { display: none; }
.inputs { color: #555; white-space: pre-wrap; }
a.ref { color: #2a4f86; cursor: pointer; text-decoration: underline; }
.hint { color: #888; } .removed { color: #a40000; } .added { color: #1a6b1a; }
"""

# Everything from the data is put in the page with textContent, never as markup.
_SCRIPT = r"""
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("graphopt-data").textContent);
  const nodes = data.graph.nodes;
  const rows = [];
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c instanceof Node ? c : String(c));
    return e;
  }
  function table(header, body, numeric) {
    const t = el("table", {}, el("thead", {}, el("tr", {}, ...header.map(h => el("th", {}, h)))));
    const tb = el("tbody");
    for (const row of body) {
      const tr = el("tr", row.cls ? {class: row.cls} : {});
      (row.cells || row).forEach((c, i) => tr.append(el("td", numeric.has(i) ? {class: "num"} : {}, c)));
      tb.append(tr);
    }
    t.append(tb);
    return t;
  }

  // --- summary
  const s = data.summary;
  const names = s.length === 2 ? ["before", "after"] : ["graph"];
  document.getElementById("summary").append(table(["", ...names],
    ["nodes", "flops", "params"].map(k => [{nodes: "nodes (regions included)", flops: "FLOPs", params: "parameters"}[k],
                                           ...s.map(x => typeof x[k] === "number" ? x[k].toLocaleString("en") : x[k])]),
    new Set([1, 2])));

  // --- graph: a tree of module sections
  const tree = document.getElementById("tree");
  const inputs = data.graph.inputs.map(a => a.name + ": " + a.type + (a.role === "param" ? " param" : ""));
  tree.append(el("div", {class: "inputs"}, "graph " + data.graph.name + "(" + inputs.join(", ") + ")"));
  const modules = new Map([["", tree]]);
  function section(path) {
    if (modules.has(path)) return modules.get(path);
    const cut = path.lastIndexOf("/");
    const parent = section(cut < 0 ? "" : path.slice(0, cut));
    const d = el("details", {class: "module", open: "", "data-module": path});
    const count = el("span", {class: "count"});
    d.append(el("summary", {}, path.slice(cut + 1) + " ", count));
    d.count = count; d.total = 0;
    parent.append(d);
    modules.set(path, d);
    return d;
  }
  nodes.forEach((n, i) => {
    const row = el("div", {class: "node" + (n.made_by ? " made" : ""), "data-id": String(i), "data-name": n.name,
                           title: [n.module, n.source, n.made_by && "by " + n.made_by].filter(Boolean).join(" · ")},
                   n.line);
    if (n.region) row.append(el("span", {class: "region"}, "   in " + n.region));
    row.addEventListener("click", () => select(i));
    section(n.module).append(row);
    rows.push(row);
    for (let p = n.module; p; p = p.includes("/") ? p.slice(0, p.lastIndexOf("/")) : "") modules.get(p).total++;
  });
  tree.append(el("div", {class: "inputs"}, "return " + data.graph.outputs.join(", ")));
  for (const [path, d] of modules) if (path) d.count.textContent = "(" + d.total + ")";

  // --- details panel
  const details = document.getElementById("details");
  function ref(i, text) {
    const a = el("a", {class: "ref"}, text);
    a.addEventListener("click", () => select(i));
    return a;
  }
  function select(i) {
    const n = nodes[i];
    rows.forEach(r => r.classList.remove("selected"));
    rows[i].classList.add("selected");
    for (let d = rows[i].parentElement; d && d !== tree; d = d.parentElement) if (d.tagName === "DETAILS") d.open = true;
    rows[i].scrollIntoView({block: "nearest"});
    const field = (label, value) => el("div", {}, el("span", {class: "label"}, label + ": "), value);
    const operands = el("span");
    n.operands.forEach(([name, at], k) => {
      if (k) operands.append(", ");
      operands.append(at === null ? name : ref(at, name));
    });
    const users = el("span");
    n.users.forEach((u, k) => { if (k) users.append(", "); users.append(ref(u, nodes[u].name)); });
    details.replaceChildren(
      el("h3", {id: "details-name"}, n.name + " = " + n.op),
      field("type", el("span", {id: "details-type"}, n.types)),
      field("module", el("span", {id: "details-module"}, n.module || "(top level)")),
      field("source", el("span", {id: "details-source"}, n.source || "(unknown)")),
      field("made by", el("span", {id: "details-made-by"}, n.made_by || "(traced)")),
      ...(n.region ? [field("region", n.region)] : []),
      field("operands", n.operands.length ? operands : "(none)"),
      field("used by", n.users.length ? users : "(graph output or unused)"),
      n.params.length ? table(["param", "value"], n.params, new Set()) : field("params", "(none)"),
      el("pre", {}, n.line));
  }

  // --- search
  const search = document.getElementById("search");
  const matches = document.getElementById("matches");
  search.addEventListener("input", () => {
    const q = search.value.trim().toLowerCase();
    const shown = new Set([""]);
    let count = 0;
    nodes.forEach((n, i) => {
      const hit = !q || [n.name, n.op, n.module, n.line].some(t => t.toLowerCase().includes(q));
      rows[i].classList.toggle("hidden", !hit);
      rows[i].classList.toggle("match", hit && !!q);
      if (hit) {
        count++;
        for (let p = n.module; p; p = p.includes("/") ? p.slice(0, p.lastIndexOf("/")) : "") shown.add(p);
      }
    });
    for (const [path, d] of modules) if (path) {
      d.classList.toggle("hidden", !shown.has(path));
      if (q && shown.has(path)) d.open = true;
    }
    matches.textContent = q ? count + " of " + nodes.length + " nodes" : "";
  });
  const fold = open => () => { for (const [path, d] of modules) if (path) d.open = open; };
  document.getElementById("expand-all").addEventListener("click", fold(true));
  document.getElementById("collapse-all").addEventListener("click", fold(false));

  // --- passes
  const passes = document.getElementById("passes");
  if (data.passes.length) {
    passes.append(table(["pass", "contract", "nodes", "FLOPs", "bytes", "ms", "error", "rules fired"],
      data.passes.map(r => ({cls: r.status === "ok" ? "" : "failed",
                             cells: [r.status === "ok" ? r.pass : r.pass + " (" + r.status + ")", r.contract,
                                     r.nodes, r.flops, r.bytes, r.ms, r.error, r.rules]})),
      new Set([2, 3, 4, 5, 6])));
  } else passes.append(el("p", {class: "hint"}, "No pipeline report."));

  // --- before and after
  const diff = document.getElementById("diff");
  const d = data.diff;
  if (!d) diff.append(el("p", {class: "hint"}, "Only one graph: nothing to compare."));
  else {
    diff.append(el("p", {}, d.nodes[0] + " → " + d.nodes[1] + " nodes (" + d.removed + " removed, " +
                   d.added + " added; scalar constants left out)"));
    if (d.inputs.length) diff.append(table(["inputs"], d.inputs.map(x => [x]), new Set()));
    if (d.by_pass.length) {
      diff.append(el("h3", {}, "Added by pass"));
      diff.append(table(["pass", "nodes added", "rules"], d.by_pass.map(p => [p.pass, p.added, p.rules]), new Set([1])));
    }
    if (d.by_module.length) {
      diff.append(el("h3", {}, "By module"));
      const body = el("tbody");
      for (const m of d.by_module) {
        body.append(el("tr", {}, el("td", {rowspan: String(m.lines.length + 1)}, m.module),
                       el("td", {class: "num"}, "−" + m.removed + " +" + m.added)));
        for (const line of m.lines)
          body.append(el("tr", {}, el("td", {class: line.startsWith("+") ? "added" : "removed"}, line)));
      }
      diff.append(el("table", {id: "by-module"}, el("thead", {}, el("tr", {}, el("th", {}, "module"),
                                                                   el("th", {}, "change"))), body));
    }
    if (!d.removed && !d.added && !d.inputs.length) diff.append(el("p", {}, "No changes."));
  }
})();
"""

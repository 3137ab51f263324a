"""Graphviz DOT export: clusters per module path, regions as sub-clusters, every node once, every edge."""

import re
import shutil
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import graphopt
from graphopt.dot import to_dot
from graphopt.pipeline import run_pipeline
from graphopt.show import format_graph
from models.blocks import Block

_NODE = re.compile(r'^\s*(v\d+) \[label="([^"\\]*(?:\\.[^"\\]*)*)"')
_EDGE = re.compile(r"^\s*(v\d+) -> (v\d+)")


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jax.lax.scan(lambda c, v: (c + nn.Dense(3, name="cell")(v), None), x[0], x)[0]


def _parse(text: str):
    """{node id: (label, cluster label path)}, [(src, dst)], {cluster label path}: from DOT text."""
    nodes, edges, clusters, stack = {}, [], set(), []
    for line in text.splitlines()[1:]:
        if line.strip().startswith("subgraph cluster_"):
            stack.append(None)
        elif stack and stack[-1] is None and line.strip().startswith("label="):
            stack[-1] = re.match(r'\s*label="([^"]*)"', line).group(1)
            clusters.add(tuple(stack))
        elif line.strip() == "}":
            if stack:
                stack.pop()
        elif (m := _NODE.match(line)):
            assert m.group(1) not in nodes, f"{m.group(1)} declared twice"
            nodes[m.group(1)] = (m.group(2), tuple(stack))
        elif (m := _EDGE.match(line)):
            edges.append((m.group(1), m.group(2)))
    return nodes, edges, clusters


def test_exact_dot_of_a_small_function():
    g = graphopt.trace(lambda x: jnp.tanh(x) * 2.0, jnp.ones(3))
    assert to_dot(g, show_source=False) == "\n".join([
        'digraph "<lambda>" {',
        '  graph [compound=true, fontname="Helvetica", fontsize=10, rankdir=TB];',
        '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname="Helvetica", fontsize=10];',
        '  edge [color="#555555"];',
        '  v0 [label="%x\\nf32[3]", shape=ellipse, fillcolor="#dbe9f7", tooltip="input %x: f32[3]"];',
        '  v1 [label="%0 = tanh\\nf32[3]", tooltip="%0 = tanh %x : f32[3]"];',
        '  v2 [label="%1 = mul (2.0)\\nf32[3]", tooltip="%1 = mul %0, 2.0 : f32[3]"];',
        '  v3 [label="return", shape=plain, style=""];',
        "  v0 -> v1;",
        "  v1 -> v2;",
        "  v2 -> v3;",
        "}",
    ])


def _block(pipeline="default"):
    x = jnp.ones((2, 4, 16))
    variables = Block().init(jax.random.key(0), x)
    return run_pipeline(graphopt.trace(Block().apply, variables, x), pipeline).graph


@pytest.mark.parametrize("pipeline", ["none", "default"])
def test_every_node_once_in_its_module_cluster(pipeline):
    g = _block(pipeline)
    nodes, edges, clusters = _parse(to_dot(g))
    assert {("Block",), ("Block", "ln"), ("Block", "up"), ("Block", "down")} <= clusters
    # the listing's names, in program order, for the graph's nodes (scalar constants are inline)
    listed = re.findall(r"^  (%\d+) = (\w+)", format_graph(g, decompositions=False), re.M)
    walked = [n for n in g.nodes if not (n.op.name == "constant" and n.output.type.ndim == 0)]
    assert [op for _, op in listed] == [n.op.name for n in walked]
    by_name = {name: node for (name, _), node in zip(listed, walked)}
    # each node drawn once, with the listing's name, in the cluster of its module path
    ids = {}
    for dot_id, (label, cluster) in nodes.items():
        if " = " in label:
            name, op = label.split("\\n")[0].split(" (")[0].split(" = ")
            assert by_name[name].op.name == op
            assert cluster == tuple(p for p in by_name[name].provenance.module_path.split("/") if p)
            ids[id(by_name[name])] = dot_id
        elif label != "return":
            ids[id(next(a for a in g.inputs if label.split("\\n")[0] == f"%{a.path}"))] = dot_id
    assert len(ids) == len(walked) + len(g.inputs)
    # an edge per (producer, reader) pair, inline scalar constants excepted, and one per output
    expected = {(ids[id(v if v.node is None else v.node)], ids[id(node)])
                for node in walked for v in node.inputs if v.node is None or v.node in walked}
    ret = next(i for i, (label, cluster) in nodes.items() if label == "return" and cluster == ())
    expected |= {(ids[id(v.node)], ret) for v in g.outputs}
    assert len(edges) == len(set(edges)) and set(edges) == expected


def test_regions_are_sub_clusters_inside_their_module():
    x = jnp.ones((5, 3))
    variables = Scanned().init(jax.random.PRNGKey(0), x)
    text = to_dot(graphopt.trace(Scanned().apply, variables, x))
    nodes, edges, clusters = _parse(text)
    # the scan body sits in the Scanned cluster; Dense "cell" inside it, by its path relative to Scanned
    assert ("Scanned", "scan body", "cell") in clusters
    dot_general = next(c for label, c in nodes.values() if "dot_general" in label)
    assert dot_general == ("Scanned", "scan body", "cell")
    scan_id = next(i for i, (label, _) in nodes.items() if "= scan" in label)
    assert re.search(rf"{scan_id} -> v\d+ \[style=dashed, lhead=cluster_\d+\];", text)
    assert sum(label == "return" for label, _ in nodes.values()) == 2  # the graph's and the body's


def test_decompositions_on_request():
    g = _block()
    short, full = _parse(to_dot(g))[0], _parse(to_dot(g, decompositions=True))[0]
    assert len(full) > len(short)
    assert any(cluster[-1:] == ("layer_norm decomposition",) for _, cluster in full.values())
    assert not any("decomposition" in " ".join(cluster) for _, cluster in short.values())


def test_made_by_pass_nodes_are_shaded_and_tooltips_name_the_origin():
    text = to_dot(_block())
    line = next(line for line in text.splitlines() if "= layer_norm" in line)
    assert 'fillcolor="#fff2cc"' in line and "Block/ln · blocks.py:" in line and "by raise_ops/layer-norm" in line


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed (apt-get install graphviz)")
def test_graphviz_accepts_it():
    x = jnp.ones((5, 3))
    variables = Scanned().init(jax.random.PRNGKey(0), x)
    for g in (_block(), graphopt.trace(Scanned().apply, variables, x)):
        for decompositions in (False, True):
            run = subprocess.run(["dot", "-Tsvg"], input=to_dot(g, decompositions=decompositions),
                                 capture_output=True, text=True, timeout=60)
            assert run.returncode == 0 and run.stderr == "", run.stderr
            assert run.stdout.lstrip().startswith("<?xml")

"""The HTML report: its embedded data (every node once, named as in the listing, grouped by module
path, escaped), no network references, the CLI's --html, and the page itself in headless Chromium."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import pytest

import graphopt
from graphopt.cli import OK, main
from graphopt.html_report import html_report, report_data, write_html_report
from graphopt.pipeline import run_pipeline
from graphopt.show import format_graph
from models.blocks import Block

_DATA = re.compile(r'<script type="application/json" id="graphopt-data">(.*?)</script>', re.S)
_HOSTILE = "</script><b onclick=\"alert('x')\">&amp;</b>"


@pytest.fixture(scope="module")
def block():
    """(before, after, report) of the residual block under the default pipeline."""
    x = jnp.ones((2, 4, 16))
    variables = Block().init(jax.random.key(0), x)
    before = graphopt.trace(Block().apply, variables, x)
    result = run_pipeline(before.clone()[0], "default")
    return before, result.graph, result.report


def _embedded(page: str) -> dict:
    blobs = _DATA.findall(page)
    assert len(blobs) == 1, "one JSON blob, closed by the first </script> after it"
    return json.loads(blobs[0])


def _listing_lines(graph, decompositions=False) -> list[str]:
    """The node lines of the listing, without comments, indentation and region braces."""
    text = format_graph(graph, show_source=False, decompositions=decompositions)
    lines = [line.strip().removesuffix(" {") for line in text.splitlines()]
    return [line for line in lines if re.match(r"%\S+( = |, )", line)]


def test_every_node_once_named_as_in_the_listing(block):
    before, after, report = block
    data = _embedded(html_report(before, after, report))
    nodes = data["graph"]["nodes"]
    assert [n["line"] for n in nodes] == _listing_lines(after)
    names = [name for n in nodes for name in n["name"].split(", ")]
    assert len(names) == len(set(names))
    assert data == json.loads(json.dumps(report_data(before, after, report)))


def test_regions_are_walked_in_listing_order():
    def f(x):
        return jax.lax.scan(lambda c, v: (c + jnp.sin(v), None), x[0], x)[0] * 2.0

    g = graphopt.trace(f, jnp.ones((3, 4)))
    nodes = report_data(g)["graph"]["nodes"]
    assert [n["line"] for n in nodes] == _listing_lines(g)
    scan = next(i for i, n in enumerate(nodes) if n["op"] == "scan")
    assert any(n["region"].startswith(nodes[scan]["name"] + " = scan") for n in nodes[scan + 1:])


def test_nodes_grouped_by_module_with_details(block):
    before, after, report = block
    data = report_data(before, after, report)
    nodes = data["graph"]["nodes"]
    modules = {n["module"] for n in nodes}
    assert {"Block/ln", "Block/up", "Block/down"} <= modules
    up = [n for n in nodes if n["module"] == "Block/up"]
    assert up and all(n["source"].startswith("blocks.py:") for n in up)
    assert any(n["made_by"].startswith("raise_ops") for n in nodes)
    # operands and users point at each other
    for i, n in enumerate(nodes):
        for _, at in n["operands"]:
            assert at is None or i in nodes[at]["users"]


def test_pass_table_and_comparison(block):
    before, after, report = block
    data = report_data(before, after, report)
    assert [r["pass"] for r in data["passes"]] == [r.name for r in report.records]
    assert {"nodes", "flops", "bytes", "ms", "error", "rules"} <= set(data["passes"][0])
    diff = data["diff"]
    assert diff["nodes"][0] > diff["nodes"][1] and diff["removed"] > 0
    assert any(p["pass"] == "raise_ops" for p in diff["by_pass"])
    assert "Block/ln" in [m["module"] for m in diff["by_module"]]
    assert [s["name"] for s in data["summary"]] == [before.name, after.name]
    alone = report_data(before)
    assert alone["diff"] is None and alone["passes"] == [] and len(alone["summary"]) == 1


def test_markup_in_params_and_title_is_escaped():
    g = graphopt.trace(lambda x: jnp.tanh(x), jnp.ones(3))
    node = next(iter(g.nodes))
    node.params["note"] = _HOSTILE
    page = html_report(g, title="<b>title</b>")
    assert page.count("</script>") == 2 and "<b>" not in page and "<b onclick" not in page
    assert "&lt;b&gt;title&lt;/b&gt;" in page
    (shown,) = _embedded(page)["graph"]["nodes"]
    assert ["note", _HOSTILE] in shown["params"]


def test_no_network_references(block):
    page = html_report(*block)
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(script|link|img)[^>]*\b(src|href)=", page)


def test_cli_html_flag_writes_the_report(tmp_path, capsys):
    blocks = os.path.join(os.path.dirname(__file__), "models", "blocks.py")
    out = tmp_path / "report.html"
    code = main(["optimize", f"{blocks}:make", "--html", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == OK, stderr
    assert stdout.startswith("graph Block.apply(") and f"wrote {out}" in stderr
    data = _embedded(out.read_text(encoding="utf-8"))
    assert data["passes"] and data["diff"]["removed"] > 0
    assert "Block/up" in {n["module"] for n in data["graph"]["nodes"]}


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_in_headless_chromium(block, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed (pip install playwright)")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium binary on PATH (chromium or chromium-browser; apt-get install chromium)")
    before, after, report = block
    page_path = tmp_path / "report.html"
    write_html_report(page_path, before, after, report)
    nodes = report_data(before, after, report)["graph"]["nodes"]
    target = next(n for n in nodes if n["module"] == "Block/up" and n["source"])

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_path.as_uri())
            rows = page.locator("#tree .node")
            assert rows.count() == len(nodes)
            _screenshot(page, tmp_path)

            # search: only matching nodes stay visible
            page.fill("#search", target["op"])
            visible = [r for r in rows.all() if r.is_visible()]
            assert visible and all(target["op"] in r.inner_text() for r in visible)
            assert page.locator(f'#tree .node[data-name="{target["name"]}"]').is_visible()
            page.fill("#search", "")

            # fold and unfold a module
            row = page.locator(f'#tree .node[data-name="{target["name"]}"]')
            summary = page.locator('details[data-module="Block/up"] > summary')
            summary.click()
            assert not row.is_visible()
            summary.click()
            assert row.is_visible()

            # click a node: the details panel shows it
            row.click()
            assert page.inner_text("#details-source") == target["source"]
            assert page.inner_text("#details-module") == "Block/up"
            assert page.inner_text("#details-name").startswith(target["name"] + " = ")
            _screenshot(page, tmp_path, "selected")
            assert errors == []
        finally:
            browser.close()


def _screenshot(page, tmp_path, suffix=""):
    name = f"html_report{'_' + suffix if suffix else ''}.png"
    page.screenshot(path=str(tmp_path / name), full_page=True)
    artifacts = os.environ.get("GRAPHOPT_TEST_ARTIFACTS")
    if artifacts:
        os.makedirs(artifacts, exist_ok=True)
        shutil.copy(tmp_path / name, os.path.join(artifacts, name))

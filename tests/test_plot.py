"""benchmarks/plot.py: the accuracy-against-compression figure from small hand-written result files.

matplotlib is in the `bench` extra, not `test`: without it these tests skip.
"""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import plot  # noqa: E402

MACHINE = {"backend": "cpu", "device": "cpu", "jax": "0.0", "git": "abc1234", "date": "2026-01-01"}


def quantize_result(model: str, metric: str, value: float) -> dict:
    rows = [{"label": "int8 weight-only", "metric": value, "stored_bytes": 260},
            {"label": "int8 weight-only, memory", "metric": value, "stored_bytes": 260},
            {"label": "int8 dynamic", "metric": value, "stored_bytes": 260},
            {"label": "int4 g32", "metric": value * 0.99, "stored_bytes": 150}]
    return {"model": model, "metric": metric, "float": value, "float_bytes": 1000, "rows": rows}


def prune_result(model: str, metric: str, value: float, before: float) -> dict:
    rows = [{"label": "30% FLOPs, l2", "metric": before, "recovered": value, "flops": 70},
            {"label": "50% FLOPs, wanda", "metric": value * 0.98, "recovered": value * 0.995, "flops": 50}]
    return {"model": model, "metric": metric, "unpruned": value, "flops": 100, "rows": rows}


@pytest.fixture
def results(tmp_path):
    quantize = {"machine": MACHINE, "models": [quantize_result("digits", "accuracy", 0.98),
                                               quantize_result("charlm", "perplexity", 5.4),
                                               {"model": "decode", "rows": []}]}
    prune = {"machine": MACHINE, "models": [prune_result("digits", "accuracy", 0.98, 0.5),
                                            prune_result("charlm", "perplexity", 5.4, 100.0)]}
    later = {"machine": MACHINE, "models": [prune_result("digits", "accuracy", 0.97, 0.9)]}
    paths = {name: tmp_path / f"{name}.json" for name in ("quantize", "prune", "later")}
    for name, data in [("quantize", quantize), ("prune", prune), ("later", later)]:
        paths[name].write_text(json.dumps(data))
    return paths


def test_writes_png_and_svg(results, tmp_path):
    out = plot.main(["--quantize", str(results["quantize"]), "--prune", str(results["prune"]),
                     str(results["later"]), "--out", str(tmp_path / "fig" / "plot.png"), "--svg"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.with_suffix(".svg").stat().st_size > 0


def test_later_prune_file_replaces_model_and_memory_rows_are_left_out(results):
    quant, pruned, machines = plot.load(results["quantize"], [results["prune"], results["later"]])
    assert sorted(quant) == ["charlm", "digits"]  # decode has speed only
    assert pruned["digits"]["unpruned"] == 0.97 and pruned["charlm"]["unpruned"] == 5.4
    assert [len(m) for m in machines.values()] == [1, 2]
    labels = [p["label"] for p in plot.points(quant["digits"], None)]
    assert labels == ["int8 weight-only", "int8 dynamic", "int4 g32"]


def test_coincident_points_share_a_label():
    points = plot.points(quantize_result("digits", "accuracy", 0.98), None)
    assert [p["label"] for p in plot.merged(points, span=0.1)] == ["int8 weight-only; int8 dynamic", "int4 g32"]

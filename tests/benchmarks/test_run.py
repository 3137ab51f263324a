"""benchmarks/run.py and the zoo's ZooModels: one quick run of the MLP through every pipeline (every
column present, every error within its pipeline's contract), RESULTS.md's generated section, a
pipeline that does not apply becoming a row, and each zoo model building, running, and giving the
original's outputs under graphopt's default pipeline.

The trained models (digits, charlm) train on first use: their cases are marked slow.
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import run  # noqa: E402
import run_report  # noqa: E402
from zoo import MODELS  # noqa: E402
from zoo.model import ZooModel  # noqa: E402

import graphopt  # noqa: E402
from graphopt.testing import assert_equivalent  # noqa: E402

RANDOM_WEIGHTS = ["mlp", "resnet18", "vit_tiny", "bert_mini", "gpt_prefill", "gpt_decode"]
TRAINED = ["digits", "charlm"]
COLUMNS = ["model", "framework", "pipeline", "status", "contract", "latency_ms", "ratio", "throughput",
           "compile_s", "compile_cpu_s", "xla_compile_s", "peak_bytes", "param_bytes", "max_rel_error",
           "max_abs_error", "within_contract", "metric"]


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "run.json"
    code = run.main(["--quick", "--models", "mlp", "--repeats", "3", "--json", str(path)])
    return code, json.loads(path.read_text())


def test_quick_run_has_every_column_and_pipeline(mlp_run):
    code, result = mlp_run
    assert code == 0
    assert [r["pipeline"] for r in result["rows"]] == ["jax.jit"] + list(run.PIPELINES)
    assert result["size"] == "quick" and result["repeats"] == 3 and result["machine"]["jax"] == jax.__version__
    for row in result["rows"]:
        assert row["status"] == "ok", row
        missing = [c for c in COLUMNS if c not in row]
        assert not missing, (row["pipeline"], missing)
        for key in ("latency_ms", "ratio"):
            assert 0 < row[key]["p10"] <= row[key]["median"] <= row[key]["p90"], (row["pipeline"], key, row[key])
        assert row["throughput"] == pytest.approx(8 / (row["latency_ms"]["median"] / 1e3))   # batch of 8 rows
        assert row["peak_bytes"] >= row["param_bytes"] > 0
        assert row["compile_s"] > 0


def test_quick_run_errors_are_within_each_contract(mlp_run):
    _, result = mlp_run
    rows = {r["pipeline"]: r for r in result["rows"]}
    for row in rows.values():
        assert row["within_contract"], (row["pipeline"], row["why"])
        if row["contract"]["kind"] == "approximate":
            assert row["max_rel_error"] <= row["contract"]["bound"]
    assert rows["none"]["max_rel_error"] == 0.0       # no passes: the same program
    assert rows["autocast"]["max_rel_error"] > 0      # bfloat16 matmuls do change the results
    assert rows["int8"]["max_rel_error"] > 0 and rows["int8_dynamic"]["max_rel_error"] > 0
    assert rows["autocast"]["param_bytes"] < rows["none"]["param_bytes"]         # bfloat16 weights
    assert rows["prune30"]["param_bytes"] < rows["none"]["param_bytes"]          # channels removed
    assert "FLOPs left 0.6" in rows["prune30"]["notes"] or "FLOPs left 0.7" in rows["prune30"]["notes"]


def test_contracts_follow_the_passes():
    assert run.contract("none") == {"kind": "exact", "bound": 0.0}
    default = run.contract("default")["bound"]          # fold_batchnorm 1e-4 + fuse_attention 0.03
    assert default == pytest.approx(0.0301)
    assert run.contract("autocast")["bound"] == pytest.approx(default + 2 ** -5)
    assert run.contract("int8")["bound"] == pytest.approx(default + 0.25)
    assert run.contract("prune30") == {"kind": "none", "bound": None}


def test_compare_flags_an_error_beyond_the_bound():
    expected = {"y": np.array([1.0, -2.0], np.float32)}
    off = {"y": np.array([1.0, -2.2], np.float32)}                         # relative error 0.1
    assert run.compare(off, expected, {"kind": "approximate", "bound": 0.2})["within_contract"]
    worse = run.compare(off, expected, {"kind": "approximate", "bound": 0.05})
    assert not worse["within_contract"] and "exceeds the bound" in worse["why"]
    assert worse["max_rel_error"] == pytest.approx(0.1, rel=1e-6)
    assert not run.compare(off, expected, {"kind": "exact", "bound": 0.0})["within_contract"]
    nan = {"y": np.array([np.nan, -2.0], np.float32)}
    assert not run.compare(nan, expected, {"kind": "none", "bound": None})["within_contract"]


def test_a_pipeline_that_does_not_apply_is_a_row(monkeypatch):
    # y = x @ w: the input's and the output's channels are both fixed, so nothing can be pruned.
    def build(size="quick", seed=0):
        return ZooModel("matmul", "jax", lambda v, x: x @ v["w"], {"w": jnp.ones((16, 16))},
                        (jnp.ones((4, 16)),), "test")

    monkeypatch.setitem(run.MODELS, "matmul", build)
    rows = run.measure_model("matmul", "quick", ["none", "prune30"], 3, 8, [], lambda text: None)
    assert [r["pipeline"] for r in rows] == ["jax.jit", "none", "prune30"]
    assert rows[1]["status"] == "ok"
    assert rows[2]["status"] == "n/a" and "nothing in this model can be pruned" in rows[2]["reason"]
    assert "n/a: nothing" in run_report.table_rows({"rows": rows})[2][2]


BEGIN, END = "<!-- run.py: begin -->", "<!-- run.py: end -->"


def test_results_md_section_is_replaced_and_the_rest_kept(mlp_run, tmp_path):
    _, result = mlp_run
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps(result))
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n\n## other\n\nkept | as is\n")
    run_report.update_results_md(results_md, run_json)
    first = results_md.read_text()
    assert first.startswith("# Results\n\n## other\n\nkept | as is\n\n" + BEGIN)
    assert first.count(BEGIN) == first.count(END) == 1
    assert "| mlp | int8 |" in first and result["command"] in first
    results_md.write_text(first + "\n## after\n")
    result["rows"] = result["rows"][:2]
    run_json.write_text(json.dumps(result))
    run_report.update_results_md(results_md, run_json)
    second = results_md.read_text()
    assert "| mlp | int8 |" not in second and "| mlp | none |" in second
    assert second.startswith("# Results\n\n## other\n\nkept | as is\n\n") and second.endswith("\n## after\n")


# --- the zoo -------------------------------------------------------------------------------------

def _check_model(name):
    model = MODELS[name]("quick")
    assert model.name == name and model.framework in ("flax.linen", "flax.nnx")
    expected = jax.jit(model.apply)(model.variables, *model.inputs)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(expected))
    optimized = graphopt.optimize(model.apply, pipeline="default", params_argnums=0)
    assert_equivalent(optimized(model.variables, *model.inputs), expected)
    graph = optimized.graph
    return model, expected, graph


@pytest.mark.parametrize("name", RANDOM_WEIGHTS)
def test_zoo_model_builds_and_default_pipeline_keeps_its_outputs(name):
    model, expected, _ = _check_model(name)
    if name == "gpt_decode":    # the cache goes in and comes out
        logits, cache = expected
        assert cache.shape == model.inputs[1].shape and logits.shape[:2] == (1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED)
def test_trained_zoo_model_builds_and_default_pipeline_keeps_its_outputs(name):
    model, _, _ = _check_model(name)
    metric = model.evaluate(lambda *x: jax.jit(model.apply)(model.variables, *x))
    assert model.metric == ("accuracy" if name == "digits" else "perplexity") and np.isfinite(metric)


def test_both_frameworks_are_in_the_zoo():
    frameworks = {name: MODELS[name]("quick").framework for name in ("mlp", "resnet18")}
    assert frameworks == {"mlp": "flax.nnx", "resnet18": "flax.linen"}


def test_gpt_decode_step_continues_the_prefill():
    """A decode step at position p on the prefill's cache gives the prefill's logits for token p."""
    prefill, decode = MODELS["gpt_prefill"]("quick"), MODELS["gpt_decode"]("quick")
    tokens = jax.random.randint(jax.random.key(3), (1, 9), 0, 64, jnp.int32)
    full_logits, _ = jax.jit(prefill.apply)(prefill.variables, tokens)
    _, cache = jax.jit(prefill.apply)(prefill.variables, tokens[:, :8])
    logits, cache = jax.jit(decode.apply)(decode.variables, tokens[:, 8:], cache, jnp.int32(8))
    np.testing.assert_allclose(logits[0, 0], full_logits[0, 8], rtol=1e-4, atol=1e-5)
    assert not np.any(np.asarray(cache[:, :, :, 9:]))       # nothing written past the new token


def test_bert_padding_is_masked():
    model = MODELS["bert_mini"]("quick")
    tokens, mask = model.inputs
    assert not bool(mask.all()) and bool(mask[:, 0].all())     # some padding, every sequence non-empty
    other = jnp.where(mask, tokens, 7)                           # other tokens at the padded positions
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(apply(model.variables, other, mask), apply(model.variables, tokens, mask),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(apply(model.variables, other, jnp.ones_like(mask)),
                           apply(model.variables, tokens, jnp.ones_like(mask)))


def test_peer_rows_come_from_run_peer(monkeypatch):
    import types

    calls = []

    def run_peer(model, quantize, repeats):
        calls.append((model.name, quantize, repeats))
        if quantize:
            raise RuntimeError("no int8 for this model\nmore detail")
        return {"ms": 2.0, "p10_ms": 1.0, "p90_ms": 3.0, "max_error": 0.5, "reference_max": 10.0, "version": "9"}

    monkeypatch.setitem(sys.modules, "peers.fake", types.SimpleNamespace(run_peer=run_peer))
    model = MODELS["mlp"]("quick")
    rows = run.peer_rows("fake", model, {"model": "mlp"}, 4, 4.0, lambda text: None)
    assert calls == [("mlp", False, 4), ("mlp", True, 4)]
    assert rows[0]["latency_ms"] == {"median": 2.0, "p10": 1.0, "p90": 3.0}
    assert rows[0]["ratio"]["median"] == 0.5 and rows[0]["max_rel_error"] == pytest.approx(0.05)
    assert rows[0]["throughput"] == pytest.approx(8 / 2e-3)
    assert rows[1]["status"] == "n/a" and rows[1]["reason"] == "RuntimeError: no int8 for this model"
    missing = run.peer_rows("absent_peer", model, {"model": "mlp"}, 4, 4.0, lambda text: None)
    assert missing[0]["status"] == "n/a" and "benchmarks/peers/absent_peer.py" in missing[0]["reason"]
    assert [row[1] for row in run_report.table_rows({"rows": rows})] == ["fake", "fake int8"]

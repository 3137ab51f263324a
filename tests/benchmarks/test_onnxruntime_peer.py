"""The ONNX Runtime peer (benchmarks/peers): the zoo's encoder and CNN exported with jax2onnx and
run in ONNX Runtime give jax.jit's outputs within float32 tolerance; the dynamic-int8 graph really
holds integer ops and stays within a stated bound of the float outputs; run_peer reports what it
measured. Skipped, with the reason, when onnx, onnxruntime or jax2onnx is not installed.

The models here are small stand-ins for zoo.bert and zoo.resnet (same layers: a padding mask,
post-norm attention, GELU; BatchNorm on random running statistics and residual adds, which hit
the exporter's layout repair). The first export in a process imports all of jax2onnx's plugins
(about 9 s of CPU), so the export-and-run checks of a model sit in one test each. The zoo models
themselves run in the slow end-to-end test.
"""

import importlib.util
import os
import sys
import types
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from graphopt.testing import assert_equivalent  # noqa: E402
from peers import onnx_export  # noqa: E402
from peers.onnxruntime import OrtRunner, max_error, run_peer, verdict  # noqa: E402

INSTALL_HINT = f"the ONNX Runtime peer needs onnx, onnxruntime and jax2onnx ({onnx_export.INSTALL})"
needs_peer = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxruntime", "jax2onnx")),
    reason=INSTALL_HINT)

# Dynamic int8 (per-tensor weights, activations quantized per call): the largest output error
# must stay under this fraction of the largest float output. It tells a working int8 graph from
# a broken one (garbage outputs), not how good ORT's quantizer is: measured ~2% on both quick
# models with the packages of 2026-12-03, 6.5% on the encoder with those of 2026-12-05 (ORT
# 1.31.1 and 1.32.0 alike; onnx, onnx-ir and flax versions ruled out).
INT8_BOUND = 0.1

MODELS = {"encoder": ("MatMulInteger", "DynamicQuantizeLinear"), "cnn": ("ConvInteger", "MatMulInteger")}


class Encoder(nn.Module):
    """A one-block post-norm encoder with a padding mask and a pooled classifier (as zoo.bert)."""

    @nn.compact
    def __call__(self, tokens, mask):
        x = nn.Embed(50, 16)(tokens)
        x = nn.LayerNorm()(x + nn.MultiHeadDotProductAttention(2)(x, x, mask=nn.make_attention_mask(mask, mask)))
        x = nn.LayerNorm()(x + nn.Dense(16)(nn.gelu(nn.Dense(64)(x))))
        return nn.Dense(2)(jnp.tanh(nn.Dense(16)(x[:, 0])))


class CNN(nn.Module):
    """Conv + BatchNorm + ReLU, two residual blocks and a strided conv (as zoo.resnet)."""

    @nn.compact
    def __call__(self, x):
        norm = lambda: nn.BatchNorm(use_running_average=True)  # noqa: E731
        x = nn.relu(norm()(nn.Conv(8, (3, 3), use_bias=False)(x)))
        for _ in range(2):  # the second block's add is where jax2onnx's stale shapes made ORT refuse the graph
            y = norm()(nn.Conv(8, (3, 3), use_bias=False)(nn.relu(norm()(nn.Conv(8, (3, 3), use_bias=False)(x)))))
            x = nn.relu(x + y)
        x = nn.relu(nn.Conv(16, (3, 3), (2, 2))(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def _build(name):
    """A small ZooModel: random weights (and random BatchNorm statistics), example inputs."""
    from zoo.model import ZooModel

    rng = np.random.default_rng(0)
    if name == "encoder":
        module = Encoder()
        mask = np.arange(8)[None, :] < np.array([[8], [5]])
        inputs = (jnp.asarray(np.where(mask, rng.integers(1, 50, (2, 8)), 0), jnp.int32), jnp.asarray(mask))
    else:
        module = CNN()
        inputs = (jnp.asarray(rng.standard_normal((2, 12, 12, 3)), jnp.float32),)
    variables = jax.jit(module.init)(jax.random.key(0), *inputs)
    def stats(path, v):
        return jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype) if "batch_stats" in jax.tree_util.keystr(path) else v

    variables = jax.tree_util.tree_map_with_path(stats, variables)
    return ZooModel(name, "flax.linen", module.apply, variables, inputs, "test model")


@needs_peer
@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_and_run_match_jax(name):
    model = _build(name)
    expected = [np.asarray(leaf) for leaf in jax.tree.leaves(jax.jit(model.apply)(model.variables, *model.inputs))]

    fp32 = OrtRunner(model, quantize=False)
    assert fp32.session.get_providers() == ["CPUExecutionProvider"]
    assert fp32.threads == os.cpu_count()
    assert_equivalent(fp32(), expected, err_msg=f"ONNX Runtime float32 on {model.name}")
    assert onnx_export.export(model) is fp32.exported, "a model is exported once per process"

    report = run_peer(model, quantize=True, repeats=5)
    for op in MODELS[name]:
        assert report["quantized_ops"].get(op, 0) > 0, f"no {op} in the int8 graph: {report['quantized_ops']}"
    scale = max(np.abs(e).max() for e in expected)
    assert report["reference_max"] == pytest.approx(scale)
    assert 0 < report["max_error"] <= INT8_BOUND * scale, \
        f"int8 error {report['max_error']:.3g} against |output| ≤ {scale:.3g}"
    assert report["model"] == model.name and report["precision"] == "int8 dynamic"
    assert report["p10_ms"] <= report["ms"] <= report["p90_ms"] and report["cpu_ms"] > 0
    assert report["exporter"].startswith("jax2onnx ") and report["threads"] == os.cpu_count()
    # jax2onnx's own jnp.cumsum (it rejects a positional axis) stays inside the export.
    np.testing.assert_array_equal(jnp.cumsum(jnp.ones((2, 3)), -1), [[1, 2, 3], [1, 2, 3]])


def test_missing_package_is_named_with_the_install_command(monkeypatch):
    for present in ("onnx", "onnxruntime"):  # stand-ins, so the test holds where they are missing
        monkeypatch.setitem(sys.modules, present, types.ModuleType(present))
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # makes `import jax2onnx` raise ImportError
    with pytest.raises(onnx_export.PeerUnavailable, match="'jax2onnx'.*pip install"):
        onnx_export.require()


@pytest.mark.parametrize("spread, text", [
    ({"median": 0.8, "p10": 0.7, "p90": 0.9}, "graphopt faster by 20% (graphopt/ORT 0.80, p10–p90 0.70–0.90)"),
    ({"median": 1.5, "p10": 1.2, "p90": 1.9}, "graphopt slower by 50% (graphopt/ORT 1.50, p10–p90 1.20–1.90)"),
    ({"median": 2.44, "p10": 0.89, "p90": 3.45},
     "graphopt slower by 144% (graphopt/ORT 2.44, p10–p90 0.89–3.45; the spread crosses 1)"),
    ({"median": 1.04, "p10": 0.9, "p90": 1.3}, "even (graphopt/ORT 1.04, p10–p90 0.90–1.30)"),
])
def test_verdict_reads_the_graphopt_over_ort_time_ratio(spread, text):
    assert verdict(spread) == text


def test_max_error_compares_every_output():
    a = [np.zeros(3, np.float32), np.ones(2, np.float32)]
    b = [np.zeros(3, np.float32), np.array([1.0, 1.5], np.float32)]
    assert max_error(a, b) == 0.5
    with pytest.raises(ValueError, match="2 outputs against 1"):
        max_error(a, b[:1])


@needs_peer
@pytest.mark.slow
def test_comparison_table_runs_end_to_end(capsys):
    from peers.onnxruntime import main

    result = main(["--models", "bert", "resnet", "--size", "quick", "--repeats", "3", "--markdown"])
    assert [m["model"] for m in result["models"]] == ["bert_mini", "resnet18"]
    rows = result["models"][1]["rows"]
    assert list(rows) == ["jax.jit", "graphopt default", "ORT float32", "graphopt int8 dynamic", "ORT int8 dynamic"]
    assert rows["graphopt default"]["max_error"] < 1e-4 and rows["ORT float32"]["max_error"] < 1e-4
    assert "graphopt_vs_peer" in rows["ORT float32"] and "graphopt_vs_peer" in rows["ORT int8 dynamic"]
    assert "| ORT int8 dynamic |" in capsys.readouterr().out

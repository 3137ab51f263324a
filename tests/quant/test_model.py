"""graphopt.quantize and saved models: one call gives the quantized graph and parameters; a saved
model loads into a freshly traced one, bit for bit, without float weights; bad files are named."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt.quant import Calibration, QuantizationError, Rule
from graphopt.quant import artifact
from graphopt.quant.model import _with_quantize


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.LayerNorm()(nn.relu(nn.Dense(64)(x)))
        return nn.Dense(10)(x)


@pytest.fixture(scope="module")
def net():
    model = Net()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 8, 3)), jnp.float32)
    return model, model.init(jax.random.key(0), x), x


def _bits(tree):
    return {k: np.asarray(v).view(np.uint8).tobytes() for k, v in tree.items()}


@pytest.mark.parametrize("scheme,options", [
    ("int8", {}), ("int4", {"group": 16, "rules": [Rule(path="Conv_0", scheme="int8")]}),
    ("int8_dynamic", {}), ("int8_static", {}), ("fp8", {}), ("int8", {"symmetric": False}),
    ("int8_static", {"smooth": 0.5}),  # SmoothQuant replays from the recorded activation maxima
])
def test_save_and_load_round_trip_bit_exactly(net, tmp_path, scheme, options):
    model, variables, x = net
    if scheme in ("int8_static", "fp8") or "smooth" in options:
        options = {**options, "calibration": Calibration([(variables, x)], progress=False)}
    qmodel = graphopt.quantize(model.apply, variables, x, scheme=scheme, **options)
    out = qmodel(x)
    path = tmp_path / "net.safetensors"
    qmodel.save(path)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)  # no float weights needed to load
    loaded = graphopt.quant.load(path, model.apply, abstract, x)
    assert loaded.recipe == qmodel.recipe
    assert bool(qmodel.recipe.smoothing) == ("smooth" in options)
    assert _bits(loaded.storage) == _bits(qmodel.storage)
    assert _bits(loaded.params) == _bits(qmodel.params)
    np.testing.assert_array_equal(np.asarray(loaded(x)).view(np.uint32), np.asarray(out).view(np.uint32))


def test_the_file_holds_every_quantized_layer_compactly(net, tmp_path):
    """Whatever form the backend chose (float weights included), the file stores int8 codes."""
    model, variables, x = net
    float_wins = lambda graphs: {k: 0.1 if k == "float" else 1.0 for k in graphs}  # noqa: E731
    qmodel = graphopt.quantize(model.apply, variables, x, scheme="int8", timer=float_wins)
    assert {e.form for e in qmodel.recipe.layers} == {"float-weights"}
    assert not any(str(v.dtype) == "int8" for v in qmodel.params.values())  # runs on float weights
    codes = {k: v for k, v in qmodel.storage.items() if k.endswith(":codes")}
    assert len(codes) == 4 and all(str(v.dtype) == "int8" for v in codes.values())
    path = tmp_path / "net.safetensors"
    qmodel.save(path)
    float_bytes = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(variables))
    assert os.path.getsize(path) < 0.3 * float_bytes


def test_quantize_reads_and_never_changes_the_users_arrays(net):
    model, variables, x = net
    before = jax.tree.map(np.array, variables)
    graphopt.quantize(model.apply, variables, x, scheme="int4", group=16,
                      rules=[Rule(path="Conv_0", scheme=None)])
    jax.tree.map(np.testing.assert_array_equal, variables, before)


def test_quantize_inserts_the_pass_where_it_belongs():
    assert _with_quantize("inference") == ["fold_constants", "canonicalize", "cse", "fold_batchnorm", "raise_ops",
                                           "quantize", "fuse_attention", "fold_params", "dce"]
    assert _with_quantize(["canonicalize"]) == ["canonicalize", "quantize", "fold_params", "dce"]
    with pytest.raises(QuantizationError, match="inserts the quantize pass itself"):
        _with_quantize(["quantize"])


def test_load_rejects_other_files_and_versions(net, tmp_path):
    model, variables, x = net
    not_ours = tmp_path / "plain.safetensors"
    from safetensors.numpy import save_file

    save_file({"w": np.ones(3, np.float32)}, str(not_ours))
    with pytest.raises(QuantizationError, match="not a graphopt quantized model"):
        graphopt.quant.load(not_ours, model.apply, variables, x)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(QuantizationError, match="cannot read a safetensors file"):
        graphopt.quant.load(garbage, model.apply, variables, x)
    future = tmp_path / "future.safetensors"
    save_file({"w": np.ones(3, np.float32)}, str(future),
              metadata={"format": artifact.FORMAT, "version": "99", "recipe": "{}", "passes": "[]", "bits": "{}"})
    with pytest.raises(QuantizationError, match="version '99' is not supported"):
        graphopt.quant.load(future, model.apply, variables, x)


def test_load_into_another_model_names_the_mismatch(net, tmp_path):
    model, variables, x = net
    qmodel = graphopt.quantize(model.apply, variables, x, scheme="int8")
    path = tmp_path / "net.safetensors"
    qmodel.save(path)
    arrays, recipe, passes = artifact.read(path)
    del arrays["params/Dense_1/kernel:scale"]
    artifact.write(path, arrays, recipe, passes)
    with pytest.raises(QuantizationError, match=r"lack params/Dense_1/kernel:scale"):
        graphopt.quant.load(path, model.apply, variables, x)
    recipe_json = json.loads(recipe.to_json())
    recipe_json["layers"][0]["shape"] = [1, 2, 3, 4]
    artifact.write(path, qmodel.storage, graphopt.quant.Recipe.from_json(json.dumps(recipe_json)), passes)
    with pytest.raises(QuantizationError, match=r"params/Conv_0/kernel.*found"):
        graphopt.quant.load(path, model.apply, variables, x)

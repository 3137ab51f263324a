"""The benchmark model zoo (benchmarks/zoo): data splits, short training runs, evaluate() calling
only the function it is given, the safetensors weight cache, and graphopt tracing the models.

Training here is a few dozen steps; the full runs are marked slow.
"""

import math
import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from zoo import charlm, digits  # noqa: E402

import graphopt  # noqa: E402


@pytest.fixture(autouse=True)
def zoo_cache(tmp_path, monkeypatch):
    """Every test gets its own empty weight cache, never the user's."""
    path = tmp_path / "zoo-cache"
    monkeypatch.setenv("GRAPHOPT_ZOO_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def short_digits():
    return digits.train(steps=30, cache=False)


@pytest.fixture(scope="module")
def short_charlm():
    return charlm.train(steps=40, cache=False)


def _leaves_with_paths(variables):
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}


# --- data ----------------------------------------------------------------------------------------

def test_digits_data_shapes_and_split():
    data = digits.load_data()
    assert data.x_train.shape == (1437, 8, 8, 1) and data.x_test.shape == (360, 8, 8, 1)
    assert data.x_train.dtype == data.x_test.dtype == np.float32
    assert data.y_train.dtype == data.y_test.dtype == np.int32
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    assert set(np.unique(data.y_test)) == set(range(10))
    again = digits.load_data()
    assert np.array_equal(again.x_test, data.x_test) and np.array_equal(again.y_train,
                                                                        data.y_train)
    other = digits.load_data(seed=1)
    assert not np.array_equal(other.x_test, data.x_test)
    # Train and test are disjoint: no test image appears among the training images.
    train_rows = {row.tobytes() for row in data.x_train.reshape(len(data.x_train), -1)}
    test_rows = [row.tobytes() for row in data.x_test.reshape(len(data.x_test), -1)]
    assert sum(row in train_rows for row in test_rows) < 5  # the data set has a few duplicates


def test_charlm_data_is_held_out_by_file():
    data = charlm.load_data()
    assert data.train.dtype == data.valid.dtype == np.uint8
    assert 1_000_000 < len(data.train) <= charlm.TRAIN_BYTES
    assert 20_000 < len(data.valid) < 200_000
    again = charlm.load_data()
    assert np.array_equal(again.train, data.train) and np.array_equal(again.valid, data.valid)
    train_text = data.train.tobytes()
    for name in charlm.VALID_FILES:
        text = (Path(os.__file__).parent / name).read_bytes()
        assert text in data.valid.tobytes() and text not in train_text


# --- training ------------------------------------------------------------------------------------

def test_digits_short_training_beats_chance(short_digits):
    accuracy = digits.evaluate(jax.jit(short_digits.apply), short_digits.variables,
                               short_digits.data)
    assert accuracy > 0.6   # chance is 0.1
    assert not short_digits.from_cache and short_digits.train_seconds > 0
    assert short_digits.num_params > 300_000


def test_charlm_short_training_lowers_perplexity(short_charlm):
    apply = jax.jit(short_charlm.apply)
    initial = short_charlm.model.init(jax.random.PRNGKey(0),
                                      jnp.zeros((1, charlm.CONTEXT), jnp.int32))
    before = charlm.evaluate(apply, initial, short_charlm.data)
    after = charlm.evaluate(apply, short_charlm.variables, short_charlm.data)
    assert after < before / 4 and after < 40


# --- evaluate ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["digits", "charlm"])
def test_evaluate_calls_only_the_given_apply(name, short_digits, short_charlm):
    module, trained = {"digits": (digits, short_digits), "charlm": (charlm, short_charlm)}[name]
    jitted = jax.jit(trained.apply)
    calls = []

    def counting(variables, x):
        assert variables is trained.variables
        calls.append((x.shape, np.dtype(x.dtype)))
        return jitted(variables, x)

    first = module.evaluate(counting, trained.variables, trained.data)
    n_calls = len(calls)
    assert n_calls > 1 and len(set(calls)) == 1   # the same shape every time
    assert module.evaluate(counting, trained.variables, trained.data) == first
    assert len(calls) == 2 * n_calls
    assert module.evaluate(jitted, trained.variables, trained.data) == first


def test_evaluate_uses_the_outputs_of_apply():
    data = digits.load_data()
    always_three = lambda variables, x: jnp.zeros((x.shape[0], 10)).at[:, 3].set(1.0)  # noqa: E731
    assert digits.evaluate(always_three, None, data) == pytest.approx(np.mean(data.y_test == 3))
    uniform = lambda variables, x: jnp.zeros(x.shape + (256,))  # noqa: E731
    assert charlm.evaluate(uniform, None, charlm.load_data()) == pytest.approx(256.0)


@pytest.mark.parametrize("name", ["digits", "charlm"])
def test_calibration_batches_come_from_the_training_split(name, short_digits, short_charlm):
    module, trained = {"digits": (digits, short_digits), "charlm": (charlm, short_charlm)}[name]
    batches = module.calibration_batches(trained, n=3)
    assert len(batches) == 3
    for variables, x in batches:
        assert variables is trained.variables
        assert x.shape[0] == module.EVAL_BATCH
    again = module.calibration_batches(trained, n=3)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(batches, again))
    if name == "digits":
        train_rows = {row.tobytes() for row in trained.data.x_train.reshape(1437, -1)}
        first = batches[0][1].reshape(digits.EVAL_BATCH, -1)
        assert all(row.tobytes() in train_rows for row in first)
    else:
        assert batches[0][1].shape == (charlm.EVAL_BATCH, charlm.CONTEXT)
        assert batches[0][1].dtype == np.int32
        assert bytes(batches[0][1][0].astype(np.uint8)) in trained.data.train.tobytes()


# --- the weight cache ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cached_digits(tmp_path_factory):
    """A 5-step digits run trained once with an empty cache: `(trained, its cache file)`."""
    path = tmp_path_factory.mktemp("zoo-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRAPHOPT_ZOO_CACHE", str(path))
        trained = digits.train(steps=5)
    (file,) = path.glob("digits-*.safetensors")
    return trained, file


def test_cache_round_trips_bit_exactly(zoo_cache, cached_digits):
    first, file = cached_digits
    assert not first.from_cache
    from safetensors.numpy import load_file
    assert "params/Conv_0/kernel" in load_file(str(file))

    zoo_cache.mkdir()
    shutil.copy(file, zoo_cache / file.name)
    second = digits.train(steps=5)
    assert second.from_cache and second.train_seconds == pytest.approx(first.train_seconds)
    assert jax.tree.structure(second.variables) == jax.tree.structure(first.variables)
    a, b = _leaves_with_paths(first.variables), _leaves_with_paths(second.variables)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key

    digits.train(steps=6)   # other settings, another file
    assert len(list(zoo_cache.glob("digits-*.safetensors"))) == 2


def _garbage(path):
    path.write_bytes(b"not a safetensors file")


def _truncated(path):
    path.write_bytes(path.read_bytes()[:-1000])


def _flipped_byte(path):
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF
    path.write_bytes(bytes(blob))


def _wrong_shape(path):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(path))
    tensors["params/Dense_1/bias"] = np.zeros(11, np.float32)
    save_file(tensors, str(path))


@pytest.mark.parametrize("corrupt", [_garbage, _truncated, _flipped_byte, _wrong_shape],
                         ids=["garbage", "truncated", "flipped-byte", "wrong-shape"])
def test_corrupt_cache_file_is_rebuilt(zoo_cache, cached_digits, corrupt):
    first, file = cached_digits
    zoo_cache.mkdir()
    path = Path(shutil.copy(file, zoo_cache / file.name))
    corrupt(path)
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = digits.train(steps=5)
    assert not rebuilt.from_cache
    for key, value in _leaves_with_paths(first.variables).items():
        assert np.array_equal(value, _leaves_with_paths(rebuilt.variables)[key])  # deterministic
    assert digits.train(steps=5).from_cache   # the rebuilt file loads


# --- graphopt ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["digits", "charlm"])
def test_graphopt_traces_and_lowers_zoo_models(name, short_digits, short_charlm):
    module, trained = {"digits": (digits, short_digits), "charlm": (charlm, short_charlm)}[name]
    (variables, x), = module.calibration_batches(trained, n=1)
    graph = graphopt.trace(trained.apply, variables, x)
    assert sum(math.prod(p.type.shape) for p in graph.params()) == trained.num_params
    # Every kernel is a parameter operand of a dot_general or a convolution.
    kernels = {p.path for p in graph.params() if p.path.endswith("kernel")}
    used = {operand.path for node in graph.walk()
            if node.op.name in ("dot_general", "conv_general_dilated")
            for operand in node.inputs if getattr(operand, "role", None) == "param"}
    assert kernels and kernels == used
    lowered = jax.jit(graphopt.lower(graph))(variables, x)
    assert np.array_equal(np.asarray(lowered), np.asarray(jax.jit(trained.apply)(variables, x)))


# --- full training (slow) ------------------------------------------------------------------------

@pytest.mark.slow
def test_digits_full_training_reaches_97_percent():
    trained = digits.train()
    assert digits.evaluate(jax.jit(trained.apply), trained.variables, trained.data) >= 0.97


@pytest.mark.slow
def test_charlm_full_training_beats_unigram_by_far():
    trained = charlm.train()
    perplexity = charlm.evaluate(jax.jit(trained.apply), trained.variables, trained.data)
    assert math.isfinite(perplexity) and perplexity < 7

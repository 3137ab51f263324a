"""Masked parameters (graphopt.pruning.masks): magnitude and N:M masks, the report, the file."""

import json
import os

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from graphopt.errors import GraphoptError
from graphopt.pruning.masks import NO_SPEEDUP, SparsityError, load_sparsified, sparsify


def mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def mlp_params(rng=0, k=8, h=8, o=4):
    r = np.random.default_rng(rng)
    return {"w1": jnp.asarray(r.normal(size=(k, h)), jnp.float32), "b1": jnp.asarray(r.normal(size=h), jnp.float32),
            "w2": jnp.asarray(r.normal(size=(h, o)), jnp.float32)}


def zeroed(params, masks):
    """The reference: `params` with the weights outside each mask set to zero."""
    def one(path, leaf):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        return jnp.where(masks[name], leaf, 0) if name in masks else leaf
    return jax.tree_util.tree_map_with_path(one, params)


def kept_are_largest(w, keep):
    """Every kept |w| is at least every pruned |w|."""
    a = np.abs(np.asarray(w, np.float64))
    return keep.all() or not keep.any() or a[keep].min() >= a[~keep].max()


# --- magnitude --------------------------------------------------------------------------------------

def test_local_magnitude_prunes_the_same_fraction_of_each_layer():
    params = mlp_params()
    s = sparsify(mlp, params, jnp.ones((2, 8)), sparsity=0.25, scope="local", params_argnums=0)
    assert sorted(s.masks) == ["w1", "w2"]                # biases are not layer weights
    assert s.masks["w1"].sum() == 64 - 16 and s.masks["w2"].sum() == 32 - 8
    for name in ("w1", "w2"):
        assert s.masks[name].dtype == bool and kept_are_largest(params[name], s.masks[name])
        np.testing.assert_array_equal(s.params[name], np.where(s.masks[name], params[name], 0))
    assert s.params["b1"] is params["b1"]
    assert [(r.path, r.pattern, r.kept, r.size) for r in s.report.rows] == [
        ("w1", "magnitude local", 48, 64), ("w2", "magnitude local", 24, 32)]


def test_global_magnitude_ranks_all_layers_together():
    params = {"w1": jnp.array([[1., 2.], [3., 4.]]), "w2": jnp.array([[10., -20.], [30., 0.5]])}
    s = sparsify(lambda p, x: x @ p["w1"] @ p["w2"], params, jnp.ones(2), sparsity=0.5, params_argnums=0)
    assert s.masks["w1"].tolist() == [[False, False], [False, True]]
    assert s.masks["w2"].tolist() == [[True, True], [True, False]]
    assert s.params["w2"].tolist() == [[10., -20.], [30., 0.]]


def test_global_magnitude_notes_a_layer_pruned_entirely():
    params = {"w1": jnp.full((2, 2), 0.01), "w2": jnp.full((2, 2), 5.0)}
    s = sparsify(lambda p, x: x @ p["w1"] @ p["w2"], params, jnp.ones(2), sparsity=0.5, params_argnums=0)
    assert s.report.rows[0].kept == 0 and "every weight pruned" in s.report.rows[0].note


@pytest.mark.parametrize("sparsity, size, pruned", [(0.3, 10, 3), (0.25, 10, 3), (0.29, 100, 29), (0.0, 10, 0),
                                                    (0.99, 10, 10), (0.5, 1, 1)])
def test_the_pruned_count_is_sparsity_times_size_rounded_half_up(sparsity, size, pruned):
    w = jnp.arange(1, size + 1, dtype=jnp.float32).reshape(size, 1)
    s = sparsify(lambda w, x: x @ w, w, jnp.ones(size), sparsity=sparsity, scope="local", params_argnums=0)
    assert (~s.masks["w"]).sum() == pruned


def test_ties_keep_the_earlier_weight():
    w = jnp.ones((4, 2))
    s = sparsify(lambda w, x: x @ w, w, jnp.ones(4), sparsity=0.5, params_argnums=0)
    assert s.masks["w"].ravel().tolist() == [True] * 4 + [False] * 4
    s = sparsify(lambda w, x: x @ w, w, jnp.ones(4), method="n:m", params_argnums=0)
    assert s.masks["w"].tolist() == [[True, True], [True, True], [False, False], [False, False]]


@settings(max_examples=25)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=3), st.floats(0, 0.99), st.integers(0, 2**32 - 1))
def test_global_magnitude_keeps_the_largest_weights_of_all_layers(widths, sparsity, seed):
    r = np.random.default_rng(seed)
    params = [jnp.asarray(r.normal(size=(3, w)), jnp.float32) for w in widths]
    s = sparsify(lambda ps, x: sum((x @ p).sum() for p in ps), params, jnp.ones(3), sparsity=sparsity,
                 params_argnums=0)
    weights = np.concatenate([np.asarray(p).ravel() for p in params])
    keep = np.concatenate([s.masks[str(i)].ravel() for i in range(len(params))])
    assert (~keep).sum() == int(np.floor(sparsity * weights.size + 0.5))
    assert kept_are_largest(weights, keep)


# --- N:M --------------------------------------------------------------------------------------------

def groups(w, keep, axes, m):
    """(|w|, keep) as rows of m consecutive weights along `axes` (flattened, last innermost)."""
    order = [a for a in range(w.ndim) if a not in axes] + list(axes)
    return (np.abs(np.asarray(w, np.float64)).transpose(order).reshape(-1, m),
            keep.transpose(order).reshape(-1, m))


def assert_n_of_m(w, keep, axes, n, m):
    values, kept = groups(w, keep, axes, m)
    assert (kept.sum(axis=1) == n).all()
    for row, mask in zip(values, kept):
        assert row[mask].min() >= row[~mask].max()


@settings(max_examples=25)
@given(st.integers(1, 3), st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 8)]), st.integers(1, 5),
       st.booleans(), st.integers(0, 2**32 - 1))
def test_n_m_keeps_the_n_largest_of_every_m_along_the_contraction(blocks, nm, out, transposed, seed):
    n, m = nm
    r = np.random.default_rng(seed)
    shape = (out, blocks * m) if transposed else (blocks * m, out)
    w = jnp.asarray(r.normal(size=shape), jnp.float32)
    fn = (lambda w, x: x @ w.T) if transposed else (lambda w, x: x @ w)
    s = sparsify(fn, w, jnp.ones(blocks * m), method="n:m", n=n, m=m, params_argnums=0)
    keep = s.masks["w"]
    assert_n_of_m(w, keep, (1,) if transposed else (0,), n, m)
    np.testing.assert_array_equal(s.params, np.where(keep, w, 0))
    assert s.report.rows[0].pattern == f"{n}:{m}" and s.settings["sparsity"] == 1 - n / m


def test_n_m_groups_follow_an_einsum_and_several_contracting_axes():
    r = np.random.default_rng(1)
    w = jnp.asarray(r.normal(size=(3, 4, 5)), jnp.float32)
    fn = lambda w, x: jnp.einsum("abk,kbe->ae", x, w.transpose(1, 0, 2))  # noqa: E731
    s = sparsify(fn, w, jnp.ones((6, 3, 4)), method="n:m", params_argnums=0)
    # the dot contracts the transposed weight's axes (1, 0), the parameter's (0, 1): 12 = 3 groups of 4
    assert_n_of_m(w, s.masks["w"], (0, 1), 2, 4)


def test_n_m_on_conv_groups_input_channels_of_each_kernel_tap():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(3, (2, 2))(x)

    x = jnp.ones((1, 5, 5, 8))
    variables = Model().init(jax.random.key(0), x)
    s = sparsify(Model().apply, variables, x, method="n:m")
    kernel = variables["params"]["Conv_0"]["kernel"]               # HWIO
    keep = s.masks["params/Conv_0/kernel"]
    assert_n_of_m(kernel, keep, (0, 1, 2), 2, 4)   # (h, w, i) flattened, i innermost
    per_tap = keep.transpose(0, 1, 3, 2).reshape(-1, 4)                     # 4 input channels of one tap
    assert (per_tap.sum(axis=1) == 2).all()


def test_n_m_keeps_infinities_and_zeroes_without_nan():
    w = jnp.array([[jnp.inf], [-jnp.inf], [jnp.inf], [1.0]])
    s = sparsify(lambda w, x: x @ w, w, jnp.ones(4), method="n:m", params_argnums=0)
    assert s.params.ravel().tolist() == [np.inf, -np.inf, 0.0, 0.0]


# --- models -------------------------------------------------------------------------------------------

class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("options", [dict(sparsity=0.6), dict(sparsity=0.4, scope="local"), dict(method="n:m")])
def test_a_linen_model_runs_as_its_weights_zeroed(options):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 4)), jnp.float32)
    variables = ConvNet().init(jax.random.key(0), x)
    s = sparsify(ConvNet().apply, variables, x, **options)
    assert sorted(s.masks) == ["params/Conv_0/kernel", "params/Dense_0/kernel"]
    assert jax.tree_util.tree_structure(s.params) == jax.tree_util.tree_structure(variables)
    expected = ConvNet().apply(zeroed(variables, s.masks), x)
    np.testing.assert_array_equal(ConvNet().apply(s.params, x), expected)
    assert not np.array_equal(expected, ConvNet().apply(variables, x))


def test_an_equinox_module_comes_back_as_a_module():
    model = eqx.nn.MLP(8, 4, 8, 1, key=jax.random.key(0))
    s = sparsify(model, jnp.ones(8), method="n:m")
    assert isinstance(s.params, eqx.nn.MLP) and sorted(s.masks) == ["layers/0/weight", "layers/1/weight"]
    assert_n_of_m(model.layers[0].weight, s.masks["layers/0/weight"], (1,), 2, 4)
    np.testing.assert_array_equal(s.params.layers[1].weight, np.where(s.masks["layers/1/weight"],
                                                                      model.layers[1].weight, 0))


def test_the_users_arrays_are_not_modified():
    r = np.random.default_rng(3)
    params = {"w": r.normal(size=(4, 4)).astype(np.float32), "b": r.normal(size=4).astype(np.float32)}
    before = {k: v.copy() for k, v in params.items()}
    s = sparsify(lambda p, x: x @ p["w"] + p["b"], params, np.ones(4, np.float32), params_argnums=0)
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
    assert s.params["w"] is not params["w"] and isinstance(s.params["w"], np.ndarray)
    assert not np.shares_memory(s.params["w"], params["w"]) and (s.params["w"] == 0).sum() == 8


def test_several_parameter_arguments_come_back_as_a_tuple():
    w1, w2 = jnp.arange(4.).reshape(2, 2), jnp.arange(4.).reshape(2, 2) + 10
    s = sparsify(lambda a, x, b: x @ a @ b, w1, jnp.ones(2), w2, sparsity=0.5, params_argnums=(0, 2))
    assert sorted(s.masks) == ["a", "b"] and isinstance(s.params, tuple)
    assert s.params[0].tolist() == [[0., 0.], [0., 0.]] and s.params[1].tolist() == [[10., 11.], [12., 13.]]


# --- rules and the report -------------------------------------------------------------------------------

def test_rules_skip_and_set_sparsity_first_match_wins():
    params = mlp_params()
    s = sparsify(mlp, params, jnp.ones(8), sparsity=0.5, params_argnums=0,
                 rules={"w2": None, "w": 0.75, "typo": 0.1})
    assert sorted(s.masks) == ["w1"] and s.masks["w1"].sum() == 16
    assert s.params["w2"] is params["w2"]
    assert [(r.path, r.pattern) for r in s.report.rows] == [("w1", "magnitude 75% (rule 1)"),
                                                            ("w2", "skipped (rule 0)")]
    text = str(s.report)
    assert "rule 2 ('typo' → 0.1) matched no layer weight" in text
    assert NO_SPEEDUP in text


def test_the_report_names_a_weight_also_read_outside_layers():
    class Tied(nn.Module):
        @nn.compact
        def __call__(self, ids):
            embed = nn.Embed(8, 4)
            return embed.attend(embed(ids))

    ids = jnp.arange(3)
    variables = Tied().init(jax.random.key(0), ids)
    s = sparsify(Tied().apply, variables, ids, method="n:m")
    assert s.report.rows[0].note == "also read by gather: masked there too"


# --- the file ---------------------------------------------------------------------------------------------

def test_save_and_load_are_bit_exact(tmp_path):
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.bfloat16),
              "b": jnp.array([np.nan, -0.0, np.inf, 1.5], jnp.float32),
              "q": jnp.array([1.0, -2.0], jnp.float8_e4m3fn)}
    fn = lambda p, x: (x @ p["w"]).astype(jnp.float32) + p["b"] + p["q"].astype(jnp.float32).sum()  # noqa: E731
    s = sparsify(fn, params, jnp.ones(8, jnp.bfloat16), method="n:m", params_argnums=0)
    s.save(tmp_path / "s.safetensors")
    for loaded in (load_sparsified(tmp_path / "s.safetensors"),
                   load_sparsified(tmp_path / "s.safetensors", like=params)):
        for name in ("w", "b", "q"):
            got, want = np.asarray(loaded.params[name]), np.asarray(s.params[name])
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
        assert loaded.masks.keys() == s.masks.keys() and (loaded.masks["w"] == s.masks["w"]).all()
        assert loaded.report == s.report and loaded.settings == s.settings
    assert isinstance(load_sparsified(tmp_path / "s.safetensors", like=params).params["w"], jax.Array)
    load_sparsified(tmp_path / "s.safetensors").save(tmp_path / "again.safetensors")  # a loaded one saves too
    again = load_sparsified(tmp_path / "again.safetensors")
    assert all(again.params[k].tobytes() == np.asarray(s.params[k]).tobytes() for k in params)
    assert again.report == s.report and (again.masks["w"] == s.masks["w"]).all()


def test_the_file_holds_masks_as_uint8_and_json_metadata(tmp_path):
    from safetensors import safe_open

    s = sparsify(mlp, mlp_params(), jnp.ones(8), params_argnums=0, sparsity=0.3)
    s.save(tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "np") as f:
        metadata = f.metadata()
        assert f.get_tensor("w1:mask").dtype == np.uint8 and sorted(f.keys()) == [
            "b1", "w1", "w1:mask", "w2", "w2:mask"]
    assert metadata["format"] == "graphopt.sparse-params" and metadata["version"] == "1"
    assert json.loads(metadata["settings"]) == {"method": "magnitude", "sparsity": 0.3, "scope": "global",
                                                "n": None, "m": None}
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_loading_checks_format_version_and_shapes(tmp_path):
    s = sparsify(mlp, mlp_params(), jnp.ones(8), params_argnums=0)
    s.save(tmp_path / "m.safetensors")
    with pytest.raises(SparsityError, match="saved from a different model"):
        load_sparsified(tmp_path / "m.safetensors", like=mlp_params(k=4))
    with pytest.raises(SparsityError, match="holds 3 parameter arrays, `like` has 2"):
        load_sparsified(tmp_path / "m.safetensors", like={"w1": 0, "w2": 0})
    save_file({"a": np.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "x"})
    with pytest.raises(SparsityError, match="not a graphopt sparse checkpoint"):
        load_sparsified(tmp_path / "other.safetensors")
    save_file({"a": np.zeros(2)}, str(tmp_path / "v9.safetensors"),
              metadata={"format": "graphopt.sparse-params", "version": "9"})
    with pytest.raises(SparsityError, match="version '9' is not supported"):
        load_sparsified(tmp_path / "v9.safetensors")
    save_file({"a": np.zeros(2)}, str(tmp_path / "cut.safetensors"),
              metadata={"format": "graphopt.sparse-params", "version": "1", "paths": '["a", "b"]'})
    with pytest.raises(SparsityError, match="lacks parameters or metadata"):
        load_sparsified(tmp_path / "cut.safetensors")
    (tmp_path / "junk").write_bytes(b"not a file format")
    with pytest.raises(SparsityError, match="cannot read a safetensors file"):
        load_sparsified(tmp_path / "junk")


# --- errors -------------------------------------------------------------------------------------------------

W = jnp.ones((4, 4))


def fails(match, fn=lambda w, x: x @ w, args=(W, jnp.ones(4)), **options):
    options.setdefault("params_argnums", 0)
    with pytest.raises(SparsityError, match=match) as info:
        sparsify(fn, *args, **options)
    assert isinstance(info.value, GraphoptError) and isinstance(info.value, ValueError)
    return str(info.value)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, "0.5"])
def test_a_sparsity_outside_0_1_is_an_error(bad):
    assert "a number in [0, 1)" in fails(r"sparsity=", sparsity=bad)


@pytest.mark.parametrize("n, m", [(4, 4), (5, 4), (0, 4), (-1, 2), (2.0, 4), (True, 4)])
def test_n_m_needs_integers_with_1_le_n_lt_m(n, m):
    fails(r"1 <= n < m", method="n:m", n=n, m=m)


def test_options_of_the_other_method_are_errors():
    fails("pass n= and m= instead", method="n:m", sparsity=0.5)
    fails("method='magnitude' takes sparsity=", m=4)
    fails(r"write method='n:m', n=2, m=4", method="2:4")
    fails("use 'magnitude' or 'n:m'", method="l1")
    fails("scope='layer'", scope="layer")


def test_bad_rules_are_errors():
    assert "escape special characters" in fails(r"rule 0: path '\(' is not a valid regex", rules=[("(", None)])
    fails(r"rule 0 \('w'\): a rule is a \(regex", rules=["w"])
    fails(r"rule 1 \('w'\) sparsity=1.5", rules=[("x", None), ("w", 1.5)])
    fails(r"with method='n:m' a rule can only skip", rules={"w": 0.5}, method="n:m")
    fails(r"rules=\('w', None\): rules are a list of", rules=("w", None))


def test_no_parameters_is_an_error():
    fails("no argument holds parameters; pass params_argnums", params_argnums=None)


def test_n_m_on_an_indivisible_contraction_names_the_layer_unless_a_rule_skips_it():
    w = jnp.ones((6, 4))
    message = fails(r"layer weight w: its contraction \(axes \[0\] of shape \[6, 4\]\) has 6 weights, not a "
                    r"multiple of m=4", args=(w, jnp.ones(6)), method="n:m")
    assert "rules=[('^w$', None)]" in message
    s = sparsify(lambda w, x: x @ w, w, jnp.ones(6), method="n:m", rules=[("^w$", None)], params_argnums=0)
    assert s.masks == {} and s.report.rows[0].pattern == "skipped (rule 0)"


def test_nan_weights_are_an_error_unless_skipped():
    w = W.at[1, 2].set(jnp.nan)
    fails(r"layer weight w has 1 NaN value\(s\)", args=(w, jnp.ones(4)))
    fails(r"NaN", args=(w, jnp.ones(4)), method="n:m")
    s = sparsify(lambda w, x: x @ w, w, jnp.ones(4), rules=[("w", None)], params_argnums=0)
    assert s.params is w


def test_a_weight_computed_from_several_parameters_is_an_error_unless_skipped():
    p = {"w": W, "a": jnp.ones((4, 1)), "b": jnp.ones((1, 4))}
    fn = lambda p, x: x @ (p["w"] + p["a"] @ p["b"])  # noqa: E731  (a LoRA merge)
    fails(r"layer weight w: its weight is computed through add", fn=fn, args=(p, jnp.ones(4)))
    s = sparsify(fn, p, jnp.ones(4), rules=[("^w$", None)], params_argnums=0)
    assert s.masks == {}


def test_n_m_on_a_weight_contracted_along_two_axes_is_an_error():
    fn = lambda w, x: x @ w + x @ w.T  # noqa: E731
    fails(r"contract it along different axes \(\(0,\) and \(1,\)\)", fn=fn, method="n:m")
    assert sparsify(fn, W, jnp.ones(4), params_argnums=0).masks["w"].sum() == 8   # magnitude: fine


def test_weights_given_as_shapes_only_are_an_error():
    fails("needs the weights' values", args=(jax.ShapeDtypeStruct((4, 4), jnp.float32), jnp.ones(4)))


def test_a_float8_weight_rounds_trip_through_its_bits(tmp_path):
    w = jnp.asarray(np.arange(16).reshape(4, 4), ml_dtypes.float8_e4m3fn)
    s = sparsify(lambda w, x: (x @ w.astype(jnp.float32)), w, jnp.ones(4), params_argnums=0)
    s.save(tmp_path / "f8.safetensors")
    got = load_sparsified(tmp_path / "f8.safetensors").params["w"]
    assert got.dtype == w.dtype and got.tobytes() == np.asarray(s.params).tobytes()

"""Importance scores against hand computations: magnitude over the whole group, Wanda's
activation-weighted norms, and first-order Taylor gradients of channel masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt.passes.prune.deps import PruneError, analyze
from graphopt.pruning.importance import scores


@pytest.fixture
def mlp():
    k = jax.random.split(jax.random.key(0), 4)
    p = {"b1": jax.random.normal(k[0], (6,)), "w1": jax.random.normal(k[1], (5, 6)),
         "w2": jax.random.normal(k[2], (6, 3))}
    x = jax.random.normal(k[3], (7, 5))
    fn = lambda p, x: jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]  # noqa: E731
    deps = analyze(graphopt.trace(fn, p, x, params_argnums=0))
    leaves = jax.tree_util.tree_leaves((p, x))
    return fn, p, x, deps, leaves


def test_magnitude_sums_every_parameter_of_the_channel(mlp):
    fn, p, x, deps, leaves = mlp
    w1, b1, w2 = (np.asarray(p[k]) for k in ("w1", "b1", "w2"))
    l1 = scores(deps, leaves, "l1")["w1:1"]
    np.testing.assert_allclose(l1, np.abs(w1).sum(0) + np.abs(b1) + np.abs(w2).sum(1), rtol=1e-6)
    l2 = scores(deps, leaves, "l2")["w1:1"]
    np.testing.assert_allclose(l2, np.sqrt((w1 ** 2).sum(0) + b1 ** 2 + (w2 ** 2).sum(1)), rtol=1e-6)


def test_a_flattened_channel_collects_all_its_rows():
    k = jax.random.split(jax.random.key(1), 3)
    p = {"conv": jax.random.normal(k[0], (3, 3, 1, 4)), "dense": jax.random.normal(k[1], (2 * 2 * 4, 5))}

    def fn(p, x):
        y = jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(y).reshape(x.shape[0], -1) @ p["dense"]

    x = jax.random.normal(k[2], (2, 2, 2, 1))
    deps = analyze(graphopt.trace(fn, p, x, params_argnums=0))
    [group] = deps.groups
    got = scores(deps, jax.tree_util.tree_leaves((p, x)), "l1")[group.name]
    conv, dense = np.asarray(p["conv"]), np.asarray(p["dense"]).reshape(2, 2, 4, 5)
    np.testing.assert_allclose(got, np.abs(conv).sum((0, 1, 2)) + np.abs(dense).sum((0, 1, 3)), rtol=1e-6)


def test_wanda_weighs_weight_rows_by_activation_norms(mlp):
    fn, p, x, deps, leaves = mlp
    batches = [(leaves, None), ([*leaves[:-1], 2 * leaves[-1]], None)]
    got = scores(deps, leaves, "wanda", batches=batches)["w1:1"]
    h = [np.asarray(jax.nn.relu(xb @ p["w1"] + p["b1"])) for xb in (x, 2 * x)]
    norm = np.sqrt(sum((hb ** 2).sum(0) for hb in h))
    np.testing.assert_allclose(got, norm * np.abs(np.asarray(p["w2"])).sum(1), rtol=1e-5)


def test_taylor_is_the_gradient_of_a_channel_mask(mlp):
    fn, p, x, deps, leaves = mlp
    y = jnp.arange(7) % 3

    def loss(out, batch):
        return -jnp.mean(jax.nn.log_softmax(out)[jnp.arange(7), batch])

    got = scores(deps, leaves, "taylor", batches=[(leaves, y)], loss=loss)["w1:1"]

    def masked(m):
        return loss(jax.nn.relu(x @ p["w1"] + p["b1"]) * m @ p["w2"], y)

    np.testing.assert_allclose(got, np.abs(jax.grad(masked)(jnp.ones(6))), rtol=1e-5, atol=1e-7)


def test_bad_requests(mlp):
    fn, p, x, deps, leaves = mlp
    with pytest.raises(PruneError, match="unknown importance 'l3'"):
        scores(deps, leaves, "l3")
    with pytest.raises(PruneError, match="needs calibration batches"):
        scores(deps, leaves, "wanda")
    with pytest.raises(PruneError, match="needs loss="):
        scores(deps, leaves, "taylor", batches=[(leaves, None)])

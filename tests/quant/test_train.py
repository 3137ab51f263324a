"""Quantization-aware fine-tuning: the fake-quantized model is the quantized model's forward pass,
its gradients flow, and distillation brings it closer to the float model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt.quant.train import fake_quantized
from graphopt.train import TrainingError, distill


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 32)), jnp.float32)
    return model, model.init(jax.random.key(0), x), x


def test_fake_quantized_forward_is_the_quantized_model(mlp):
    model, variables, x = mlp
    student = fake_quantized(model.apply, variables, x, scheme="int4", group=16)
    assert [n.op.name for n in student.graph.nodes].count("fake_quantize") == 2
    quantized = graphopt.quantize(model.apply, variables, x, scheme="int4", group=16, prefer="memory")
    np.testing.assert_allclose(student(variables, x), quantized(x), rtol=1e-5, atol=1e-5)


def test_distill_reduces_the_gap_to_the_float_model(mlp):
    model, variables, x = mlp
    teacher = lambda x: model.apply(variables, x)  # noqa: E731
    student = fake_quantized(model.apply, variables, x, scheme="int4", group=8)
    rng = np.random.default_rng(1)  # unlabeled batches of the traced shape
    batches = [jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for _ in range(4)]
    gap = lambda p: float(jnp.mean((student(p, x) - teacher(x)) ** 2))  # noqa: E731
    for loss in ("mse", "kl"):
        tuned = distill(student, teacher, variables, batches, steps=60, loss=loss, learning_rate=1e-4)
        assert gap(tuned) < 0.8 * gap(variables), loss  # measured 0.57 (mse) and 0.68 (kl)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), variables, model.init(jax.random.key(0), x))


def test_distill_rejects_bad_arguments(mlp):
    model, variables, x = mlp
    student = fake_quantized(model.apply, variables, x, scheme="int8")
    teacher = lambda x: model.apply(variables, x)  # noqa: E731
    with pytest.raises(TrainingError, match="loss must be"):
        distill(student, teacher, variables, [x], steps=1, loss="l1")
    with pytest.raises(TrainingError, match="steps"):
        distill(student, teacher, variables, [x], steps=0)
    with pytest.raises(TrainingError, match="empty"):
        distill(student, teacher, variables, [], steps=1)

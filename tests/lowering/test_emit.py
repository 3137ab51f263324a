"""Lowering: the lowered graph is the same program (compiled HLO included), differentiable,
vmappable, checks its signature, and uses registered kernels for graphopt ops."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt.demo import DemoConfig, demo_model
from graphopt import implementations
from graphopt.errors import SignatureError
from graphopt.ir import Graph
from graphopt.lowering import emit
from graphopt.ops import OpDef
from graphopt.testing import assert_equivalent
from graphopt.types import TensorType


def _instructions(hlo: str) -> list[str]:
    """Compiled HLO instructions without metadata, ids renumbered by first appearance."""
    hlo = re.sub(r", metadata=\{[^}]*\}", "", hlo)
    hlo = re.sub(r",? ?stack_frame_id=\d+", "", hlo)
    lines = [l for l in hlo.splitlines() if l.strip() and not l.startswith(("HloModule", "FileNames",
                                                                                 "FunctionNames", "FileLocations",
                                                                                 "StackFrames"))
             and not re.match(r"^\d+ ", l.strip())]
    # Entry parameter names come from argument names, which jit derives from the pytree paths.
    lines = [re.sub(r"^ENTRY .*$", "ENTRY", l) for l in lines]
    ids: dict[str, str] = {}
    rename = lambda m: ids.setdefault(m.group(0), f"%v{len(ids)}")
    return [re.sub(r"%[\w.\-]+", rename, l) for l in lines]


def test_compiled_program_is_identical_to_jax_jit():
    model, variables, tokens = demo_model(DemoConfig(layers=2, seq=32))
    g = graphopt.trace(model.apply, variables, tokens)
    original = jax.jit(model.apply).lower(variables, tokens).compile().as_text()
    lowered = jax.jit(graphopt.lower(g)).lower(variables, tokens).compile().as_text()
    assert _instructions(lowered) == _instructions(original)


def test_source_metadata_survives_lowering():
    model, variables, tokens = demo_model(DemoConfig(layers=1, seq=16))
    g = graphopt.trace(model.apply, variables, tokens)
    text = jax.jit(graphopt.lower(g)).lower(variables, tokens).as_text(debug_info=True)
    assert "Transformer/block_0/attn/query/dot_general" in text
    assert "lowering/emit.py" not in text


def test_gradients_and_vmap_match():
    def f(w, x):
        h = jax.nn.gelu(x @ w["a"])
        h = jax.checkpoint(lambda v: jnp.tanh(v) * w["b"])(h)
        return jax.nn.logsumexp(h, axis=-1)

    w = {"a": jax.random.normal(jax.random.PRNGKey(0), (4, 6)), "b": jnp.linspace(-1, 1, 6)}
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
    lowered = graphopt.lower(graphopt.trace(f, w, x, params_argnums=0))
    grad = lambda fn: jax.grad(lambda w, x: fn(w, x).sum(), argnums=(0, 1))(w, x)
    assert_equivalent(grad(lowered), grad(f))
    xs = jnp.stack([x, 2 * x])
    assert_equivalent(jax.vmap(lowered, (None, 0))(w, xs), jax.vmap(f, (None, 0))(w, xs))


def test_wrong_signature_names_expected_and_given():
    g = graphopt.trace(lambda w, x: x @ w, jnp.ones((4, 2)), jnp.ones((3, 4)), params_argnums=0)
    f = graphopt.lower(g)
    with pytest.raises(SignatureError, match=r"argument 'x' has type f32\[5,4\].*traced for f32\[3,4\]") as err:
        f(jnp.ones((4, 2)), jnp.ones((5, 4)))
    assert "expected signature: (w: f32[4,2], x: f32[3,4])" in str(err.value)
    assert "given:              (w: f32[4,2], x: f32[5,4])" in str(err.value)
    with pytest.raises(SignatureError, match=r"i32\[3,4\]"):
        f(jnp.ones((4, 2)), jnp.ones((3, 4), jnp.int32))
    with pytest.raises(SignatureError, match="structured as"):
        f(jnp.ones((4, 2)))


def test_kernels_are_chosen_per_backend():
    def infer(in_types, params, regions):
        return [in_types[0]]

    op = OpDef("test_double", infer, lambda x, *, regions: [x * 2])
    g = Graph()
    x = g.add_input(TensorType((2,), np.float32))
    g.set_outputs([g.add_node(op, [x]).output])
    assert graphopt.lower(g)(jnp.ones(2))[0].tolist() == [2.0, 2.0]
    emit.register_kernel("test_double", jax.default_backend())(lambda x, *, regions: [x * 3])
    try:
        assert graphopt.lower(g)(jnp.ones(2))[0].tolist() == [3.0, 3.0]
    finally:
        del implementations.KERNELS[("test_double", emit.DEFAULT, jax.default_backend())]

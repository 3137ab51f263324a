"""Tracing: roles and paths, provenance, inlining, regions, opaque primitives, and clear errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import graphopt
from graphopt.errors import TraceError
from graphopt.testing import assert_equivalent


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))


def test_linen_params_have_roles_and_paths():
    model, x = MLP(), jnp.ones((2, 4))
    variables = model.init(jax.random.PRNGKey(0), x)
    g = graphopt.trace(model.apply, variables, x)
    params = {a.path: str(a.type) for a in g.inputs if a.role == "param"}
    assert params == {"params/hidden/bias": "f32[8]", "params/hidden/kernel": "f32[4,8]",
                      "params/out/bias": "f32[3]", "params/out/kernel": "f32[8,3]"}
    assert [(a.role, a.path) for a in g.inputs if a.role == "input"] == [("input", "x")]
    assert g.name == "MLP.apply"


def test_linen_module_paths_and_source_lines():
    model, x = MLP(), jnp.ones((2, 4))
    g = graphopt.trace(model.apply, model.init(jax.random.PRNGKey(0), x), x)
    dots = [n for n in g.nodes if n.op.name == "dot_general"]
    assert [n.provenance.module_path for n in dots] == ["MLP/hidden", "MLP/out"]
    # The source line is the innermost frame outside JAX and Flax: this test file.
    assert all(n.provenance.source.startswith("test_trace.py:") for n in dots)


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(4, 8, rngs=rngs)
        self.down = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


def test_nnx_module_state_is_the_parameter_argument_and_paths_are_scoped():
    block = NnxBlock(nnx.Rngs(0))
    x = jnp.ones((2, 4))
    g = graphopt.trace(block, x)
    assert sorted(a.path for a in g.params()) == ["down/bias", "down/kernel", "up/bias", "up/kernel"]
    dots = [n for n in g.nodes if n.op.name == "dot_general"]
    assert [n.provenance.module_path for n in dots] == ["up", "down"]
    # the module's classes are restored after tracing
    assert "__call__" not in nnx.Linear.__dict__ or not hasattr(nnx.Linear.__call__, "__wrapped__")
    out = jax.jit(graphopt.lower(g))(nnx.state(block), x)
    assert_equivalent(out, block(x))


def test_equinox_module():
    eqx = pytest.importorskip("equinox")
    mlp = eqx.nn.MLP(4, 2, 8, 2, key=jax.random.PRNGKey(0))
    x = jnp.ones(4)
    g = graphopt.trace(mlp, x)
    assert any(a.path.startswith("layers/0") for a in g.params())
    assert any("/layers/0/" in n.provenance.module_path for n in g.walk())
    out = graphopt.lower(g)(eqx.filter(mlp, eqx.is_array), x)
    assert_equivalent(out, mlp(x))


def test_nested_jit_is_inlined_and_keeps_module_path():
    @jax.jit
    def inner(a):
        with jax.named_scope("inner_scope"):
            return jnp.sin(a) + 1

    g = graphopt.trace(lambda x: inner(x) * 2, jnp.ones(3))
    assert [n.op.name for n in g.nodes if n.op.name != "constant"] == ["sin", "add", "mul"]
    sin = next(n for n in g.nodes if n.op.name == "sin")
    assert sin.provenance.module_path.endswith("inner_scope")


def test_scalar_literals_are_shared_and_arrays_kept_by_identity():
    weights = jnp.arange(3.0)
    g = graphopt.trace(lambda x: (x * 2.0 + weights) * 2.0, jnp.ones(3))
    consts = [n for n in g.nodes if n.op.name == "constant"]
    scalars = [n for n in consts if n.output.type.ndim == 0]
    assert len(scalars) == 1
    assert any(n.params["value"] is weights for n in consts)


def test_unknown_higher_order_primitive_is_opaque_and_round_trips():
    from jax.sharding import Mesh, PartitionSpec as P

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:
        from jax.experimental.shard_map import shard_map
    mesh = Mesh(np.array(jax.devices()[:1]), ("d",))
    fn = shard_map(lambda a: jnp.cos(a) * 3, mesh=mesh, in_specs=P("d"), out_specs=P("d"))
    x = jnp.linspace(0, 1, 8)
    g = graphopt.trace(lambda a: fn(a) + 1, x)
    opaque = [n for n in g.nodes if n.op.kind == "opaque"]
    assert len(opaque) == 1
    g.verify()
    assert_equivalent(jax.jit(graphopt.lower(g))(x), jax.jit(lambda a: fn(a) + 1)(x), exact=True)


def test_static_argnums():
    def f(x, n, mode):
        return x * n if mode == "scale" else x + n

    g = graphopt.trace(f, jnp.ones(3), 3, "scale", static_argnums=(1, 2))
    assert len(g.inputs) == 1
    assert_equivalent(graphopt.lower(g)(jnp.arange(3.0)), jnp.arange(3.0) * 3)


def test_python_control_flow_on_a_traced_value_is_explained():
    def f(x):
        if x.sum() > 0:
            return x
        return -x

    with pytest.raises(TraceError, match=r"cannot trace f at test_trace.py:\d+ .*lax.cond"):
        graphopt.trace(f, jnp.ones(3))


def test_non_array_argument_is_named():
    with pytest.raises(TraceError, match=r"argument 'config/mode' is a str.*static_argnums"):
        graphopt.trace(lambda x, config: x, jnp.ones(2), {"mode": "fast"})


def test_errors_inside_the_model_name_the_user_line():
    def broken(x):
        return x @ jnp.ones((5, 5))

    with pytest.raises(TraceError, match=r"cannot trace broken at test_trace.py:\d+ .*TypeError"):
        graphopt.trace(broken, jnp.ones((2, 3)))


def test_params_argnums_out_of_range():
    with pytest.raises(TraceError, match="out of range"):
        graphopt.trace(lambda x: x, jnp.ones(2), params_argnums=3)


def test_shape_dtype_structs_are_enough_to_trace():
    spec = jax.ShapeDtypeStruct((2, 0, 3), jnp.bfloat16)
    g = graphopt.trace(lambda x: jnp.tanh(x).sum(axis=1), spec)
    assert str(g.outputs[0].type) == "bf16[2,3]"

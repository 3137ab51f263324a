"""The quantized ops' kernels compute the reference form's values (up to accumulation rounding),
and refuse, with a reason, what they cannot compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt import implementations
from graphopt.ir import Graph
from graphopt.quant.ops import quantize_node, quantized_node
from graphopt.quant.scheme import scheme_named
from graphopt.types import TensorType

DOT = (((1,), (0,)), ((), ()))


def _layer(scheme, x_shape, w_shape, *, conv=False, weight_side=1, act_scale=None):
    """A graph (w, x) -> quantized layer, and the layer's node."""
    graph = Graph()
    w = graph.add_input(TensorType(w_shape, np.float32), "param", "w")
    x = graph.add_input(TensorType(x_shape, np.float32), path="x")
    if conv:
        spec = jax.lax.conv_dimension_numbers(x_shape, w_shape, ("NHWC", "HWIO", "NHWC"))
        op_params = jax.make_jaxpr(lambda x, w: jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))(
            jnp.zeros(x_shape), jnp.zeros(w_shape)).eqns[0].params
        assert op_params["dimension_numbers"] == spec
    else:
        lhs, rhs = (x_shape, w_shape) if weight_side == 1 else (w_shape, x_shape)
        op_params = jax.make_jaxpr(lambda a, b: jax.lax.dot_general(a, b, DOT))(
            jnp.zeros(lhs), jnp.zeros(rhs)).eqns[0].params
    codes = quantize_node(graph, w, scheme, weight_side=weight_side,
                          dimension_numbers=op_params["dimension_numbers"], conv=conv)
    act = None if act_scale is None else graph.constant(np.asarray(act_scale, np.float32))
    out = quantized_node(graph, "quantized_conv" if conv else "quantized_dot", x, codes, scheme,
                         weight=w.type, weight_side=weight_side, op_params=dict(op_params), act_scale=act)
    graph.set_outputs([out])
    return graph, out.node


def _run(graph, node, implementation, w, x):
    node.params = {**node.params, "implementation": implementation}
    return np.asarray(jax.jit(graphopt.lower(graph).flat)(w, x)[0], np.float64)


CASES = [
    ("int8", "scale_after", (6, 32), (32, 16), False),
    ("int8_dynamic", "integer", (6, 32), (32, 16), False),
    ("int8_dynamic", "integer", (2, 5, 5, 8), (3, 3, 8, 4), True),
    ("fp8", "fp8", (6, 32), (32, 16), False),
    ("fp8_e5m2", "fp8", (6, 32), (32, 16), False),
]


@pytest.mark.parametrize("name,kernel,x_shape,w_shape,conv", CASES)
def test_kernel_equals_the_reference_form(name, kernel, x_shape, w_shape, conv):
    scheme = scheme_named(name)
    rng = np.random.default_rng(0)
    w = rng.standard_normal(w_shape).astype(np.float32)
    x = rng.standard_normal(x_shape).astype(np.float32)
    # static schemes take a calibrated activation scale: here the absmax one
    act_scale = np.abs(x).max() / scheme.activations.qmax if scheme.activation_mode == "static" else None
    graph, node = _layer(scheme, x_shape, w_shape, conv=conv, act_scale=act_scale)
    kernel_impl = implementations.find(node.op.name, kernel, "cpu")
    assert kernel_impl is not None and kernel_impl.unsupported(node.input_types, node.params) is None
    reference = _run(graph, node, None, w, x)
    actual = _run(graph, node, kernel, w, x)
    # The same products, summed in another order / precision: f32 accumulation error only.
    bound = 1e-5 * np.abs(x).sum() * np.abs(w).max()
    assert np.abs(actual - reference).max() <= bound


@pytest.mark.parametrize("scheme,kernel,why", [
    (scheme_named("int4", group=8), "scale_after", "int4"),
    (scheme_named("int8", group=8), "scale_after", "per-group"),
    (scheme_named("int8", symmetric=False), "scale_after", "asymmetric"),
    (scheme_named("int8"), "integer", "int8 activations"),
    (scheme_named("int8_dynamic"), "fp8", "fp8 activations"),
    (scheme_named("int8_dynamic"), "scale_after", "activations are quantized"),
])
def test_kernels_name_what_they_cannot_run(scheme, kernel, why):
    _, node = _layer(scheme, (4, 16), (16, 8))
    reason = implementations.find("quantized_dot", kernel, "cpu").unsupported(node.input_types, node.params)
    assert reason is not None and why in reason


def test_dots_with_batch_dimensions_run_in_the_reference_form_only():
    graph = Graph()
    w = graph.add_input(TensorType((3, 16, 8), np.float32), "param", "w")
    x = graph.add_input(TensorType((3, 4, 16), np.float32), path="x")
    numbers = (((2,), (1,)), ((0,), (0,)))
    op_params = jax.make_jaxpr(lambda a, b: jax.lax.dot_general(a, b, numbers))(
        jnp.zeros((3, 4, 16)), jnp.zeros((3, 16, 8))).eqns[0].params
    scheme = scheme_named("int8_dynamic")
    codes = quantize_node(graph, w, scheme, weight_side=1, dimension_numbers=numbers)
    out = quantized_node(graph, "quantized_dot", x, codes, scheme, weight=w.type, weight_side=1,
                         op_params=dict(op_params))
    reason = implementations.find("quantized_dot", "integer", "cpu").unsupported(out.node.input_types,
                                                                                   out.node.params)
    assert "batch dimensions" in reason

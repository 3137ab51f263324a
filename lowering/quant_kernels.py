"""Kernels of the quantized ops (`graphopt.quant.ops`), registered in `graphopt.implementations`.

The reference form (implementation None) dequantizes the weight and runs the float op: on GPU and
TPU XLA fuses that convert into the GEMM's operand read, so the weight crosses memory as int8. On
CPU XLA writes the dequantized weight out in full first, so other forms can be faster:

    op              implementation  what it runs                                     when
    quantized_dot   "scale_after"   dot(x, codes as float) · scale, scale on the     weight-only, per channel,
                                    output (one multiply per output, not per weight)  symmetric
    quantized_dot   "integer"       dot(int8 x, int8 codes) → int32, then ·x_scale·w_scale   int8 activations
    quantized_conv  "integer"       the same with conv_general_dilated               int8 activations
    quantized_dot   "fp8"           dot on float8 operands, f32 accumulation, then ·scales   fp8 schemes

All compute the reference's values up to accumulation rounding (the integer forms accumulate
exactly in int32; the reference sums the same products in the activation dtype). Each kernel's
`supports` rule names what it cannot do; the quantize pass measures the supported ones.

Example:
    >>> import graphopt.implementations as impls
    >>> sorted(k.implementation for k in impls.available("quantized_dot", "cpu"))
    ['fp8', 'integer', 'scale_after']
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from graphopt.implementations import register
from graphopt.quant.ops import split_inputs, x_contracting
from graphopt.quant.scheme import FORMATS, Layout, compute_scale, quantize


def _per_channel(in_types, p, kind) -> str | None:
    if not p["symmetric"]:
        return "asymmetric (zero-point) weights"
    if p["group"] is not None:
        return f"per-group scales (group {p['group']}) vary along the contracting axis"
    if kind == "quantized_dot":
        _, (lb, rb) = dict(p["op_params"])["dimension_numbers"]
        if lb or rb:
            return "dot_general with batch dimensions"
    return None


def _scale_after_support(in_types, p):
    if p["activation_mode"] is not None:
        return "activations are quantized (use 'integer')"
    if FORMATS[p["format"]].name == "int4":
        return "int4 codes"
    return _per_channel(in_types, p, "quantized_dot")


def _integer_support(kind):
    def supports(in_types, p):
        if p["activation_format"] != "int8":
            return "needs int8 activations"
        return _per_channel(in_types, p, kind)
    return supports


def _fp8_support(in_types, p):
    if p["activation_format"] not in ("float8_e4m3fn", "float8_e5m2"):
        return "needs fp8 activations"
    return _per_channel(in_types, p, "quantized_dot")


def _output_scale(scale, out_ndim, kind, p, operand_side: int, contracting):
    """A keepdims scale of one operand (weight or activation), reshaped to broadcast against the
    op's output: its non-contracting axes are the output's axes for that operand."""
    op_params = dict(p["op_params"])
    if kind == "quantized_conv":
        spec = op_params["dimension_numbers"]
        out_axis = spec.out_spec[0] if operand_side == 0 else spec.out_spec[1]
        vector = jnp.reshape(scale, (-1,))
        shape = [1] * out_ndim
        shape[out_axis] = vector.shape[0]
        return jnp.reshape(vector, shape)
    free = [d for a, d in enumerate(scale.shape) if a not in contracting]
    rest = out_ndim - len(free)
    return jnp.reshape(scale, ((*free, *(1,) * rest) if operand_side == 0 else (*(1,) * rest, *free)))


def _weight_contracting(p, kind):
    if kind == "quantized_conv":
        spec = dict(p["op_params"])["dimension_numbers"].rhs_spec
        return tuple(a for a in range(len(p["weight_shape"])) if a != spec[0])
    return tuple(p["reduce_axes"])


def _run(kind, lhs, rhs, op_params, accumulate):
    op_params = {**dict(op_params), "preferred_element_type": accumulate}
    prim = lax.dot_general_p if kind == "quantized_dot" else lax.conv_general_dilated_p
    return prim.bind(lhs, rhs, **op_params)


@register("quantized_dot", "scale_after", supports=_scale_after_support)
def quantized_dot_scale_after(*args, regions, implementation, **p):
    x, codes, scale, _, _ = split_inputs(args, p)
    w = p["weight_side"]
    lhs, rhs = (x, codes.astype(x.dtype)) if w == 1 else (codes.astype(x.dtype), x)
    out = _run("quantized_dot", lhs, rhs, p["op_params"], dict(p["op_params"])["preferred_element_type"])
    return [(out * _output_scale(scale.astype(out.dtype), out.ndim, "quantized_dot", p, w,
                                 tuple(p["reduce_axes"]))).astype(out.dtype)]


def _low_precision(kind, accumulate):
    def kernel(*args, regions, implementation, **p):
        x, codes, w_scale, _, act_scale = split_inputs(args, p)
        fmt, side = FORMATS[p["activation_format"]], p["weight_side"]
        contracting = x_contracting(p, kind)
        compute = jnp.promote_types(x.dtype, jnp.float32)
        if act_scale is not None:
            layout, x_scale = Layout(tuple(range(x.ndim))), jnp.reshape(act_scale, (1,) * x.ndim).astype(compute)
        else:
            layout = Layout(contracting)
            x_scale, _ = compute_scale(lax.stop_gradient(x), fmt, layout)
        xq = quantize(x, fmt, layout, x_scale)
        lhs, rhs = (xq, codes) if side == 1 else (codes, xq)
        out = _run(kind, lhs, rhs, p["op_params"], accumulate).astype(compute)
        if act_scale is not None:
            out = out * jnp.reshape(x_scale, ())
        else:
            out = out * _output_scale(x_scale, out.ndim, kind, p, 1 - side, contracting)
        out = out * _output_scale(w_scale.astype(compute), out.ndim, kind, p, side, _weight_contracting(p, kind))
        out_dtype = dict(p["op_params"])["preferred_element_type"] or x.dtype
        return [out.astype(out_dtype)]
    kernel.__name__ = f"{kind}_{'integer' if accumulate == jnp.int32 else 'fp8'}"
    return kernel


register("quantized_dot", "integer", supports=_integer_support("quantized_dot"))(
    _low_precision("quantized_dot", jnp.int32))
register("quantized_conv", "integer", supports=_integer_support("quantized_conv"))(
    _low_precision("quantized_conv", jnp.int32))
register("quantized_dot", "fp8", supports=_fp8_support)(_low_precision("quantized_dot", np.dtype(np.float32)))

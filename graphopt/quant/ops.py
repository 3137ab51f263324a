"""graphopt's quantization ops: quantize, quantized_dot, quantized_conv, fake_quantize.

    quantize(w) -> (codes, scale[, zero_point])      weights → stored codes; on parameters only, so
                                                     fold_params runs it once, at optimize time
    quantized_dot(x, codes, scale[, zero][, act_scale])   dot_general of x with the weight the codes
    quantized_conv(x, codes, scale[, zero][, act_scale])  stand for (conv_general_dilated likewise)
    fake_quantize(x[, scale])                        x rounded to the format and back, with a
                                                     straight-through gradient (training)

What a quantized op computes is defined by its reference implementation (implementation None):
dequantize the weight to the activation's dtype, quantize and dequantize the activation when the
scheme quantizes activations (per token at run time, or with the calibrated per-tensor
`act_scale`), then run the original dot_general / conv with its own params. Kernels
(`lowering/quant_kernels.py`) compute the same values in other forms — the weight scale applied
after the matmul, int8×int8→int32 matmuls — and differ only by accumulation rounding; the
quantize pass chooses among them by measurement.

Example:
    >>> import numpy as np
    >>> from graphopt.ir import Graph
    >>> from graphopt.types import TensorType
    >>> g = Graph()
    >>> w = g.add_input(TensorType((16, 4), np.float32), path="w", role="param")
    >>> x = g.add_input(TensorType((2, 16), np.float32), path="x")
    >>> codes = quantize_node(g, w, scheme_named("int8"), weight_side=1,
    ...                       dimension_numbers=(((1,), (0,)), ((), ())))
    >>> [v.type for v in codes]
    [TensorType(i8[16,4]), TensorType(f32[1,4])]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from graphopt.nn_ops import CompositeOp, _dot_type, add_composite, composite_node
from graphopt.ops import OPS, register
from graphopt.quant.scheme import (FORMATS, Layout, QuantizationError, Scheme, compute_scale, dequantize,
                                   quantize, scheme_named)
from graphopt.types import TensorType

__all__ = ["QUANTIZE", "QUANTIZED_DOT", "QUANTIZED_CONV", "DEQUANTIZE", "FAKE_QUANTIZE", "quantize_node",
           "quantized_node", "dequantize_node", "fake_quantize_node", "weight_layout", "scheme_named"]

LAYOUT_PARAMS = ("format", "reduce_axes", "group_axis", "group", "symmetric")


def _layout(p) -> Layout:
    return Layout(tuple(p["reduce_axes"]), p["group_axis"], p["group"])


def _code_types(w: TensorType, p) -> list[TensorType]:
    fmt = FORMATS[p["format"]]
    layout = _layout(p)
    layout.check(w.shape, "quantize")
    shape = w.shape if fmt.name != "int4" else (*w.shape[:-1], w.shape[-1] // 2)
    scale_dtype = jnp.promote_types(w.dtype, jnp.float32)
    out = [TensorType(shape, fmt.storage), TensorType(layout.scale_shape(w.shape), scale_dtype)]
    if not p["symmetric"]:
        out.append(TensorType(layout.scale_shape(w.shape), np.int8))
    return out


def _check_layout(op, p):
    if p["format"] not in FORMATS:
        raise TypeError(f"{op}: unknown format {p['format']!r}; known: {', '.join(FORMATS)}")
    if type(p["symmetric"]) is not bool:
        raise TypeError(f"{op}: symmetric must be a bool, got {p['symmetric']!r}")
    if FORMATS[p["format"]].is_float and not p["symmetric"]:
        raise TypeError(f"{op}: floating formats are symmetric only")


# --- quantize ------------------------------------------------------------------------------------

def _quantize_check(in_types, p):
    _check_layout("quantize", p)
    if len(in_types) != 1 or not jnp.issubdtype(in_types[0].dtype, jnp.floating):
        raise TypeError(f"quantize takes one float weight, got {in_types}")
    w = in_types[0]
    if FORMATS[p["format"]].name == "int4" and w.shape[-1] % 2:
        raise TypeError(f"quantize: int4 packs two codes per byte along the last axis; {w} has an odd one")
    try:
        return _code_types(w, p)
    except QuantizationError as err:
        raise TypeError(str(err)) from None


def _quantize_impl(w, *, regions, format, reduce_axes, group_axis, group, symmetric, implementation):
    fmt, layout = FORMATS[format], Layout(tuple(reduce_axes), group_axis, group)
    scale, zero = compute_scale(w, fmt, layout, symmetric=symmetric)
    codes = quantize(w, fmt, layout, scale, zero)
    return [codes, scale] + ([] if zero is None else [zero])


QUANTIZE = register(CompositeOp("quantize", _quantize_check, _quantize_impl, LAYOUT_PARAMS,
                                output_names=("codes", "scale", "zero_point"), finite_outputs=(1,)))


# --- quantized_dot / quantized_conv --------------------------------------------------------------

MATMUL_PARAMS = LAYOUT_PARAMS + ("weight_side", "weight_shape", "weight_dtype", "activation_format",
                                 "activation_mode", "op_params")


def _matmul_check(kind):
    def check(in_types, p):
        _check_layout(kind, p)
        if p["activation_mode"] not in (None, "dynamic", "static"):
            raise TypeError(f"{kind}: activation_mode must be None, 'dynamic' or 'static'")
        if (p["activation_mode"] is None) != (p["activation_format"] is None):
            raise TypeError(f"{kind}: activation_format and activation_mode go together")
        weight = TensorType(tuple(p["weight_shape"]), p["weight_dtype"])
        expected = ["x"] + ["codes", "scale"] + ["zero_point"] * (not p["symmetric"]) + \
            ["act_scale"] * (p["activation_mode"] == "static")
        if len(in_types) != len(expected):
            raise TypeError(f"{kind} takes {len(expected)} inputs ({', '.join(expected)}), got {len(in_types)}")
        codes = _code_types(weight, p)
        for name, got, want in zip(expected[1:], in_types[1:], codes):
            if got.strong() != want.strong():
                raise TypeError(f"{kind}: {name} must be {want} for weight {weight}, got {got}")
        if p["activation_mode"] == "static" and in_types[-1].shape != ():
            raise TypeError(f"{kind}: act_scale must be a scalar, got {in_types[-1]}")
        return [_float_type(kind, in_types[0], weight, p)]
    return check


def _float_type(kind, x: TensorType, w: TensorType, p) -> TensorType:
    lhs, rhs = (x, w) if p["weight_side"] == 1 else (w, x)
    op_params = dict(p["op_params"])
    if kind == "quantized_dot":
        return _dot_type(lhs.strong(), rhs.strong(), op_params["dimension_numbers"], op_params["precision"],
                         op_params["preferred_element_type"])
    out = jax.eval_shape(lambda a, b: lax.conv_general_dilated_p.bind(a, b, **op_params), lhs.aval(), rhs.aval())
    return TensorType(out.shape, out.dtype)


def weight_of(codes, scale, zero, *, format, reduce_axes, group_axis, group, weight_shape, dtype):
    """The float weight that `codes` stand for (the reference form's dequantize)."""
    layout = Layout(tuple(reduce_axes), group_axis, group)
    return dequantize(codes, FORMATS[format], layout, scale, zero, dtype, tuple(weight_shape))


def split_inputs(args, p):
    """(x, codes, scale, zero, act_scale) from a quantized op's inputs."""
    x, codes, scale, *rest = args
    zero = None if p["symmetric"] else rest.pop(0)
    act_scale = rest.pop(0) if p["activation_mode"] == "static" else None
    return x, codes, scale, zero, act_scale


def x_contracting(p, kind) -> tuple[int, ...]:
    """The activation's axes that one per-token scale spans: its contracting axes (dot), or every
    axis but the batch axis (conv: one scale per example)."""
    op_params = dict(p["op_params"])
    if kind == "quantized_dot":
        (lc, rc), _ = op_params["dimension_numbers"]
        return tuple(lc if p["weight_side"] == 1 else rc)
    lhs_spec = op_params["dimension_numbers"].lhs_spec
    return tuple(a for a in range(len(lhs_spec)) if a != lhs_spec[0])


def fake_quantized_activation(x, p, kind, act_scale):
    """x quantized to the activation format and back (the reference form's activation)."""
    fmt = FORMATS[p["activation_format"]]
    if act_scale is not None:
        layout, scale = Layout(tuple(range(x.ndim))), jnp.reshape(act_scale, (1,) * x.ndim)
    else:
        layout = Layout(x_contracting(p, kind))
        scale, _ = compute_scale(lax.stop_gradient(x), fmt, layout)
    return dequantize(quantize(x, fmt, layout, scale.astype(jnp.promote_types(x.dtype, jnp.float32))),
                      fmt, layout, scale, None, x.dtype)


def run_float(kind, lhs, rhs, op_params):
    """The original dot_general / conv on float operands."""
    prim = lax.dot_general_p if kind == "quantized_dot" else lax.conv_general_dilated_p
    return prim.bind(lhs, rhs, **dict(op_params))


def _matmul_impl(kind):
    def impl(*args, regions, implementation, **p):
        x, codes, scale, zero, act_scale = split_inputs(args, p)
        w = weight_of(codes, scale, zero, format=p["format"], reduce_axes=p["reduce_axes"],
                      group_axis=p["group_axis"], group=p["group"], weight_shape=p["weight_shape"],
                      dtype=x.dtype)
        if p["activation_mode"] is not None:
            x = fake_quantized_activation(x, p, kind, act_scale)
        lhs, rhs = (x, w) if p["weight_side"] == 1 else (w, x)
        return [run_float(kind, lhs, rhs, p["op_params"])]
    return impl


QUANTIZED_DOT = register(CompositeOp("quantized_dot", _matmul_check("quantized_dot"),
                                     _matmul_impl("quantized_dot"), MATMUL_PARAMS))
QUANTIZED_CONV = register(CompositeOp("quantized_conv", _matmul_check("quantized_conv"),
                                      _matmul_impl("quantized_conv"), MATMUL_PARAMS))


# --- dequantize ----------------------------------------------------------------------------------

DEQUANTIZE_PARAMS = LAYOUT_PARAMS + ("weight_shape", "weight_dtype")


def _dequantize_check(in_types, p):
    _check_layout("dequantize", p)
    weight = TensorType(tuple(p["weight_shape"]), p["weight_dtype"])
    want = _code_types(weight, p)
    if [t.strong() for t in in_types] != [t.strong() for t in want]:
        raise TypeError(f"dequantize: inputs must be ({', '.join(map(str, want))}) for weight {weight}, "
                        f"got ({', '.join(map(str, in_types))})")
    return [weight]


def _dequantize_impl(codes, scale, *zero, regions, format, reduce_axes, group_axis, group, symmetric,
                     weight_shape, weight_dtype, implementation):
    return [weight_of(codes, scale, zero[0] if zero else None, format=format, reduce_axes=reduce_axes,
                      group_axis=group_axis, group=group, weight_shape=weight_shape, dtype=weight_dtype)]


DEQUANTIZE = register(CompositeOp("dequantize", _dequantize_check, _dequantize_impl, DEQUANTIZE_PARAMS))


# --- fake_quantize (training) --------------------------------------------------------------------

def _fake_check(in_types, p):
    _check_layout("fake_quantize", p)
    x = in_types[0]
    if not jnp.issubdtype(x.dtype, jnp.floating) or len(in_types) not in (1, 2):
        raise TypeError(f"fake_quantize takes a float tensor and an optional scale, got {in_types}")
    try:
        _layout(p).check(x.shape, "fake_quantize")
    except QuantizationError as err:
        raise TypeError(str(err)) from None
    return [x.strong()]


def _fake_impl(x, *scale, regions, format, reduce_axes, group_axis, group, symmetric, implementation):
    fmt, layout = FORMATS[format], Layout(tuple(reduce_axes), group_axis, group)
    if scale:
        s, zero = jnp.reshape(scale[0], (1,) * x.ndim).astype(jnp.promote_types(x.dtype, jnp.float32)), None
    else:  # scales follow the weights as they train, but carry no gradient themselves
        s, zero = compute_scale(lax.stop_gradient(x), fmt, layout, symmetric=symmetric)
    rounded = dequantize(quantize(x, fmt, layout, s, zero), fmt, layout, s, zero, x.dtype, x.shape)
    return [x + lax.stop_gradient(rounded - x)]  # straight-through: the gradient of identity


FAKE_QUANTIZE = register(CompositeOp("fake_quantize", _fake_check, _fake_impl, LAYOUT_PARAMS))


# --- building nodes ------------------------------------------------------------------------------

def weight_layout(scheme: Scheme, kind: str, weight: TensorType, weight_side: int, op_params) -> Layout:
    """Scales per output channel (shared over the weight's contracting / input-feature axes), or,
    for grouped schemes, per run of `group` consecutive elements of the contraction (see
    `_grouped`). QuantizationError if it cannot be."""
    if kind == "quantized_dot":
        (lc, rc), _ = op_params["dimension_numbers"]
        contracting = tuple(rc if weight_side == 1 else lc)
    else:
        rhs_spec = op_params["dimension_numbers"].rhs_spec
        reduce = tuple(sorted(a for a in range(weight.ndim) if a != rhs_spec[0]))
        if scheme.group is not None:  # groups of input channels, each with its whole window
            layout = Layout(reduce, rhs_spec[1], scheme.group)
            layout.check(weight.shape, "conv kernel")
            return layout
        return Layout(reduce)
    if not contracting:
        raise QuantizationError(f"weight {weight} has no contracting axis to share scales over")
    layout = Layout(tuple(sorted(contracting))) if scheme.group is None else \
        _grouped(contracting, weight.shape, scheme.group)
    layout.check(weight.shape, "weight")
    return layout


def _grouped(contracting, shape, group: int) -> Layout:
    """Groups of `group` consecutive elements of a contraction over several axes (an attention
    output projection [heads, head_dim, out] contracts over heads × head_dim): the trailing
    contracting axes that `group` spans are reduced whole, the axis where the group ends is split,
    and the contracting axes before it keep one scale per index."""
    inner = 1
    for position in range(len(contracting) - 1, -1, -1):
        axis = contracting[position]
        size = shape[axis]
        if group % (inner * size) == 0 and position > 0:
            inner *= size
            continue
        if group % inner == 0 and size % (group // inner) == 0:
            part = group // inner
            reduce = tuple(sorted(contracting[position:]))
            return Layout(reduce) if part == size and position == 0 else Layout(reduce, axis, part)
        break
    dims = " × ".join(str(shape[a]) for a in contracting)
    raise QuantizationError(f"weight {tuple(shape)}: a contraction of {dims} does not split into groups of "
                            f"{group}; choose a group size that divides it (or per-channel scales)")


def _layout_params(scheme: Scheme, layout: Layout) -> dict:
    return dict(format=scheme.weights.name, reduce_axes=layout.reduce_axes, group_axis=layout.group_axis,
                group=layout.group, symmetric=scheme.symmetric, implementation=None)


def quantize_node(where, w, scheme: Scheme, *, weight_side: int, dimension_numbers=None, conv=False):
    """The `quantize` node of weight `w` (codes, scale[, zero_point] Values) for a dot (or conv)."""
    kind = "quantized_conv" if conv else "quantized_dot"
    op_params = {"dimension_numbers": dimension_numbers}
    layout = weight_layout(scheme, kind, w.type, weight_side, op_params)
    return list(composite_node(where, QUANTIZE, [w], _layout_params(scheme, layout)).outputs)


def quantized_node(where, kind: str, x, codes, scheme: Scheme, *, weight: TensorType, weight_side: int,
                   op_params: dict, act_scale=None, implementation=None):
    """A quantized_dot / quantized_conv node computing the original op (`op_params`) on `x` and the
    weight that `codes` (the quantize node's outputs) stand for."""
    layout = weight_layout(scheme, kind, weight, weight_side, op_params)
    params = _layout_params(scheme, layout)
    params.update(weight_side=weight_side, weight_shape=tuple(weight.shape), weight_dtype=np.dtype(weight.dtype),
                  activation_format=None if scheme.weight_only else scheme.activations.name,
                  activation_mode=scheme.activation_mode, op_params=tuple(sorted(op_params.items())),
                  implementation=implementation)
    inputs = [x, *codes] + ([act_scale] if scheme.activation_mode == "static" else [])
    return add_composite(where, OPS[kind], inputs, params)


def dequantize_node(where, codes, scheme: Scheme, layout: Layout, weight: TensorType):
    """The float weight (of `weight`'s type) that `codes` (a quantize node's outputs) stand for."""
    params = _layout_params(scheme, layout)
    params.update(weight_shape=tuple(weight.shape), weight_dtype=np.dtype(weight.dtype))
    return add_composite(where, DEQUANTIZE, list(codes), params)


def fake_quantize_node(where, x, fmt_name: str, layout: Layout, *, symmetric=True, scale=None):
    """x rounded to `fmt_name` with `layout`'s scales (or the given scalar scale), straight-through."""
    params = dict(format=fmt_name, reduce_axes=layout.reduce_axes, group_axis=layout.group_axis,
                  group=layout.group, symmetric=symmetric, implementation=None)
    return add_composite(where, FAKE_QUANTIZE, [x] + ([scale] if scale is not None else []), params)

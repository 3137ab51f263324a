"""Backend kernels for graphopt's composite ops, registered in `graphopt.implementations`.

    op         implementation  backend  kernel
    attention  "xla"           any      jax.nn.dot_product_attention(implementation="xla")
                               cpu      the same, f32 only (XLA:CPU lacks the bf16/f16 dot algorithms)
    attention  "cudnn"         gpu      jax.nn.dot_product_attention(implementation="cudnn")
    attention  "pallas_flash"  tpu      jax.experimental.pallas.ops.tpu.flash_attention (if importable)
    attention  "chunked"       any      key blocks, online softmax (`lowering/chunked_attention.py`)

A node whose `implementation` is None never reaches these: it runs its decomposition or reference
(see `graphopt.nn_ops`). Each kernel converts the op's semantics to the library's and says, through
its `supports` rule, which nodes it computes with the same semantics; passes never pick it for others:

- layout: "BNTH" q/k/v are transposed to "BTNH" and back (XLA folds these into the dots);
  rank-3 inputs get a batch dimension of 1; bias and mask get leading 1s up to rank 4.
- GQA/MQA: jax.nn.dot_product_attention groups query heads natively (K < N, N % K == 0) with the
  same head mapping (query head n reads kv head n // (N // K)); Pallas flash needs K == N.
- masks: the library fills masked scores with -0.7·finfo(f32).max; the op's `mask_value` fill
  agrees whenever exp(fill - row max) underflows to 0 (fill <= -1e4) and on fully masked rows, which
  average v for any finite fill. A fill of -inf (fully masked rows give NaN in the source) or above
  -1e4 is not supported. cuDNN's result on fully masked rows is its own: it is not promised to
  match (measure on a GPU before relying on it).
- numerics: scores in f32, softmax in f32, probabilities cast to v's dtype (as the reference);
  f64 is not supported (the library computes the softmax in f32).
- the Pallas TPU kernel is registered only when importable and cannot be tested on this machine:
  it takes no mask, no GQA and head dim == value head dim; it is kept deliberately small.

Example:
    >>> import graphopt.implementations as impls
    >>> impls.find("attention", "xla", "cpu").fn.__name__
    'attention_xla'
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from graphopt.implementations import register
from graphopt.nn_ops import attention_dims

_FLOATS = (np.dtype(np.float16), np.dtype(jnp.bfloat16), np.dtype(np.float32))
_MAX_FILL = -1e4


def common_support(in_types, p) -> str | None:
    q, k, v = in_types[:3]
    if q.dtype not in _FLOATS:
        return f"dtype {q.dtype} (supported: f16, bf16, f32)"
    if q.shape[-1] != v.shape[-1]:
        return f"value head dim {v.shape[-1]} differs from the query head dim {q.shape[-1]}"
    fill = p["mask_value"]
    if (p["has_mask"] or p["is_causal"]) and fill is not None and not fill <= _MAX_FILL:
        return f"mask_value {fill} (the kernel's fill agrees only for fills <= {_MAX_FILL:g})"
    if p["has_mask"] and fill is not None and np.isinf(fill):
        return "mask_value -inf: fully masked rows are NaN in the source, averages in the kernel"
    return None


def _xla_cpu_support(in_types, p) -> str | None:
    if in_types[0].dtype != np.float32:  # the library asks for BF16_BF16_F32 / F16_F16_F32 dots
        return (f"dtype {in_types[0].dtype} on CPU (jax.nn.dot_product_attention asks for "
                "BF16_BF16_F32 / F16_F16_F32 dot algorithms, which XLA:CPU does not support)")
    return common_support(in_types, p)


def _cudnn_support(in_types, p) -> str | None:
    reason = common_support(in_types, p)
    if reason:
        return reason
    q = in_types[0]
    if q.dtype == np.float32:
        return "dtype f32 (cuDNN flash attention takes f16 and bf16)"
    if q.shape[-1] > 128 or q.shape[-1] % 8:
        return f"head dim {q.shape[-1]} (cuDNN: a multiple of 8, at most 128; 256 on Hopper)"
    return None


def _to_4d(x, rank):
    return x.reshape((1,) * (rank - x.ndim) + x.shape)


def library_args(q, k, v, extra, p):
    """q, k, v as BTNH rank 4, and the 4-d bias and mask, for jax.nn.dot_product_attention."""
    layout = p["layout"]
    qkv = [x if layout == "BTNH" else jnp.swapaxes(x, -3, -2) for x in (q, k, v)]
    qkv = [x[None] if x.ndim == 3 else x for x in qkv]
    bias = _to_4d(extra[0], 4) if p["has_bias"] else None
    mask = _to_4d(extra[-1], 4) if p["has_mask"] else None
    return qkv, bias, mask


def from_library(out, q, layout):
    out = out if layout == "BTNH" else jnp.swapaxes(out, -3, -2)
    return out[0] if q.ndim == 3 else out


def _dot_product_attention(which):
    def kernel(q, k, v, *extra, regions, **p):
        (q4, k4, v4), bias, mask = library_args(q, k, v, extra, p)
        if which == "cudnn":  # cuDNN wants full-length score dims in bias and mask
            B, T, N, _ = q4.shape
            S = k4.shape[1]
            bias = None if bias is None else jnp.broadcast_to(bias, bias.shape[:2] + (T, S))
            mask = None if mask is None else jnp.broadcast_to(mask, mask.shape[:2] + (T, S))
        out = jax.nn.dot_product_attention(q4, k4, v4, bias, mask, scale=p["scale"],
                                           is_causal=p["is_causal"], implementation=which)
        return [from_library(out, q, p["layout"])]
    kernel.__name__ = f"attention_{which}"
    return kernel


register("attention", "xla", supports=common_support)(_dot_product_attention("xla"))
register("attention", "xla", "cpu", supports=_xla_cpu_support)(_dot_product_attention("xla"))
register("attention", "cudnn", "gpu", supports=_cudnn_support)(_dot_product_attention("cudnn"))


try:  # TPU only; untested here (no TPU). See the module docstring.
    from jax.experimental.pallas.ops.tpu import flash_attention as _pallas_flash
except Exception:  # pragma: no cover - depends on the installed jax
    _pallas_flash = None


def _pallas_support(in_types, p) -> str | None:
    reason = common_support(in_types, p)
    if reason:
        return reason
    if p["has_mask"]:
        return "a boolean mask (the Pallas flash kernel takes an additive bias only)"
    _, _, n, _ = attention_dims(in_types[0], p["layout"])
    _, _, nk, _ = attention_dims(in_types[1], p["layout"])
    if n != nk:
        return f"grouped kv heads ({n} query heads, {nk} kv heads)"
    tq, tk = attention_dims(in_types[0], p["layout"])[1], attention_dims(in_types[1], p["layout"])[1]
    if tq < _PALLAS_BLOCK or tk < _PALLAS_BLOCK or tk % _PALLAS_BLOCK:
        return (f"sequence lengths {tq} (queries) and {tk} (keys): the kernel's {_PALLAS_BLOCK}-token "
                f"blocks need both >= {_PALLAS_BLOCK} and the keys a multiple of {_PALLAS_BLOCK}")
    return None


_PALLAS_BLOCK = 128  # the Pallas TPU flash kernel's default block sizes (BlockSizes.get_default)


if _pallas_flash is not None:
    @register("attention", "pallas_flash", "tpu", supports=_pallas_support)
    def attention_pallas_flash(q, k, v, *extra, regions, **p):
        (q4, k4, v4), bias, _ = library_args(q, k, v, extra, p)
        q4, k4, v4 = (jnp.swapaxes(x, 1, 2) for x in (q4, k4, v4))  # the kernel takes BNTH
        if bias is not None:
            bias = jnp.broadcast_to(bias, q4.shape[:3] + (k4.shape[2],)).astype(jnp.float32)
        out = _pallas_flash.flash_attention(q4, k4, v4, bias, causal=p["is_causal"], sm_scale=p["scale"])
        return [from_library(jnp.swapaxes(out, 1, 2), q, p["layout"])]

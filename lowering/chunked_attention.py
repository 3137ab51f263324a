"""Attention in key blocks with an online softmax: memory linear in the sequence, any backend.

    attention  "chunked"  any  a lax.scan over blocks of C keys (C = 512, 256 or 128, dividing S)

The scores of all queries against one block of keys are computed, masked and folded into a
running maximum, denominator and weighted sum of v (the online softmax of memory-efficient and
flash attention); the [B, N, T, S] score matrix is never built, only [B, N, T, C]. On a 2-core
CPU at 8192 tokens it needs 141 MiB of temporaries where `jax.nn.dot_product_attention`'s XLA form
needs 2 GiB, and ran in 0.83–0.96× that form's time and 0.86–1.0× the decomposition's in four
runs (`benchmarks/RESULTS.md`); fuse_attention measures it against the decomposition and the
other kernels per shape, as any kernel.

Semantics are the op's (`graphopt.nn_ops`): scores in f32, times `scale`, plus bias, masked
scores (mask and causal) set to `mask_value` (or the library's fill), softmax over all keys, so a
fully masked row averages v as the decomposition does. The sums run in another order than one
softmax over the whole row: results differ in the last bits (fuse_attention's approximate
contract). Not supported: keys that no block divides or fewer than two blocks (nothing to save),
and the fills the other kernels refuse (see `lowering.kernels`). Gradients: the scan body is
rematerialized (`jax.checkpoint`), so the backward keeps each block's carry, not its weights, and
its memory is linear in the sequence too (a 2-core CPU, causal [1, T, 4, 32] f32: 92 MiB of
temporaries at T=2048 and 192 MiB at 4096, where without remat it was 204 and 705 MiB).

Example:
    >>> import graphopt.implementations as impls
    >>> impls.find("attention", "chunked", "cpu").fn.__name__
    'attention_chunked'
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from graphopt.implementations import register
from graphopt.lowering.kernels import common_support, from_library, library_args
from graphopt.nn_ops import attention_dims, masked_fill

BLOCKS = (512, 256, 128)  # key block sizes, largest first: fewer scan steps


def key_block(keys: int) -> int | None:
    """The key block for `keys` keys: the largest of BLOCKS that divides it at least twice."""
    return next((c for c in BLOCKS if keys % c == 0 and keys >= 2 * c), None)


def _supports(in_types, p) -> str | None:
    reason = common_support(in_types, p)
    if reason:
        return reason
    keys = attention_dims(in_types[1], p["layout"])[1]
    if key_block(keys) is None:
        return (f"{keys} keys: blocks of {', '.join(map(str, BLOCKS))} keys, at least two, must "
                "divide them")
    return None


@register("attention", "chunked", supports=_supports)
def attention_chunked(q, k, v, *extra, regions, **p):
    (q4, k4, v4), bias, mask = library_args(q, k, v, extra, p)
    (B, T, N, H), (S, K) = q4.shape, k4.shape[1:3]
    G, C = N // K, key_block(S)
    fill = jnp.float32(masked_fill(jnp.float32) if p["mask_value"] is None else p["mask_value"])
    qg = q4.reshape(B, T, K, G, H)

    def blocks(x, axis):  # x's key axis split into S // C blocks, leading; size-1 axes broadcast
        if x is None or x.shape[axis] == 1:
            return None
        x = jnp.moveaxis(x, axis, 0)
        return x.reshape((S // C, C) + x.shape[1:])

    def grouped(x):  # [b, n, t, c] → [b, K, G, t, c], to line up with the grouped scores
        return x.reshape(x.shape[0], K if x.shape[1] == N else 1, G if x.shape[1] == N else 1, *x.shape[2:])

    xs = {"i": jnp.arange(S // C), "k": blocks(k4, 1), "v": blocks(v4, 1),
          "bias": blocks(bias, 3), "mask": blocks(mask, 3)}

    def step(carry, x):
        top, total, acc = carry
        s = jnp.einsum("btkgh,bskh->bkgts", qg, jnp.moveaxis(x["k"], 0, 1),
                       preferred_element_type=jnp.float32) * jnp.float32(p["scale"])
        if bias is not None:
            b = bias if "bias" not in x else jnp.moveaxis(x["bias"], 0, 3)
            s = (s + grouped(b)).astype(jnp.float32)
        keep = None
        if mask is not None:
            keep = grouped(mask if "mask" not in x else jnp.moveaxis(x["mask"], 0, 3))
        if p["is_causal"]:
            causal = x["i"] * C + jnp.arange(C)[None, :] <= jnp.arange(T)[:, None]
            keep = causal if keep is None else jnp.logical_and(keep, causal)
        if keep is not None:
            s = jnp.where(keep, s, fill)
        new_top = jnp.maximum(top, s.max(-1))
        rescale = jnp.exp(top - new_top)
        weights = jnp.exp(s - new_top[..., None])
        total = total * rescale + weights.sum(-1)
        acc = acc * rescale[..., None] + jnp.einsum("bkgts,bskh->bkgth", weights.astype(v4.dtype),
                                                    jnp.moveaxis(x["v"], 0, 1),
                                                    preferred_element_type=jnp.float32)
        return (new_top, total, acc), None

    Hv = v4.shape[-1]
    init = (jnp.full((B, K, G, T), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
            jnp.zeros((B, K, G, T, Hv), jnp.float32))
    xs = {name: x for name, x in xs.items() if x is not None}
    (_, total, acc), _ = lax.scan(jax.checkpoint(step), init, xs)  # remat: the backward keeps carries only
    out = (acc / total[..., None]).astype(v4.dtype)
    out = jnp.moveaxis(out, 3, 1).reshape(B, T, N, Hv)
    return [from_library(out, q, p["layout"])]

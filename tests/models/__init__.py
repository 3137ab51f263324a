"""Small reference models used to exercise graphopt end to end.

Every model is described by a :class:`ModelCase`.  A case carries two views of
the same computation:

* ``target`` / ``trace_args`` / ``trace_kwargs``: exactly what is handed to
  ``graphopt.trace(target, *trace_args, **trace_kwargs)``.  For Flax linen this
  is a bound ``model.apply``; for Flax nnx and Equinox it is the module
  instance itself.
* ``fn`` / ``args``: a *pure* function with the same positional pytree
  signature as the function returned by ``graphopt.lower(graph)``, together
  with example arguments.  This is the reference the lowered function is
  compared against (outputs, gradients, vmap).

The per-framework registries live in :mod:`.linen_models`,
:mod:`.nnx_models` and :mod:`.eqx_models`; each exposes ``MODELS``, a dict
mapping a model name to a zero-argument factory returning a ``ModelCase``.
:func:`all_models` merges them under ``"<framework>/<name>"`` keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """One model plus everything the round-trip tests need to know about it."""

    name: str
    #: Object passed as the first argument of ``graphopt.trace``.
    target: Any
    #: Example positional arguments passed to ``graphopt.trace`` after ``target``.
    trace_args: tuple
    #: Extra keyword arguments for ``graphopt.trace`` (e.g. ``params_argnums``).
    trace_kwargs: dict
    #: Pure reference function with the same signature as the lowered function.
    fn: Callable[..., Any]
    #: Example positional arguments for ``fn`` (and for the lowered function).
    args: tuple
    #: Positions in ``args`` holding parameters (the rest are data inputs).
    param_argnums: tuple[int, ...] = (0,)
    #: How gradients are checked: reverse mode (``jax.grad``), forward mode
    #: (``jax.jvp``, for models whose while-loops carry differentiable state and
    #: are therefore not reverse-differentiable), or not at all.
    grad_mode: Literal["reverse", "forward", "none"] = "reverse"
    #: Op names that must occur somewhere in the traced graph (searched
    #: recursively through regions).
    expected_ops: frozenset[str] = frozenset()
    #: Each substring must occur in the path of at least one param input.
    param_path_hints: tuple[str, ...] = ()

    @property
    def input_argnums(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.args)) if i not in self.param_argnums)


def is_float_tree(tree) -> bool:
    """True if ``tree`` has at least one leaf and every leaf is floating point."""
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(jnp.issubdtype(jnp.result_type(l), jnp.floating) for l in leaves)


def all_models() -> dict[str, Callable[[], ModelCase]]:
    """All registered model factories, keyed ``"<framework>/<name>"``."""
    from . import eqx_models, linen_models, nnx_models

    registry: dict[str, Callable[[], ModelCase]] = {}
    for prefix, module in (("linen", linen_models), ("nnx", nnx_models), ("eqx", eqx_models)):
        for name, factory in module.MODELS.items():
            registry[f"{prefix}/{name}"] = factory
    return registry


# ---------------------------------------------------------------------------
# Cheap deterministic initialisation.
#
# Framework initialisers run (and compile) many small XLA programs on CPU,
# which dominated test time.  Instead, models are initialised abstractly
# (``jax.eval_shape`` / ``nnx.eval_shape`` / ``eqx.filter_eval_shape``) and
# the leaves are filled from NumPy here.
# ---------------------------------------------------------------------------


def numpy_init(
    abstract_tree, seed: int, *, fan_in_axes: Literal["leading", "trailing"] = "leading"
):
    """Fill a pytree of ``jax.ShapeDtypeStruct`` leaves with random values.

    The distribution is chosen from the leaf's key path: ``var`` -> U(0.5, 2)
    (BatchNorm running variance), ``scale`` -> 1 + 0.1 N(0, 1), ``bias`` /
    ``mean`` / 1-D leaves -> 0.1 N(0, 1), everything else (kernels,
    embeddings) -> N(0, 1/fan_in).  ``fan_in_axes="leading"`` means the output
    dimension is the last axis (Flax layout); ``"trailing"`` means it is the
    first (Equinox layout).  Integer leaves become zeros.
    """
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        shape, dtype = leaf.shape, leaf.dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            return jnp.zeros(shape, dtype)
        name = jax.tree_util.keystr(path)
        if "'var'" in name or ".var" in name:
            value = rng.uniform(0.5, 2.0, shape)
        elif "scale" in name:
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "bias" in name or "mean" in name or len(shape) <= 1:
            value = 0.1 * rng.standard_normal(shape)
        else:
            out = shape[-1] if fan_in_axes == "leading" else shape[0]
            fan_in = max(1, int(np.prod(shape)) // out)
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        return jnp.asarray(value, dtype)

    return jax.tree_util.tree_map_with_path(init, abstract_tree)


def normal(seed: int, shape, scale: float = 1.0):
    """Float32 N(0, scale^2) array from NumPy (no XLA compilation)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def randint(seed: int, shape, high: int):
    """Int32 array uniform in ``[0, high)`` from NumPy."""
    return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape), jnp.int32)


# ---------------------------------------------------------------------------
# Building blocks shared by the linen and nnx control-flow models.
# ---------------------------------------------------------------------------


@jax.custom_jvp
def surrogate_clip(x):
    """Hard clip to [-2, 2] whose JVP is a *smooth surrogate* (tanh-shaped).

    The custom rule deliberately differs from the derivative of the primal
    (which is 0 outside the clip range), so a compiler that dropped the
    ``custom_jvp`` wrapper and differentiated the primal instead would produce
    different gradients.
    """
    return jnp.clip(x, -2.0, 2.0)


@surrogate_clip.defjvp
def _surrogate_clip_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return surrogate_clip(x), t * (1.0 - jnp.tanh(x / 2.0) ** 2)


@jax.custom_vjp
def clipped_grad(x):
    """Identity in the forward pass; the backward pass scales by 3 and clips the
    cotangent to [-0.05, 0.05].  Again detectably different from autodiff of
    the primal (which would pass the cotangent through unchanged)."""
    return x


def _clipped_grad_fwd(x):
    return x, None


def _clipped_grad_bwd(_, g):
    return (jnp.clip(3.0 * g, -0.05, 0.05),)


clipped_grad.defvjp(_clipped_grad_fwd, _clipped_grad_bwd)


def refine_step(h, w):
    """One damped refinement step used by the adaptive-depth models (a
    contraction for moderate ``w``, so update norms shrink geometrically)."""
    return 0.5 * h + 0.5 * jnp.tanh(0.5 * (h @ w))


def halting_steps(h, w, *, max_steps: int, tol: float):
    """Per-example number of refinement steps (``lax.while_loop``).

    Example ``b`` keeps iterating ``refine_step`` while its update norm is
    above ``tol`` (at most ``max_steps`` times).  Callers pass
    ``stop_gradient``-ed arguments: the halting decision is discrete, and a
    while-loop with no differentiable carry keeps the model reverse-mode
    differentiable.
    """

    def cond_fn(carry):
        i, _, active, _ = carry
        return (i < max_steps) & jnp.any(active)

    def body_fn(carry):
        i, h, active, n = carry
        h_new = refine_step(h, w)
        delta = jnp.linalg.norm(h_new - h, axis=-1)
        n = n + active.astype(jnp.int32)
        active = active & (delta > tol)
        return i + 1, h_new, active, n

    batch = h.shape[0]
    init = (jnp.int32(0), h, jnp.ones((batch,), bool), jnp.zeros((batch,), jnp.int32))
    return jax.lax.while_loop(cond_fn, body_fn, init)[3]


def masked_refinement(h, w, n_steps, *, max_steps: int):
    """Apply ``refine_step`` exactly ``n_steps[b]`` times to row ``b``.

    Implemented as a fixed-length ``lax.scan`` with a per-example mask, so it
    is reverse-mode differentiable (unlike a data-dependent while-loop).
    """

    def body(h, i):
        h_new = refine_step(h, w)
        return jnp.where((i < n_steps)[:, None], h_new, h), None

    h, _ = jax.lax.scan(body, h, jnp.arange(max_steps))
    return h


def branch(pred, h, w_a, w_b):
    """``lax.cond`` between two parameterised branches."""
    return jax.lax.cond(
        pred,
        lambda h: jnp.tanh(h @ w_a),
        lambda h: jax.nn.gelu(h @ w_b),
        h,
    )


def padding_mask(lengths, seq_len: int):
    """Boolean ``[batch, 1, seq, seq]`` attention mask from token lengths."""
    valid = jnp.arange(seq_len)[None, :] < lengths[:, None]
    return valid[:, None, :, None] & valid[:, None, None, :]


def causal_mask(seq_len: int):
    """Boolean ``[1, 1, seq, seq]`` lower-triangular mask."""
    return jnp.tril(jnp.ones((seq_len, seq_len), bool))[None, None]


def masked_attention(q, k, v, mask):
    """Hand-written multi-head attention.  ``q, k, v``: ``[batch, seq, heads,
    head_dim]``; ``mask``: boolean, broadcastable to ``[batch, heads, q, k]``."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)

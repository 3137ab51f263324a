"""Testing utilities for graphopt.

Four tools, meant to be used together:

* :func:`assert_equivalent` compares two pytrees of arrays: structure,
  shapes, dtypes, then values (NaN-aware, Inf-sign-aware, optionally
  bit-exact including the sign of zero), with per-dtype :data:`TOLERANCES`.
* :func:`assert_matches_reference` compares a jitted function with a jitted
  reference, and tells a real mismatch from one XLA's compiler makes
  (:class:`CompiledDifferently`: the two agree run op by op).
* :func:`equivalence_check` traces a function with :func:`graphopt.trace`,
  verifies the graph, lowers it back with :func:`graphopt.lower`, and checks
  the result against the original, both under ``jax.jit``.
* :func:`programs` (from :mod:`graphopt.testing_programs`) is a hypothesis
  strategy for random straight-line JAX programs with nasty inputs.

Example::

    from hypothesis import given
    from graphopt.testing import assert_equivalent, equivalence_check, programs

    @given(programs())
    def test_roundtrip(program):
        equivalence_check(program, *program.args)
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np

import graphopt
from graphopt.frameworks import adapt
from graphopt.random_program import Program, arrays
from graphopt.testing_programs import OP_FAMILIES, programs

__all__ = [
    "TOLERANCES", "tolerance", "assert_equivalent", "assert_matches_reference", "CompiledDifferently",
    "equivalence_check", "primitives",
    "primitive_counts", "programs", "arrays", "Program", "OP_FAMILIES",
]

# (rtol, atol) per dtype. Roughly "a few ulps after a handful of roundings":
# loose enough for reassociation/fusion by an optimizer, tight enough to catch
# a wrong op. Integers and bools are always compared exactly.
TOLERANCES: dict[np.dtype, tuple[float, float]] = {
    np.dtype(np.float64): (1e-12, 1e-12),
    np.dtype(np.float32): (1e-5, 1e-6),
    np.dtype(np.float16): (1e-3, 1e-3),
    np.dtype(ml_dtypes.bfloat16): (1e-2, 1e-2),
    np.dtype(np.complex128): (1e-12, 1e-12),
    np.dtype(np.complex64): (1e-5, 1e-6),
    **{np.dtype(getattr(ml_dtypes, name)): (0.125, 0.125) for name in (
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e4m3b11fnuz", "float8_e4m3", "float8_e3m4")
       if hasattr(ml_dtypes, name)},
    **{np.dtype(getattr(ml_dtypes, name)): (0.25, 0.25) for name in (
        "float8_e5m2", "float8_e5m2fnuz") if hasattr(ml_dtypes, name)},
    **{np.dtype(t): (0.0, 0.0) for t in (
        np.bool_, np.int8, np.int16, np.int32, np.int64,
        np.uint8, np.uint16, np.uint32, np.uint64)},
}


def is_float(dtype: np.dtype) -> bool:
    """Whether `dtype` is a float (complex and ml_dtypes' bfloat16 and float8 types included)."""
    # ml_dtypes' floats (bfloat16, float8_*) have kind "V", not "f".
    return dtype.kind in "fc" or (dtype.kind == "V" and "float" in dtype.name)


def tolerance(dtype) -> tuple[float, float]:
    """Default ``(rtol, atol)`` for ``dtype``.

    Float dtypes missing from :data:`TOLERANCES` get two epsilons (capped at 1,
    for exponent-only formats like ``float8_e8m0fnu``); others compare exactly.

    >>> tolerance(np.float32)
    (1e-05, 1e-06)
    """
    dtype = np.dtype(dtype)
    if dtype in TOLERANCES:
        return TOLERANCES[dtype]
    if not is_float(dtype):
        return (0.0, 0.0)
    eps = float(ml_dtypes.finfo(dtype).eps)
    return (min(2 * eps, 1.0), min(2 * eps, 1.0))


def _as_real(x: np.ndarray) -> np.ndarray:
    """View complex numbers as a trailing [real, imag] axis; leave others alone."""
    return np.stack([x.real, x.imag], axis=-1) if x.dtype.kind == "c" else x


def _bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def leaf_mismatch(actual: np.ndarray, expected: np.ndarray, rtol=None, atol=None, exact=False,
                  signed_zeros=False, names=("actual", "expected"), show=repr) -> str | None:
    """None if two arrays agree, else how they differ (count, worst index, both values).

    Integers and bools compare exactly; floats within `rtol`/`atol` (default: per dtype), with
    NaN positions and ±Inf matching exactly; `signed_zeros` also requires −0 and +0 to match;
    `exact` requires identical bits (NaN payloads aside). `names` label the two sides, `show`
    formats their values.

    >>> leaf_mismatch(np.float32([1, -0.0]), np.float32([1, 0.0]), signed_zeros=True)
    '1 of 2 elements differ (rtol=1e-05, atol=1e-06; NaN, ±Inf, ±0 must match); worst at index (1,): actual np.float32(-0.0), expected np.float32(0.0)'
    """
    if actual.dtype != expected.dtype:
        return f"dtype mismatch: {names[0]} {actual.dtype}, {names[1]} {expected.dtype}"
    if actual.shape != expected.shape:
        return f"shape mismatch: {names[0]} {actual.shape}, {names[1]} {expected.shape}"
    a, e = _as_real(actual), _as_real(expected)
    if not is_float(actual.dtype):  # ints and bools: exact, whatever the tolerances
        bad = a != e
        err = np.where(bad, 1.0, 0.0)
    else:
        d_rtol, d_atol = tolerance(actual.dtype)
        rtol, atol = (d_rtol if rtol is None else rtol), (d_atol if atol is None else atol)
        a64, e64 = a.astype(np.float64), e.astype(np.float64)
        a_nan, e_nan = np.isnan(a64), np.isnan(e64)
        either_inf = np.isinf(a64) | np.isinf(e64)
        finite = ~(a_nan | e_nan | either_inf)
        with np.errstate(invalid="ignore", over="ignore"):
            err = np.where(finite, np.abs(a64 - e64), np.inf)
        bad = (a_nan != e_nan) | (either_inf & (a64 != e64))
        if exact:
            # Bits must match, except NaN payloads: XLA makes no promise about
            # which NaN an operation produces, only that it is a NaN.
            bad |= ~(a_nan & e_nan) & (_bits(a) != _bits(e))
        else:
            bad |= finite & ~(err <= atol + rtol * np.abs(np.where(finite, e64, 0.0)))  # no 0 × ∞
            if signed_zeros:
                bad |= (a64 == 0) & (e64 == 0) & (np.signbit(a64) != np.signbit(e64))
        err = np.where(a_nan & e_nan, 0.0, err)
    if not bad.any():
        return None
    # Worst mismatch: the largest error among mismatches (ties: the first one).
    worst = np.unravel_index(np.argmax(np.where(bad, err, -1.0)), bad.shape)
    part = None
    if a.shape != actual.shape:  # complex: undo the trailing [real, imag] axis
        worst, part, bad = worst[:-1], ("real", "imag")[worst[-1]], bad.any(axis=-1)
    av, ev = actual[worst], expected[worst]
    if part:
        av, ev = getattr(av, part), getattr(ev, part)
    tol = "bit-exact" if exact else f"rtol={rtol}, atol={atol}" if is_float(actual.dtype) else "exact"
    if signed_zeros and not exact and is_float(actual.dtype):
        tol += "; NaN, ±Inf, ±0 must match"
    return (f"{int(bad.sum())} of {bad.size} elements differ ({tol}); worst at index "
            f"{tuple(int(i) for i in worst)}{f' ({part})' if part else ''}: "
            f"{names[0]} {show(av)}, {names[1]} {show(ev)}")


def _path_str(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def assert_equivalent(actual: Any, expected: Any, *, rtol: float | None = None,
                      atol: float | None = None, exact: bool = False, err_msg: str = "") -> None:
    """Asserts that two pytrees of arrays hold the same values.

    Checks, in order: tree structure; then per leaf the dtype, the shape and
    the values. NaNs must be in the same positions, and infinities must match
    exactly, sign included. Finite floats must satisfy
    ``|actual - expected| <= atol + rtol * |expected|``, with ``rtol``/``atol``
    defaulting to :data:`TOLERANCES` for the leaf's dtype. Integers and bools
    are always compared exactly. With ``exact=True`` every non-NaN float must
    match bit for bit, which also distinguishes ``-0.0`` from ``+0.0``.

    Raises:
      AssertionError naming every mismatching leaf by its pytree path, with
      the mismatch count, the worst index and the values there.

    >>> import numpy as np
    >>> assert_equivalent({"a": np.float32(1.0)}, {"a": np.float32(1.0 + 1e-7)})
    >>> assert_equivalent(np.float32(-0.0), np.float32(0.0), exact=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    AssertionError: 1 of 1 leaves differ:
      <root>: 1 of 1 elements differ (bit-exact); worst at index (): actual ...
    """
    a_leaves, a_tree = jax.tree_util.tree_flatten_with_path(actual)
    e_leaves, e_tree = jax.tree_util.tree_flatten_with_path(expected)
    header = f"{err_msg}\n" if err_msg else ""
    if a_tree != e_tree:
        raise AssertionError(f"{header}pytree structure mismatch:\n"
                             f"  actual:   {a_tree}\n  expected: {e_tree}")
    problems = []
    for (path, a), (_, e) in zip(a_leaves, e_leaves):
        why = leaf_mismatch(np.asarray(a), np.asarray(e), rtol, atol, exact)
        if why:
            problems.append(f"  {_path_str(path)}: {why}")
    if problems:
        raise AssertionError(f"{header}{len(problems)} of {len(a_leaves)} leaves differ:\n"
                             + "\n".join(problems))


class CompiledDifferently(AssertionError):
    """Two functions that agree bit for bit run op by op (`jax.disable_jit`) disagree compiled:
    XLA compiled their (different but equivalent) programs to different results. Seen with
    jaxlib 0.10.2 on CPU: its simplifier folds `sign(-0.0)` of a literal to +0.0 (at run time,
    and inside a nested jit, -0.0), and `exp(acosh(-clamp(...)))` of out-of-domain integers
    gives arbitrary values, different in each compile. Property tests reject such examples."""


def assert_matches_reference(actual_fn: Callable, reference_fn: Callable, *args, actual_args=None,
                             static_argnums=(), err_msg: str = "", **tolerances) -> Any:
    """assert_equivalent(jax.jit(actual_fn)(*actual_args), jax.jit(reference_fn)(*args),
    **tolerances) (`actual_args` default: `args`); returns the reference's result. On a mismatch
    both run again op by op: if they agree there bit for bit, the difference is XLA's
    (CompiledDifferently), else the mismatch is raised as is.

    >>> import jax.numpy as jnp
    >>> _ = assert_matches_reference(lambda x: x + x, lambda x: x * 2, jnp.float32(1.0), exact=True)
    """
    actual_args = args if actual_args is None else actual_args
    expected = jax.jit(reference_fn, static_argnums=static_argnums)(*args)
    try:
        assert_equivalent(jax.jit(actual_fn)(*actual_args), expected, err_msg=err_msg, **tolerances)
    except AssertionError as mismatch:
        with jax.disable_jit():
            op_by_op = actual_fn(*actual_args), reference_fn(*args)
        try:
            assert_equivalent(*op_by_op, exact=True)
        except AssertionError:
            raise mismatch from None
        raise CompiledDifferently(f"{mismatch}\nRun op by op (jax.disable_jit) the two agree bit for "
                                  "bit: XLA compiled them to different results") from None
    return expected


def primitives(fn: Callable, *args) -> set[str]:
    """Names of all primitives in ``jax.make_jaxpr(fn)(*args)``, nested jaxprs included.

    >>> sorted(primitives(lambda x: jax.jit(jax.numpy.sin)(x) + 1, 1.0))
    ['add', 'jit', 'sin']
    """
    return set(primitive_counts(fn, *args))


def primitive_counts(fn: Callable, *args) -> Counter:
    """How often each primitive occurs in ``jax.make_jaxpr(fn)(*args)``, nested jaxprs included.

    >>> primitive_counts(lambda x: jax.numpy.sin(jax.numpy.sin(x)), 1.0)
    Counter({'sin': 2})
    """
    return Counter(_walk(jax.make_jaxpr(fn)(*args).jaxpr))


def _walk(jaxpr) -> Iterator[str]:
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _walk(inner)


def equivalence_check(fn: Callable, *args, exact: bool = True, rtol: float | None = None,
                      atol: float | None = None, params_argnums=None, static_argnums=()):
    """Round-trips ``fn`` through graphopt and checks that nothing changed.

    Traces ``fn`` at ``args`` with :func:`graphopt.trace`, runs
    ``graph.verify()``, lowers with :func:`graphopt.lower` and compares
    ``jax.jit(lowered)`` to ``jax.jit(fn)`` with :func:`assert_matches_reference`
    (:func:`assert_equivalent`; :class:`CompiledDifferently` where the two
    agree run op by op and only XLA's compiled programs differ).
    ``fn`` may be anything ``graphopt.trace`` accepts (a function, a linen
    ``apply``, an nnx or Equinox module); the lowered function is called the
    way graphopt documents: without static arguments, and for modules with
    the module state first.

    The default is ``exact=True``: the lowered function binds the same
    primitives with the same parameters, so XLA compiles the same HLO and
    must produce the same bits. Pass ``exact=False`` (and optionally
    tolerances) when checking a graph that an optimization pass changed.

    Returns the traced graph, for further inspection.

    >>> import jax.numpy as jnp
    >>> graph = equivalence_check(lambda x: jnp.sin(x) * 2, jnp.arange(3.0))
    >>> [a.role for a in graph.inputs]
    ['input']
    """
    graph = graphopt.trace(fn, *args, params_argnums=params_argnums, static_argnums=static_argnums)
    graph.verify()
    lowered = graphopt.lower(graph)
    static = {i % len(args) for i in ((static_argnums,) if isinstance(static_argnums, int)
                                      else static_argnums)}
    dynamic = tuple(a for i, a in enumerate(args) if i not in static)
    assert_matches_reference(lowered, fn, *args, actual_args=adapt(fn, dynamic, params_argnums).args,
                             static_argnums=tuple(static), exact=exact, rtol=rtol, atol=atol,
                             err_msg=f"graphopt.lower(graphopt.trace(fn)) differs from fn = {fn!r}")
    return graph

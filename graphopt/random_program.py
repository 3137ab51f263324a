"""The random programs graphopt's property tests run: values, instructions, and their builder.

A :class:`Program` is an ordinary callable (``program(*program.args)`` runs it) holding example
inputs and a straight-line list of :class:`Instr` s, each a JAX function applied to earlier values;
``repr(program)`` prints it as a listing. :func:`arrays` draws input values full of awkward cases:
NaN, ±Inf, −0, subnormals, extremes. ``_Builder`` is what op families (see
:mod:`graphopt.testing_programs`) use to add instructions with well-typed operands.

>>> import numpy as np
>>> Aval((2, 3), F32)
Aval(shape=(2, 3), dtype=dtype('float32'), weak=False)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from hypothesis import strategies as st
from jax import lax

F32 = np.dtype(np.float32)
BF16 = np.dtype(ml_dtypes.bfloat16)
I32 = np.dtype(np.int32)
BOOL = np.dtype(np.bool_)
FLOATS = (F32, BF16)
NUMERIC = (F32, BF16, I32)
ANY = (F32, BF16, I32, BOOL)

_MAX_RANK = 4
_MAX_SIZE = 256
_SHORT = {F32: "f32", BF16: "bf16", I32: "i32", BOOL: "bool"}
_INT_MIN = np.iinfo(np.int32).min

# A third of all float elements are IEEE corner cases, a third awkward
# magnitudes (hypothesis shrinks towards the first, 0.0), a third ordinary.
IEEE_SPECIALS = (math.nan, math.inf, -math.inf, -0.0)
SPECIAL_FLOATS = (0.0, 1.0, -1.0, 0.5, -2.5, 3.0, 1e-3, 1e4, 1e30, -1e-40)
SPECIAL_INTS = (0, 1, -1, 2, -7, 100, 65536, 2**31 - 1, _INT_MIN)


def _elements(dtype: np.dtype) -> st.SearchStrategy:
    if dtype == BOOL:
        return st.booleans()
    if dtype == I32:
        return st.one_of(st.integers(-10, 10), st.sampled_from(SPECIAL_INTS))
    return st.one_of(st.sampled_from(SPECIAL_FLOATS), st.sampled_from(IEEE_SPECIALS),
                     st.floats(-10, 10, width=32))


def arrays(shape: tuple[int, ...], dtype: np.dtype) -> st.SearchStrategy[np.ndarray]:
    """Strategy for a numpy array of ``shape``/``dtype`` rich in special values.

    >>> from hypothesis import given
    >>> @given(arrays((2, 0, 3), BF16))
    ... def test(x):
    ...     assert x.shape == (2, 0, 3) and x.dtype == BF16
    >>> test()
    """
    n = math.prod(shape)
    # Built through a list (not hypothesis.extra.numpy) because bfloat16 is
    # not a dtype hypothesis knows, and sizes here are tiny anyway.
    return st.lists(_elements(dtype), min_size=n, max_size=n).map(
        lambda xs: np.asarray(xs, dtype=np.float64 if dtype in FLOATS else dtype)
        .astype(dtype).reshape(shape))


@dataclasses.dataclass(frozen=True)
class Aval:
    """Shape and dtype of a program value (weak: JAX's weak type, of Python scalars)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    weak: bool = False

    def __str__(self) -> str:
        weak = "weak " if self.weak else ""
        return f"{weak}{_SHORT[self.dtype]}[{','.join(map(str, self.shape))}]"


@dataclasses.dataclass(frozen=True)
class Lit:
    """A scalar literal operand (a numpy scalar, so JAX inlines it as a Literal)."""

    value: Any

    def __str__(self) -> str:
        return f"{self.value.item()!r}:{_SHORT[np.dtype(type(self.value))]}"


@dataclasses.dataclass(frozen=True, eq=False)
class Instr:
    """``aval = fn(*args, **params)``; ``op`` is only used for printing."""

    op: str
    fn: Callable
    args: tuple[int | Lit, ...]
    params: dict
    aval: Aval


class Program:
    """A random straight-line JAX program together with example arguments.

    Call it like a function: ``program(*program.args)``. The arguments are
    a tuple of pytrees whose leaves are numpy arrays or Python scalars; the
    program numbers those leaves ``x0, x1, ...`` in flattening order. Its
    ``repr`` is a jaxpr-like listing, which is what hypothesis prints for a
    failing case::

        Program(x0: f32[2], {'p0': x1: weak f32[]}) -> (v3, x1)
          v2: f32[2] = exp(x0)
          v3: f32[2] = add(v2, 1.0:f32)
        args:
          x0 = array([nan, -0.], dtype=float32)
          x1 = 3.0
    """

    def __init__(self, in_avals, instrs, outputs, args):
        self.in_avals: tuple[Aval, ...] = tuple(in_avals)
        self.instrs: tuple[Instr, ...] = tuple(instrs)
        self.outputs = outputs  # pytree whose leaves are value ids
        self.args: tuple = tuple(args)
        self.__name__ = "program"  # so jax.jit & friends can name it

    def __call__(self, *xs):
        # Under jit every leaf is already a tracer; called eagerly (or with some
        # arguments closed over), Python scalars become weakly typed arrays here.
        env = [x if hasattr(x, "dtype") else jnp.asarray(x) for x in jax.tree.leaves(xs)]
        for ins in self.instrs:
            operands = (a.value if isinstance(a, Lit) else env[a] for a in ins.args)
            env.append(ins.fn(*operands, **ins.params))
        return jax.tree.map(lambda i: env[i], self.outputs)

    @property
    def ops(self) -> tuple[str, ...]:
        """Names of the instructions, in program order."""
        return tuple(ins.op for ins in self.instrs)

    def _name(self, i) -> str:
        if isinstance(i, Lit):
            return str(i)
        return f"x{i}" if i < len(self.in_avals) else f"v{i}"

    def __repr__(self) -> str:
        named = [_Raw(f"x{i}: {a}") for i, a in enumerate(self.in_avals)]
        ins_str = repr(jax.tree.unflatten(jax.tree.structure(self.args), named))[1:-1]
        ins_str = ins_str[:-1] if ins_str.endswith(",") else ins_str  # a 1-tuple's comma
        outs = jax.tree.map(lambda i: _Raw(self._name(i)), self.outputs)
        lines = [f"Program({ins_str}) -> {outs}"]
        for k, ins in enumerate(self.instrs, start=len(self.in_avals)):
            params = ", ".join(f"{p}={_fmt(v)}" for p, v in ins.params.items())
            args = ", ".join(self._name(a) for a in ins.args)
            lines.append(f"  v{k}: {ins.aval} = {ins.op}{f'[{params}]' if params else ''}({args})")
        lines.append("args:")
        lines += [f"  x{i} = {_fmt(a)}" for i, a in enumerate(jax.tree.leaves(self.args))]
        return "\n".join(lines)


class _Raw(str):
    def __repr__(self) -> str:
        return str(self)


def _fmt(v) -> str:
    if isinstance(v, np.ndarray):
        return " ".join(np.array_repr(v, precision=8).split())
    if isinstance(v, np.dtype):
        return _SHORT.get(v, str(v))
    return repr(v)


class _Builder:
    """Accumulates well-typed instructions while drawing choices from hypothesis."""

    def __init__(self, draw, in_avals):
        self.draw = draw
        self.avals: list[Aval] = list(in_avals)
        self.instrs: list[Instr] = []

    def choose(self, options):
        return self.draw(st.sampled_from(tuple(options)))

    def coin(self, p_true_in: int = 2) -> bool:
        """True with probability 1/p_true_in (shrinks towards False)."""
        return self.draw(st.integers(0, p_true_in - 1)) == p_true_in - 1

    def emit(self, op: str, fn: Callable, *args, **params) -> int | None:
        """Append ``fn(*args, **params)``; None if its result would be too big.

        A None operand (a helper instruction that was too big) rejects this
        instruction too, so size limits never need checking up front.
        """
        if any(a is None for a in args):
            return None
        specs = [a.value if isinstance(a, Lit) else jax.ShapeDtypeStruct(
            self.avals[a].shape, self.avals[a].dtype, weak_type=self.avals[a].weak) for a in args]
        out = jax.eval_shape(functools.partial(fn, **params), *specs)
        aval = Aval(tuple(out.shape), np.dtype(out.dtype), bool(out.weak_type))
        if len(aval.shape) > _MAX_RANK or math.prod(aval.shape) > _MAX_SIZE:
            return None
        self.instrs.append(Instr(op, fn, tuple(args), params, aval))
        self.avals.append(aval)
        return len(self.avals) - 1

    def pick(self, dtypes=ANY, pred=lambda aval: True) -> int | None:
        """An existing value with one of ``dtypes`` satisfying ``pred`` (recent first)."""
        cands = [i for i, a in enumerate(self.avals) if a.dtype in dtypes and pred(a)]
        return self.choose(cands[::-1]) if cands else None

    def operand(self, dtypes, pred=lambda aval: True) -> int | None:
        """Like :meth:`pick`, but converts a value of another dtype if needed."""
        i = self.pick(dtypes, pred)
        if i is None or self.coin(6):
            j = self.pick(ANY, pred)
            if j is not None:
                dtype = self.choose(dtypes)
                i = j if self.avals[j].dtype == dtype else self.convert(j, dtype)
        return i

    def convert(self, i: int, dtype: np.dtype) -> int:
        return self.emit("convert_element_type", _convert, i, new_dtype=dtype)

    def literal(self, dtype: np.dtype) -> Lit:
        return Lit(self.draw(arrays((), dtype))[()])

    def fit(self, shape: tuple[int, ...], dtype: np.dtype) -> int | Lit:
        """A value of exactly ``shape``/``dtype``: reused, derived, or a new constant."""
        target = Aval(tuple(shape), dtype)
        how = self.draw(st.integers(0, 4))
        same = [i for i, a in enumerate(self.avals) if a == target]
        if same and how < 3:
            return self.choose(same[::-1])
        if not shape and how == 3:
            return self.literal(dtype)
        srcs = [i for i, a in enumerate(self.avals) if _broadcastable(a.shape, target.shape)]
        if srcs and how < 4:
            i = self.choose(srcs[::-1])
            if self.avals[i].dtype != dtype:
                i = self.convert(i, dtype)
            if self.avals[i].shape != target.shape:
                rank = len(self.avals[i].shape)
                i = self.emit("broadcast_in_dim", lax.broadcast_in_dim, i, shape=target.shape,
                              broadcast_dimensions=tuple(range(len(shape) - rank, len(shape))))
            return i
        # A captured (closed-over) constant: becomes a constvar, not an input.
        return self.emit("const", _const, value=self.draw(arrays(target.shape, dtype)))


def _broadcastable(src: tuple[int, ...], dst: tuple[int, ...]) -> bool:
    return len(src) <= len(dst) and all(s in (1, d) for s, d in zip(src[::-1], dst[::-1]))


def _convert(x, new_dtype):
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(new_dtype, jnp.integer):
        # XLA saturates and maps NaN to 0, but JAX constant-folds conversions
        # of scalar constants with numpy, where NaN/Inf/out-of-range casts are
        # platform dependent (and warn). Keep the operand in range everywhere.
        bound = np.asarray(2.0**30, x.dtype)
        x = lax.select(lax.ne(x, x), lax.full_like(x, 0), lax.clamp(-bound, x, bound))
    return lax.convert_element_type(x, new_dtype)


def _const(value):
    return jnp.asarray(value)

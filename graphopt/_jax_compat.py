"""Every use of JAX internals in graphopt, in one place.

graphopt reads jaxprs (to trace) and re-binds primitives (to lower). Both need a few objects that JAX
does not export publicly: the control-flow primitives, the aval class, source information. A JAX
upgrade that moves any of them should touch this file only.

Example:
    >>> from graphopt import _jax_compat as compat
    >>> compat.primitive_kind(compat.SCAN)
    'scan'
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import jax
from jax._src import core as _core
from jax._src import source_info_util as _source_info
from jax._src import ad_checkpoint as _ad_checkpoint
from jax._src import custom_derivatives as _custom
from jax._src import linear_util as _linear_util
from jax._src.lax import lax as _lax_internal
from jax._src.lax.control_flow import conditionals as _conditionals
from jax._src.lax.control_flow import loops as _loops

Primitive = _core.Primitive
Jaxpr = _core.Jaxpr
# JAX ≤ 0.11 pairs a Jaxpr with its consts in a ClosedJaxpr; from 0.12 a Jaxpr holds its consts.
ClosedJaxpr = getattr(_core, "ClosedJaxpr", None)
Literal = _core.Literal
DropVar = _core.DropVar
ShapedArray = _core.ShapedArray

# A function JAX wrapped for later tracing (a custom_jvp call's derivative rule is one).
WrappedFun = _linear_util.WrappedFun

SCAN = _loops.scan_p
WHILE = _loops.while_p
COND = _conditionals.cond_p
REMAT = _ad_checkpoint.remat_p
CUSTOM_JVP = _custom.custom_jvp_call_p
CUSTOM_VJP = _custom.custom_vjp_call_p


def _find_jit_primitive():
    from jax._src import pjit

    return getattr(pjit, "jit_p", None) or getattr(pjit, "pjit_p")


# Call-like primitives whose body is inlined into the enclosing graph: nested jit and plain calls.
_INLINED = {_find_jit_primitive(), _core.closed_call_p, _core.call_p}

_KINDS = {
    SCAN: "scan",
    WHILE: "while",
    COND: "cond",
    REMAT: "remat",
    CUSTOM_JVP: "custom_jvp_call",
    CUSTOM_VJP: "custom_vjp_call",
}


def primitive_kind(primitive: Primitive) -> str:
    """Return 'inline', a region-op name ('scan', 'while', ...), or 'primitive'."""
    if primitive in _INLINED:
        return "inline"
    return _KINDS.get(primitive, "primitive")


def inlined_jaxpr(params: dict):
    """The body of an inlined call primitive (a jaxpr; read it with `jaxpr_parts`)."""
    return params.get("jaxpr", params.get("call_jaxpr"))


def has_subjaxprs(params: dict) -> bool:
    """Whether a primitive's params hold jaxprs (a higher-order primitive graphopt doesn't know)."""
    return any(True for _ in _core.jaxprs_in_params(params))


def jaxpr_parts(jaxpr):
    """(constvars, consts, invars, eqns, outvars) of a jaxpr, closed or open, on any JAX version."""
    consts = getattr(jaxpr, "consts", ())
    inner = jaxpr.jaxpr if ClosedJaxpr is not None and isinstance(jaxpr, ClosedJaxpr) else jaxpr
    return inner.constvars, consts, inner.invars, inner.eqns, inner.outvars


def scan_layout(params: dict, num_operands: int) -> tuple[int, int]:
    """(num_consts, num_carry) of a scan equation.

    JAX ≤ 0.11 stores the counts; JAX 0.12 stores the operand trees (consts, carry, xs) instead.
    """
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].update(list(range(num_operands))).unpack()
    return len(list(consts)), len(list(carry))


def shaped_array(shape: Sequence[int], dtype: Any, weak_type: bool = False) -> ShapedArray:
    return ShapedArray(tuple(shape), dtype, weak_type=weak_type)


def abstract_eval(primitive: Primitive, in_avals: Sequence[ShapedArray], params: dict):
    """Run a primitive's shape rule. Returns (list of out avals, effects)."""
    out, effects = primitive.abstract_eval(*in_avals, **params)
    return (list(out) if primitive.multiple_results else [out]), effects


def default_params(primitive: Primitive, in_avals: Sequence[ShapedArray], options: dict | None = None) -> dict:
    """The params `jax.lax.<name>(*args, **options)` binds for this primitive, e.g. JAX 0.10's
    `mul` has `out_dtype=None`; {} where lax has no such function or it needs other options
    (reshape needs new_sizes). Versions add and drop params: learned from the installed JAX."""
    fn = getattr(jax.lax, primitive.name, None)
    if not callable(fn):
        return {}
    try:
        closed = jax.make_jaxpr(lambda *args: fn(*args, **(options or {})))(*in_avals)
    except Exception:  # needs options, or not these operands: nothing to learn
        return {}
    eqns = jaxpr_parts(closed)[3]
    return dict(eqns[0].params) if len(eqns) == 1 and eqns[0].primitive is primitive else {}


def bind(primitive: Primitive, args: Sequence[Any], params: dict) -> list:
    """Bind a primitive on the current trace, as `jax.core.eval_jaxpr` does."""
    bind_params = primitive.get_bind_params(params)
    if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
        subfuns, bind_params = bind_params
        out = primitive.bind(*subfuns, *args, **bind_params)
    else:
        out = primitive.bind(*args, **bind_params)
    return list(out) if primitive.multiple_results else [out]


def make_constant(value: Any, dtype: Any, weak_type: bool):
    """A constant of exactly this dtype and weak type (weak types decide later promotions)."""
    if not weak_type:
        return value if isinstance(value, jax.Array) else jax.numpy.asarray(value, dtype)
    return _lax_internal._convert_element_type(value, dtype, weak_type=True)


def rebind_custom_call(primitive: Primitive, args: Sequence[Any], body: Callable,
                       body_avals: Sequence[ShapedArray], params: dict) -> list:
    """Re-bind custom_jvp_call / custom_vjp_call with a (possibly rewritten) primal body.

    The user's derivative rule (jvp, fwd/bwd) is kept as traced; only the primal computation
    comes from graphopt's region, re-traced into a jaxpr here.
    """
    call_jaxpr = jax.make_jaxpr(lambda *xs: list(body(*xs)))(*body_avals)
    return bind(primitive, args, {**params, "call_jaxpr": call_jaxpr})


def make_jaxpr_with_shape(fn: Callable, args: Sequence[Any]):
    return jax.make_jaxpr(fn, return_shape=True)(*args)


# --- source information -------------------------------------------------------------------------

def name_stack(source_info) -> str:
    return str(source_info.name_stack)


def traceback_of(source_info):
    return source_info.traceback


def frames(traceback) -> list[tuple[str, int, str]]:
    """(file, line, function) for each frame of a JAX traceback, innermost first."""
    if traceback is None:
        return []
    return [(f.file_name, f.line_num, f.function_name) for f in traceback.frames]


def source_context(traceback, name: str):
    """Context in which bound primitives record this traceback and name (for HLO metadata,
    profiles and JAX's error messages), as `jax.core.eval_jaxpr` replays equations."""
    stack = _source_info.current_name_stack()
    if name:
        stack = stack.extend(name)
    return _source_info.user_context(traceback, name_stack=stack)


def user_frame(traceback) -> tuple[str, int, str] | None:
    """The innermost frame outside JAX, as JAX's own error messages choose it."""
    frame = _source_info.user_frame(traceback)
    return None if frame is None else (frame.file_name, frame.start_line, frame.function_name)


def literal_value(literal: Literal):
    return literal.val


def aval_of(atom):
    return atom.aval


# -- ahead-of-time executables (lowering/compile.py) ---------------------------------------------

@contextlib.contextmanager
def without_compilation_cache():
    """A context in which XLA compiles afresh, not from JAX's persistent compilation cache: on
    CPU, an executable loaded from that cache serializes without some of its functions (running
    the deserialized copy fails with 'Function ... not found'). JAX decides once per process
    whether the cache is in use; the decision is reset on entry and on exit."""
    from jax._src import config as _config

    with _config.enable_compilation_cache(False):
        reset_compilation_cache()
        try:
            yield
        finally:
            reset_compilation_cache()


def serialize_executable(compiled) -> bytes:
    """A `jax.stages.Compiled`'s XLA executable in PjRt's serialized format (no Python objects)."""
    return compiled._executable.xla_executable.serialize()


def deserialize_executable(data: bytes, devices: Sequence[Any]):
    """Load bytes from `serialize_executable` on `devices` of this machine's matching backend."""
    return devices[0].client.deserialize_executable(data, list(devices))


def execute(executable, arrays: Sequence[Any]) -> list:
    """Run a loaded single-device executable on device arrays; the flat outputs."""
    return list(executable.execute(list(arrays)))


# -- caches (lowering/cache.py, lowering/fingerprint.py) ------------------------------------------

def reset_compilation_cache() -> None:
    """Make JAX re-open its persistent compilation cache at the next compile, so that a changed
    `jax_compilation_cache_dir` takes effect in a process that has compiled already."""
    from jax._src import compilation_cache

    compilation_cache.reset_cache()


def jaxpr_arrays(jaxpr):
    """Every constant and literal value of a jaxpr and its sub-jaxprs (params), in a fixed order."""
    constvars, consts, _, eqns, _ = jaxpr_parts(jaxpr)
    yield from consts
    for eqn in eqns:
        for atom in eqn.invars:
            if isinstance(atom, Literal):
                yield atom.val
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, _core.Jaxpr) or (ClosedJaxpr is not None and isinstance(sub, ClosedJaxpr)):
                    yield from jaxpr_arrays(sub)  # a closed sub-jaxpr brings its own consts

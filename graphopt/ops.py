"""What a node computes: JAX primitives, opaque primitives, and graphopt's own ops.

Every op has a name and a shape rule (`infer`), so a node's output types are always computed from
its inputs and never stored by hand. Three kinds:

- `PrimitiveOp`: a JAX primitive, kept with its params; its shape rule is the primitive's own.
- `OpaqueOp`: a higher-order primitive graphopt does not model (shard_map, pallas_call, ...). It is
  carried through unchanged, its jaxpr params included, and lowers back exactly as traced.
- `OpDef`: an op defined by graphopt (constants, control flow with regions, later fused ops), with a
  Python shape rule and a reference implementation used by the lowering.

Example:
    >>> import jax, numpy as np
    >>> from graphopt.types import TensorType
    >>> op = primitive_op(jax.lax.sin_p)
    >>> op.infer([TensorType((3,), np.float32)], {}, ())
    [TensorType(f32[3])]
"""

from __future__ import annotations

import abc
import struct
from typing import Any, Callable, Sequence

import jax
import numpy as np

from graphopt import _jax_compat as compat
from graphopt.types import TensorType


# The effects of a pure node. Shared: most nodes have none, and an empty frozenset per node would
# be one more object for the garbage collector to scan.
NO_EFFECTS: frozenset = frozenset()


class Op(abc.ABC):
    """Base class: a name, a kind, and a shape rule."""

    name: str = "?"
    kind: str = "?"
    output_names: tuple = ()          # see OpDef
    finite_outputs: frozenset = frozenset()

    @abc.abstractmethod
    def infer(self, in_types: Sequence[TensorType], params: dict, regions: Sequence) -> list[TensorType] | None:
        """Output types for these inputs, or None when the op cannot say (opaque ops)."""

    def effects(self, in_types: Sequence[TensorType], params: dict) -> frozenset:
        return NO_EFFECTS

    def signature(self, in_types: Sequence[TensorType], params: dict, regions: Sequence):
        """(output types, effects) of a node: what `Graph.add_node` asks of an op. The types are
        None when the op cannot say (opaque ops)."""
        types = self.infer(in_types, params, regions)
        return types, (NO_EFFECTS if types is None else self.effects(in_types, params))

    def __repr__(self):
        return f"{type(self).__name__}({self.name})"


class PrimitiveOp(Op):
    """A JAX primitive. Use `primitive_op(p)`, which shares one instance per primitive."""

    kind = "primitive"

    def __init__(self, primitive: compat.Primitive):
        self.primitive = primitive
        self.name = primitive.name
        self._cache: dict = {}

    def _eval(self, in_types, params) -> tuple[tuple[TensorType, ...], frozenset]:
        """(output types, effects) from JAX's abstract evaluation."""
        # Unrolled models repeat the same (types, params) many times and JAX's shape rules cost
        # ~20-100 µs each, so results are memoized when the params are hashable.
        key = signature_key(in_types, params)
        if key is not None:
            hit = self._cache.get(key)
            if hit is not None:
                return hit
        avals, effects = compat.abstract_eval(self.primitive, [t.aval() for t in in_types], params)
        result = (tuple(TensorType.of_aval(a) for a in avals), frozenset(effects) or NO_EFFECTS)
        if key is not None:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = result
        return result

    def infer(self, in_types, params, regions):
        return list(self._eval(in_types, params)[0])

    def effects(self, in_types, params):
        return self._eval(in_types, params)[1]

    def signature(self, in_types, params, regions):
        return self._eval(in_types, params)  # one memo lookup for both


def signature_key(in_types, params: dict):
    """A key for memoizing shape rules, or None if a param value is unhashable: equal keys mean
    equal input types and params equal by Python's `==` and of the same types (True and 1
    apart). Coarser than params_key (0.0 and -0.0 are one key), which no shape rule tells apart,
    and several times cheaper: it runs for every node built."""
    key = (tuple(in_types), tuple([(name, type(value), value) for name, value in params.items()]))
    try:
        hash(key)
    except TypeError:
        return None
    return key


# Params arrays up to this many elements are keyed by content, larger ones by identity.
MAX_KEYED_ELEMENTS = 4096


def params_key(params: dict):
    """A hashable key, equal only for interchangeable params, or None when some value cannot be
    keyed. Exact: floats by their bits (-0.0 and 0.0 differ, a NaN equals itself), True and 1
    apart, small arrays by content. Used to memoize shape rules and by cse to merge nodes.

    >>> params_key({"axes": (0, 2)}) == params_key({"axes": (0, 2)}), params_key({"x": {1, 2}})
    (True, None)
    >>> params_key({"c": 0.0}) == params_key({"c": -0.0})
    False
    """
    try:  # the names are strings: only the values need keying (one call per value)
        return frozenset([(name, _param_key(value)) for name, value in params.items()])
    except (_Unkeyable, TypeError):
        return None


class _Unkeyable(Exception):
    pass


# Values whose Python equality is exact, keyed as (type, value): the type keeps True, 1 apart.
_PLAIN = frozenset({int, str, bool, bytes, type(None)})


def _param_key(obj):
    """A hashable stand-in for a param value; equal keys mean interchangeable params."""
    kind = type(obj)
    if kind in _PLAIN:
        return (kind, obj)
    if kind is tuple or kind is list:
        kinds = tuple(map(type, obj))
        if _PLAIN.issuperset(kinds):  # the common case, e.g. axes=(0, 2): no recursion
            return (kind, kinds, tuple(obj))
        return (kind, tuple([_param_key(x) for x in obj]))
    if kind is dict:
        return (dict, frozenset([(_param_key(k), _param_key(v)) for k, v in obj.items()]))
    if isinstance(obj, float):
        return (float, struct.pack("<d", obj))  # bits: -0.0 and 0.0 differ, NaN equals itself
    if isinstance(obj, complex):
        return (complex, struct.pack("<dd", obj.real, obj.imag))
    if isinstance(obj, np.dtype):
        return _dtype_key(obj)
    if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
        return _array_key(obj)
    if isinstance(obj, (tuple, list, dict)):  # subclasses: named tuples, ordered dicts
        return (kind, _param_key(dict(obj) if isinstance(obj, dict) else list(obj)))
    try:
        hash(obj)
    except TypeError:
        raise _Unkeyable(kind.__name__) from None
    return (kind, obj)  # jaxprs, enums, functions, shardings: their own equality


_DTYPE_KEYS: dict = {}


def _dtype_key(dtype: np.dtype):
    key = _DTYPE_KEYS.get(dtype)
    if key is None:  # dtype.name is slow (µs), and dtypes are few
        key = _DTYPE_KEYS[dtype] = (np.dtype, dtype.str, dtype.name)
    return key


def _array_key(value):
    """(dtype, shape, bytes) for small arrays and scalars; identity for large ones."""
    # Sized before np.asarray, which would copy a device array; most constants are ndarrays.
    size = value.size if type(value) is np.ndarray else int(np.prod(np.shape(value)))
    if size > MAX_KEYED_ELEMENTS:
        return ("id", id(value))
    try:
        array = np.asarray(value)  # an ndarray as it is
    except Exception:  # e.g. PRNG key arrays, which have no numpy form
        return ("id", id(value))
    if array.dtype == object:
        raise _Unkeyable("object array")
    return (_dtype_key(array.dtype), array.shape, array.tobytes())


class OpaqueOp(PrimitiveOp):
    """A primitive graphopt does not look inside; its types are fixed by the trace."""

    kind = "opaque"

    def infer(self, in_types, params, regions):
        return None

    def signature(self, in_types, params, regions):
        return None, NO_EFFECTS


_PRIMITIVE_OPS: dict[Any, PrimitiveOp] = {}


def primitive_op(primitive, *, opaque: bool = False) -> PrimitiveOp:
    key = (primitive, opaque)
    op = _PRIMITIVE_OPS.get(key)
    if op is None:
        op = _PRIMITIVE_OPS[key] = (OpaqueOp if opaque else PrimitiveOp)(primitive)
    return op


def primitive_named(name: str) -> PrimitiveOp:
    """The PrimitiveOp for a JAX primitive name ('mul', 'dot_general', ...)."""
    op = _OPS_BY_NAME.get(name)  # rewrite rules ask by name for every node they build
    if op is not None:
        return op
    if not _PRIMITIVES_BY_NAME:
        import jax.lax

        for attr, value in vars(jax.lax).items():
            if attr.endswith("_p") and isinstance(value, compat.Primitive):
                _PRIMITIVES_BY_NAME.setdefault(value.name, value)
    primitive = _PRIMITIVES_BY_NAME.get(name)
    if primitive is None:
        raise KeyError(f"no JAX primitive named {name!r}")
    op = _OPS_BY_NAME[name] = primitive_op(primitive)
    return op


_OPS_BY_NAME: dict[str, PrimitiveOp] = {}
_PRIMITIVES_BY_NAME: dict[str, compat.Primitive] = {}


class OpDef(Op):
    """An op defined by graphopt.

    Args:
        name: the op name shown in listings and matched by passes.
        infer: shape rule `(in_types, params, regions) -> list[TensorType]`; raises TypeError on
            inputs the op does not accept.
        impl: reference implementation `(*args, regions=[callables], **params) -> list of arrays`,
            written with public JAX; the lowering uses it unless a backend kernel is registered.
        region_names: names of the sub-graphs the op holds, e.g. ("cond", "body") for while.
        output_names: names of the outputs, for ops with several (fold_params names the
            parameters it makes after them: `kernel:scale`).
        finite_outputs: indices of outputs that must hold no NaN or ±Inf for the op's inputs to
            be valid (a quantization scale: NaN weights cannot be quantized); the parameter prep
            checks them when it computes them and names the parameter when one is not finite.
    """

    kind = "graphopt"

    def __init__(self, name: str, infer: Callable, impl: Callable, region_names: Sequence[str] = (),
                 *, output_names: Sequence[str] = (), finite_outputs: Sequence[int] = ()):
        self.name = name
        self._infer = infer
        self.impl = impl
        self.region_names = tuple(region_names)
        self.output_names = tuple(output_names)
        self.finite_outputs = frozenset(finite_outputs)

    def infer(self, in_types, params, regions):
        return self._infer(list(in_types), params, list(regions))


OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    """Add an OpDef to the registry by name (names are unique)."""
    if op.name in OPS:
        raise ValueError(f"graphopt op {op.name!r} is already registered")
    OPS[op.name] = op
    return op


# --- constants -----------------------------------------------------------------------------------

def _constant_infer(in_types, params, regions):
    if in_types:
        raise TypeError("constant takes no inputs")
    value = params["value"]
    return [TensorType.interned(np.shape(value), params["dtype"], params["weak_type"])]


def _constant_impl(*, regions, value, dtype, weak_type):
    return [compat.make_constant(value, dtype, weak_type)]


CONSTANT = register(OpDef("constant", _constant_infer, _constant_impl))


def constant_params(value, dtype=None, weak_type: bool = False) -> dict:
    """Params of a constant node. The value object is kept as given, never copied or modified."""
    if dtype is None:
        dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
    return {"value": value, "dtype": dtype, "weak_type": bool(weak_type)}

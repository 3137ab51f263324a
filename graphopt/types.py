"""TensorType: the static type of every value in a graphopt graph (shape, dtype, weak type).

Example:
    >>> import numpy as np
    >>> t = TensorType((2, 3), np.dtype("float32"))
    >>> str(t), t.size, t.nbytes
    ('f32[2,3]', 6, 24)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from graphopt import _jax_compat as compat

_SHORT_NAMES = {
    "float64": "f64", "float32": "f32", "float16": "f16", "bfloat16": "bf16",
    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "int4": "i4",
    "uint64": "u64", "uint32": "u32", "uint16": "u16", "uint8": "u8", "uint4": "u4",
    "bool": "bool", "complex64": "c64", "complex128": "c128",
    "float8_e4m3fn": "f8e4m3fn", "float8_e5m2": "f8e5m2",
}


_INTERNED: dict = {}

_SUB_BYTE_BITS = {"int4": 4, "uint4": 4, "int2": 2, "uint2": 2, "float4_e2m1fn": 4}


def dtype_name(dtype: Any) -> str:
    """Short dtype name as jaxprs print it: f32, bf16, i32, bool."""
    name = str(dtype)
    return _SHORT_NAMES.get(name, name)


class TensorType:
    """Shape, dtype and weak type of a value. Immutable and hashable.

    `weak_type` follows JAX: a weakly typed value (a Python scalar) defers to the other operand's
    dtype in promotion, so it is part of the type.
    """

    __slots__ = ("shape", "dtype", "weak_type", "_aval", "_hash", "_size", "_nbytes")

    def __init__(self, shape, dtype, weak_type: bool = False):
        object.__setattr__(self, "shape", tuple(int(d) for d in shape))
        object.__setattr__(self, "dtype", dtype if is_extended_dtype(dtype) else np.dtype(dtype))
        object.__setattr__(self, "weak_type", bool(weak_type))
        object.__setattr__(self, "_aval", None)
        object.__setattr__(self, "_hash", hash((self.shape, self.dtype, self.weak_type)))
        object.__setattr__(self, "_size", math.prod(self.shape))
        object.__setattr__(self, "_nbytes", None)

    def __setattr__(self, name, value):
        raise AttributeError("TensorType is immutable")

    @classmethod
    def of_aval(cls, aval) -> "TensorType":
        """From a JAX aval (ShapedArray) or anything with .shape and .dtype (interned: a traced
        model has thousands of values but a few dozen distinct types)."""
        return cls.interned(aval.shape, aval.dtype, getattr(aval, "weak_type", False))

    @classmethod
    def interned(cls, shape, dtype, weak_type: bool = False) -> "TensorType":
        """TensorType(shape, dtype, weak_type), shared: one object per distinct type seen."""
        key = (shape, dtype, weak_type)
        interned = _INTERNED.get(key)
        if interned is None:
            if len(_INTERNED) > 65536:
                _INTERNED.clear()
            interned = _INTERNED[key] = cls(*key)
        return interned

    @classmethod
    def of_array(cls, array) -> "TensorType":
        return cls(np.shape(array), getattr(array, "dtype", None) or np.asarray(array).dtype)

    def aval(self):
        """The equivalent JAX ShapedArray (cached)."""
        if self._aval is None:
            object.__setattr__(self, "_aval", compat.shaped_array(self.shape, self.dtype, self.weak_type))
        return self._aval

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        """Bytes of a dense array of this type (4-bit types packed two per byte)."""
        if self._nbytes is None:
            bits = _SUB_BYTE_BITS.get(str(self.dtype))
            nbytes = (self._size * bits + 7) // 8 if bits else self._size * getattr(self.dtype, "itemsize", 0)
            object.__setattr__(self, "_nbytes", nbytes)
        return self._nbytes

    def strong(self) -> "TensorType":
        """The same type without the weak flag."""
        return self if not self.weak_type else TensorType(self.shape, self.dtype, False)

    def __eq__(self, other):
        return self is other or (isinstance(other, TensorType) and self.shape == other.shape
                and self.dtype == other.dtype and self.weak_type == other.weak_type)

    def __hash__(self):
        return self._hash

    def __str__(self):
        dims = ",".join(map(str, self.shape))
        return f"{dtype_name(self.dtype)}[{dims}]" + ("~" if self.weak_type else "")

    def __repr__(self):
        return f"TensorType({self})"


def is_extended_dtype(dtype) -> bool:
    # PRNG key dtypes and other JAX extended dtypes are not numpy dtypes.
    return not isinstance(dtype, (np.dtype, type, str)) and jax.dtypes.issubdtype(dtype, jax.dtypes.extended)

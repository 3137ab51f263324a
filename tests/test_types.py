import jax.numpy as jnp
import numpy as np
import pytest

from graphopt.types import TensorType


def test_tensor_type_basics():
    t = TensorType((2, 0, 3), jnp.bfloat16)
    assert str(t) == "bf16[2,0,3]" and t.size == 0 and t.nbytes == 0 and t.ndim == 3
    assert str(TensorType((), np.float32, weak_type=True)) == "f32[]~"
    assert TensorType((2,), np.int32) == TensorType([2], "int32")
    assert TensorType((2,), np.int32) != TensorType((2,), np.int32, weak_type=True)
    assert TensorType((2,), np.int32, weak_type=True).strong() == TensorType((2,), np.int32)
    assert hash(TensorType((2,), np.int32)) == hash(TensorType((2,), "int32"))


def test_tensor_type_is_immutable():
    with pytest.raises(AttributeError):
        TensorType((2,), np.float32).shape = (3,)


def test_aval_round_trip():
    t = TensorType((4, 5), np.float32, weak_type=True)
    assert TensorType.of_aval(t.aval()) == t

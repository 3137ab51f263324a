"""graphopt.ops: params keys (shape-rule memoization and cse merging rely on them being exact)."""

import numpy as np
import pytest

from graphopt import ops


@pytest.mark.parametrize("a, b, same", [
    (0.0, 0.0, True), (0.0, -0.0, False), (float("nan"), float("nan"), True), (1, True, False),
    (1, 1.0, False), ((1, 2), [1, 2], False), ({"a": (1, 2)}, {"a": (1, 2)}, True),
    (np.dtype("float32"), np.dtype("float32"), True), (np.dtype("float32"), "float32", False),
    (np.arange(3), np.arange(3), True), (np.arange(3), np.arange(3.0), False),
    (np.float32(-0.0), np.float32(0.0), False),
])
def test_param_keys_compare_bits_and_types(a, b, same):
    assert (ops._param_key(a) == ops._param_key(b)) is same


def test_large_arrays_in_params_are_keyed_by_identity_and_unhashables_refused():
    big = np.zeros(5000)
    assert ops._param_key(big) == ops._param_key(big)
    assert ops._param_key(big) != ops._param_key(big.copy())
    with pytest.raises(ops._Unkeyable):
        ops._param_key({"a": {1, 2}})

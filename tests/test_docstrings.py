"""Every docstring example in the package runs."""

import doctest
import importlib
import pkgutil

import pytest

import graphopt

MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(graphopt.__path__, "graphopt.")
) + ["graphopt", "graphopt.lowering.emit", "graphopt.lowering.export"]


@pytest.mark.parametrize("name", sorted(set(MODULES)))
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0

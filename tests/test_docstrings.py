"""Every docstring example in the package runs."""

import doctest
import importlib
import pkgutil

import pytest

import graphopt
import graphopt.lowering
import graphopt.passes

MODULES = ["graphopt"] + [
    name
    for package in (graphopt, graphopt.lowering, graphopt.passes)
    for _, name, _ in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
]


@pytest.mark.parametrize("name", sorted(set(MODULES)))
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0

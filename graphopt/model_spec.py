"""Models named on the command line: `module:function` or `path/to/file.py:function`, and input specs.

A model is a function and its example arguments. The command line gives the function as
`module:function` (imported; the current directory is on the import path) or
`path/to/file.py:function` (loaded from the file; its directory is on the import path), where
`function` may be dotted (`model:Net.apply`). The example arguments are given by input specs,
`DTYPE[d0,d1,...]`, one per positional argument: `f32[2,128]`, `i32[2,16]`, `bf16[8]`, `f32[]`.

Without input specs, `function` is a *factory*: called with no arguments it returns
`(fn, example_args)`, e.g. `(model.apply, (variables, tokens))` for a Flax model, whose
parameters are then traced as weights (argument 0 of a linen `apply`; see `graphopt.trace`).

Example:
    >>> parse_input_spec("i32[2,16]")
    TensorType(i32[2,16])
    >>> [a.shape for a in example_arrays([parse_input_spec("f32[2,3]"), parse_input_spec("f32[]")])]
    [(2, 3), ()]
    >>> try:
    ...     parse_input_spec("f32(2,3)")
    ... except SpecError as err:
    ...     print(err)
    bad input spec 'f32(2,3)': write DTYPE[d0,d1,...], e.g. f32[2,128] or i32[2,16] (f32[] for a scalar)
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
import sys
from typing import Any, Callable

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.types import _SHORT_NAMES, TensorType

# Short names as graphopt prints them (f32, bf16, i32, bool), and NumPy's long names.
_DTYPES = {short: long for long, short in _SHORT_NAMES.items()} | {long: long for long in _SHORT_NAMES}
_SPEC = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*\[\s*([0-9,\s]*)\]\s*$")


class SpecError(GraphoptError):
    """The command line names a model or an input that cannot be used (a usage error)."""


class ModelError(GraphoptError):
    """The model's own code raised while it was imported or built (the cause is chained)."""


@dataclasses.dataclass
class Model:
    """A function to trace and its example arguments."""

    fn: Callable
    args: tuple
    name: str


def parse_input_spec(text: str) -> TensorType:
    """'f32[2,128]' → TensorType; a SpecError that says how to write it otherwise."""
    match = _SPEC.match(text)
    if not match:
        raise SpecError(f"bad input spec {text!r}: write DTYPE[d0,d1,...], e.g. f32[2,128] or i32[2,16] "
                        "(f32[] for a scalar)")
    dtype, dims = match.group(1), match.group(2)
    if dtype not in _DTYPES:
        raise SpecError(f"bad input spec {text!r}: unknown dtype {dtype!r}; use one of "
                        f"{', '.join(sorted(set(_SHORT_NAMES.values())))}")
    parts = [d.strip() for d in dims.split(",")] if dims.strip() else []
    if any(not p for p in parts):
        raise SpecError(f"bad input spec {text!r}: empty dimension")
    try:
        dtype_obj = np.dtype(_DTYPES[dtype])
    except TypeError:  # bfloat16, float8: NumPy knows them through ml_dtypes
        import ml_dtypes

        dtype_obj = np.dtype(getattr(ml_dtypes, _DTYPES[dtype]))
    return TensorType(tuple(int(p) for p in parts), dtype_obj)


def example_arrays(types: list[TensorType], seed: int = 0) -> tuple:
    """Arrays of these types: floats N(0, 1), integers in [0, 8), random bools; reproducible."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    arrays = []
    for t in types:
        if t.dtype == np.bool_:
            value = rng.random(t.shape) < 0.5
        elif np.issubdtype(t.dtype, np.integer):
            value = rng.integers(0, 8, t.shape)
        else:
            value = rng.standard_normal(t.shape)
        arrays.append(jnp.asarray(value, dtype=t.dtype))
    return tuple(arrays)


def load_model(target: str, inputs: list[str], seed: int = 0) -> Model:
    """The function `target` names, with arrays for `inputs` (or from the factory, without)."""
    types = [parse_input_spec(s) for s in inputs]  # check the specs before importing anything
    fn = load_function(target)
    if types:
        return Model(fn, example_arrays(types, seed), target)
    if _required_parameters(fn):
        raise SpecError(f"{target} takes arguments ({', '.join(_required_parameters(fn))}): give one "
                        "--input spec per argument (e.g. --input f32[2,128]), or name a factory "
                        "returning (fn, example_args)")
    try:
        made = fn()
    except Exception as err:
        raise _model_error(f"calling the factory {target}", err) from err
    if not (isinstance(made, (tuple, list)) and len(made) == 2 and callable(made[0])
            and isinstance(made[1], (tuple, list))):
        raise SpecError(f"{target} was called as a factory (no --input given) and must return "
                        f"(fn, example_args); it returned {_short_repr(made)}")
    return Model(made[0], tuple(made[1]), target)


def _required_parameters(fn) -> list[str]:
    """Names of the parameters a call without arguments would miss ([] if unknown)."""
    import inspect

    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.default is p.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def load_function(target: str) -> Callable:
    """`module:function` or `path/to/file.py:function` → the function."""
    where, colon, attr = target.rpartition(":")
    if not colon or not where or not attr:
        raise SpecError(f"cannot read model {target!r}: write module:function or path/to/file.py:function")
    module = _load_file(where) if where.endswith(".py") or os.sep in where or "/" in where \
        else _import(where)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"{where} has no attribute {attr!r}" + _did_you_mean(obj, part))
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecError(f"{target} is a {type(obj).__name__}, not a function")
    return obj


def _import(name: str):
    if os.getcwd() not in sys.path:  # as `python -m` does; console scripts leave it out
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and (name == err.name or name.startswith(err.name + ".")):
            raise SpecError(f"cannot find module {name!r} (from {os.getcwd()}); for a file, "
                            "write path/to/file.py:function") from err
        raise _model_error(f"importing {name}", err) from err
    except Exception as err:
        raise _model_error(f"importing {name}", err) from err


_LOADED: dict[str, tuple[float, Any]] = {}  # absolute path -> (mtime, module)


def _load_file(path: str):
    """The module of a file, executed once per version of the file (so that its registrations,
    e.g. of passes, do not run twice when the command line runs again in one process)."""
    if not os.path.isfile(path):
        raise SpecError(f"no such file: {path}")
    mtime = os.path.getmtime(path)
    loaded = _LOADED.get(os.path.abspath(path))
    if loaded is not None and loaded[0] == mtime:
        return loaded[1]
    directory = os.path.dirname(os.path.abspath(path))
    if directory not in sys.path:  # as `python file.py` does: its neighbours import
        sys.path.insert(0, directory)
    name = "_graphopt_model_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise _model_error(f"loading {path}", err) from err
    _LOADED[os.path.abspath(path)] = (mtime, module)
    return module


def _model_error(doing: str, err: Exception) -> ModelError:
    return ModelError(f"{doing} failed: {type(err).__name__}: {err} (run with --debug for the traceback)")


def _did_you_mean(obj, name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, [n for n in dir(obj) if not n.startswith("_")], n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _short_repr(value) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."

"""Saved quantized models: the quantized parameters and the recipe, in one safetensors file.

What is stored (`storage_params`) is the optimized graph's parameters, except that a layer the
quantize pass left in float form on this backend ("float-weights": its weight is the dequantized
codes, computed once by the prep) is stored as its codes and scales too: the file holds every
quantized layer in its compact form, whatever the backend chose. `restore` turns stored arrays
back into the graph's parameters (dequantizing those layers once).

File layout (safetensors: no pickle, no code):
    tensors   "<param path>:codes", "<param path>:scale", ... and the other parameters, by the
              optimized graph's parameter names; float8 arrays are stored as their uint8 bits
    metadata  format = "graphopt.quantized-params", version = FORMAT_VERSION, the recipe's JSON,
              the pipeline's pass names, and the dtypes of arrays stored as bits

Loading checks the format and version and names what does not fit. Arrays round-trip bit-exactly.

Example:
    >>> import os, tempfile, numpy as np, jax.numpy as jnp
    >>> from graphopt.quant.recipe import Recipe
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> arrays = {"w:codes": jnp.array([[1, -2]], jnp.int8), "w:scale": jnp.array([0.5], jnp.float8_e4m3fn)}
    >>> write(path, arrays, Recipe(()), ["quantize", "fold_params"])
    >>> loaded, recipe, passes = read(path)
    >>> [(k, str(v.dtype)) for k, v in sorted(loaded.items())], passes
    ([('w:codes', 'int8'), ('w:scale', 'float8_e4m3fn')], ['quantize', 'fold_params'])
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import numpy as np

from graphopt import safetensors_file
from graphopt.param_derived import param_name
from graphopt.quant.recipe import Recipe
from graphopt.quant.scheme import QuantizationError

FORMAT = "graphopt.quantized-params"
FORMAT_VERSION = 1


def _dequantized_from(value):
    """The quantize node's outputs that `value` (a prep output) dequantizes, or None."""
    node = value.node
    if node is None or node.op.name != "dequantize":
        return None
    sources = {id(v.node) for v in node.inputs}
    if len(sources) != 1 or node.inputs[0].node is None or node.inputs[0].node.op.name != "quantize":
        return None
    return list(node.inputs)


def storage_params(graph, *args) -> dict:
    """The arrays to save for optimized `graph`, from the traced function's arguments `args`:
    its parameters, with dequantized ("float-weights") layers as their codes and scales."""
    prep = graph.prep
    if prep is None:
        raise QuantizationError("the graph has no parameter prep: run fold_params after quantize")
    region, mapping = prep.graph.clone()
    outputs, names = [], []
    for key, value in zip(prep.keys, prep.graph.outputs):
        codes = _dequantized_from(value)
        for v, name in ([(c, param_name(c)) for c in codes] if codes else [(value, key)]):
            if name not in names:
                outputs.append(mapping[id(v)])
                names.append(name)
    region.set_outputs(outputs)
    from graphopt.param_prep import ParamPrep

    partial = ParamPrep(region, prep.original_in_tree, prep.param_leaf_indices, prep.param_argnums, tuple(names))
    return partial.params(*args)


def restore(graph, storage: dict) -> dict:
    """The parameters of optimized `graph` from stored arrays (`storage_params` or `read`)."""
    prep = graph.prep
    if prep is None:
        raise QuantizationError("the graph has no parameter prep: run fold_params after quantize")
    params = {}
    for key, value in zip(prep.keys, prep.graph.outputs):
        codes = _dequantized_from(value)
        names = [param_name(c) for c in codes] if codes else [key]
        missing = [n for n in names if n not in storage]
        if missing:
            raise QuantizationError(f"the saved parameters lack {', '.join(missing)} (needed for {key}); "
                                    "the file was saved from a different model or pipeline")
        for name in names:
            want = (codes[names.index(name)] if codes else value).type
            got = storage[name]
            if tuple(np.shape(got)) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
                raise QuantizationError(f"saved parameter {name} is {np.dtype(got.dtype)}{list(np.shape(got))}, "
                                        f"the graph expects {want}; the file was saved from a different model")
        params[key] = _dequantize(value.node, [storage[n] for n in names]) if codes else storage[key]
    return params


_DEQUANTIZE = {}


def _dequantize(node, arrays):
    key = repr(sorted(node.params.items()))
    fn = _DEQUANTIZE.get(key)
    if fn is None:  # closes over the op and params only: the cache must not keep graphs alive
        impl, params = node.op.impl, dict(node.params)
        fn = _DEQUANTIZE[key] = jax.jit(lambda *a: impl(*a, regions=[], **params)[0])
    return fn(*arrays)


# --- the file ------------------------------------------------------------------------------------

def write(path: str | os.PathLike, arrays: dict, recipe: Recipe, passes: Sequence[str]) -> None:
    """Write `arrays` and the recipe to a safetensors file at `path` (replaced atomically)."""
    safetensors_file.write(path, arrays, {"recipe": recipe.to_json(), "passes": json.dumps(list(passes))},
                           format=FORMAT, version=FORMAT_VERSION)


def read(path: str | os.PathLike) -> tuple[dict, Recipe, list[str]]:
    """(arrays, recipe, pipeline pass names) from a file written by `write`."""
    arrays, metadata = safetensors_file.read(path, format=FORMAT, version=FORMAT_VERSION,
                                             what="a graphopt quantized model", error=QuantizationError)
    return arrays, Recipe.from_json(metadata["recipe"]), json.loads(metadata["passes"])

"""Quantize a model in one call: the rewritten graph and its quantized parameters, savable.

    qmodel = graphopt.quantize(model.apply, variables, x, scheme="int8")   # trace, passes, prep
    qmodel(x)                                # the quantized model on new inputs (jitted)
    qmodel.params                            # {"params/Dense_0/kernel:codes": int8 array, ...}
    print(qmodel.report)                     # per pass; the quantize row notes each layer's form
    qmodel.save("model.safetensors")
    qmodel = graphopt.quant.load("model.safetensors", model.apply, abstract_variables, x)

`quantize` runs `pipeline` (default "inference") with the quantize pass inserted before the
passes that must follow it (fuse_attention, fold_params, dce), so fold_params computes the codes
once. The model's own parameter arrays are read, never modified. `load` traces the model again
(example arguments may be `jax.ShapeDtypeStruct`s: `jax.eval_shape(model.init, ...)`), replays
the saved recipe and runs on the saved parameters: no float weights, timing or calibration needed.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"])
    >>> qmodel = quantize(fn, {"w": jnp.full((64, 8), 0.01)}, jnp.ones((2, 64)), scheme="int8",
    ...                   params_argnums=0, prefer="memory")
    >>> sorted((k, str(v.dtype)) for k, v in qmodel.params.items())
    [('w:codes', 'int8'), ('w:scale', 'float32')]
    >>> qmodel(jnp.ones((2, 64))).shape
    (2, 8)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from graphopt.pipeline import PIPELINES, PassSpec, Report, run_pipeline
from graphopt.quant import artifact
from graphopt.quant.recipe import Recipe
from graphopt.quant.scheme import QuantizationError

# Passes that must run after quantize: fuse_attention (picks kernels for what remains), fold_params
# (computes the codes once), dce.
_AFTER = ("fuse_attention", "fold_params", "dce")


@dataclasses.dataclass
class QuantizedModel:
    """A quantized model: graph, parameters (codes, scales, other weights) and how it was made."""

    graph: Any
    params: dict
    storage: dict                 # what `save` writes (see graphopt.quant.artifact)
    report: Report | None
    passes: list[str]
    _run: Callable | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @property
    def recipe(self) -> Recipe:
        return self.graph.metadata["quantization"]

    def __call__(self, *inputs):
        """Run on the traced function's non-parameter arguments, in order."""
        if self._run is None:
            from graphopt.lowering.emit import lower

            self._run = jax.jit(lower(self.graph))
        first = self.graph.param_argnums[0]
        args = list(inputs)
        args.insert(first, self.params)
        return self._run(*args)

    def save(self, path) -> None:
        """Write the quantized parameters and the recipe to a safetensors file."""
        artifact.write(path, self.storage, self.recipe, self.passes)

    def parameter_bytes(self) -> int:
        """Bytes of the parameters the model runs on."""
        return sum(int(v.size) * v.dtype.itemsize for v in jax.tree_util.tree_leaves(self.params))


def quantize(fn: Callable, *args, scheme="int8", pipeline="inference", params_argnums=None,
             **options) -> QuantizedModel:
    """Trace `fn(*args)`, run `pipeline` with `quantize(scheme, **options)` in it, and prepare
    the quantized parameters from the arguments' weights. Options: those of the quantize pass
    (rules, group, symmetric, calibration, smooth, prefer, margin)."""
    import graphopt

    graph = graphopt.trace(fn, *args, params_argnums=params_argnums)
    passes = _with_quantize(pipeline)
    specs = [PassSpec("quantize", (scheme,), options) if p == "quantize" else p for p in passes]
    result = run_pipeline(graph, specs)
    storage = artifact.storage_params(result.graph, *args)
    return QuantizedModel(result.graph, artifact.restore(result.graph, storage), storage, result.report, passes)


def load(path, fn: Callable, *args, params_argnums=None) -> QuantizedModel:
    """A model saved by `QuantizedModel.save`: trace `fn(*args)` (arrays or ShapeDtypeStructs),
    replay the saved recipe with the saved pipeline, and run on the saved parameters."""
    import graphopt

    storage, recipe, passes = artifact.read(path)
    graph = graphopt.trace(fn, *args, params_argnums=params_argnums)
    specs = [PassSpec("quantize", options={"recipe": recipe}) if p == "quantize" else p for p in passes]
    result = run_pipeline(graph, specs)
    return QuantizedModel(result.graph, artifact.restore(result.graph, storage), storage, result.report, passes)


def _with_quantize(pipeline) -> list[str]:
    """The pass names of `pipeline` with "quantize" inserted before the first pass of _AFTER
    (fold_params and dce appended when missing)."""
    names = list(PIPELINES[pipeline]) if isinstance(pipeline, str) else list(pipeline)
    if any(not isinstance(n, str) for n in names) or "quantize" in names:
        raise QuantizationError("quantize(pipeline=...) takes a pipeline name or a list of pass names without "
                                "'quantize' (it inserts the quantize pass itself)")
    at = next((i for i, n in enumerate(names) if n in _AFTER), len(names))
    names.insert(at, "quantize")
    names += [n for n in ("fold_params", "dce") if n not in names[at:]]
    return names

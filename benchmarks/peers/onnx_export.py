"""A zoo model to an ONNX graph: jax2onnx on `apply(variables, *inputs)`, the weights baked in.

    export(model) -> Exported      # once per model object in a process; later calls reuse it
    require() -> (onnx, onnxruntime, jax2onnx)   # or PeerUnavailable saying what to install

The exporter is jax2onnx (PyPI `jax2onnx`; 0.17.1 works with JAX 0.10.2). Its flax.linen plugins
write Dense, Conv, BatchNorm, attention, GELU, ... as native ONNX ops (Gemm, Conv,
BatchNormalization, Softmax, Gelu; LayerNorm as LayerNormalization, `normalization_mode=
"prefer_native"`, which ORT fuses with the residual add into SkipLayerNormalization), which ONNX
Runtime's graph optimizer and its dynamic quantizer know. Attention's two batched matmuls become
Einsum, which `quantize_dynamic` leaves in float. The variables are closed over, so they become
initializers: `quantize_dynamic` quantizes initializer weights only.

Install (its declared requirements pin orbax-checkpoint < 0.11.37 and pull netron, huggingface-hub
and dm-pix, none of which export needs):

    pip install onnx onnx-ir onnxruntime && pip install --no-deps jax2onnx

One repair is made to the exported graph. jax2onnx 0.17.1 removes the NHWC↔NCHW transpose pairs
around Conv → BatchNorm → Relu chains but keeps the shape annotations (`value_info`) of the old
layout, and ONNX Runtime then refuses the model ("[ShapeInferenceError] Incompatible dimensions" at
the first residual Add of a ResNet). The annotations are dropped and inferred again, strictly, so
that a real inconsistency still fails here.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import importlib.metadata
import logging
import time
from typing import Any

import jax
import numpy as np

INSTALL = "pip install onnx onnx-ir onnxruntime && pip install --no-deps jax2onnx"


class PeerUnavailable(ImportError):
    """A package the ONNX Runtime peer needs is not installed."""


@dataclasses.dataclass
class Exported:
    """The ONNX graph of one zoo model and what comparing against it needs."""

    model_bytes: bytes              # the serialized ModelProto (weights as initializers)
    input_names: list[str]          # in the order of `model.inputs`
    inputs: list[np.ndarray]        # `model.inputs` as numpy
    reference: list[np.ndarray]     # jax.jit(model.apply)'s outputs, flattened (tree leaves)
    ops: dict[str, int]             # op type -> count in the exported graph
    seconds: float                  # export time (the first export imports jax2onnx's plugins)
    exporter: str                   # "jax2onnx 0.17.1"


_CACHE: dict[int, tuple[Any, Exported]] = {}  # id(model) -> (model, export): the model is kept alive


def require():
    """The `onnx`, `onnxruntime` and `jax2onnx` modules, or PeerUnavailable naming the missing one.

    >>> onnx, ort, jax2onnx = require()          # doctest: +SKIP
    """
    modules = []
    for name in ("onnx", "onnxruntime", "jax2onnx"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError as error:
            raise PeerUnavailable(f"the ONNX Runtime peer needs the package {name!r} ({error}); "
                                  f"install with: {INSTALL}") from error
    return tuple(modules)


def export(model) -> Exported:
    """`model` (a zoo `ZooModel`) as ONNX: `apply(variables, *inputs)` with `variables` baked in.

    Raises RuntimeError naming the model, the exporter and its error when jax2onnx cannot
    convert the model (an op it has no plugin for, say).

    >>> import sys; sys.path.insert(0, "benchmarks")                 # doctest: +SKIP
    >>> from zoo import resnet                                       # doctest: +SKIP
    >>> exported = export(resnet.build("quick"))                     # doctest: +SKIP
    >>> exported.ops["Conv"]                                         # doctest: +SKIP
    20
    """
    cached = _CACHE.get(id(model))
    if cached is not None:
        return cached[1]
    onnx, _, jax2onnx = require()
    inputs = [np.asarray(x) for x in model.inputs]
    names = [f"input_{i}" for i in range(len(inputs))]
    variables = model.variables

    def fn(*xs):
        return model.apply(variables, *xs)

    # As the benchmarks' baseline computes it: the variables as arguments, not as XLA constants.
    reference = [np.asarray(leaf) for leaf in jax.tree.leaves(jax.jit(model.apply)(variables, *inputs))]
    exporter = f"jax2onnx {importlib.metadata.version('jax2onnx')}"
    start = time.perf_counter()
    # jax2onnx imports all its plugins on first use and logs a traceback for each example plugin
    # whose optional package (dm-pix, ...) is missing; none of them is needed here.
    plugin_log = logging.getLogger("jax2onnx.plugins.plugin_system")
    level = plugin_log.level
    plugin_log.setLevel(logging.ERROR)
    try:
        with _jnp_patches_scoped():
            proto = jax2onnx.to_onnx(fn, inputs, model_name=model.name, input_names=names,
                                     normalization_mode="prefer_native")
    except Exception as error:  # noqa: BLE001 -- any exporter failure is reported with the model
        raise RuntimeError(f"{exporter} could not export zoo model {model.name!r} "
                           f"({type(error).__name__}: {error}); the ONNX Runtime rows for it cannot run. "
                           f"Check whether a newer jax2onnx supports the op named above.") from error
    finally:
        plugin_log.setLevel(level)
    seconds = time.perf_counter() - start
    proto = _reinfer_shapes(onnx, proto, model.name)
    exported = Exported(proto.SerializeToString(), names, inputs, reference,
                        dict(collections.Counter(n.op_type for n in proto.graph.node)), seconds, exporter)
    _CACHE[id(model)] = (model, exported)
    return exported


_JAX2ONNX_JNP: dict[str, Any] = {}  # jax.numpy attributes as jax2onnx set them, for its next exports


@contextlib.contextmanager
def _jnp_patches_scoped():
    """Keep jax2onnx's changes to `jax.numpy` inside the export. Its cumsum plugin, when it loads,
    replaces `jnp.cumsum` for the rest of the process with a version that rejects a positional
    axis (`jnp.cumsum(x, -1)` then raises TypeError in any model traced later, graphopt's
    included); the originals are put back after each export and jax2onnx's versions restored for
    the next one."""
    import jax.numpy as jnp

    before = dict(vars(jnp))
    for name, value in _JAX2ONNX_JNP.items():
        setattr(jnp, name, value)
    try:
        yield
    finally:
        after = dict(vars(jnp))
        for name in set(before) | set(after):
            if after.get(name, _MISSING) is not before.get(name, _MISSING):
                _JAX2ONNX_JNP[name] = after.get(name)
                if name in before:
                    setattr(jnp, name, before[name])
                else:
                    delattr(jnp, name)


_MISSING = object()


def _reinfer_shapes(onnx, proto, name: str):
    """`proto` with its intermediate shape annotations inferred anew (see the module docstring)."""
    del proto.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    except Exception as error:  # noqa: BLE001 -- onnx raises InferenceError, a C++-bound type
        raise RuntimeError(f"the ONNX graph exported from zoo model {name!r} is inconsistent: {error}") from error

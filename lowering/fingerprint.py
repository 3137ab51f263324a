"""The key of an optimized program: everything its result depends on, hashed.

`fingerprint(fn, *args, ...)` traces the model with `jax.make_jaxpr` (JAX's own trace: no Graph is
built) and hashes

- the jaxpr as text, with source lines, module paths (name stack) and effects, and the bytes of
  every constant and literal in it and in its sub-jaxprs (text may abbreviate arrays);
- the argument signature: pytree structure, shapes, dtypes, weak types; the argument names, which
  arguments are parameters, the static arguments' values (their repr), and the model's name;
- the pipeline: each pass with its options;
- the backend (export platform and device kind) and the versions of JAX, jaxlib and graphopt, with
  a hash of graphopt's own source files, so an edited pass never returns an old program.

A model whose program depends on code the key cannot see (a pass or a kernel defined outside
graphopt, an option whose repr is an object address) gets no key: the program cache is skipped.

Example:
    >>> import jax.numpy as jnp
    >>> f = lambda x: jnp.sin(x) * 2
    >>> a, b = fingerprint(f, jnp.ones(3)), fingerprint(f, jnp.zeros(3))   # same types: same key
    >>> c = fingerprint(f, jnp.ones(4))
    >>> a.key == b.key != c.key, len(a.key)
    (True, 64)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import os
import re
from typing import Any, Callable

import jax
import numpy as np

from graphopt import _jax_compat as compat

logger = logging.getLogger("graphopt.cache")

FORMAT = 1  # bump when the key or the stored entry changes meaning
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """A program's key, and what calling a stored program needs from the trace."""

    key: str              # sha256 hex
    out_tree: Any         # output pytree structure of the model
    versions: dict        # {"format", "graphopt", "graphopt_source", "jax", "jaxlib", "platform"}


def fingerprint(fn: Callable, *args, params_argnums=None, static_argnums=(),
                pipeline="default") -> Fingerprint | None:
    """The key of `optimize(fn, pipeline=...)` called with `args`; None when no sound key exists."""
    from graphopt.trace import trace_jaxpr

    passes = pipeline_description(pipeline)
    kernels = kernel_description()
    if passes is None or kernels is None:
        return None
    static = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
    traced = trace_jaxpr(fn, *args, params_argnums=params_argnums, static_argnums=static)
    name, adapted, closed, out_shape, in_tree = (traced.name, traced.adapted, traced.jaxpr,
                                                 traced.out_shape, traced.in_tree)
    leaves = [leaf for _, leaf in traced.leaves]
    static_values = [(i % len(args), repr(args[i % len(args)])) for i in static]
    if any(_ADDRESS.search(text) for _, text in static_values):
        logger.debug("no program key: a static argument's repr holds an object address")
        return None
    versions = runtime_versions()
    header = {
        **versions, "model": name, "framework": adapted.framework, "arg_names": adapted.arg_names,
        "params_argnums": list(adapted.params_argnums), "static": static_values,
        "in_tree": str(in_tree), "out_tree": str(jax.tree_util.tree_structure(out_shape)),
        "leaves": [_leaf_type(x) for x in leaves], "pipeline": passes, "kernels": kernels,
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    digest.update(closed.pretty_print(source_info=True, name_stack=True, print_effects=True).encode())
    for value in compat.jaxpr_arrays(closed):
        array = np.asarray(value)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return Fingerprint(digest.hexdigest(), jax.tree_util.tree_structure(out_shape), versions)


def runtime_versions() -> dict:
    """What a stored program was built with; an entry built with anything else is not used."""
    import jaxlib

    import graphopt

    device = jax.devices()[0]
    return {"format": FORMAT, "graphopt": graphopt.__version__, "graphopt_source": source_hash(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "platform": jax.export.default_export_platform(), "device_kind": device.device_kind}


@functools.cache
def source_hash() -> str:
    """sha256 of graphopt's Python sources (graphopt, graphopt.passes, graphopt.lowering)."""
    digest = hashlib.sha256()
    for package in ("graphopt", "graphopt.passes", "graphopt.lowering"):
        for root in importlib.import_module(package).__path__:
            for folder, dirs, files in sorted(os.walk(root)):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                for name in sorted(f for f in files if f.endswith(".py")):
                    path = os.path.join(folder, name)
                    digest.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as file:
                        digest.update(file.read())
    return digest.hexdigest()


def pipeline_description(pipeline) -> list | None:
    """[[pass name, where its function is defined, args, options], ...]; None if a pass lives
    outside graphopt (its code is not covered by the key)."""
    from graphopt.pipeline import resolve

    described = []
    for info, spec in resolve(pipeline):
        where = f"{getattr(info.fn, '__module__', '?')}.{getattr(info.fn, '__qualname__', '?')}"
        text = [info.name, where, repr(spec.args), repr(sorted(spec.options.items()))]
        if not _in_graphopt(info.fn) or any(_ADDRESS.search(t) for t in text):
            logger.debug("no program key: pass %s (%s) is not part of graphopt", info.name, where)
            return None
        described.append(text)
    return described


def kernel_description() -> list | None:
    """The kernel table as [[op, implementation, backend, function], ...]; None if a kernel
    registered from outside graphopt could change the lowering."""
    from graphopt import implementations

    implementations._load_builtin_kernels()  # the table as a build sees it, not half-filled
    described = []
    for (op, name, backend), kernel in sorted(implementations.KERNELS.items(), key=lambda kv: repr(kv[0])):
        if not _in_graphopt(kernel.fn):
            logger.debug("no program key: kernel %s/%s is registered from outside graphopt", op, name)
            return None
        described.append([op, name, str(backend), f"{kernel.fn.__module__}.{kernel.fn.__qualname__}"])
    return described


def _in_graphopt(fn) -> bool:
    module = getattr(fn, "__module__", None) or ""
    return module == "graphopt" or module.startswith("graphopt.")


def _leaf_type(x) -> list:
    dtype = getattr(x, "dtype", None)
    weak = bool(getattr(x, "weak_type", dtype is None))  # Python scalars are weakly typed
    return [list(np.shape(x)), str(dtype if dtype is not None else type(x).__name__), weak]

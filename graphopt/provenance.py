"""Provenance: where a node came from (module path, source line, the pass that made it).

Example:
    >>> p = Provenance("block/mlp", made_by=None)
    >>> p.derived("canonicalize").describe()
    'block/mlp, made by canonicalize'
"""

from __future__ import annotations

import functools
import os

from graphopt import _jax_compat as compat


class Provenance:
    """Where a node came from: module path (name stack), source line, and the pass that made it.

    The source line is computed from the JAX traceback when first asked for: most nodes are never
    printed, and resolving tracebacks for every node would dominate tracing time. The traceback is
    kept so the lowered program carries the same source metadata as the original.
    """

    __slots__ = ("module_path", "made_by", "_traceback", "_source")

    def __init__(self, module_path: str = "", traceback=None, made_by: str | None = None,
                 source: tuple[str, int, str] | None = None):
        self.module_path = module_path
        self.made_by = made_by
        self._traceback = traceback
        self._source = source

    @property
    def frame(self) -> tuple[str, int, str] | None:
        """(file, line, function) of the innermost frame in the user's code, if known."""
        if self._source is None and self._traceback is not None:
            self._source = _user_frame(self._traceback)
        return self._source

    @property
    def traceback(self):
        """The JAX traceback of the traced operation, or None."""
        return self._traceback

    @property
    def source(self) -> str:
        """'file.py:LINE' of the innermost frame in the user's code, or ''."""
        frame = self.frame
        return f"{os.path.basename(frame[0])}:{frame[1]}" if frame else ""

    def derived(self, made_by: str) -> "Provenance":
        """The same origin, marked as rewritten by pass `made_by`."""
        return Provenance(self.module_path, self._traceback, made_by, self._source)

    def moved(self, module_path: str) -> "Provenance":
        """The same, in another module (a copy of a layer's node made for another layer)."""
        return Provenance(module_path, self._traceback, self.made_by, self._source)

    def describe(self) -> str:
        parts = [p for p in (self.module_path, self.source) if p]
        if self.made_by:
            parts.append(f"made by {self.made_by}")
        return ", ".join(parts) or "unknown origin"


def _library_dirs() -> tuple[str, ...]:
    import importlib.util

    dirs = []
    for name in ("jax", "jaxlib", "flax", "equinox", "optax", "keras", "numpy", "ml_dtypes"):
        spec = importlib.util.find_spec(name)
        if spec and spec.submodule_search_locations:
            dirs.extend(os.path.realpath(p) + os.sep for p in spec.submodule_search_locations)
    here = os.path.dirname(os.path.realpath(__file__))
    dirs += [os.path.join(here, f) for f in ("trace.py", "frameworks.py", "api.py")]
    dirs.append(os.path.join(os.path.dirname(here), "lowering") + os.sep)
    return tuple(dirs)


_LIBRARY_DIRS: tuple[str, ...] | None = None


def _user_frame(traceback):
    """First frame outside JAX and the model libraries; JAX's own choice if all frames are."""
    global _LIBRARY_DIRS
    if _LIBRARY_DIRS is None:
        _LIBRARY_DIRS = _library_dirs()
    for file, line, function in compat.frames(traceback):
        if not _in_library(file) and not file.startswith("<frozen"):
            return (file, line, function)
    return compat.user_frame(traceback)


@functools.lru_cache(maxsize=None)
def _in_library(file: str) -> bool:
    """Whether a source file lies in JAX or a model library (realpath once per file: an analysis
    that describes every node's provenance asks for the same few files 100k times)."""
    return os.path.realpath(file).startswith(_LIBRARY_DIRS)

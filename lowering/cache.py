"""Caches that carry work between runs: JAX's persistent compilation cache and optimized programs.

Both live under one folder, `$GRAPHOPT_CACHE_DIR`, else `~/.cache/graphopt`:

    xla/        JAX's persistent compilation cache: compiled XLA executables
    programs/   graphopt's optimized programs (`graphopt.lowering.program_cache`): a second run of
                `@graphopt.optimize` on the same model and argument types skips tracing into a
                Graph, the passes and the lowering, and its XLA compile hits xla/

Both are on by default. `GRAPHOPT_CACHE=0` (or `configure(enabled=False)`) turns both off;
`configure(path=...)` moves them. Each folder is kept under `GRAPHOPT_CACHE_MAX_BYTES` (default
2 GiB; `configure(max_bytes=...)`): storing a program evicts the least recently used ones, and
JAX evicts its own executables (`jax_compilation_cache_max_size`). Importing graphopt changes
nothing in JAX's configuration: the compilation cache is turned on when graphopt first builds a
program, with thresholds that cache small programs too. A `jax_compilation_cache_dir` the user set (flag, `JAX_COMPILATION_CACHE_DIR`
or `jax.config.update`) is respected: graphopt then uses it as it is, thresholds included.

Example:
    >>> from graphopt.lowering import cache
    >>> settings = cache.configure(path="/tmp/graphopt-doc-cache", enabled=True)
    >>> settings.enabled, str(settings.programs_dir)
    (True, '/tmp/graphopt-doc-cache/programs')
    >>> cache.configure(enabled=False).enabled
    False
    >>> _ = cache.configure(path=None, enabled=None)   # back to the environment's settings
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pathlib
import threading

import jax

from graphopt import _jax_compat

logger = logging.getLogger("graphopt.cache")

DEFAULT_MAX_BYTES = 2 << 30
_UNSET = object()
_overrides: dict = {}           # from configure(): "path", "enabled", "max_bytes"
_lock = threading.Lock()
_owned_dir: str | None = None   # the jax_compilation_cache_dir graphopt set, if it set one
_listening = False
_stats: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Settings:
    """Where the caches live and whether they are on."""

    enabled: bool
    path: pathlib.Path
    max_bytes: int = DEFAULT_MAX_BYTES  # per folder

    @property
    def programs_dir(self) -> pathlib.Path:
        return self.path / "programs"

    @property
    def xla_dir(self) -> pathlib.Path:
        return self.path / "xla"


def settings() -> Settings:
    """The current settings: `configure`'s, else the environment's, else the defaults."""
    enabled = _overrides.get("enabled")
    if enabled is None:
        enabled = os.environ.get("GRAPHOPT_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")
    path = _overrides.get("path") or os.environ.get("GRAPHOPT_CACHE_DIR") or \
        os.path.join(os.path.expanduser("~"), ".cache", "graphopt")
    max_bytes = _overrides.get("max_bytes")
    if max_bytes is None:
        text = os.environ.get("GRAPHOPT_CACHE_MAX_BYTES", "").strip()
        try:
            max_bytes = int(text) if text else DEFAULT_MAX_BYTES
        except ValueError:
            raise ValueError(f"GRAPHOPT_CACHE_MAX_BYTES={text!r} is not a whole number of bytes "
                             f"(e.g. {DEFAULT_MAX_BYTES} for 2 GiB)") from None
    return Settings(bool(enabled), pathlib.Path(path), max_bytes)


def configure(path=_UNSET, enabled=_UNSET, max_bytes=_UNSET) -> Settings:
    """Move (`path`), turn on and off (`enabled`) or bound (`max_bytes` per folder) both caches
    for this process; None goes back to the environment (`GRAPHOPT_CACHE_DIR`, `GRAPHOPT_CACHE`,
    `GRAPHOPT_CACHE_MAX_BYTES`). Returns the new settings.

    Takes effect at the next build. Turning the caches off, or moving them, also detaches JAX's
    compilation cache if graphopt had attached it (a folder the user set is never touched).
    """
    with _lock:
        if max_bytes is not _UNSET and max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"max_bytes={max_bytes!r}: give a whole number of bytes, 0 or more")
        for name, value, kind in (("path", path, str), ("enabled", enabled, bool), ("max_bytes", max_bytes, int)):
            if value is not _UNSET:
                _overrides[name] = None if value is None else kind(value)
        current = settings()
        bound = _xla_cache_bound()  # None: a JAX without the option
        if _owned_dir is not None and (not current.enabled or _owned_dir != str(current.xla_dir)
                                       or bound not in (None, current.max_bytes)):
            _detach()  # the next build attaches it again, as now configured
    return current


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache under the graphopt cache folder, unless the caches
    are off or the user chose a folder of their own. Returns the folder in use (None: none).

    Called by graphopt when it builds a program (never at import)."""
    global _owned_dir
    with _lock:
        current = settings()
        user_dir = jax.config.jax_compilation_cache_dir
        if user_dir and user_dir != _owned_dir:
            _listen()
            return user_dir  # the user's own cache: theirs to configure
        if not current.enabled:
            return None
        wanted = str(current.xla_dir)
        if _owned_dir != wanted:
            if _owned_dir is not None:
                _detach()
            try:
                os.makedirs(wanted, exist_ok=True)
            except OSError as err:  # a read-only home: run without the compilation cache
                logger.debug("no JAX compilation cache: cannot create %s (%s)", wanted, err)
                return None
            jax.config.update("jax_compilation_cache_dir", wanted)
            # graphopt's programs are often small and quick to compile; cache them all.
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
            _bound_xla_cache(current.max_bytes)
            _jax_compat.reset_compilation_cache()  # a cache JAX opened earlier would keep its folder
            _owned_dir = wanted
            logger.debug("JAX persistent compilation cache at %s", wanted)
        _listen()
        return wanted


def stats() -> dict:
    """Counts for this process: `program_hits`, `program_misses`, `program_stores`,
    `program_rejected` (entries found bad and deleted), `program_skipped` (calls the program cache
    does not apply to), `compile_hits` and `compile_requests` (JAX's persistent compilation cache,
    counted once graphopt has turned it on or found the user's)."""
    keys = ("program_hits", "program_misses", "program_stores", "program_rejected", "program_skipped",
            "compile_hits", "compile_requests")
    return {k: _stats[k] for k in keys}


def count(name: str) -> None:
    _stats[name] += 1


def _bound_xla_cache(max_bytes: int) -> None:
    """JAX's own least-recently-used eviction of the compilation cache graphopt sets up (-1:
    unbounded, JAX's default)."""
    try:
        jax.config.update("jax_compilation_cache_max_size", max_bytes)
    except (AttributeError, KeyError):  # a JAX without the option: unbounded
        logger.debug("this JAX cannot bound its compilation cache")


def _xla_cache_bound():
    return getattr(jax.config, "jax_compilation_cache_max_size", None)


def _detach() -> None:
    global _owned_dir
    jax.config.update("jax_compilation_cache_dir", None)
    _bound_xla_cache(-1)
    _jax_compat.reset_compilation_cache()
    logger.debug("JAX persistent compilation cache at %s detached", _owned_dir)
    _owned_dir = None


def _listen() -> None:
    global _listening
    if _listening:
        return
    _listening = True
    events = {"/jax/compilation_cache/cache_hits": "compile_hits",
              "/jax/compilation_cache/compile_requests_use_cache": "compile_requests"}

    def on_event(event: str, **kwargs) -> None:
        name = events.get(event)
        if name is not None:
            _stats[name] += 1

    jax.monitoring.register_event_listener(on_event)

"""Model frameworks as pure functions: plain JAX, Flax linen, Flax nnx, Equinox.

`adapt(model, args)` returns the pure function graphopt traces, the arguments to pass it, and which
of them are parameters:

| model                         | traced function        | parameter arguments                   |
|-------------------------------|------------------------|---------------------------------------|
| function `f(*args)`           | `f`                    | `params_argnums` (default none)       |
| linen `module.apply`          | `apply(variables, *x)` | argument 0 (the variables)            |
| nnx `Module` instance         | `(state, *x) -> out`   | the state from `nnx.split(module)`    |
| Equinox `Module` instance     | `(arrays, *x) -> out`  | the module's array leaves             |

nnx and Equinox do not name their modules in JAX's name stack, as linen does; during tracing,
graphopt enters a `jax.named_scope` per submodule call so nodes carry their module path.

Example:
    >>> import jax.numpy as jnp
    >>> a = adapt(lambda w, x: x @ w, (jnp.ones((3, 2)), jnp.ones(3)), params_argnums=(0,))
    >>> a.params_argnums, a.arg_names
    ((0,), ['w', 'x'])
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
import threading
from typing import Any, Callable

import jax

from graphopt.errors import TraceError


@dataclasses.dataclass
class Adapted:
    """A model seen as a pure function of arrays."""

    fn: Callable                 # pure function to trace
    args: tuple                  # arguments to call it with
    params_argnums: tuple[int, ...]
    arg_names: list[str]         # a name per argument, for paths and error messages
    framework: str               # "jax", "linen", "nnx" or "equinox"


def adapt(model: Any, args: tuple, params_argnums=None) -> Adapted:
    """See the module docstring. `params_argnums=None` picks the framework's default."""
    if _is_nnx_module(model):
        from flax import nnx

        graphdef, state = nnx.split(model)

        def nnx_call(state, *xs):
            module = nnx.merge(graphdef, state)
            with module_scopes(module, _nnx_submodules(module)):
                return module(*xs)

        return Adapted(nnx_call, (state, *args), (0,), ["state"] + _names(None, len(args)), "nnx")
    if _is_equinox_module(model):
        import equinox as eqx

        arrays, static = eqx.partition(model, eqx.is_array)

        def eqx_call(arrays, *xs):
            module = eqx.combine(arrays, static)
            with module_scopes(module, _equinox_submodules(module)):
                return module(*xs)

        return Adapted(eqx_call, (arrays, *args), (0,), ["params"] + _names(None, len(args)), "equinox")
    if not callable(model):
        raise TraceError(f"graphopt.trace needs a function or a module, got {type(model).__name__}")
    framework, names = "jax", _names(model, len(args))
    if _is_linen_apply(model):
        # apply(variables, *args): name the inputs after the module's own __call__ arguments.
        framework = "linen"
        names = ["variables"] + _names(model.__self__.__call__, len(args) - 1)
        params_argnums = (0,) if params_argnums is None else params_argnums
    return Adapted(model, tuple(args), _normalize_argnums(() if params_argnums is None else params_argnums, len(args)), names, framework)


def _normalize_argnums(argnums, n: int) -> tuple[int, ...]:
    argnums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for i in argnums:
        if not -n <= i < n:
            raise TraceError(f"params_argnums={argnums} is out of range for {n} argument(s)")
    return tuple(sorted(i % n for i in argnums))


def _names(fn, n: int) -> list[str]:
    """Parameter names of `fn` for its first n positional arguments (arg0, arg1... otherwise)."""
    names = []
    if fn is not None:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        for p in params:
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                names.append(p.name)
            elif p.kind == p.VAR_POSITIONAL:
                break
    names = names[:n]
    return names + [f"arg{i}" for i in range(len(names), n)]


def _is_linen_apply(fn) -> bool:
    if "flax" not in sys.modules:
        return False
    from flax import linen

    return inspect.ismethod(fn) and isinstance(fn.__self__, linen.Module) and fn.__name__ == "apply"


def _is_nnx_module(obj) -> bool:
    # An nnx Module exists only once flax.nnx is imported; importing it here (a linen model's
    # every first call) would cost a few hundred ms.
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(obj, nnx.Module)


def _is_equinox_module(obj) -> bool:
    eqx = sys.modules.get("equinox")
    return eqx is not None and isinstance(obj, eqx.Module)


# --- module paths for nnx and Equinox ------------------------------------------------------------

def _nnx_submodules(root) -> dict[int, tuple[str, Any]]:
    """id(submodule) -> (path, submodule) for every nnx submodule below `root`."""
    from flax import nnx

    return {id(m): ("/".join(map(str, path)), m) for path, m in nnx.iter_graph(root)
            if isinstance(m, nnx.Module) and path}


def _equinox_submodules(root) -> dict[int, tuple[str, Any]]:
    """id(submodule) -> (path, submodule) for every Equinox submodule below `root`."""
    import equinox as eqx

    found: dict[int, tuple[str, Any]] = {}

    def visit(module, prefix):
        leaves = jax.tree_util.tree_flatten_with_path(
            module, is_leaf=lambda x: x is not module and isinstance(x, eqx.Module))[0]
        for path, leaf in leaves:
            if isinstance(leaf, eqx.Module) and id(leaf) not in found:
                name = "/".join(_key_name(k) for k in path)
                found[id(leaf)] = (f"{prefix}/{name}" if prefix else name, leaf)
                visit(leaf, found[id(leaf)][0])

    visit(root, "")
    return found


def _key_name(key) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


_active = threading.local()


@contextlib.contextmanager
def module_scopes(root, submodules: dict[int, tuple[str, Any]]):
    """While active, a call of any listed submodule runs under `jax.named_scope(its path)`.

    Wraps `__call__` of the modules' classes for the duration of the trace and restores them
    after. Paths are entered relative to the enclosing scoped module, so name stacks nest cleanly.
    """
    classes = {type(root)} | {type(m) for _, m in submodules.values()}
    saved = {cls: cls.__dict__.get("__call__") for cls in classes}
    for cls in classes:
        cls.__call__ = _scoped(cls.__call__, submodules)
    try:
        yield
    finally:
        for cls, original in saved.items():
            if original is None:
                del cls.__call__
            else:
                cls.__call__ = original


def _scoped(call, submodules):
    def scoped_call(self, *args, **kwargs):
        stack = _active.__dict__.setdefault("stack", [])
        entry = submodules.get(id(self))
        if entry is None or (stack and stack[-1] == entry[0]):  # unknown, or scoped by a subclass
            return call(self, *args, **kwargs)
        path, outer = entry[0], (stack[-1] if stack else "")
        name = path[len(outer) + 1:] if outer and path.startswith(outer + "/") else path
        stack.append(path)
        try:
            with jax.named_scope(name):
                return call(self, *args, **kwargs)
        finally:
            stack.pop()

    scoped_call.__wrapped__ = call
    return scoped_call

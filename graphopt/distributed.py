"""Run an optimized model across processes: thin helpers over `jax.distributed` and XLA's SPMD.

graphopt has no distributed runtime of its own. Several processes (one per host, or several on one
host) each run the *same* Python program; `jax.distributed.initialize` connects them through a
coordinator (process 0 at `coordinator_address`) so that `jax.devices()` lists every process's
devices. A `Mesh` over those global devices names the axes (`data`, `model`); arrays placed on it
with a `NamedSharding` are *global arrays* of which each process holds only its own shards. The
optimized function is jitted as usual: XLA's SPMD partitioner splits the one program over the mesh
and inserts the collectives (all-reduce, all-gather), which run over gloo between CPU processes
or NCCL / ICI on GPU / TPU. Every process must make the same calls in the same order.

This module adds what each process needs around that, with errors that say what to fix:

- `initialize`: `jax.distributed.initialize` with its arguments checked, the CPU device count per
  process, and gloo as the CPU collectives implementation.
- `global_mesh`: a `Mesh` over all processes' devices from axis sizes, its first axis spanning the
  processes (`Auto` axes, so XLA's partitioner propagates shardings; `jax.make_mesh` defaults to
  `Explicit` axes, which reject programs such as a matmul over a sharded contraction dimension).
- `place`: a pytree every process holds in full (weights built from the same seed or read from
  the same checkpoint) → global arrays, each process keeping only its shards.
- `place_local`: each process's own slice of the batch → one global array.
- `gather`: a global array (pytree) → the full value as NumPy on every process.
- Every process traces and optimizes the model itself, and SPMD needs one program: a pass that
  decides by timing (`fuse_attention`) takes its static per-backend choice when
  `jax.process_count() > 1`, so every process builds the same graph.

Example (run it as `python run.py 0` and `python run.py 1`, on one host; docs/distributed.md has
the version for several hosts and the one with hand-written specs)::

    import sys, numpy as np
    from graphopt import distributed as dist

    i = int(sys.argv[1])
    dist.initialize("127.0.0.1:12355", num_processes=2, process_id=i, cpu_devices=4)  # first!
    import graphopt, graphopt.demo
    mesh = dist.global_mesh(data=2, model=4)              # 8 devices: 2 processes x 4
    model, variables, tokens = graphopt.demo.demo_model(graphopt.demo.DemoConfig(batch=4))
    sharded = graphopt.shard(model.apply, variables, tokens, mesh=mesh)
    params = dist.place(variables, mesh, lambda path, leaf: sharded.plan[path])
    batch = dist.place_local(np.asarray(tokens)[2 * i:2 * i + 2], mesh, sharded.plan["tokens"])
    print(dist.gather(sharded(params, batch)).shape)      # (4, 128, 256) on both processes

The pieces work the same in a single process, on its local devices:

    >>> import jax, numpy as np
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = global_mesh(data=1, model=jax.device_count())
    >>> w = place({"w": np.arange(8.0).reshape(2, 4)}, mesh, P(None, "model"))
    >>> gather(jax.jit(lambda p: p["w"].sum(0))(w)).tolist()
    [4.0, 6.0, 8.0, 10.0]
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from graphopt.errors import GraphoptError

__all__ = ["DistributedError", "gather", "global_mesh", "initialize", "path_of",
           "place", "place_local"]


class DistributedError(GraphoptError, ValueError):
    """A multi-process setup that cannot work as asked: bad arguments, or a call made too late."""


def initialize(coordinator_address: str, num_processes: int, process_id: int, *,
               cpu_devices: int | None = None, local_device_ids=None, timeout_s: int = 300) -> None:
    """Connect this process to the others (`jax.distributed.initialize`); call it first of all.

    `coordinator_address` is `host:port` of process 0, the same string in every process; process 0
    listens there. `process_id` runs over `0 .. num_processes - 1`. `cpu_devices` sets how many CPU
    devices this process exposes (`jax_num_cpu_devices`; the CPU backend has one by default).
    The CPU collectives implementation is set to gloo (JAX 0.10's default; where it is `none`,
    programs that span CPU processes fail) unless one was chosen (`mpi`). On GPU and TPU the CPU
    settings are inert. `timeout_s` bounds how long this process waits for the others to connect.

    Must run before any JAX computation, `jax.devices()` included, in this process.

    >>> initialize("localhost", num_processes=2, process_id=0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    graphopt.distributed.DistributedError: coordinator_address must be 'host:port' ...
    """
    _check_address(coordinator_address)
    for name, value in (("num_processes", num_processes), ("process_id", process_id)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise DistributedError(f"{name} must be an int, got {value!r}")
    if num_processes < 1:
        raise DistributedError(f"num_processes must be at least 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"process_id must be in 0..{num_processes - 1} (num_processes="
                               f"{num_processes}), got {process_id}; give each process its own id")
    if cpu_devices is not None and (isinstance(cpu_devices, bool) or not isinstance(cpu_devices, int)
                                    or cpu_devices < 1):
        raise DistributedError(f"cpu_devices must be a positive int, got {cpu_devices!r}")
    if jax.distributed.is_initialized():
        raise DistributedError("jax.distributed is already initialized in this process; call "
                               "initialize once per process (jax.distributed.shutdown() ends it)")
    try:
        if cpu_devices is not None:
            jax.config.update("jax_num_cpu_devices", cpu_devices)
        if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=int(num_processes), process_id=int(process_id),
                                   local_device_ids=local_device_ids,
                                   initialization_timeout=int(timeout_s))
    except RuntimeError as e:
        if "before" in str(e):  # JAX's wording: "... must be called before any JAX calls ..."
            raise DistributedError(
                "graphopt.distributed.initialize must run before anything touches a JAX backend in "
                "this process (a computation, jax.devices(), jax.device_put, building a model's "
                f"variables, ...); move the call to the top of the program. JAX said: {e}") from e
        raise


def global_mesh(axes: dict[str, int] | None = None, /, **sizes: int) -> Mesh:
    """A `Mesh` over every process's devices, e.g. `global_mesh(data=2, model=4)`.

    The product of the sizes must be `jax.device_count()` (all processes together). Devices are
    laid out process by process, so the first axis spans processes when its size is
    `jax.process_count()`: put the axis with the least traffic (`data`) first, and the axis whose
    collectives run every layer (`model`) inside a process or host. Axes are `Auto`: XLA's SPMD
    partitioner propagates the input shardings through the program. (On TPU pods the order of
    devices inside a host matters for ICI: there, `jax.make_mesh(..., axis_types=(AxisType.Auto,)
    * n)` lays them out by topology, and any such `Mesh` works with `place` and `graphopt.shard`.)

    >>> import jax
    >>> global_mesh(data=1, model=jax.device_count()).axis_names
    ('data', 'model')
    """
    sizes = {**(axes or {}), **sizes}
    if not sizes:
        raise DistributedError("global_mesh needs axis sizes, e.g. global_mesh(data=2, model=4)")
    bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise DistributedError(f"axis sizes must be positive ints, got {bad}")
    total, needed = int(np.prod(list(sizes.values()))), jax.device_count()
    if total != needed:
        raise DistributedError(
            f"mesh {sizes} has {total} devices, but there are {needed} ({jax.process_count()} "
            f"process(es) x {jax.local_device_count()} local device(s)); choose sizes whose product "
            f"is {needed}, or change the processes' device counts (initialize(cpu_devices=...))")
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices).reshape(tuple(sizes.values())), tuple(sizes),
                axis_types=(AxisType.Auto,) * len(sizes))


Spec = PartitionSpec | Callable[[str, Any], PartitionSpec] | Any


def place(tree: Any, mesh: Mesh, spec: Spec) -> Any:
    """Global arrays for a pytree that every process holds in full (same values everywhere).

    `spec` is one `PartitionSpec` for every leaf, a pytree of them shaped like `tree` (a prefix
    is enough), or a function `(path, leaf) -> PartitionSpec` where `path` is the leaf's
    '/'-joined pytree path, as graphopt names parameters (`params/block_0/up/kernel`). Each
    process copies only the shards its devices hold. Leaves that are already `jax.Array`s with
    exactly this sharding are kept as they are.

    >>> import jax, numpy as np
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = global_mesh(data=1, model=jax.device_count())
    >>> place({"b": np.zeros(4)}, mesh, P())["b"].sharding.spec == P()
    True
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    specs = _leaf_specs(tree, leaves, spec)
    out = []
    for (path, leaf), leaf_spec in zip(leaves, specs):
        name = path_of(path)
        _check_spec(name, np.shape(leaf), mesh, leaf_spec)
        sharding = NamedSharding(mesh, leaf_spec)
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            out.append(leaf)
            continue
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            raise DistributedError(f"{name}: a global array sharded as {leaf.sharding} cannot be "
                                   f"re-placed from one process; reshard it with jax.jit instead")
        host = np.asarray(leaf)
        out.append(jax.make_array_from_callback(host.shape, sharding, lambda index, h=host: h[index]))
    return jax.tree_util.tree_unflatten(treedef, out)


def place_local(local: Any, mesh: Mesh, spec: PartitionSpec) -> Any:
    """One global array from each process's own slice (a pytree of them) of the batch.

    The slices are stacked along the dimension `spec` shards over the process-spanning axis (the
    first, usually `data`): with 2 processes each passing a [2, T] slice and `P("data")`, the
    global array is [4, T], process 0's rows first. Use it when each host loads its own data.
    """
    sharding = NamedSharding(mesh, spec)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def gather(tree: Any) -> Any:
    """The full value of each (global) array in `tree`, as NumPy, on every process.

    A collective: every process must call it. Arrays that live in one process are just copied.
    """
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(one, tree)


def path_of(path) -> str:
    """'/'-joined names of a pytree key path: `(DictKey('params'), DictKey('up'))` → `params/up`."""
    from graphopt.trace import key_path_name

    return key_path_name(path)


def _check_address(address) -> None:
    host, sep, port = str(address).rpartition(":")
    if not isinstance(address, str) or not sep or not host or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise DistributedError(
            f"coordinator_address must be 'host:port' (e.g. '10.0.0.1:1234', '127.0.0.1:1234' when "
            f"all processes run on one machine), the same in every process; got {address!r}")


def _leaf_specs(tree, leaves, spec) -> list:
    if isinstance(spec, PartitionSpec):
        return [spec] * len(leaves)
    if callable(spec):
        specs = []
        for path, leaf in leaves:
            s = spec(path_of(path), leaf)
            if not isinstance(s, PartitionSpec):
                raise DistributedError(f"the spec function returned {s!r} for {path_of(path)}; it "
                                       "must return a jax.sharding.PartitionSpec (P() to replicate)")
            specs.append(s)
        return specs
    is_spec = lambda s: isinstance(s, PartitionSpec)  # noqa: E731
    try:
        full = jax.tree_util.tree_map(lambda s, sub: jax.tree_util.tree_map(lambda _: s, sub),
                                      spec, tree, is_leaf=is_spec)
    except ValueError as e:
        raise DistributedError(f"the spec pytree does not match the tree's structure (it must be "
                               f"a prefix of it): {e}") from e
    return jax.tree_util.tree_leaves(full, is_leaf=is_spec)


def _check_spec(name: str, shape: tuple, mesh: Mesh, spec: PartitionSpec) -> None:
    if len(spec) > len(shape):
        raise DistributedError(f"{name}: spec {spec} has {len(spec)} entries but the array has "
                               f"shape {shape}")
    for dim, axes in enumerate(spec):
        if axes is None:
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        unknown = [a for a in names if a not in mesh.shape]
        if unknown:
            raise DistributedError(f"{name}: spec {spec} names axis {unknown[0]!r}, not in the mesh "
                                   f"{dict(mesh.shape)}")
        parts = int(np.prod([mesh.shape[a] for a in names]))
        if shape[dim] % parts:
            raise DistributedError(f"{name}: dimension {dim} of shape {shape} is not divisible by "
                                   f"{parts} (mesh axes {names} of spec {spec}); pick another axis "
                                   "or replicate it (None)")

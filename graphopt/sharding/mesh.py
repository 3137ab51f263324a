"""Meshes for the sharding pass: a `jax.sharding.Mesh`, or sizes (`{"data": 2, "model": 4}`, "2x4").

Planning needs only the axis sizes (`mesh_sizes`), so a plan for a 256-chip pod can be made on a
laptop; running needs devices (`device_mesh`). The sharding constraints graphopt inserts use
`jax.lax.with_sharding_constraint`, which takes only *Auto* mesh axes, so a mesh given with
Explicit axes is re-made with Auto ones (same devices, same names).

Example:
    >>> mesh_sizes("2x4"), mesh_sizes({"model": 8})
    ({'data': 2, 'model': 4}, {'data': 1, 'model': 8})
"""

from __future__ import annotations

import re

import jax
import numpy as np

from graphopt.errors import GraphoptError

AXES = ("data", "model")


class ShardingError(GraphoptError, ValueError):
    """A sharding request that cannot be carried out (it names the parameter, axis and sizes)."""


def mesh_sizes(mesh) -> dict[str, int]:
    """{"data": d, "model": m} for a Mesh, a dict of sizes (a missing axis is 1) or "DxM"."""
    if isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    elif isinstance(mesh, str):
        match = re.fullmatch(r"\s*(\d+)\s*[x×*]\s*(\d+)\s*", mesh)
        if not match:
            raise ShardingError(f"mesh {mesh!r}: write sizes as 'DATAxMODEL', e.g. '2x4'")
        sizes = {"data": int(match.group(1)), "model": int(match.group(2))}
    elif isinstance(mesh, dict):
        sizes = {"data": 1, "model": 1, **{k: int(v) for k, v in mesh.items()}}
    else:
        raise ShardingError(f"mesh must be a jax.sharding.Mesh, a dict of axis sizes or 'DxM', "
                            f"got {type(mesh).__name__}")
    unknown = set(sizes) - set(AXES)
    if unknown or any(n < 1 for n in sizes.values()):
        raise ShardingError(f"mesh axes must be {AXES} with sizes >= 1, got {sizes}; name a jax Mesh's "
                            "axes ('data', 'model'), e.g. jax.make_mesh((2, 4), ('data', 'model'))")
    return {axis: sizes.get(axis, 1) for axis in AXES}


def device_mesh(mesh) -> jax.sharding.Mesh:
    """A Mesh with Auto axes 'data' and 'model' over real devices."""
    sizes = mesh_sizes(mesh)
    if isinstance(mesh, jax.sharding.Mesh):
        names, devices = list(mesh.axis_names), np.asarray(mesh.devices)
        for axis in AXES:  # a mesh without one of the axes: that axis has size 1
            if axis not in names:
                devices, names = devices[..., None], names + [axis]
        devices = devices.transpose([names.index(axis) for axis in AXES])  # ('model', 'data') too
    else:
        count = sizes["data"] * sizes["model"]
        available = jax.devices()
        if len(available) < count:
            raise ShardingError(
                f"a {sizes['data']}x{sizes['model']} mesh needs {count} devices, {len(available)} are "
                f"visible ({available[0].platform}). On CPU, set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={count} before JAX starts.")
        devices = np.asarray(available[:count]).reshape(sizes["data"], sizes["model"])
    return jax.sharding.Mesh(devices, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))

"""Compilation targets: `cpu`, `cuda`, `tpu` and `tpu:<chip>:<topology>`, parsed and resolved to devices.

A TPU topology names the chip and the slice shape, as libtpu spells it: `tpu:v5e:2x2`,
`tpu:v4:2x2x1`, `tpu:v5p:2x2x1`, `tpu:v6e:2x2`. On a machine without a TPU, its devices are libtpu's
*compile-only* devices: XLA compiles a real TPU executable for them (cost and memory analysis,
serialized executable), which cannot run here. That needs the libtpu wheel: `pip install
'graphopt[tpu]'`.

Example:
    >>> parse_target("tpu:v5e:2x2")
    Target(platform='tpu', topology='v5e:2x2')
    >>> parse_target("cpu").platform
    'cpu'
    >>> parse_target("gpu")
    Traceback (most recent call last):
    ...
    graphopt.errors.TargetError: unknown target 'gpu': use cpu, cuda, tpu or tpu:<chip>:<topology> (e.g. tpu:v5e:2x2, tpu:v4:2x2x1)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import jax

from graphopt.errors import TargetError

INSTALL_LIBTPU = "pip install 'graphopt[tpu]'"
_TOPOLOGY = re.compile(r"^(v[0-9]+[a-z]*):([0-9]+(?:x[0-9]+){1,2})$")


@dataclasses.dataclass(frozen=True)
class Target:
    """A platform, and for TPU an optional topology (`v5e:2x2`) to compile for without a TPU."""

    platform: str                  # "cpu" | "cuda" | "tpu"
    topology: str | None = None    # "v5e:2x2": compile-only devices from libtpu

    def __str__(self) -> str:
        return self.platform if self.topology is None else f"{self.platform}:{self.topology}"

    @property
    def compile_only(self) -> bool:
        """True when the executable is built for devices this machine does not have."""
        return self.topology is not None


def parse_target(text: str) -> Target:
    """`"cpu"`, `"cuda"`, `"tpu"` or `"tpu:<chip>:<topology>"` → Target; anything else is an error."""
    spec = text.strip().lower()
    if spec in ("cpu", "cuda", "tpu"):
        return Target(spec)
    if spec.startswith("tpu:"):
        topology = spec[4:]
        if not _TOPOLOGY.match(topology):
            raise TargetError(f"bad TPU topology {topology!r} in target {text!r}: write tpu:<chip>:<shape>, "
                              "e.g. tpu:v5e:2x2, tpu:v4:2x2x1, tpu:v5p:2x2x1, tpu:v6e:2x2")
        return Target("tpu", topology)
    raise TargetError(f"unknown target {text!r}: use cpu, cuda, tpu or tpu:<chip>:<topology> "
                      "(e.g. tpu:v5e:2x2, tpu:v4:2x2x1)")


def devices(target: Target) -> list:
    """The devices to compile for: this machine's for cpu / cuda / tpu, libtpu's compile-only
    devices for a TPU topology. Raises TargetError with what to do when they are not available."""
    if target.topology is not None:
        return _topology_devices(target.topology)
    try:
        return jax.devices(target.platform)
    except RuntimeError as e:
        hint = {"cuda": "export for CUDA instead (graphopt.export(..., platforms=('cuda',)) or "
                        "`graphopt export --platforms cuda`), which needs no GPU",
                "tpu": "give a topology to compile for a TPU this machine does not have, "
                       f"e.g. --target tpu:v5e:2x2 (needs libtpu: {INSTALL_LIBTPU})"}.get(target.platform, "")
        raise TargetError(f"no {target.platform} device on this machine; {hint}") from e


def libtpu_available() -> bool:
    """Whether the libtpu wheel (TPU compiler and runtime) is installed."""
    return importlib.util.find_spec("libtpu") is not None


_topologies: dict[str, list] = {}


def _topology_devices(topology: str) -> list:
    if topology in _topologies:
        return _topologies[topology]
    if not libtpu_available():
        raise TargetError(f"compiling for tpu:{topology} on a machine without a TPU needs libtpu, "
                          f"which is not installed; install it with: {INSTALL_LIBTPU}")
    from jax.experimental import topologies

    # Not a Cloud TPU VM: skip libtpu's metadata-server queries (they would time out offline).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # Compile-only devices touch no chip: let several processes (pytest workers) load libtpu.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        found = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    except Exception as e:  # libtpu reports bad names and shapes as JaxRuntimeError
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TargetError(f"libtpu cannot build the TPU topology {topology!r}: {message}. Known chips: "
                          "v4, v5e, v5p, v6e; the shape must tile the chip's host (2x2 for v5e, "
                          "2x2x1 for v4 / v5p)") from e
    _topologies[topology] = list(found)
    return _topologies[topology]

"""The sharding plan: a PartitionSpec and the reason for it, for every input of a traced graph.

`make_plan(graph, mesh)` decides, from the dataflow (`graphopt.sharding.analysis`):

- tensor parallelism (Megatron): each tensor-parallel dimension is split over `model` in every
  parameter holding it: the producing weight is column-parallel (output features split), the
  consuming weight row-parallel (input features split), biases and scales on that dimension
  follow; one split per parameter. An output projection (LM head) is split by its outputs
  (vocabulary) when `model` divides them, else replicated. Everything else (norms, biases of
  row-parallel layers, embedding tables read by a gather) is replicated over `model`.
- grouped-query attention: when `model` does not divide the KV heads but divides the query
  heads, K/V are replicated and Q / output split (noted in the plan).
- data parallelism: axis 0 (the batch) of every model input is split over `data`; parameters are
  replicated over `data`, or with `fsdp=True` their largest remaining axis that `data` divides
  is split over it.
- `rules=[(regex, spec), ...]`: the first rule whose regex `re.search`es a path overrides the
  automatic choice for that input (parameters and model inputs alike).

A split that the mesh cannot make is a `ShardingError` naming the path, axis and sizes.

Example:
    >>> import graphopt, jax, jax.numpy as jnp
    >>> p = {"up": jnp.ones((4, 16)), "down": jnp.ones((16, 4))}
    >>> g = graphopt.trace(lambda p, x: jax.nn.relu(x @ p["up"]) @ p["down"], p, jnp.ones((2, 4)),
    ...                    params_argnums=0)
    >>> plan = make_plan(g, {"data": 2, "model": 4})
    >>> plan["up"], plan["down"], plan["x"]
    (P(None, 'model'), P('model', None), P('data', None))
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Sequence

import numpy as np
from jax.sharding import PartitionSpec

from graphopt.ir import Graph
from graphopt.sharding.analysis import Analysis, analyze, lead
from graphopt.sharding.mesh import ShardingError, mesh_sizes


@dataclasses.dataclass
class Entry:
    """One graph input's sharding: `spec` has one entry per axis (None or a mesh axis name)."""

    path: str
    role: str
    shape: tuple
    dtype: np.dtype
    spec: tuple
    reason: str

    @property
    def partition_spec(self) -> PartitionSpec:
        return PartitionSpec(*self.spec)


@dataclasses.dataclass
class Plan:
    """The plan: entries in graph-input order, the mesh sizes, and notes on the pairs found."""

    mesh: dict
    fsdp: bool
    entries: list[Entry]
    notes: list[str]

    def __getitem__(self, path: str) -> PartitionSpec:
        return self.entry(path).partition_spec

    def entry(self, path: str) -> Entry:
        for e in self.entries:
            if e.path == path:
                return e
        raise KeyError(f"no input {path!r} in the plan; inputs: {', '.join(e.path for e in self.entries)}")

    def specs(self) -> dict[str, PartitionSpec]:
        return {e.path: e.partition_spec for e in self.entries}

    def __str__(self) -> str:
        from graphopt.sharding.report import plan_table

        return plan_table(self)


Rules = Sequence[tuple[str, "PartitionSpec | tuple"]]


def make_plan(graph: Graph, mesh, *, fsdp: bool = False, rules: Rules = (),
              analysis: Analysis | None = None) -> Plan:
    """The plan for `graph` on `mesh` (a Mesh, sizes or 'DxM'); see the module docstring."""
    sizes = mesh_sizes(mesh)
    analysis = analysis or analyze(graph)
    args = {a.path: a for a in graph.inputs}
    specs = {a.path: [None] * a.type.ndim for a in graph.inputs}
    reasons: dict[str, str] = {}
    notes: list[str] = []
    ruled = {path for path in args if any(re.search(pattern, path) for pattern, _ in rules)}
    _tensor_parallel(analysis, args, sizes["model"], specs, reasons, notes, ruled)
    _output_heads(analysis, args, sizes["model"], specs, reasons)
    for arg in graph.inputs:
        if arg.role == "param":
            if arg.path not in reasons:
                reasons[arg.path] = f"replicated over model: {_why_replicated(arg, analysis)}"
            reasons[arg.path] += _data_split(arg, specs[arg.path], sizes["data"], fsdp)
        else:
            reasons[arg.path] = _batch_split(arg, specs[arg.path], sizes["data"])
    entries = []
    for arg in graph.inputs:
        spec, reason = _apply_rules(arg, tuple(specs[arg.path]), reasons[arg.path], rules, sizes)
        entries.append(Entry(arg.path, arg.role, arg.type.shape, np.dtype(arg.type.dtype), spec, reason))
    return Plan(sizes, fsdp, entries, notes)


def _tensor_parallel(analysis: Analysis, args, m: int, specs, reasons, notes, ruled: set) -> None:
    split: set[str] = set()
    for dim in analysis.tensor_parallel:
        holders = [(p, a) for p, a in analysis.holders.get(id(dim), []) if p in args]
        if not holders or any(p in split for p, _ in holders):
            continue  # a parameter takes one split: the heads, not also the per-head features
        kind = "heads" if id(dim) in analysis.head_like else "features"
        twice = sorted(p for p, n in Counter(p for p, _ in holders).items() if n > 1)
        if twice:  # one mesh axis splits at most one axis of a tensor
            for path in twice:
                axes = sorted(a for p, a in holders if p == path)
                reasons[path] = (f"replicated over model: axes {axes} all hold one tensor-parallel dimension "
                                 f"({dim.size} {kind}; a weight read by consecutive layers), and model can "
                                 "split only one of them")
            notes.append(f"tensor-parallel {kind} ({dim.size}) not split: {', '.join(twice)} hold(s) it on "
                         "more than one axis")
            continue
        ok = [(p, a) for p, a in holders if _divides(analysis, args[p], a, m)]
        if not ok and all(p in ruled for p, _ in holders):
            continue  # the user's rules decide for every parameter holding it
        if not ok:
            path, axis = next((p, a) for p, a in holders if p not in ruled)
            size = args[path].type.shape[axis]
            raise ShardingError(
                f"cannot split {path} axis {axis} ({dim.size} {kind}, axis size {size}) over model={m}: "
                f"{m} does not divide {dim.size}. Use a mesh whose model size divides {dim.size} "
                f"(model in {_divisors(dim.size)}), or keep it whole with a rule, e.g. "
                f"rules=[({re.escape(path)!r}, P())] (and the same for {', '.join(p for p, _ in holders if p != path and p not in ruled) or 'nothing else'}).")
        roles = {"column": [], "row": []}
        for path, axis in ok:
            role = _role(analysis, path, dim)
            specs[path][axis] = "model"
            split.add(path)
            size = args[path].type.shape[axis]
            if role == "column":
                reasons[path] = f"column-parallel: axis {axis} ({size}, {kind}) split over model"
            elif role == "row":
                reasons[path] = (f"row-parallel: axis {axis} ({size}, {kind}) split over model; its "
                                 "output is all-reduced over model")
            else:
                reasons[path] = f"axis {axis} ({size}, {kind}) split over model with its layer"
            if role:
                roles[role].append(path)
            if role == "row":
                for layer in analysis.layers:
                    if layer.param.path == path and layer.bias is not None and layer.bias.path not in reasons:
                        reasons[layer.bias.path] = (f"replicated over model: bias of the row-parallel {path}, "
                                                    "added after the all-reduce")
        for path, axis in holders:
            if (path, axis) not in ok:
                split.add(path)
                reasons[path] = (f"replicated over model: its {dim.size} {kind} are not divisible by model={m} "
                                 f"(grouped-query attention: K/V replicated, Q and output split)")
                notes.append(f"{path}: {dim.size} KV {kind} not divisible by model={m}; replicated")
        notes.append(f"tensor-parallel {kind} ({dim.size}): column {roles['column']}, row {roles['row']}")


def _role(analysis: Analysis, path: str, dim) -> str:
    for layer in analysis.layers:
        if layer.param.path != path:
            continue
        value = layer.node.inputs[layer.weight]
        if any(analysis.lead(value, a) is dim for a in layer.free):
            return "column"
        if any(analysis.lead(value, a) is dim for a in layer.contracted):
            return "row"
    return ""


def _divides(analysis: Analysis, arg, axis: int, m: int) -> bool:
    """Whether `m` contiguous blocks of this axis split whole units of its tensor-parallel
    dimension: `m` divides the outermost factor, or a product of leading factors that are all
    heads (KV heads x group = query heads); never a cut through the features of one head."""
    if m == 1:
        return True
    if arg.type.shape[axis] % m:
        return False
    factors = analysis.atoms(arg, axis)
    if factors[0].size % m == 0:
        return True
    size = 1
    for atom in factors:
        if id(atom) not in analysis.head_like:
            return False
        size *= atom.size
        if size % m == 0:
            return True
    return False


def _output_heads(analysis: Analysis, args, m: int, specs, reasons) -> None:
    """Split an output projection (LM head) by its outputs; its biases follow."""
    for layer in analysis.layers:
        path = layer.param.path
        if path in reasons or path not in args:
            continue
        value = layer.node.inputs[layer.weight]
        for axis in layer.free:
            dim = analysis.lead(value, axis)
            if id(dim) not in analysis.to_output or id(dim) in analysis.batch:
                continue
            holders = [(p, a) for p, a in analysis.holders.get(id(dim), []) if p in args and p not in reasons]
            if m > 1 and dim.size % m:
                for p, a in holders:
                    reasons[p] = (f"replicated over model: output projection with {dim.size} outputs, "
                                  f"not divisible by model={m}")
                break
            for p, a in holders:
                specs[p][a] = "model"
                reasons[p] = (f"output projection (vocab-parallel): axis {a} ({dim.size} outputs) split over "
                              "model; the model's output stays split over model")
            break


def _why_replicated(arg, analysis: Analysis) -> str:
    readers = {n.op.name for n in arg.users()} | {n.op.name for u in arg.users() for v in u.outputs
                                                   for n in v.users()}
    if "gather" in readers and arg.type.ndim >= 2:
        return "an embedding table read by a gather (a rule can split it by vocab)"
    if any(layer.param is arg for layer in analysis.layers):
        return "a layer outside any tensor-parallel pair"
    if arg.type.ndim <= 1:
        return "a norm scale or bias on features that are not split"
    return "no tensor-parallel dimension"


def _data_split(arg, spec: list, d: int, fsdp: bool) -> str:
    if not fsdp:
        return "; replicated over data"
    free = sorted((i for i in range(len(spec)) if spec[i] is None), key=lambda i: (-arg.type.shape[i], i))
    for i in free:
        if arg.type.shape[i] % d == 0:
            spec[i] = "data"
            return f"; FSDP: axis {i} ({arg.type.shape[i]}) split over data"
    return f"; FSDP: no free axis divisible by data={d}, replicated over data"


def _batch_split(arg, spec: list, d: int) -> str:
    if arg.type.ndim == 0:
        return "a scalar: replicated"
    if arg.type.shape[0] % d:
        raise ShardingError(
            f"model input {arg.path!r} has batch size {arg.type.shape[0]} (axis 0), not divisible by "
            f"data={d}. Use a batch size that data={d} divides, a mesh with a data size dividing "
            f"{arg.type.shape[0]}, or a rule for it, e.g. rules=[({re.escape(arg.path)!r}, P())].")
    spec[0] = "data"
    return f"batch (axis 0, {arg.type.shape[0]}) split over data"


def _apply_rules(arg, spec: tuple, reason: str, rules: Rules, sizes: dict) -> tuple[tuple, str]:
    for pattern, rule_spec in rules:
        if not re.search(pattern, arg.path):
            continue
        entries = tuple(rule_spec)
        if len(entries) > arg.type.ndim:
            raise ShardingError(f"rule {pattern!r} gives {arg.path} ({arg.type}) the spec {PartitionSpec(*entries)} "
                                f"with {len(entries)} entries; it has {arg.type.ndim} axes")
        entries += (None,) * (arg.type.ndim - len(entries))
        _check_divisible(arg, entries, sizes, f"rule {pattern!r}")
        was = ", ".join(str(s) for s in spec)
        return entries, f"rule {pattern!r} (automatic: ({was}), {reason})"
    _check_divisible(arg, spec, sizes, "the automatic plan")
    return spec, reason


def _check_divisible(arg, spec: tuple, sizes: dict, who: str) -> None:
    for axis, entry in enumerate(spec):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        for name in names:
            if name not in sizes:
                raise ShardingError(f"{who} names mesh axis {name!r} for {arg.path}; the mesh axes are "
                                    f"{tuple(sizes)}")
        n = int(np.prod([sizes[name] for name in names])) if names else 1
        if arg.type.shape[axis] % n:
            raise ShardingError(
                f"{who} splits {arg.path} axis {axis} (size {arg.type.shape[axis]}) over {'x'.join(names)}={n}, "
                f"which does not divide it. Use a mesh whose sizes divide {arg.type.shape[axis]}, or replicate "
                f"that axis with a rule, e.g. rules=[({re.escape(arg.path)!r}, P())].")


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, min(n, 64) + 1) if n % k == 0]


def per_device_shape(shape: Sequence[int], spec: Sequence, sizes: dict) -> tuple[int, ...]:
    """The shape of one device's shard (ceil division, as XLA pads) of an array of `shape`."""
    out = []
    for axis, n in enumerate(shape):
        entry = spec[axis] if axis < len(spec) else None
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        k = int(np.prod([sizes[name] for name in names])) if names else 1
        out.append(-(-n // k))
    return tuple(out)


__all__ = ["Entry", "Plan", "ShardingError", "analyze", "lead", "make_plan", "per_device_shape"]

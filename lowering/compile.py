"""Ahead-of-time compile: a model (or graph) → an XLA executable for cpu, cuda or a TPU topology.

`graphopt.compile(fn, *args, target="tpu:v5e:2x2")` traces the model, runs the pipeline, lowers
it, and compiles it with XLA for the target, without running it. For a TPU topology on a machine
without a TPU, the executable is a real TPU binary built by libtpu for compile-only devices
(`pip install 'graphopt[tpu]'`); everything XLA knows about it comes back:

- `cost`: FLOPs, transcendentals, bytes accessed and, on TPU, XLA's estimated seconds;
- `memory`: argument, output, temporary, aliased and generated-code bytes;
- `stablehlo` (the lowered module, what any platform compiles) and `hlo` (after XLA's passes);
- `serialize()`: the executable's bytes (PjRt's own format); `save(folder)` writes it with the
  StableHLO, the HLO and a JSON of the analyses and the input signature.

A program compiled for this machine's backend can be called with the model's arguments.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> program = graphopt.compile(lambda w, x: jnp.tanh(x @ w), jnp.ones((4, 8)), jnp.ones((2, 4)),
    ...                            params_argnums=0, target="cpu")
    >>> program.cost.flops > 0, program.memory.argument_bytes
    (True, 160)
    >>> program(jnp.ones((4, 8)), jnp.zeros((2, 4))).tolist()[0][:3]
    [0.0, 0.0, 0.0]
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
from typing import Any, Callable

import jax
import numpy as np

from graphopt import _jax_compat
from graphopt.errors import TargetError
from graphopt.ir import Graph
from graphopt.lowering.emit import lower, target_backend
from graphopt.lowering.export import input_specs
from graphopt.lowering.target import Target, devices, parse_target
from graphopt.param_prep import PreparedParams


@dataclasses.dataclass(frozen=True)
class Cost:
    """XLA's cost analysis of the compiled program (per device)."""

    flops: float
    transcendentals: float
    bytes_accessed: float
    estimated_seconds: float | None  # XLA's roofline estimate; TPU only


@dataclasses.dataclass(frozen=True)
class Memory:
    """XLA's memory analysis of the compiled program, in bytes, per device."""

    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    generated_code_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs + temporaries − buffers shared between arguments and outputs."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


@dataclasses.dataclass
class CompiledProgram:
    """An XLA executable for one target, its analyses and texts. See the module docstring."""

    target: Target
    graph: Graph
    device_kind: str
    num_devices: int
    cost: Cost
    memory: Memory
    stablehlo: str
    hlo: str
    _compiled: Any = dataclasses.field(repr=False)
    sharded: bool = False  # compiled with a mesh: takes the model's arguments as `graphopt.shard` places them
    _prepared: PreparedParams = dataclasses.field(default_factory=PreparedParams, repr=False, compare=False)

    def serialize(self) -> bytes:
        """The executable as bytes (PjRt's serialized format, loadable by a PjRt client of the
        target's platform); see `load` for this machine's backend."""
        return bytes(_jax_compat.serialize_executable(self._compiled))

    def __call__(self, *args):
        """Run on this machine; takes the traced model's arguments (parameters are prepared
        by the pipeline's parameter folding as `graphopt.optimize` does: once per set of weights)."""
        if self.target.compile_only:
            raise TargetError(f"this executable was compiled for {self.target}, which is not on this "
                              "machine: save() it and load it on a host of that kind, or compile "
                              "with target='cpu' to run it here")
        if self.sharded:
            raise TargetError("a program compiled with a mesh takes placed arguments: run the model with "
                              "graphopt.shard(...) instead, which places them")
        return self._compiled(*self._prepared.arguments(self.graph.prep, args))

    def save(self, folder: str | os.PathLike) -> pathlib.Path:
        """Write `executable.bin`, `module.stablehlo.mlir`, `module.hlo.txt` and `program.json`
        (target, analyses, input and output signature) into `folder`; returns the folder."""
        path = pathlib.Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        files = {"executable.bin": self.serialize(), "module.stablehlo.mlir": self.stablehlo.encode(),
                 "module.hlo.txt": self.hlo.encode(),
                 "program.json": json.dumps(self.metadata(), indent=2).encode()}
        for name, data in files.items():
            temporary = path / f".{name}.tmp"
            temporary.write_bytes(data)
            temporary.replace(path / name)
        return path

    def metadata(self) -> dict:
        """The JSON-ready description written by `save`."""
        def signature(values):
            return [{"shape": list(v.type.shape), "dtype": str(v.type.dtype)} for v in values]

        return {"format": "graphopt.compiled/1", "target": str(self.target), "platform": self.target.platform,
                "device_kind": self.device_kind, "num_devices": self.num_devices, "jax": jax.__version__,
                "cost": dataclasses.asdict(self.cost), "memory": dataclasses.asdict(self.memory),
                "inputs": signature(self.graph.inputs), "outputs": signature(self.graph.outputs)}

    def summary(self) -> str:
        """A few lines: target, FLOPs, bytes, estimated time and memory."""
        c, m = self.cost, self.memory
        where = "in the topology" if self.target.compile_only else "on this machine"
        estimate = "n/a" if c.estimated_seconds is None else f"{c.estimated_seconds * 1e6:.1f} µs"
        return "\n".join([
            f"target {self.target} ({self.device_kind}; {self.num_devices} device(s) {where})",
            f"cost: {c.flops:.4g} FLOPs, {c.transcendentals:.4g} transcendentals, "
            f"{c.bytes_accessed:.4g} bytes accessed, estimated {estimate}",
            f"memory: arguments {m.argument_bytes:,} B, outputs {m.output_bytes:,} B, "
            f"temporaries {m.temp_bytes:,} B, aliased {m.alias_bytes:,} B, peak {m.peak_bytes:,} B, "
            f"code {m.generated_code_bytes:,} B" + (" (per device)" if self.sharded else "")]
            + ([f"collectives: {', '.join(f'{k} {n}' for k, n in self.collectives().items() if n) or 'none'}"]
               if self.sharded else []))

    def collectives(self) -> dict[str, int]:
        """Collective ops in the compiled program, by kind (all-reduce, all-gather, ...)."""
        from graphopt.sharding import count_collectives

        return count_collectives(self.hlo)

    def __str__(self) -> str:
        return self.summary()


def compile(fn_or_graph: Graph | Callable, *args, target: str | Target = "cpu", pipeline="default",
            params_argnums=None, static_argnums=(), mesh=None, rules=(), fsdp: bool = False) -> CompiledProgram:
    """Trace `fn_or_graph` with `args` (or take a Graph as it is), run `pipeline` (a model only),
    lower and compile it for `target` ("cpu", "cuda", "tpu", "tpu:v5e:2x2", ...).

    Without `mesh`, the program runs on one device. With `mesh` ("2x2", {"data": 2, "model": 2}),
    the model is sharded by `graphopt.shard` (tensor parallelism over `model`, batch over `data`;
    `rules` and `fsdp` as there) over the target's first data×model devices, and the analyses are
    per device. `args` may be arrays or `jax.ShapeDtypeStruct`s: nothing runs, so a model larger
    than this machine's memory compiles as well.
    """
    target = parse_target(target) if isinstance(target, str) else target
    available = devices(target)
    if mesh is not None:
        if isinstance(fn_or_graph, Graph):
            raise TargetError("compile(mesh=...) shards a model: give the function and its arguments, "
                              "not a Graph")
        from graphopt.trace import drop_static

        fn, args, params_argnums = drop_static(fn_or_graph, args, params_argnums, static_argnums)
        lowered, graph = _sharded_lowering(fn, args, available, mesh,
                                           pipeline=for_backend(pipeline, target.platform),
                                           params_argnums=params_argnums, rules=rules, fsdp=fsdp)
    else:
        graph = fn_or_graph if isinstance(fn_or_graph, Graph) else _optimized_graph(
            fn_or_graph, args, pipeline, params_argnums, static_argnums, target.platform)
        sharding = jax.sharding.SingleDeviceSharding(available[0])
        specs = jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, weak_type=s.weak_type, sharding=sharding),
            input_specs(graph))
        with target_backend(target.platform):  # the target's kernels, not this machine's
            lowered = jax.jit(lower(graph)).lower(*specs)
    with _jax_compat.without_compilation_cache():  # its executables must serialize whole
        compiled = lowered.compile()
    return CompiledProgram(target=target, graph=graph, device_kind=available[0].device_kind,
                           num_devices=len(available), cost=_cost(compiled),
                           memory=memory_analysis(compiled), stablehlo=lowered.as_text(),
                           hlo=compiled.as_text(), _compiled=compiled, sharded=mesh is not None)


def _sharded_lowering(fn, args, available: list, mesh, **options):
    """`graphopt.shard` over a mesh of the target's devices (compile-only ones too); the lowering."""
    from graphopt.sharding import mesh_sizes, shard

    sizes = mesh_sizes(mesh)
    count = sizes["data"] * sizes["model"]
    if count > len(available):
        raise TargetError(f"a {sizes['data']}x{sizes['model']} mesh needs {count} devices; the target has "
                          f"{len(available)}: choose a larger topology or a smaller mesh")
    grid = np.asarray(available[:count], dtype=object).reshape(sizes["data"], sizes["model"])
    sharded = shard(fn, *args, mesh=jax.sharding.Mesh(grid, ("data", "model")), **options)
    with target_backend(available[0].platform):
        return sharded.lower(), sharded.graph


def comparison_table(programs: dict[str, CompiledProgram]) -> str:
    """Programs for one target side by side (e.g. pipeline "none" against "default"), with the
    ratio of the last to the first where there are two.

    Example:
        >>> import jax.numpy as jnp
        >>> f = lambda x: jnp.tanh(x) * 2
        >>> p = compile(f, jnp.ones(8), pipeline="none")
        >>> print(comparison_table({"none": p, "default": compile(f, jnp.ones(8))}))  # doctest: +ELLIPSIS
        target cpu (cpu)
        ...FLOPs ...
    """
    from rich.console import Console
    from rich.table import Table

    first = next(iter(programs.values()))
    names = list(programs)
    table = Table("", *names, *(["ratio"] if len(names) == 2 else []), box=None, pad_edge=False)

    def row(label, values, number):
        ratio = [] if len(values) != 2 else [
            f"{values[1] / values[0]:.3f}" if values[0] else "n/a"] if None not in values else ["n/a"]
        table.add_row(label, *(("n/a" if v is None else number(v)) for v in values), *ratio)

    programs = list(programs.values())
    row("FLOPs", [p.cost.flops for p in programs], lambda v: f"{v:,.0f}")
    row("bytes accessed", [p.cost.bytes_accessed for p in programs], lambda v: f"{v:,.0f}")
    row("estimated µs", [None if p.cost.estimated_seconds is None else p.cost.estimated_seconds * 1e6
                         for p in programs], lambda v: f"{v:,.2f}")
    for field in ("argument_bytes", "output_bytes", "temp_bytes", "peak_bytes", "generated_code_bytes"):
        row(field.replace("_", " "), [getattr(p.memory, field) for p in programs], lambda v: f"{v:,}")
    buffer = io.StringIO()
    console = Console(file=buffer, width=100, color_system=None, force_terminal=False)
    console.print(f"target {first.target} ({first.device_kind})", table)
    return buffer.getvalue().rstrip()


def load(folder: str | os.PathLike) -> "LoadedProgram":
    """Load an executable written by `CompiledProgram.save` on a machine of its platform."""
    path = pathlib.Path(folder)
    metadata = json.loads((path / "program.json").read_text())
    if metadata.get("format") != "graphopt.compiled/1":
        raise TargetError(f"{path} does not hold a graphopt compiled program (program.json format "
                          f"{metadata.get('format')!r})")
    try:
        local = jax.devices(metadata["platform"])
    except RuntimeError as e:
        raise TargetError(f"{path} holds a {metadata['target']} executable; this machine has no "
                          f"{metadata['platform']} device to load it on") from e
    executable = _jax_compat.deserialize_executable((path / "executable.bin").read_bytes(), local[:1])
    return LoadedProgram(executable, metadata)


@dataclasses.dataclass
class LoadedProgram:
    """A saved executable loaded on this machine. Call it with the optimized graph's flat inputs
    (prepared parameters first, as `graphopt.prepare` gives them); returns the flat outputs."""

    executable: Any
    metadata: dict

    def __call__(self, *args) -> list:
        leaves = jax.tree_util.tree_leaves(args)
        expected = self.metadata["inputs"]
        if len(leaves) != len(expected):
            raise TargetError(f"the program takes {len(expected)} arrays, got {len(leaves)}")
        for i, (leaf, spec) in enumerate(zip(leaves, expected)):
            dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype  # no copy off a device
            if list(np.shape(leaf)) != spec["shape"] or str(dtype) != spec["dtype"]:
                raise TargetError(f"input {i}: expected {spec['dtype']}{spec['shape']}, got "
                                  f"{dtype}{list(np.shape(leaf))}")
        return _jax_compat.execute(self.executable, [jax.device_put(leaf) for leaf in leaves])


def _optimized_graph(fn, args, pipeline, params_argnums, static_argnums, platform: str) -> Graph:
    from graphopt.pipeline import run_pipeline
    from graphopt.trace import trace

    graph = trace(fn, *args, params_argnums=params_argnums, static_argnums=static_argnums)
    return run_pipeline(graph, for_backend(pipeline, platform)).graph


def for_backend(pipeline, platform: str) -> list:
    """`pipeline` with its kernel choices made for `platform`: passes that take a `backend=`
    option (fuse_attention) get the target's, unless the spec names one; otherwise they would
    measure this machine's kernels and pick for it.

    Example:
        >>> [getattr(p, "options", None) for p in for_backend(["dce", "fuse_attention"], "tpu")]
        [{}, {'backend': 'tpu'}]
    """
    import inspect

    from graphopt.pipeline import PASSES, PassSpec, resolve

    out = []
    for info, spec in resolve(pipeline):
        if PASSES.get(info.name) is not info:  # a user's own pass function: as it is
            out.append(info.fn)
            continue
        if "backend" in inspect.signature(info.fn).parameters and "backend" not in spec.options:
            spec = PassSpec(spec.name, spec.args, {**spec.options, "backend": platform})
        out.append(spec)
    return out


def _cost(compiled) -> Cost:
    analysis = compiled.cost_analysis() or {}
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else {}
    seconds = analysis.get("optimal_seconds")
    return Cost(flops=float(analysis.get("flops", 0.0)),
                transcendentals=float(analysis.get("transcendentals", 0.0)),
                bytes_accessed=float(analysis.get("bytes accessed", 0.0)),
                estimated_seconds=None if seconds is None or seconds < 0 else float(seconds))


def memory_analysis(compiled) -> Memory | None:
    """XLA's memory analysis of a `jax.stages.Compiled` as a `Memory` (None where the backend has none)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 -- some backends do not implement it
        return None
    if stats is None:
        return None
    return Memory(argument_bytes=int(stats.argument_size_in_bytes), output_bytes=int(stats.output_size_in_bytes),
                  temp_bytes=int(stats.temp_size_in_bytes), alias_bytes=int(stats.alias_size_in_bytes),
                  generated_code_bytes=int(stats.generated_code_size_in_bytes))

"""What a sharding costs: per-device parameter bytes, the plan table, collectives in compiled HLO.

`param_memory(plan)` works on the plan alone, i.e. on abstract shapes (a plan made from
`jax.ShapeDtypeStruct` arguments: no array is ever allocated), which is how `docs/scaling.py`
projects a 70B model onto a pod. `count_collectives(hlo_text)` reads the compiled program.

Example:
    >>> count_collectives("%x = f32[8] all-reduce(f32[8] %y), replica_groups={}\\n"
    ...                   "%s = (f32[8], f32[8]) all-gather-start(f32[4] %z)")
    {'all-reduce': 1, 'all-gather': 1, 'reduce-scatter': 0, 'all-to-all': 0, 'collective-permute': 0}
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from graphopt.pipeline import size_str
from graphopt.sharding.plan import Plan, per_device_shape

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# An HLO instruction's opcode follows its result type and a space, and precedes its operands;
# asynchronous pairs count once, by their -start half.
_OPCODE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collectives by kind in an HLO module's text (`compiled.as_text()`)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for match in _OPCODE.finditer(hlo_text):
        counts[match.group(1)] += 1
    return counts


@dataclasses.dataclass
class ParamMemory:
    """Parameter bytes: per device (the largest shard: XLA pads uneven splits) and unsharded."""

    per_device: int
    total: int
    per_param: dict                 # path -> (per-device bytes, total bytes)


def param_memory(plan: Plan) -> ParamMemory:
    """Per-device parameter bytes of `plan` (abstract: shapes and dtypes only)."""
    per_param = {}
    for e in plan.entries:
        if e.role != "param":
            continue
        local = int(np.prod(per_device_shape(e.shape, e.spec, plan.mesh), dtype=np.int64)) * e.dtype.itemsize
        per_param[e.path] = (local, int(np.prod(e.shape, dtype=np.int64)) * e.dtype.itemsize)
    return ParamMemory(sum(a for a, _ in per_param.values()), sum(b for _, b in per_param.values()), per_param)


def _spec_str(spec) -> str:
    return "(" + ", ".join("·" if s is None else s if isinstance(s, str) else "+".join(s) for s in spec) + ")"


def plan_table(plan: Plan, memory: ParamMemory | None = None) -> str:
    """The plan as a text table: path, shape, spec, per-device bytes, reason."""
    memory = memory or param_memory(plan)
    rows = [("input", "shape", "spec", "per device", "reason")]
    for e in plan.entries:
        local = size_str(memory.per_param[e.path][0]) if e.path in memory.per_param else ""
        rows.append((e.path, "x".join(map(str, e.shape)) or "scalar", _spec_str(e.spec), local, e.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    head = (f"sharding plan: mesh data={plan.mesh['data']} x model={plan.mesh['model']}"
            f"{', FSDP' if plan.fsdp else ''}; parameters {size_str(memory.per_device)} per device "
            f"of {size_str(memory.total)}")
    return "\n".join([head, *lines, *(f"note: {n}" for n in plan.notes)])


@dataclasses.dataclass
class ShardingReport:
    """`Sharded.report`: the plan, the parameter memory, and the compiled program's collectives."""

    plan: Plan
    memory: ParamMemory
    collectives: dict | None = None

    def __str__(self) -> str:
        text = plan_table(self.plan, self.memory)
        if self.collectives is not None:
            text += "\ncollectives in the compiled program: " + ", ".join(
                f"{k} {v}" for k, v in self.collectives.items())
        return text

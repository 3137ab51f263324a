"""Which channels to keep: from importance scores and a target, the kept indices of each group.

Targets (one of):
    ratio=0.3     remove 30% of the channels (of every group with scope="local"; of all channels,
                  ranked together, with scope="global")
    flops=0.3     remove channels until the model's FLOPs are 30% lower (estimated from the graph:
                  each node's cost scales with the kept fraction of the groups on its axes)

Global ranking compares channels across groups by their score divided by their group's mean
score (Torch-Pruning's normalization), so a group of large weights is not spared for its scale
alone; `normalize=False` ranks the raw scores (comparable across layers for wanda and taylor,
which measure a channel's effect on the outputs: what removing a whole layer needs). Widths are kept at multiples of `multiple` (8 by default, 128 for TPU tiles) elements: a
group whose channels each span a multiple of it already (attention heads of 32 dimensions) is
pruned one channel at a time, a group smaller than two multiples in halved steps. `rules`
give per-group overrides by a regex on the group's parameter paths: `(r"head", None)` leaves
matching groups whole, `(r"mlp", 0.5)` prunes them by exactly that ratio whatever the target.
No group loses every channel (a ratio that would do so is an error naming the group), except,
under global ranking, the groups in `removable`: layers on a residual branch, removed whole
(`passes/prune/residual.py`) when the user allows it.

Example:
    >>> s = {"a": np.array([1.0, 5.0, 3.0, 2.0]), "b": np.array([4.0, 4.0])}
    >>> plan = Selection(sizes={"a": 4, "b": 2}, paths={"a": ["mlp/kernel"], "b": ["head/kernel"]})
    >>> keep = plan.choose(s, ratio=0.5, scope="local", multiple=1)
    >>> {k: v.tolist() for k, v in keep.items()}
    {'a': [1, 2], 'b': [0]}
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import re
from typing import Sequence

import numpy as np

from graphopt.passes.prune.deps import PruneError, estimate_flops


@dataclasses.dataclass
class Selection:
    """The groups to choose channels in: sizes and parameter paths by group name, and (for flops
    targets) `flops_rows` from `passes.prune.deps.flops_weights` with the groups' order `names`."""

    sizes: dict
    paths: dict
    flops_rows: list | None = None
    names: list | None = None
    strides: dict | None = None   # group -> smallest stride between its channels in any parameter
    removable: frozenset = frozenset()  # groups that may lose every channel (whole residual layers)

    def choose(self, scores: dict, *, ratio: float | None = None, flops: float | None = None,
               scope: str = "global", multiple: int = 8, rules: Sequence = (), normalize: bool = True) -> dict:
        """{group: sorted kept indices} (only groups that lose channels)."""
        if (ratio is None) == (flops is None):
            raise PruneError("give exactly one target: ratio= (of channels) or flops= (fraction of FLOPs to remove)")
        target = ratio if ratio is not None else flops
        if not 0 <= target <= 1:
            raise PruneError(f"the pruning target is a fraction to remove, in [0, 1); got {target}")
        if scope not in ("global", "local"):
            raise PruneError(f"scope must be 'global' or 'local', got {scope!r}")
        if multiple < 1:
            raise PruneError(f"multiple must be >= 1, got {multiple}")
        fixed, free = self._apply_rules(rules)
        counts = {name: self.sizes[name] - self._removable(name, r, multiple) for name, r in fixed.items()}
        if ratio is not None and scope == "local":
            counts.update({n: self.sizes[n] - self._removable(n, ratio, multiple) for n in free})
        elif ratio is not None:
            total = sum(self.sizes[n] for n in free)
            counts.update(self._global(scores, free, multiple, counts, normalize,
                                       lambda c: sum(self.sizes[n] - c[n] for n in free) >= ratio * total))
        elif scope == "local":
            counts.update(self._uniform_for_flops(free, flops, multiple, counts))
        else:
            goal = (1 - flops) * self._flops({})
            counts.update(self._global(scores, free, multiple, counts, normalize, lambda c: self._flops(c) <= goal))
        return {name: np.sort(np.argsort(-scores[name], kind="stable")[:count])
                for name, count in counts.items() if count < self.sizes[name]}

    def _apply_rules(self, rules) -> tuple[dict, list]:
        compiled = []
        for i, rule in enumerate(rules.items() if isinstance(rules, dict) else rules):
            pattern, value = rule
            try:
                compiled.append((re.compile(pattern), value))
            except re.error as err:
                raise PruneError(f"pruning rule {i}: {pattern!r} is not a valid regex: {err}") from None
            if value is not None and not 0 <= value <= 1:
                raise PruneError(f"pruning rule {pattern!r}: the ratio must be in [0, 1), or None to leave "
                                 f"the group whole; got {value}")
        fixed, free, used = {}, [], set()
        for name in self.sizes:
            for i, (regex, value) in enumerate(compiled):
                if any(regex.search(p) for p in [name, *self.paths[name]]):
                    used.add(i)
                    fixed[name] = 0.0 if value is None else value
                    break
            else:
                free.append(name)
        unused = [compiled[i][0].pattern for i in range(len(compiled)) if i not in used]
        if unused:
            raise PruneError(f"pruning rules match no prunable group: {', '.join(map(repr, unused))}; "
                             f"groups: {', '.join(self.sizes)}")
        return fixed, free

    def _unit(self, name: str, multiple: int) -> int:
        """Channels removed at a time so that every parameter's pruned axis stays a multiple of
        `multiple` elements: a channel that spans whole rows of `multiple` (an attention head of
        32 dims) may go alone. Halved until it divides the group's size with more than one unit left."""
        size = self.sizes[name]
        stride = (self.strides or {}).get(name, 1)
        unit = multiple // math.gcd(multiple, stride)
        while unit > 1 and (size % unit or size <= unit):
            unit //= 2
        return unit

    def _removable(self, name: str, ratio: float, multiple: int) -> int:
        """Channels a ratio removes from one group, rounded to whole units; an error if none would remain."""
        size, unit = self.sizes[name], self._unit(name, multiple)
        removed = int(math.floor(ratio * size / unit + 1e-9)) * unit
        if ratio >= 1 or removed >= size:
            raise PruneError(f"pruning {ratio:.0%} of group {name} ({size} channels, in steps of {unit}) "
                             "would remove every channel; lower the ratio or leave the group out with a "
                             f"rule ({name!r}, None)")
        return removed

    def _global(self, scores, free, multiple, fixed_counts, normalize, done) -> dict:
        """Remove the lowest normalized-score units across `free` groups until `done(counts)`."""
        counts = {**fixed_counts, **{n: self.sizes[n] for n in free}}
        order, heap = {}, []
        for name in free:
            s = np.asarray(scores[name], np.float64)
            mean = s.mean() if normalize and s.size and s.mean() > 0 else 1.0
            order[name] = (np.argsort(s, kind="stable"), s / mean)
            self._push(heap, name, order, counts, multiple)
        while heap and not done(counts):
            _, name = heapq.heappop(heap)
            counts[name] -= self._unit(name, multiple)
            self._push(heap, name, order, counts, multiple)
        if not done(counts):
            raise PruneError("the pruning target cannot be reached without removing every channel of some "
                             f"group (groups at their minimum: {', '.join(free)}); lower the target")
        return {n: counts[n] for n in free}

    def _push(self, heap, name, order, counts, multiple) -> None:
        unit = self._unit(name, multiple)
        removed = self.sizes[name] - counts[name]
        if counts[name] - unit >= (0 if name in self.removable else 1):
            ranked, normalized = order[name]
            heapq.heappush(heap, (float(normalized[ranked[removed:removed + unit]].mean()), name))

    def _uniform_for_flops(self, free, flops, multiple, fixed_counts) -> dict:
        """The smallest equal ratio over `free` groups that removes `flops` of the FLOPs."""
        goal = (1 - flops) * self._flops({})
        lo, hi = 0.0, 1.0
        best = None
        for _ in range(40):
            mid = (lo + hi) / 2
            try:
                counts = {n: self.sizes[n] - self._removable(n, mid, multiple) for n in free}
            except PruneError:
                hi = mid
                continue
            if self._flops({**fixed_counts, **counts}) <= goal:
                best, hi = counts, mid
            else:
                lo = mid
        if best is None:
            raise PruneError(f"removing {flops:.0%} of the FLOPs needs more than a uniform ratio can give "
                             "without emptying a group; use scope='global' or a lower target")
        return best

    def _flops(self, counts: dict) -> float:
        if self.flops_rows is None:
            raise PruneError("a flops= target needs the graph's FLOP rows")
        sizes = [self.sizes[n] for n in self.names]
        return estimate_flops(self.flops_rows, sizes, [counts.get(n, self.sizes[n]) for n in self.names])

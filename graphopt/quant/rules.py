"""Layer selection: which layers a quantization pass quantizes, with which scheme.

A rule matches a layer (a dot_general or convolution with a parameter weight) by its weight's
parameter path (a regex, `re.search`), its op ("dot_general" or "conv") and its weight size in
elements; it says which scheme the layer gets, or `scheme=None` to leave it in float. Rules are
tried in order and the first match wins; a layer no rule matches gets the pass's default scheme.
`plan` gives the decision per layer and the rules that matched nothing, which the pass reports
(a rule that matches nothing is usually a typo in its path). A rule is checked when it is built
(its regex, op, size bounds, and a scheme name with its options), so a typo there fails at once.

Example:
    >>> rules = [Rule(path=r"lm_head", scheme=None), Rule(max_size=1023, scheme=None)]
    >>> layers = [Layer("params/lm_head/kernel", "dot_general", (64, 256)),
    ...           Layer("params/block_0/mlp/kernel", "dot_general", (64, 256)),
    ...           Layer("params/block_0/tiny/kernel", "dot_general", (8, 8))]
    >>> decisions, unused = plan(layers, rules, default="int8")
    >>> [(d.layer.path, d.scheme, d.rule) for d in decisions]
    [('params/lm_head/kernel', None, 0), ('params/block_0/mlp/kernel', 'int8', None), ('params/block_0/tiny/kernel', None, 1)]
    >>> unused
    []
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import numpy as np

from graphopt.quant.scheme import QuantizationError, scheme_named

OP_KINDS = ("dot_general", "conv")


@dataclasses.dataclass(frozen=True)
class Layer:
    """A quantizable layer: its weight's parameter path, op kind and weight shape."""

    path: str
    op: str
    shape: tuple

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Match layers by `path` regex, `op` kind and weight size; give them `scheme` (None: skip).

    `scheme` is a scheme name, a `Scheme`, or None; `options` (e.g. {"group": 64}) go with it."""

    scheme: Any = None
    path: str | None = None
    op: str | None = None
    min_size: int = 0
    max_size: int | None = None
    options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.op is not None and self.op not in OP_KINDS:
            raise QuantizationError(f"rule {self}: op must be one of {', '.join(OP_KINDS)} (or None: any), "
                                    f"got {self.op!r}")
        if self.path is not None:
            try:
                re.compile(self.path)
            except (re.error, TypeError) as err:
                raise QuantizationError(f"rule path {self.path!r} is not a valid regex: {err} (escape "
                                        "special characters, e.g. with re.escape, to match them literally)") from None
        if not _is_size(self.min_size) or not (self.max_size is None or _is_size(self.max_size)):
            raise QuantizationError(f"rule {self}: min_size and max_size must be ints >= 0 (max_size may "
                                    "be None: no bound)")
        if self.max_size is not None and self.max_size < self.min_size:
            raise QuantizationError(f"rule {self}: max_size {self.max_size} < min_size {self.min_size} matches "
                                    "no layer; the bounds are inclusive element counts")
        if not isinstance(self.options, dict):
            raise QuantizationError(f"rule {self}: options must be a dict, e.g. {{'group': 64}}")
        if isinstance(self.scheme, str):  # a typo in a scheme name or option: now, not at the first match
            try:
                scheme_named(self.scheme, **self.options)
            except QuantizationError as err:
                raise QuantizationError(f"rule {self.describe()}: {err}") from None
            except TypeError:
                raise QuantizationError(f"rule {self.describe()}: options {sorted(self.options)} are not all "
                                        "scheme options; they are: group, symmetric") from None

    def matches(self, layer: Layer) -> bool:
        return ((self.path is None or re.search(self.path, layer.path) is not None)
                and (self.op is None or self.op == layer.op)
                and layer.size >= self.min_size
                and (self.max_size is None or layer.size <= self.max_size))

    def describe(self) -> str:
        parts = [f"path ~ {self.path!r}"] if self.path is not None else []
        parts += [f"op = {self.op}"] if self.op else []
        parts += [f"size >= {self.min_size}"] if self.min_size else []
        parts += [f"size <= {self.max_size}"] if self.max_size is not None else []
        what = "skip" if self.scheme is None else f"{getattr(self.scheme, 'name', self.scheme)}"
        return f"{' and '.join(parts) or 'any layer'} → {what}"


@dataclasses.dataclass(frozen=True)
class Decision:
    layer: Layer
    scheme: Any            # scheme name / Scheme, or None (left in float)
    rule: int | None       # index of the matching rule; None: the default
    options: dict = dataclasses.field(default_factory=dict)


def plan(layers: Sequence[Layer], rules: Sequence[Rule], default) -> tuple[list[Decision], list[int]]:
    """(decision per layer, indices of rules that matched no layer). First matching rule wins."""
    rules = [as_rule(r) for r in rules]
    decisions, used = [], set()
    for layer in layers:
        for index, rule in enumerate(rules):
            if rule.matches(layer):
                decisions.append(Decision(layer, rule.scheme, index, dict(rule.options)))
                used.add(index)
                break
        else:
            decisions.append(Decision(layer, default, None))
    return decisions, [i for i in range(len(rules)) if i not in used]


def _is_size(n) -> bool:
    return isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0


def as_rule(rule) -> Rule:
    """A Rule, or one built from a dict of Rule's fields."""
    if isinstance(rule, Rule):
        return rule
    fields = [f.name for f in dataclasses.fields(Rule)]
    if not isinstance(rule, dict) or set(rule) - set(fields):
        unknown = sorted(set(rule) - set(fields)) if isinstance(rule, dict) else None
        raise QuantizationError(f"rule {rule!r}: " + (f"unknown fields {unknown}" if unknown else "not a Rule or dict")
                                + f"; a rule's fields are {', '.join(fields)}")
    return Rule(**rule)

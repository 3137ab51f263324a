"""Masked parameters: unstructured magnitude sparsity and N:M (2:4) sparsity of layer weights.

`sparsify(fn, *args)` finds the layers of `fn` in its traced graph (`graphopt.quant.layers`: the
dot_generals, einsums and convolutions whose weight is a parameter), zeroes part of each layer's
weight, and returns new parameters, the masks and a report.

    No speed, no memory: the arrays stay dense and XLA multiplies the zeros like any other value.
    The gain is a checkpoint that compresses well, and for 2:4 a pattern that sparse tensor cores
    can use outside XLA. To make a model smaller and faster under XLA, remove whole channels:
    `graphopt.prune` (structured pruning).

Methods:
    magnitude  keep the largest |w|. scope="global" ranks the weights of all layers together (layers
               end up with different sparsities), scope="local" prunes each layer by the same
               fraction. round(sparsity × size) weights are pruned, halves rounded up.
    n:m        in every group of m consecutive weights along the layer's contraction (the axes its
               weight is summed over, flattened in order; a convolution's input channels innermost,
               so a group is m input channels of one kernel tap), keep the n largest |w|. The
               contraction size must be a multiple of m: otherwise an error, unless a rule skips
               the layer.

What is masked: layer weights only. Biases, norm scales, embeddings and layers inside control
flow (scan, while, cond) stay as they are. A weight must reach its layer as a parameter, through
dtype casts and transposes only; one computed from several parameters (`W + A @ B`) cannot be
made sparse by masking a parameter and is an error unless a rule skips it. A weight that is also
read outside a layer (a tied embedding) is one array: it is masked there too, and the report says so.

Rules: `rules=[(regex, value), ...]` or `{regex: value}`, searched (`re.search`) in the weight's
parameter path, first match wins. value None skips the layer; a number is the layer's own
sparsity (magnitude only; under scope="global" such a layer is ranked on its own). A rule that
matches no layer is not an error: the report lists it (it is usually a typo).

Ties and NaN: among equal |w| the earlier weight (row-major) is kept, so masks are deterministic.
±inf counts as the largest magnitude. A NaN weight in a layer to be masked is an error: its rank
would be arbitrary, and zeroing it would hide a broken checkpoint.

`Sparsified.save(path)` writes one safetensors file (no pickle): every parameter array by its
path, each mask as uint8 under "<path>:mask", and JSON metadata (format, version, method, n, m,
sparsity, scope, the report). `load_sparsified(path, like=...)` reads it back bit-exactly.

Example:
    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.array([[1., -5.], [-3., 2.], [.5, 4.], [2., -1.]]), "b": jnp.ones(2)}
    >>> s = sparsify(lambda p, x: x @ p["w"] + p["b"], params, jnp.ones((1, 4)), method="n:m",
    ...              params_argnums=0)
    >>> s.params["w"].tolist(), s.params["b"].tolist(), sorted(s.masks)
    ([[0.0, -5.0], [-3.0, 0.0], [0.0, 4.0], [2.0, 0.0]], [1.0, 1.0], ['w'])
    >>> [(row.path, row.pattern, row.kept) for row in s.report.rows]
    [('w', '2:4', 4)]
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import re
from typing import Any, Callable

import jax
import numpy as np

from graphopt import safetensors_file
from graphopt.errors import GraphoptError
from graphopt.frameworks import _is_equinox_module, _is_nnx_module
from graphopt.quant.layers import find_layers
from graphopt.trace import trace

FORMAT = "graphopt.sparse-params"
FORMAT_VERSION = 1
NO_SPEEDUP = ("Masks give no speed-up and no memory saving at run time under XLA: the arrays stay "
              "dense, zeros included. The gain is a checkpoint that compresses well (and a 2:4 pattern "
              "that sparse hardware can use outside XLA). For speed, remove whole channels: graphopt.prune.")
# ops a weight may reach its layer through: the layer still reads the parameter's own values
_CASTS = ("convert_element_type", "copy", "copy_p", "reduce_precision")


class SparsityError(GraphoptError, ValueError):
    """A sparsity request that cannot be carried out as asked (it names the value or layer)."""


@dataclasses.dataclass(frozen=True)
class LayerMask:
    """One report row: a weight parameter, how it was masked, and how many weights it kept."""

    path: str
    op: str                 # "dot_general" or "conv"
    shape: tuple
    pattern: str            # "2:4", "magnitude global", "magnitude 30% (rule 0)", "skipped (rule 1)"
    kept: int
    size: int
    note: str = ""          # "also read by gather: masked there too"


@dataclasses.dataclass
class SparsityReport:
    """Per layer weight: shape, pattern and kept fraction; then notes. Print it, or render with rich."""

    rows: list[LayerMask]
    notes: list[str]

    def __rich__(self):
        from rich.table import Table

        table = Table("layer weight", "op", "shape", "pattern", "kept", "note", title="sparsity masks",
                      title_justify="left")
        for row in self.rows:
            kept = f"{row.kept}/{row.size} ({row.kept / max(row.size, 1):.1%})"
            table.add_row(row.path, row.op, "×".join(map(str, row.shape)), row.pattern, kept, row.note)
        return table

    def __str__(self):
        import io

        from rich.console import Console

        buffer = io.StringIO()
        console = Console(file=buffer, width=160, color_system=None)
        console.print(self)
        for note in self.notes:
            console.print(note, soft_wrap=True)
        return buffer.getvalue().rstrip()


@dataclasses.dataclass(repr=False)
class Sparsified:
    """Masked parameters. `params`: the parameter argument(s) with pruned weights zeroed (new arrays;
    the other leaves are the caller's own), in the structure sparsify took them: the argument's
    pytree, a tuple of them for several params_argnums, or the nnx / Equinox module. `masks`:
    parameter path -> bool array, True = kept. `settings`: method, n, m, sparsity, scope."""

    params: Any
    masks: dict
    report: SparsityReport
    settings: dict
    paths: list[str]        # the parameter leaves' paths, in flattening order

    def save(self, path: str | os.PathLike) -> None:
        """Write parameters, masks (uint8) and metadata to a safetensors file (replaced atomically)."""
        by_path = isinstance(self.params, dict) and set(self.params) == set(self.paths)  # a flat dict
        leaves = [self.params[p] for p in self.paths] if by_path else _tree_of(self.params)[0]
        tensors = dict(zip(self.paths, leaves))
        for name, mask in self.masks.items():
            if f"{name}:mask" in tensors:
                raise SparsityError(f"parameter path {name}:mask collides with the mask of {name}; rename it")
            tensors[f"{name}:mask"] = np.ascontiguousarray(mask, dtype=np.uint8)
        report = {"rows": [dataclasses.asdict(r) for r in self.report.rows], "notes": self.report.notes}
        metadata = {"settings": json.dumps(self.settings), "paths": json.dumps(self.paths),
                    "report": json.dumps(report)}
        safetensors_file.write(path, tensors, metadata, format=FORMAT, version=FORMAT_VERSION)

    def __repr__(self):
        kept, size = sum(r.kept for r in self.report.rows), sum(r.size for r in self.report.rows)
        return (f"<Sparsified {self.settings['method']}: {len(self.masks)} layer weights masked, "
                f"{kept}/{size} kept>")


def sparsify(fn: Callable, *args, method: str = "magnitude", sparsity: float | None = None,
             n: int | None = None, m: int | None = None, scope: str = "global", rules=(),
             params_argnums=None) -> Sparsified:
    """Zero part of the layer weights of `fn(*args)`: see the module docstring.

    Args:
        fn, args: as `graphopt.trace` takes them; the parameter arguments need values, the others
            may be `jax.ShapeDtypeStruct`s.
        method: "magnitude" (with `sparsity`, default 0.5, and `scope`) or "n:m" (with `n`, `m`,
            default 2:4).
        scope: "global" (rank all layers together) or "local" (each layer by itself); magnitude only.
        rules: (regex on the weight's parameter path, sparsity or None to skip) pairs, or a dict.
        params_argnums: which arguments hold the parameters (default: as graphopt.trace).

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[1., -3.], [4., 0.5]])
        >>> sparsify(lambda w, x: x @ w, w, jnp.ones(2), sparsity=0.5, params_argnums=0).params.tolist()
        [[0.0, -3.0], [4.0, 0.0]]
    """
    settings = _check_settings(method, sparsity, n, m, scope)
    rules = _check_rules(rules, settings["method"])
    graph = trace(fn, *args, params_argnums=params_argnums)
    if not graph.param_argnums:
        raise SparsityError("sparsify: no argument holds parameters; pass params_argnums=<index of the "
                            "weights argument> (e.g. params_argnums=0)")
    argnums = graph.param_argnums
    holder = (fn if _is_nnx_module(fn) or _is_equinox_module(fn)  # the module holds its parameters
              else args[argnums[0]] if len(argnums) == 1 else tuple(args[i] for i in argnums))
    leaves, rebuild = _tree_of(holder)
    params = graph.params()
    if len(leaves) != len(params):
        raise SparsityError(f"sparsify: {len(leaves)} parameter leaves but {len(params)} traced parameters; "
                            "pass the parameters as plain pytrees of arrays")
    position = {id(arg): k for k, arg in enumerate(params)}

    targets = _targets(graph, settings)
    decisions, used = _decide(targets, rules, settings)
    _check_targets(targets, decisions, settings)
    keep = _masks(targets, decisions, leaves, position, settings)

    new_leaves, masks, rows = list(leaves), {}, []
    for target, decision in zip(targets, decisions):
        if target.path in keep:
            k = position[id(target.arg)]
            masks[target.path] = keep[target.path]
            new_leaves[k] = _zeroed(leaves[k], keep[target.path])
        kept = int(keep[target.path].sum()) if target.path in keep else target.size
        note = target.note if target.path in keep else ""
        if kept == 0 and target.size:
            note = "; ".join(filter(None, ["every weight pruned: give it its own sparsity with a rule", note]))
        rows.append(LayerMask(target.path, target.op, target.shape, _pattern(decision, settings), kept,
                              target.size, note))
    notes = [f"rule {i} ({rules[i][0].pattern!r} → {'skip' if rules[i][1] is None else rules[i][1]}) matched "
             "no layer weight" for i in range(len(rules)) if i not in used]
    notes += [_summary(rows), NO_SPEEDUP]
    return Sparsified(rebuild(new_leaves), masks, SparsityReport(rows, notes), settings, [a.path for a in params])


def load_sparsified(path: str | os.PathLike, like=None) -> Sparsified:
    """A Sparsified saved by `Sparsified.save`. Without `like`, `.params` is a dict path -> numpy
    array; with `like` (the parameters, arrays or ShapeDtypeStructs, in the structure sparsify
    returned them), the saved arrays in that structure, checked leaf by leaf. Bit-exact.

    Example:
        >>> import os, tempfile, jax.numpy as jnp
        >>> w = jnp.array([[1., 2.], [3., 4.]])
        >>> file = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> sparsify(lambda w, x: x @ w, w, jnp.ones(2), params_argnums=0).save(file)
        >>> loaded = load_sparsified(file, like=w)
        >>> loaded.params.tolist(), loaded.masks["w"].tolist()
        ([[0.0, 0.0], [3.0, 4.0]], [[False, False], [True, True]])
    """
    arrays, metadata = safetensors_file.read(path, format=FORMAT, version=FORMAT_VERSION,
                                             what="a graphopt sparse checkpoint", error=SparsityError)
    try:
        paths, report, settings = (json.loads(metadata[k]) for k in ("paths", "report", "settings"))
    except (KeyError, ValueError):
        paths = None
    if paths is None or not set(paths) <= set(arrays):
        raise SparsityError(f"{path}: the file lacks parameters or metadata; it was not written by "
                            "Sparsified.save, or was changed since")
    params = {p: arrays[p] for p in paths}
    masks = {key[:-len(":mask")]: arrays[key].astype(bool) for key in arrays
             if key.endswith(":mask") and key not in params}
    rows = [LayerMask(**{**row, "shape": tuple(row["shape"])}) for row in report["rows"]]
    if like is not None:
        template, rebuild = _tree_of(like)
        if len(template) != len(paths):
            raise SparsityError(f"{path} holds {len(paths)} parameter arrays, `like` has {len(template)} leaves: "
                                "the file was saved from a different model")
        for name, leaf in zip(paths, template):
            got, dtype = params[name], np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
            if tuple(got.shape) != tuple(np.shape(leaf)) or got.dtype != dtype:
                raise SparsityError(f"saved parameter {name} is {got.dtype}{list(got.shape)}, `like` has "
                                    f"{dtype}{list(np.shape(leaf))}: the file was saved from a different model")
        params = rebuild([params[name] if isinstance(leaf, np.ndarray) else jax.device_put(params[name])
                          for name, leaf in zip(paths, template)])
    return Sparsified(params, masks, SparsityReport(rows, report["notes"]), settings, paths)


# --- checking the request ------------------------------------------------------------------------

def _check_settings(method, sparsity, n, m, scope) -> dict:
    if method == "magnitude":
        if n is not None or m is not None:
            raise SparsityError(f"n={n}, m={m} are for method='n:m'; method='magnitude' takes sparsity= "
                                "(the fraction of weights to zero)")
        sparsity = 0.5 if sparsity is None else sparsity
        _check_fraction(sparsity, "sparsity")
        if scope not in ("global", "local"):
            raise SparsityError(f"scope={scope!r}: use 'global' (rank all layers together) or 'local' "
                                "(the same sparsity in every layer)")
        return {"method": method, "sparsity": float(sparsity), "scope": scope, "n": None, "m": None}
    if method == "n:m":
        if sparsity is not None:
            raise SparsityError(f"sparsity={sparsity} does not apply to method='n:m' (its sparsity is 1 - n/m): "
                                "pass n= and m= instead (default 2:4)")
        n, m = 2 if n is None else n, 4 if m is None else m
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (n, m)) or not 1 <= n < m:
            raise SparsityError(f"n={n!r}, m={m!r}: N:M sparsity keeps n of every m weights, so it needs "
                                "integers with 1 <= n < m (2:4 is what sparse tensor cores use)")
        return {"method": method, "sparsity": 1 - n / m, "scope": "local", "n": int(n), "m": int(m)}
    hint = " (write method='n:m', n=2, m=4)" if isinstance(method, str) and ":" in method else ""
    raise SparsityError(f"method={method!r}: use 'magnitude' or 'n:m'{hint}")


def _check_fraction(value, what: str):
    if (not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value < 1):
        raise SparsityError(f"{what}={value!r}: a sparsity is the fraction of weights to zero, a number in "
                            "[0, 1) (skip a layer with a rule value of None)")


def _check_rules(rules, method) -> list[tuple[re.Pattern, Any]]:
    if isinstance(rules, str) or (isinstance(rules, tuple) and len(rules) == 2 and isinstance(rules[0], str)):
        raise SparsityError(f"rules={rules!r}: rules are a list of (regex, sparsity or None) pairs or a dict, "
                            "e.g. rules=[('head', None)]")
    pairs = list(rules.items()) if isinstance(rules, dict) else list(rules)
    checked = []
    for index, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise SparsityError(f"rule {index} ({pair!r}): a rule is a (regex on the parameter path, sparsity "
                                "or None) pair, e.g. ('head', None)")
        pattern, value = pair
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise SparsityError(f"rule {index}: path {pattern!r} is not a valid regex: {err} (escape special "
                                "characters, e.g. with re.escape, to match them literally)") from None
        if value is not None:
            if method == "n:m":
                raise SparsityError(f"rule {index} ({pattern!r} → {value!r}): with method='n:m' a rule can only "
                                    "skip layers (value None)")
            _check_fraction(value, f"rule {index} ({pattern!r}) sparsity")
        checked.append((compiled, value))
    return checked


# --- the layer weights -----------------------------------------------------------------------------

@dataclasses.dataclass
class _Target:
    """A weight parameter read by one or more layers."""

    path: str
    op: str
    arg: Any = None          # the parameter (graph input); None when the weight is not one
    shape: tuple = ()
    axes: tuple | None = None  # its contracting axes, in the parameter's own axis order
    problem: str = ""        # why it cannot be masked as asked
    known: set = dataclasses.field(default_factory=set)  # ids of the layer nodes and casts reading it
    note: str = ""

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _targets(graph, settings) -> list[_Target]:
    targets: dict[str, _Target] = {}
    for site in find_layers(graph):
        target = targets.setdefault(site.layer.path, _Target(site.layer.path, site.layer.op,
                                                             shape=tuple(site.layer.shape)))
        target.known.add(id(site.node))
        arg, axes = _as_parameter(site.node.inputs[site.side], _contracting_axes(site), target.known)
        if arg is None:
            target.problem = target.problem or (
                f"its weight is computed through {axes} (not only casts and transposes of one parameter), "
                "so masking a parameter would not make it sparse")
            continue
        target.arg, target.shape = arg, tuple(arg.type.shape)
        if target.axes is not None and target.axes != axes and settings["method"] == "n:m":
            target.problem = target.problem or (f"layers contract it along different axes ({target.axes} and "
                                                f"{axes}): N:M groups must lie along one contraction")
        if target.axes is None:
            target.axes = axes
    for target in targets.values():
        if target.arg is not None:
            readers = _other_readers(target.arg, target.known)
            target.note = f"also read by {', '.join(readers)}: masked there too" if readers else ""
        if target.arg is not None and settings["method"] == "n:m" and not target.problem:
            size = int(np.prod([target.shape[a] for a in target.axes], dtype=np.int64))
            if size % settings["m"]:
                target.problem = (f"its contraction (axes {list(target.axes)} of shape {list(target.shape)}) has "
                                  f"{size} weights, not a multiple of m={settings['m']}")
    return list(targets.values())


def _contracting_axes(site) -> tuple:
    """The axes of `site`'s weight that the layer sums over; a convolution's input channels last."""
    numbers_ = site.node.params["dimension_numbers"]
    if site.layer.op == "conv":
        rhs = numbers_[1]  # (out features, in features, *spatial)
        return (*rhs[2:], rhs[1])
    return tuple(numbers_[0][site.side])


def _as_parameter(value, axes, known):
    """(the parameter `value` is, `axes` as that parameter's axes), following casts and transposes;
    or (None, the op in the way). Adds the nodes followed to `known`."""
    while value.node is not None:
        node = value.node
        if node.op.name == "transpose":
            axes = tuple(node.params["permutation"][a] for a in axes)
        elif node.op.name not in _CASTS:
            return None, node.op.name
        known.add(id(node))
        value = node.inputs[0]
    return (value, axes) if value.role == "param" else (None, "a non-parameter input")


def _other_readers(arg, known) -> list[str]:
    """Ops other than its layers (and the casts on the way) that read parameter `arg`."""
    others, stack = set(), [arg]
    while stack:
        for user in stack.pop().users():
            if id(user) not in known:
                others.add(user.op.name)
            elif user.op.name == "transpose" or user.op.name in _CASTS:
                stack.extend(user.outputs)
    return sorted(others)


def _decide(targets, rules, settings) -> tuple[list[tuple], set]:
    """Per target (sparsity, or None to skip; the index of the rule that matched, or None), and the
    indices of the rules that matched."""
    decisions = []
    for target in targets:
        index = next((i for i, (pattern, _) in enumerate(rules) if pattern.search(target.path)), None)
        decisions.append((settings["sparsity"] if index is None else rules[index][1], index))
    return decisions, {index for _, index in decisions if index is not None}


def _pattern(decision, settings) -> str:
    value, rule = decision
    if rule is not None:
        return f"skipped (rule {rule})" if value is None else f"magnitude {value:.0%} (rule {rule})"
    if settings["method"] == "n:m":
        return f"{settings['n']}:{settings['m']}"
    return f"magnitude {settings['scope']}"


def _check_targets(targets, decisions, settings):
    problems = [t for t, (value, _) in zip(targets, decisions) if t.problem and value is not None]
    if problems:
        raise SparsityError(f"cannot apply {settings['method']} sparsity to "
                            + "; ".join(f"layer weight {t.path}: {t.problem}" for t in problems)
                            + ". Skip such layers with rules=[(regex, None)], e.g. rules=[("
                            + f"{'^' + re.escape(problems[0].path) + '$'!r}, None)]")


# --- the masks ---------------------------------------------------------------------------------------

def _masks(targets, decisions, leaves, position, settings) -> dict:
    """Parameter path -> bool mask (True = kept) for every target not skipped."""
    keep, pooled = {}, []
    for target, (value, rule) in zip(targets, decisions):
        if value is None:
            continue
        magnitude = _magnitude(leaves[position[id(target.arg)]], target.path)
        if settings["method"] == "n:m":
            keep[target.path] = _n_of_m(magnitude, target.axes, settings["n"], settings["m"])
        elif settings["scope"] == "global" and rule is None:
            pooled.append((target.path, magnitude))
        else:
            keep[target.path] = ~_smallest(magnitude.ravel(), _count(value, magnitude.size)).reshape(magnitude.shape)
    if pooled:
        scores = np.concatenate([magnitude.ravel() for _, magnitude in pooled])
        pruned = _smallest(scores, _count(settings["sparsity"], scores.size))
        start = 0
        for path, magnitude in pooled:
            keep[path] = ~pruned[start:start + magnitude.size].reshape(magnitude.shape)
            start += magnitude.size
    return keep


def _magnitude(leaf, path: str) -> np.ndarray:
    """|w| in float32 (exact for 16-bit floats), float64 for float64 weights. NaN is an error."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        raise SparsityError(f"layer weight {path} is a ShapeDtypeStruct: sparsify needs the weights' values "
                            "(the other arguments may be ShapeDtypeStructs)")
    array = np.asarray(jax.device_get(leaf))
    magnitude = np.abs(array.astype(np.float64 if array.dtype == np.float64 else np.float32))
    nans = int(np.isnan(magnitude).sum())
    if nans:
        raise SparsityError(f"layer weight {path} has {nans} NaN value(s): NaN has no magnitude to rank. Fix "
                            f"the checkpoint, or skip the layer with a rule ({'^' + re.escape(path) + '$'!r}, None)")
    return magnitude


def _count(sparsity: float, size: int) -> int:
    """How many of `size` weights to prune: round(sparsity × size), halves up."""
    return int(np.floor(sparsity * size + 0.5))


def _smallest(scores: np.ndarray, k: int) -> np.ndarray:
    """A bool mask of the k smallest scores; among equal scores the later ones go first."""
    pruned = np.zeros(scores.shape, bool)
    if k == 0:
        return pruned
    threshold = np.partition(scores, k - 1)[k - 1]
    pruned = scores < threshold
    ties = np.flatnonzero(scores == threshold)
    pruned[ties[len(ties) - (k - int(pruned.sum())):]] = True
    return pruned


def _n_of_m(magnitude: np.ndarray, axes: tuple, n: int, m: int) -> np.ndarray:
    """Keep the n largest of every m consecutive weights along the (flattened) contracting axes."""
    order = [a for a in range(magnitude.ndim) if a not in axes] + list(axes)
    moved = magnitude.transpose(order)
    groups = moved.reshape(-1, m)
    largest = np.argsort(-groups, axis=1, kind="stable")[:, :n]  # stable: the earlier of equals
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, largest, True, axis=1)
    return keep.reshape(moved.shape).transpose(np.argsort(order))


def _zeroed(leaf, keep: np.ndarray):
    """A new array: `leaf` with the weights outside `keep` set to zero (where, not *: inf * 0 is NaN)."""
    array = np.asarray(jax.device_get(leaf))
    zeroed = np.where(keep, array, np.zeros((), array.dtype))
    return jax.device_put(zeroed, leaf.sharding) if isinstance(leaf, jax.Array) else zeroed


def _summary(rows) -> str:
    masked = [r for r in rows if not r.pattern.startswith("skipped")]
    kept, size = sum(r.kept for r in masked), sum(r.size for r in masked)
    return (f"{len(masked)} of {len(rows)} layer weights masked: {kept} of {size} weights kept "
            f"({kept / max(size, 1):.1%}); the parameters that are not layer weights are unchanged")


# --- parameter holders ---------------------------------------------------------------------------

def _tree_of(holder) -> tuple[list, Callable]:
    """(the parameter leaves of `holder`, leaves -> a new holder): a pytree, or an nnx / Equinox
    module (its state / array leaves, as graphopt.trace sees them)."""
    if _is_nnx_module(holder):
        from flax import nnx

        graphdef, state = nnx.split(holder)
        leaves, treedef = jax.tree_util.tree_flatten(state)
        return leaves, lambda new: nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, new))
    if _is_equinox_module(holder):
        import equinox as eqx

        arrays, static = eqx.partition(holder, eqx.is_array)
        leaves, treedef = jax.tree_util.tree_flatten(arrays)
        return leaves, lambda new: eqx.combine(jax.tree_util.tree_unflatten(treedef, new), static)
    leaves, treedef = jax.tree_util.tree_flatten(holder)
    return leaves, lambda new: jax.tree_util.tree_unflatten(treedef, new)

"""smooth: SmoothQuant, migrating activation outliers into the weights, as a graph rewrite.

    %h = layer_norm %x, %g, %b          %s = smooth_scale(|Wq|, |Wk|, |Wv|, a^α)  # prep (fold_params)
    %q = dot_general %h, %Wq       →    %h = layer_norm %x, %g / %s, %b / %s       # prep: g/s, b/s
    %k = dot_general %h, %Wk            %q = dot_general %h, %Wq · %s              # prep: Wq·s
    %v = dot_general %h, %Wv            %k = dot_general %h, %Wk · %s   ...

Static int8 activations get one scale per tensor, set by the largest value; a few outlier channels
(×50 in transformer LayerNorm outputs) leave the other channels a handful of levels. SmoothQuant
(Xiao et al. 2022) divides activation channel j by s_j and multiplies weight row j (its slice along
the contracting axis) by s_j — exact in real arithmetic, X W = (X diag(1/s)) (diag(s) W) — with

    s_j = a_j^α / w_j^(1−α)    a_j = max |X_j| over the calibration batches
                               w_j = max over the layers reading X of max_k |W[j, k]|

so channel j's range after the move is a_j^(1−α) w_j^(1−α) on the activation and a_j^α w_j^α on
the weight (α = 0.5: split evenly). Layers reading one activation (Q, K and V after one LayerNorm)
share one s. s_j ≥ 1e-5; a channel whose activation or weight max is 0 (or whose s is not finite)
gets s_j = 1. s is float32, rounded to the narrowest float dtype of the activation and the weights,
so both sides use the same value.

Only the activation maxima come from calibration (constants). The weight maxima, s, W·s and the
folded norm parameters are computed in the graph from the parameters, so `fold_params` computes
them once per set of weights, and the graph does not bake in the weights it was calibrated with.

Where 1/s goes, when *every* reader of the activation (and of each value changed on the way) is
one of the smoothed layers — never a value something else reads, such as a residual stream:
(a) into a `layer_norm` / `rms_norm` node's parameter scale (and bias); (b) into the parameters of
an affine spelled in primitives: `mul(a, p)` divides p, `add`/`sub` divide both operands (recursing
into the activation side), `div` its numerator, `convert_element_type` passes through; (c) else an
explicit `mul(x, 1/s)` before the layers: one elementwise multiply, which XLA fuses into x's
producer. Convolutions, dots contracting over several axes, and anything else are left alone with
a note. The rewritten weight operand is parameter-derived, so the quantize pass still sees a layer.

Trade-offs: a larger α makes activations easier and weights harder to quantize (per-channel int8
weights absorb it well; int4 groups less so). Numerics: exact up to float rounding (x/s and W·s
each round once). s is positive and finite, so NaN, ±Inf and −0 stay where they were, barring
over/underflow of W·s or g/s. The weights must be finite (as for quantization).

Example:
    >>> import graphopt, jax.numpy as jnp, numpy as np
    >>> from graphopt.quant.observe import Calibration
    >>> p = {"g": jnp.array([1.0, 50.0, 1.0, 1.0]), "w": jnp.full((4, 3), 0.5)}
    >>> f = lambda p, x: (x * p["g"]) @ p["w"]             # channel 1 is an outlier
    >>> x = jnp.arange(8.0).reshape(2, 4)
    >>> g = graphopt.trace(f, p, x, params_argnums=0)
    >>> dot = next(n for n in g.nodes if n.op.name == "dot_general")
    >>> [note] = smooth(g, [(dot, 1)], Calibration([(p, x)], progress=False))
    >>> for part in note.split("; "):
    ...     print(part)
    smooth: w ← activation f32[2,4]: folded into the affine on parameters (mul)
    s up to 22.4 (channel 1), activation absmax 250 → 11.2
    >>> bool(np.allclose(graphopt.lower(g)(p, x), f(p, x), rtol=1e-6))
    True
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from graphopt.builder import Builder
from graphopt.param_derived import largest_source, param_derived_values
from graphopt.quant.observe import ChannelAbsMax, observe
from graphopt.quant.scheme import QuantizationError

MIN_SCALE = 1e-5
NORMS = {"layer_norm": "scale and bias", "rms_norm": "scale"}
DOTS = ("dot_general", "linear")
_MAX_DEPTH = 16  # how far up an affine chain the division is pushed


@dataclasses.dataclass
class _Group:
    """The layers reading one activation along one channel axis: they share one s."""

    x: object
    axis: int
    layers: list = dataclasses.field(default_factory=list)  # (node, side, weight axis, name)

    @property
    def names(self) -> str:
        return ", ".join(name for *_, name in self.layers)


def smooth(graph, layers, calibration, alpha: float = 0.5, *, record: list | None = None,
           activation_max: list | None = None) -> list[str]:
    """Migrate activation outliers into the weights of `layers` ((node, side) pairs: top-level
    dot_general or linear nodes whose operand `side` is a parameter-derived weight and operand
    1 - side the activation), in place. Returns notes for the pass report: one per smoothed
    activation (which layers, how it was folded, the largest s_j), one per layer left alone.
    Raises QuantizationError naming the layer for what it cannot do (see the module docstring).

    `record` (a list) receives, per smoothed activation, the JSON-able facts that replay it:
    {"alpha", "activation_max"}; `activation_max` (those records' values, in the same order)
    replays a smoothing without calibration data (a saved model's recipe).

    >>> smooth(None, [], None, alpha=2.0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    graphopt.quant.scheme.QuantizationError: smooth: alpha must be a number in [0, 1] (...), got 2.0
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise QuantizationError("smooth: alpha must be a number in [0, 1] (the share of each channel's range "
                                f"moved to the weights; 0.5 splits it evenly), got {alpha!r}")
    derived, constant = param_derived_values(graph) if layers else ({}, set())
    static = lambda v: id(v) in derived or id(v) in constant  # noqa: E731
    groups, notes = _groups(graph, layers, static)
    if not groups:
        return notes + ["smooth: nothing to smooth; the graph is unchanged"]
    if activation_max is not None:
        if len(activation_max) != len(groups) or any(np.shape(a) != (g.x.type.shape[g.axis],)
                                                     for a, g in zip(activation_max, groups)):
            raise QuantizationError(f"smooth: the recorded statistics ({len(activation_max)} activations) do not "
                                    f"fit this graph's {len(groups)} smoothed activations ({groups[0].names}, ...)")
        stats = [(np.asarray(a, np.float32), None) for a in activation_max]
    elif calibration is None:
        raise QuantizationError(f"smooth: {groups[0].names}: SmoothQuant needs activation statistics; "
                                "pass calibration=Calibration(batches)")
    else:
        stats = _statistics(graph, groups, calibration)
    order = {node: i for i, node in enumerate(graph.nodes)}
    for group, (act, weight_max) in zip(groups, stats):
        notes.append(_smooth_group(graph, group, act, weight_max, float(alpha), static, order))
        if record is not None:
            record.append({"alpha": float(alpha), "activation_max": [float(v) for v in act]})
    return notes


# --- which layers, and their statistics ----------------------------------------------------------

def _groups(graph, layers, static) -> tuple[list[_Group], list[str]]:
    groups, notes, seen = {}, [], set()
    for node, side in layers:
        if node in seen:
            continue
        seen.add(node)
        if side not in (0, 1) or node.graph is not graph:
            raise QuantizationError(f"smooth: {node.describe()}: expected a top-level node of this graph and "
                                    f"the weight's operand index 0 or 1, got side {side!r}")
        source = largest_source(node.inputs[side])
        name = source.path or f"input {source.index}"
        if node.op.name == "conv_general_dilated":
            notes.append(f"smooth: {name} left alone: convolutions are not smoothed")
            continue
        if node.op.name not in DOTS:
            raise QuantizationError(f"smooth: {name} ({node.describe()}): not a dot_general, linear or "
                                    "convolution layer")
        if not all(jnp.issubdtype(v.type.dtype, jnp.floating) for v in node.inputs[:2]):
            raise QuantizationError(f"smooth: {name} ({node.describe()}): needs float operands, got "
                                    f"{node.inputs[0].type} and {node.inputs[1].type}")
        if not static(node.inputs[side]) or static(node.inputs[1 - side]):
            raise QuantizationError(f"smooth: {node.describe()}: operand {side} must be the weight, computed "
                                    f"from parameters only, and operand {1 - side} the activation")
        lhs, rhs = node.params["dimension_numbers"][0]
        x_axes, w_axes = (lhs, rhs) if side == 1 else (rhs, lhs)
        if len(x_axes) != 1:
            notes.append(f"smooth: {name} left alone: it contracts over {len(x_axes)} axes, "
                         "not one channel axis")
            continue
        x = node.inputs[1 - side]
        group = groups.setdefault((x, x_axes[0]), _Group(x, x_axes[0]))
        group.layers.append((node, side, w_axes[0], name))
    return list(groups.values()), notes


def _statistics(graph, groups, calibration) -> list[tuple[np.ndarray, np.ndarray]]:
    """(activation max per channel, weight max per channel) per group, from one calibration run."""
    values, observers = [], []
    for group in groups:
        values.append(group.x)
        observers.append(ChannelAbsMax(group.axis, name=f"{group.names} input"))
        for node, side, w_axis, name in group.layers:
            values.append(node.inputs[side])
            observers.append(ChannelAbsMax(w_axis, name=f"{name} weight"))
    observe(graph, values, calibration, observers=observers)
    found, position = [], 0
    for group in groups:
        n = len(group.layers)
        chunk = [o.absmax for o in observers[position:position + 1 + n]]
        found.append((chunk[0], np.max(chunk[1:], axis=0)))
        position += 1 + n
    return found


# --- the rewrite ---------------------------------------------------------------------------------

def _smooth_group(graph, group, act, weight_max, alpha, static, order) -> str:
    x, axis = group.x, group.axis
    edits, how = _fold_plan(group, static)
    first = min((node for node, *_ in group.layers), key=order.__getitem__)
    anchor = min([first] + [node for node, _, _ in edits], key=order.__getitem__)
    b = Builder(graph, before=anchor, made_by="smooth")
    weights = [_available(b, node.inputs[side], order, anchor) for node, side, _, _ in group.layers]
    w_axes = tuple(w_axis for _, _, w_axis, _ in group.layers)
    narrow = _narrowest([x.type.dtype] + [w.type.dtype for w in weights])
    a = np.where(act > 0, act.astype(np.float64) ** alpha, 0.0).astype(np.float32)
    s = b.jax(lambda a, *ws: _scales(a, _weight_max(ws, w_axes), alpha, narrow), b.const(a), *weights)
    for node, side, w_axis, _ in group.layers:
        _rewire(node, side, lambda w, s: w * _along(s, w, w_axis), s)
    for node, index, leaf_axis in edits:
        _rewire(node, index, lambda v, s: v / _along(s, v, leaf_axis), s)
    if not edits:
        smoothed = _at(graph, first).jax(lambda x, s: x * _along(1 / s, x, axis), x, s)
        for node, side, *_ in group.layers:
            node.set_input(1 - side, _typed(_at(graph, first), smoothed, x.type))
    if weight_max is None:  # replayed from recorded statistics: the weights are not at hand
        return f"smooth: {group.names} ← activation {x.type}: {how}; replayed"
    host_s = np.asarray(_scales(jnp.asarray(a), jnp.asarray(weight_max), alpha, narrow))
    j = int(np.argmax(host_s))
    return (f"smooth: {group.names} ← activation {x.type}: {how}; s up to {host_s[j]:.3g} (channel {j}), "
            f"activation absmax {act.max():.3g} → {(act / host_s).max():.3g}")


def _fold_plan(group, static) -> tuple[list, str]:
    """([(node, operand index, channel axis of the operand)] to divide by s so that x is divided
    by s, how it reads) — or ([], why not) for an explicit multiply."""
    x = group.x
    readers = {(node, 1 - side) for node, side, *_ in group.layers}
    others = sorted({"a graph output" if node is None else node.op.name
                     for node, i in x.uses if (node, i) not in readers})
    if others:
        return [], f"explicit mul(x, 1/s) (x is also read by {', '.join(others)})"
    edits = _push(x, group.axis, static, 0)
    if not edits:
        return [], "explicit mul(x, 1/s) (x's producer is no norm or affine on parameters)"
    norm = next((node for node, _, _ in edits if node.op.name in NORMS), None)
    if norm is not None:
        return edits, f"folded into {norm.op.name} {NORMS[norm.op.name]} ({norm.provenance.module_path})"
    ops = sorted({node.op.name for node, _, _ in edits})
    return edits, f"folded into the affine on parameters ({', '.join(ops)})"


def _push(v, axis, static, depth):
    """Edits dividing `v` (read only where the division is wanted) by s along `axis`, or None."""
    node = v.node
    if node is None or depth > _MAX_DEPTH or node.effects:
        return None
    name = node.op.name
    if name in NORMS:
        p, c = node.params, v.type.shape[axis]
        leaves = [(node, i, 0) for i in range(1, len(node.inputs))]
        ok = p["has_scale"] and p["axes"] == (axis,) == (v.type.ndim - 1,) and all(
            static(node.inputs[i]) and node.inputs[i].type.shape == (c,) for _, i, _ in leaves)
        return leaves if ok else None
    if node.regions:
        return None
    operand = functools.partial(_operand, node, axis=axis, static=static, depth=depth)
    if name == "convert_element_type":
        return operand(0) if jnp.issubdtype(node.inputs[0].type.dtype, jnp.floating) else None
    if name == "div":
        return operand(0)
    if name == "mul":  # (a·p)/s = a·(p/s): one factor takes it; a parameter factor first
        for i in sorted(range(2), key=lambda i: not static(node.inputs[i])):
            found = operand(i)
            if found:
                return found
        return None
    if name in ("add", "sub"):  # (a ± p)/s = a/s ± p/s
        found = [operand(0), operand(1)]
        return found[0] + found[1] if all(found) else None
    return None


def _operand(node, index, *, axis, static, depth):
    u, out = node.inputs[index], node.outputs[0]
    if static(u):
        fits = u.type.ndim == out.type.ndim and u.type.shape[axis] == out.type.shape[axis]
        return [(node, index, axis)] if fits and jnp.issubdtype(u.type.dtype, jnp.floating) else None
    if len(u.uses) != 1:  # someone else reads it: leave it unchanged
        return None
    return _push(u, axis, static, depth + 1)


def _available(b, value, order, anchor):
    """`value`, or a copy of its (parameter-derived) producers placed before `anchor` if it is
    computed after it."""
    node = value.node
    if node is None or order.get(node, -1) < order[anchor]:
        return value
    inputs = [_available(b, v, order, anchor) for v in node.inputs]
    copy = b.graph.add_node(node.op, inputs, node.params, provenance=b.provenance, before=anchor)
    return copy.outputs[value.index]


def _at(graph, node) -> Builder:
    return Builder(graph, before=node, made_by="smooth")


def _rewire(node, index, fn, s) -> None:
    """Operand `index` of `node` becomes fn(operand, s), computed just before `node`."""
    b, old = _at(node.graph, node), node.inputs[index]
    node.set_input(index, _typed(b, b.jax(fn, old, s), old.type))


def _typed(b, value, type):
    """`value` with `type`'s weak type (a weak-typed weight stays weak, as set_input requires)."""
    if value.type == type or value.type.strong() != type.strong():
        return value
    return b.op("convert_element_type", value, new_dtype=type.dtype, weak_type=type.weak_type, sharding=None)


# --- the scales (traced into the graph, and run on the host for the report) ----------------------

def _weight_max(ws, axes):
    """max over the layers of max |W| over every axis but the contracting one: one per channel."""
    maxes = [jnp.max(jnp.abs(w.astype(jnp.float32)), axis=tuple(d for d in range(w.ndim) if d != a),
                     initial=0.0) for w, a in zip(ws, axes)]
    return functools.reduce(jnp.maximum, maxes)


def _scales(a, m, alpha, narrow):
    """s = a / m^(1-α) (a = activation max^α), clamped to [MIN_SCALE, max of `narrow`]; 1 where
    the activation or the weight channel is 0, or s is not finite. float32, holding `narrow` values."""
    raw = a / m ** (1 - alpha)
    ok = (a > 0) & (m > 0) & jnp.isfinite(raw)
    s = jnp.where(ok, jnp.clip(raw, MIN_SCALE, float(jnp.finfo(narrow).max)), 1.0)
    return s.astype(narrow).astype(jnp.float32)


def _narrowest(dtypes):
    return min((np.dtype(d) for d in dtypes), key=lambda d: (jnp.finfo(d).nmant, jnp.finfo(d).bits))


def _along(s, like, axis):
    """s (one per channel) in `like`'s dtype, shaped to broadcast along `axis` of `like`."""
    shape = [1] * like.ndim
    shape[axis] = s.shape[0]
    return s.astype(like.dtype).reshape(shape)

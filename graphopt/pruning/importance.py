"""How much each channel of each prunable group matters: the scores pruning ranks channels by.

    "l1", "l2"   magnitude: the sum of |w| (or the root of the sum of w²) over every parameter
                 element that belongs to the channel, across the whole group (the producer's
                 output column, its bias, the consumer's input row, a norm's scale...)
    "wanda"      activation-aware (Wanda, Sun et al. 2023): at each exit, ‖X_c‖₂ over the
                 calibration batches times ‖W_c‖₁ of the weight the channel meets there (for a
                 contraction of two activations, q·k: ‖A_c‖₂·‖B_c‖₂); summed over exits
    "taylor"     first-order Taylor (Molchanov et al. 2019): |∂L/∂m_c| summed over calibration
                 batches, where m_c multiplies channel c at every exit (all ones): the estimated
                 change of the loss L when the channel is removed. Needs `loss(outputs, batch)`.

A channel of a flattened axis (a convolution's channel after `reshape [N,H,W,C] -> [N,H*W*C]`)
collects every element of that axis that belongs to it.

Example:
    >>> import graphopt, jax, jax.numpy as jnp, numpy as np
    >>> from graphopt.passes.prune.deps import analyze
    >>> p = {"w1": jnp.array([[1.0, 0.0, 2.0], [1.0, 0.0, 2.0]]), "w2": jnp.ones((3, 1))}
    >>> g = graphopt.trace(lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"], p, jnp.ones((1, 2)),
    ...                    params_argnums=0)
    >>> scores(analyze(g), jax.tree_util.tree_leaves((p, jnp.ones((1, 2)))), "l1")
    {'w1:1': array([3., 1., 5.], dtype=float32)}
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from graphopt.passes.prune.deps import Dependencies, PruneError, atoms

METHODS = ("l1", "l2", "wanda", "taylor")


def scores(deps: Dependencies, leaves: Sequence, method: str = "l2", *, batches: Iterable | None = None,
           loss: Callable | None = None) -> dict[str, np.ndarray]:
    """{group name: importance per channel (float32)} for every group of `deps`.

    `leaves`: the traced function's arguments, flattened (graph-input order). `batches` (for
    "wanda" and "taylor") yields `(flat arguments, batch)` pairs; `loss(outputs, batch)` (for
    "taylor") is the scalar loss of the model's outputs on that batch (a pytree of arrays: the
    labels are usually in it)."""
    if method not in METHODS:
        raise PruneError(f"unknown importance {method!r}; known: {', '.join(METHODS)}")
    if method in ("l1", "l2"):
        return _magnitude(deps, leaves, method)
    if batches is None:
        raise PruneError(f"importance={method!r} needs calibration batches (calibration=[...] of model "
                         "inputs); l1 and l2 need none")
    if method == "wanda":
        return _wanda(deps, [leaves for leaves, _ in batches])
    if loss is None:
        raise PruneError("importance='taylor' needs loss=callable(outputs, batch) -> scalar: the loss "
                         "whose first-order change estimates each channel's cost")
    return _taylor(deps, batches, loss)


def channel_index(dim, atom) -> np.ndarray:
    """For each index along `dim`, the channel of `atom` it belongs to (-1: none)."""
    dim, atom = dim.find(), atom.find()
    if dim is atom:
        return np.arange(dim.size)
    if dim.parts is None:
        return np.full(dim.size, -1)
    kind, parts = dim.parts
    pieces = [channel_index(p, atom) for p in parts]
    if kind == "concat":
        return np.concatenate(pieces)
    out = np.full(1, -1)
    for part, piece in zip(parts, pieces):
        out = np.maximum(out[:, None], piece[None, :]).reshape(-1)
    return out


def channel_stride(dim, atom) -> int:
    """How many elements of `dim` lie between consecutive channels of `atom` (1: innermost)."""
    dim, atom = dim.find(), atom.find()
    if dim is atom or dim.parts is None:
        return 1
    kind, parts = dim.parts
    for i, part in enumerate(parts):
        if any(a is atom for a in atoms(part)):
            inner = 1 if kind == "concat" else int(np.prod([p.size for p in parts[i + 1:]]))
            return channel_stride(part, atom) * inner
    return 1


def _per_channel(deps: Dependencies, group, value, axis: int, vector: np.ndarray) -> np.ndarray:
    """`vector` (one entry per index along value's axis) summed into the group's channels."""
    index = channel_index(deps.dims[id(value)][axis], group.dim)
    hit = index >= 0
    return np.bincount(index[hit], weights=np.asarray(vector, np.float64)[hit], minlength=group.size)


def _reduce_except(array, axis: int, fn) -> np.ndarray:
    x = np.moveaxis(np.asarray(array, np.float32), axis, 0)
    return fn(x.reshape(x.shape[0], -1)).sum(axis=1)


def _magnitude(deps, leaves, method) -> dict:
    power = np.abs if method == "l1" else np.square
    out = {}
    for group in deps.groups:
        total = np.zeros(group.size)
        for arg, axis in group.params:
            total += _per_channel(deps, group, arg, axis, _reduce_except(leaves[arg.index], axis, power))
        out[group.name] = (total if method == "l1" else np.sqrt(total)).astype(np.float32)
    return out


def _exit_operands(node, operand: int, axis: int) -> tuple[int, int]:
    """The axis of each operand of an exit that the contraction runs over."""
    if node.op.name == "dot_general":
        (lc, rc), _ = node.params["dimension_numbers"]
        return lc[list(lc).index(axis)], rc[list(lc).index(axis)]
    lhs_spec, rhs_spec, _ = node.params["dimension_numbers"]
    return lhs_spec[1], rhs_spec[1]


class _ChannelNorms:
    """Per-channel sums of |x| and x² along one axis, over every other axis and every batch."""

    def __init__(self, axis: int):
        self.axis, self.abs, self.squares, self.batches = axis, None, None, 0

    def reduce(self, x):
        x = jnp.moveaxis(x.astype(jnp.float32), self.axis, 0).reshape(x.shape[self.axis], -1)
        return jnp.sum(jnp.abs(x), axis=1), jnp.sum(x * x, axis=1)

    def update(self, sums) -> None:
        a, s = (np.asarray(v, np.float64) for v in sums)
        self.abs = a if self.abs is None else self.abs + a
        self.squares = s if self.squares is None else self.squares + s
        self.batches += 1


def _wanda(deps, batches) -> dict:
    from graphopt.param_derived import param_derived_values
    from graphopt.quant.observe import Calibration, observe

    graph = deps.graph
    derived, constant = param_derived_values(graph)
    exits = list(dict.fromkeys((node, operand, axis) for g in deps.groups for node, operand, axis in g.exits))
    values, observers = [], []
    for node, operand, axis in exits:
        for value, value_axis in zip(node.inputs, _exit_operands(node, operand, axis)):
            values.append(value)
            observers.append(_ChannelNorms(value_axis))
    if any(node.graph is not graph for node, _, _ in exits):
        raise PruneError("importance='wanda' cannot read contractions inside regions; use 'l2'")
    observe(graph, values, Calibration(batches, progress=False), observers=observers)
    factor = {}
    for (node, operand, axis), pair in zip(exits, zip(observers[::2], observers[1::2])):
        vectors = []
        for value, obs in zip(node.inputs, pair):
            weight = id(value) in derived or id(value) in constant
            vectors.append(obs.abs / obs.batches if weight else np.sqrt(obs.squares))
        factor[(node, operand, axis)] = (node.inputs[operand], axis, vectors[0] * vectors[1])
    out = {}
    for group in deps.groups:
        total = np.zeros(group.size)
        for key in dict.fromkeys(group.exits):
            value, axis, vector = factor[key]
            total += _per_channel(deps, group, value, axis, vector)
        out[group.name] = total.astype(np.float32)
    return out


def _taylor(deps, batches, loss) -> dict:
    from graphopt.lowering.emit import lower
    from graphopt.passes.prune.masked import masked_graph

    graph = masked_graph(deps, inputs=True)
    flat = lower(graph).flat
    n_args = len(deps.graph.inputs)
    out_tree = deps.graph.out_tree

    def objective(masks, leaves, batch):
        outs = flat(*leaves, *masks)
        outputs = jax.tree_util.tree_unflatten(out_tree, outs) if out_tree is not None else outs
        return loss(outputs, batch)

    grad = jax.jit(jax.grad(objective))
    masks = [jnp.ones(g.size, jnp.float32) for g in deps.groups]
    totals = [np.zeros(g.size) for g in deps.groups]
    seen = 0
    for index, (leaves, batch) in enumerate(batches):
        if len(leaves) != n_args:
            raise PruneError(f"calibration batch {index}: expected {n_args} arrays, got {len(leaves)}")
        for total, g in zip(totals, grad(masks, list(leaves), batch)):
            total += np.asarray(g, np.float64)
        seen += 1
    if not seen:
        raise PruneError("importance='taylor': the calibration batches were empty")
    return {g.name: np.abs(t).astype(np.float32) for g, t in zip(deps.groups, totals)}

"""Calibration runs: record the activations entering quantized layers over example batches.

Static schemes (int8_static, fp8) need one scale per activation, fixed before deployment. The
quantize pass marks the activation Values it will quantize; `observe` runs the graph (as it is
before the pass, parameters included) on each example batch with those Values as extra outputs,
feeding every observer (`graphopt.quant.calibrate`) its tensor, with a progress bar.

    Calibration(batches, method="percentile", percentile=99.99)   # the pass option `calibration=`

`batches` yields argument tuples of the traced function (parameters included), e.g.
`((params, x) for x in loader)`. A one-shot iterator (a generator) is kept as a list on first use,
so every run over the calibration (SmoothQuant's statistics, then the static scales) sees the same
batches.

An observer with a `reduce(x)` method (`ChannelAbsMax`: the per-channel max |x| SmoothQuant needs)
is fed `reduce(x)`, computed inside the same jitted run: only the statistic leaves the device.
Range observers and statistics mix freely in one `observe` call, one pass over the batches.

Example:
    >>> import graphopt, jax.numpy as jnp, numpy as np
    >>> g = graphopt.trace(lambda w, x: jnp.tanh(x) @ w, jnp.ones((4, 2)), jnp.ones((3, 4)), params_argnums=0)
    >>> act = next(g.nodes).output                                   # tanh(x), the dot's input
    >>> batches = [(np.ones((4, 2), np.float32), np.full((3, 4), 2.0, np.float32))]
    >>> [obs] = observe(g, [act], Calibration(batches, progress=False))
    >>> round(obs.range(255, True)[1], 4)
    0.964
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from graphopt.quant.calibrate import CalibrationError, make_observer
from graphopt.quant.scheme import QuantizationError


@dataclasses.dataclass
class Calibration:
    """Example batches and the range method (`absmax`, `percentile`, `mse`) with its options."""

    batches: Iterable
    method: str = "absmax"
    options: dict = dataclasses.field(default_factory=dict)
    progress: bool = True
    total: int | None = None

    def __init__(self, batches, method: str = "absmax", *, progress: bool = True, total=None, **options):
        self.batches, self.method, self.options = batches, method, options
        self.progress, self.total = progress, total
        make_observer(method, **options)  # reject an unknown method or bad options now

    def examples(self) -> Iterable:
        """The batches, to iterate; a one-shot iterator is read into a list the first time, so that
        later runs (smoothing, then static calibration) see the same batches."""
        if iter(self.batches) is self.batches:
            self.batches = list(self.batches)
        return self.batches


class ChannelAbsMax:
    """Per-channel max |x| along `axis`: the max over every other axis and every batch.

    `reduce` runs inside the jitted calibration run; `update` takes its result.

    >>> obs = ChannelAbsMax(1, name="fc1 input")
    >>> for batch in (np.array([[1.0, -3.0], [-2.0, 0.5]]), np.array([[4.0, 0.0]])):
    ...     obs.update(obs.reduce(batch))
    >>> obs.absmax.tolist()
    [4.0, 3.0]
    """

    def __init__(self, axis: int, *, name: str | None = None):
        self.axis, self.name = axis, name
        self.absmax: np.ndarray | None = None  # float32, one per channel; None until fed

    def reduce(self, x):
        x = jnp.asarray(x)
        x = jnp.abs(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
        others = tuple(a for a in range(x.ndim) if a != self.axis % x.ndim)
        return jnp.max(x, axis=others, initial=0.0) if others else x

    def update(self, channel_max) -> None:
        values = np.asarray(channel_max, np.float32)
        if not np.all(np.isfinite(values)):  # NaN and Inf propagate through the max
            bad = np.flatnonzero(~np.isfinite(values))
            raise CalibrationError(f"{self.name or 'activation'}: calibration batch has NaN or ±Inf "
                                   f"values in {bad.size} of {values.size} channels (first: {bad[0]}); "
                                   "calibration data must be finite")
        self.absmax = values if self.absmax is None else np.maximum(self.absmax, values)

    def __repr__(self) -> str:
        return f"ChannelAbsMax(axis={self.axis}, name={self.name!r})"


def observe(graph, values: Sequence, calibration: Calibration, names: Sequence[str] | None = None, *,
            observers: Sequence | None = None) -> list:
    """One observer per Value in `values` (of `graph`, top level), fed over the calibration batches:
    a range observer of `calibration.method` named `names[i]`, or `observers[i]` when given (any
    object with `update(x)`, and optionally `reduce(x)`, run in the jitted pass: `ChannelAbsMax`)."""
    from graphopt.lowering.emit import lower

    if observers is None:
        names = list(names) if names is not None else [f"activation {i}" for i in range(len(values))]
        observers = [make_observer(calibration.method, name=n, **calibration.options) for n in names]
    observers = list(observers)
    reducers = [getattr(o, "reduce", None) or (lambda x: x) for o in observers]
    original = list(graph.outputs)
    graph.set_outputs(list(values))
    seen = 0
    try:  # the lowering reads the graph when jit traces it: keep the extra outputs until done
        flat = lower(graph).flat
        run = jax.jit(lambda *leaves: [r(v) for r, v in zip(reducers, flat(*leaves))])
        for batch in _progress(calibration):
            leaves = jax.tree_util.tree_leaves(batch)
            if len(leaves) != len(graph.inputs):
                raise QuantizationError(f"calibration batch {seen}: expected the traced function's "
                                        f"arguments ({len(graph.inputs)} arrays), got {len(leaves)}; "
                                        "yield (params, inputs...) tuples")
            for observer, value in zip(observers, run(*leaves)):
                observer.update(jax.device_get(value))
            seen += 1
    finally:
        graph.set_outputs(original)
    if not seen:
        raise QuantizationError("calibration: the batches iterator yielded nothing; static quantization "
                                "needs at least one example batch")
    return observers


def _progress(calibration: Calibration) -> Iterable[Any]:
    from graphopt.progress import track

    return track(calibration.examples(), "calibrating", total=calibration.total, enabled=calibration.progress)

"""Calibration runs: record the activations entering quantized layers over example batches.

Static schemes (int8_static, fp8) need one scale per activation, fixed before deployment. The
quantize pass marks the activation Values it will quantize; `observe` runs the graph (as it is
before the pass, parameters included) on each example batch with those Values as extra outputs,
feeding every observer (`graphopt.quant.calibrate`) its tensor, with a progress bar.

    Calibration(batches, method="percentile", percentile=99.99)   # the pass option `calibration=`

`batches` yields argument tuples of the traced function (parameters included), e.g.
`((params, x) for x in loader)`.

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

from graphopt.quant.calibrate import make_observer
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


def observe(graph, values: Sequence, calibration: Calibration, names: Sequence[str] | None = None) -> list:
    """One observer per Value in `values` (of `graph`, top level), fed over the calibration batches."""
    from graphopt.lowering.emit import lower

    names = list(names) if names is not None else [f"activation {i}" for i in range(len(values))]
    observers = [make_observer(calibration.method, name=n, **calibration.options) for n in names]
    original = list(graph.outputs)
    graph.set_outputs(list(values))
    seen = 0
    try:  # the lowering reads the graph when jit traces it: keep the extra outputs until done
        run = jax.jit(lower(graph).flat)
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
    if not calibration.progress:
        return calibration.batches
    from rich.progress import track

    return track(calibration.batches, description="calibrating", total=calibration.total, transient=True)

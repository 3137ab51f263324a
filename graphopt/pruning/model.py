"""Prune a model in one call: a smaller graph, its smaller parameters, and what was removed.

    pruned = graphopt.prune(model.apply, variables, x, flops=0.3)      # or ratio=0.3
    pruned(x)                              # the pruned model (jitted), same outputs structure
    pruned.params                          # the variables pytree, every pruned array smaller
    print(pruned.report)                   # groups, per-layer params/FLOPs/bytes, measured speed
    pruned = pruned.distill(lambda x: model.apply(variables, x), batches, steps=300)  # recover
    pruned.save("pruned.safetensors")
    pruned = graphopt.pruning.load("pruned.safetensors", model.apply, abstract_variables, x)

The model is traced, its channel dependencies found (`passes/prune/deps.py`), channels scored
(`importance`: l1, l2, wanda, taylor; `graphopt/pruning/importance.py`) and chosen (`ratio` or
`flops`, local or global, `multiple`, `rules`; `graphopt/pruning/select.py`), and the graph is
rebuilt with those channels physically removed (`passes/prune/shrink.py`). Widths stay multiples
of `multiple` elements; `multiple="auto"` (the default) chooses with each of the backend's
candidates (8, 16, 32 on CPU; 128 on TPU), times the pruned graphs and keeps the fastest, since
which widths run fast is up to the backend's kernels. `steps=k` prunes in k
rounds, rescoring the already pruned model each time (with `recover(model) -> params` run after
each round to fine-tune it, when given). The parameter pytree keeps its structure (same paths),
so the pruned model trains with any optax loop: `graphopt.lower(pruned.graph)` is an ordinary
JAX function of `(params, inputs...)`.

`layers=True` lets global ranking remove every channel of a group on a residual branch (an MLP
or attention block whose output is added to a skip connection): the whole layer goes, the
residual stream carries on (`passes/prune/residual.py`).

`evaluate(model) -> float` (optional) scores a model called on its inputs, `model(x)`: the report
gives it for the unpruned model and the pruned one (after `recover`, when given).

Calibration batches (for wanda and taylor) are the model's non-parameter inputs, one tuple (or
one array) per batch; `inputs(batch)` extracts them when batches hold more (labels for taylor's
`loss(outputs, batch)`).

Example:
    >>> import graphopt, jax, jax.numpy as jnp
    >>> fn = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
    >>> p = {"w1": jax.random.normal(jax.random.key(0), (8, 64)), "w2": jnp.ones((64, 2))}
    >>> pruned = prune(fn, p, jnp.ones((4, 8)), ratio=0.5, params_argnums=0, measure=False)
    >>> {k: v.shape for k, v in pruned.params.items()}, pruned(jnp.ones((4, 8))).shape
    ({'w1': (8, 32), 'w2': (32, 2)}, (4, 2))
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from graphopt import safetensors_file
from graphopt.passes.prune.deps import Dependencies, PruneError, analyze, flops_weights
from graphopt.passes.prune.shrink import shrink, take
from graphopt.pruning import importance as _importance
from graphopt.pruning.report import PruneReport, build_report
from graphopt.pruning.select import Selection

FORMAT = "graphopt.pruned-params"
FORMAT_VERSION = 1


@dataclasses.dataclass
class PrunedModel:
    """A structurally pruned model: its graph, parameters and the channels kept per group."""

    graph: Any                    # the pruned Graph (for the example inputs' shapes)
    args: tuple                   # the traced function's arguments, parameters pruned
    keep: dict                    # group name -> kept channel indices of the original model
    report: PruneReport | None
    source: tuple | None = None   # (fn, unpruned abstract arguments): re-traced for other input shapes
    _graphs: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def params(self):
        """The pruned parameter argument (the first one, if the model has several)."""
        return self.args[self.graph.param_argnums[0]]

    def __call__(self, *inputs):
        """Run on the traced function's non-parameter arguments, in order (any shapes the model
        accepts: the pruned graph is rebuilt, once, for inputs of other shapes)."""
        return self._lowered(inputs, jitted=True)(*self.arguments(inputs))

    def _lowered(self, inputs: Sequence, jitted: bool = False):
        """The lowered pruned graph for inputs of these shapes (jitted or not), cached."""
        from graphopt.lowering.emit import lower

        key = (tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in jax.tree_util.tree_leaves(inputs)),
               jitted)
        found = self._graphs.get(key)
        if found is None:
            graph = self.graph
            if key[0] != _input_signature(self.graph) and self.source is not None:
                graph = _retrace(self.source, inputs, self.graph.param_argnums, self.keep)
            found = self._graphs[key] = jax.jit(lower(graph)) if jitted else lower(graph)
        return found

    def arguments(self, inputs: Sequence) -> tuple:
        """The full argument tuple: these inputs with the pruned parameters in their places."""
        rest = iter(inputs)
        return tuple(self.args[i] if i in self.graph.param_argnums else next(rest) for i in range(len(self.args)))

    def apply(self, params, *inputs):
        """The pruned model as a function of (the first parameter argument, inputs...): what a
        training loop differentiates."""
        args = list(self.arguments(inputs))
        args[self.graph.param_argnums[0]] = params
        return self._lowered(inputs)(*args)

    def with_params(self, params) -> "PrunedModel":
        """The same pruned model on other (fine-tuned) parameters of the same shapes."""
        args = list(self.args)
        args[self.graph.param_argnums[0]] = params
        return PrunedModel(self.graph, tuple(args), self.keep, self.report, self.source)

    def distill(self, teacher: Callable, batches: Iterable, *, steps: int, **options) -> "PrunedModel":
        """Recover accuracy by distillation against `teacher(x)` (the unpruned model's outputs):
        `graphopt.train.distill` on this model's parameters; options: loss, temperature,
        learning_rate, optimizer, inputs."""
        from graphopt.train import distill

        return self.with_params(distill(self.apply, teacher, self.params, batches, steps=steps, **options))

    def fine_tune(self, batches: Iterable, loss: Callable, *, steps: int, **options) -> "PrunedModel":
        """Recover accuracy on the task: `graphopt.train.fine_tune` (minimize loss(outputs, batch))."""
        from graphopt.train import fine_tune

        return self.with_params(fine_tune(self.apply, self.params, batches, loss, steps=steps, **options))

    def save(self, path) -> None:
        """Write the pruned parameters and the kept channels to a safetensors file."""
        if len(self.graph.param_argnums) > 1:
            raise PruneError("save writes one parameter argument; this model has parameters in arguments "
                             f"{list(self.graph.param_argnums)}: save them yourself (safetensors or orbax), with .keep "
                             "(the channels kept per group)")
        first = self.graph.param_argnums[0]
        keep = {name: np.asarray(index).tolist() for name, index in self.keep.items()}
        safetensors_file.write(path, _flat_params(self.args[first]), {"keep": json.dumps(keep)},
                               format=FORMAT, version=FORMAT_VERSION)


def prune(fn: Callable, *args, params_argnums=None, ratio: float | None = None, flops: float | None = None,
          importance: str = "l2", scope: str = "global", multiple: int | str = "auto", rules: Sequence | dict = (),
          calibration: Iterable | None = None, inputs: Callable | None = None, loss: Callable | None = None,
          steps: int = 1, recover: Callable | None = None, measure: bool = True,
          evaluate: Callable | None = None, layers: bool = False, normalize: bool = True) -> PrunedModel:
    """Structurally prune `fn(*args)`: remove `ratio` of the channels or `flops` of the FLOPs.

    See the module docstring for the options. The arguments' arrays are read, never modified."""
    import graphopt

    if steps < 1:
        raise PruneError(f"steps must be >= 1, got {steps}")
    original = graphopt.trace(fn, *args, params_argnums=params_argnums)
    if not original.param_argnums:
        raise PruneError("prune needs to know which arguments hold the parameters: pass params_argnums=")
    batches = list(calibration) if calibration is not None else None
    graph, leaves = original, list(jax.tree_util.tree_leaves(args))
    kept: dict[str, np.ndarray] = {}
    for step in range(steps):
        # Each round removes the same share of what is left: k rounds compound to the target.
        share = lambda t: None if t is None else 1 - (1 - t) ** (1 / steps)  # noqa: E731
        deps = analyze(graph)
        if step == 0:
            original_deps = deps  # the report's "before" (graph is still the original)
        if not deps.groups:
            raise PruneError("nothing in this model can be pruned exactly: "
                             + "; ".join(f"{n}: {r[0]}" for n, _, r in deps.blocked[:8]))
        keep, chosen, times = _choose(deps, leaves, share(ratio), share(flops), importance, scope, multiple,
                                      rules, _examples(deps, leaves, batches, inputs), loss, layers, normalize)
        graph, slices = shrink(deps, keep)
        leaves = [take(leaf, slices[i]) if i in slices else leaf for i, leaf in enumerate(leaves)]
        for name, index in keep.items():
            kept[name] = kept.get(name, np.arange(deps.group(name).size))[index]
        model = PrunedModel(graph, tuple(jax.tree_util.tree_unflatten(original.in_tree, leaves)), kept, None,
                            (fn, _abstract(args)))
        if recover is not None:
            model = model.with_params(recover(model))
            leaves = list(jax.tree_util.tree_leaves(model.args))
    model.report = build_report(original, graph, original_deps, kept, measure=measure)
    model.report.multiple, model.report.multiple_times = chosen, times
    if evaluate is not None:
        unpruned = lambda *inputs: fn(*PrunedModel(original, args, {}, None).arguments(inputs))  # noqa: E731
        model.report.metric = (float(evaluate(unpruned)), float(evaluate(model)))
    return model


def load(path, fn: Callable, *args, params_argnums=None) -> PrunedModel:
    """A model saved by `PrunedModel.save`: trace `fn(*args)` (arrays or ShapeDtypeStructs), remove
    the saved channels, and run on the saved parameters."""
    import graphopt

    flat, meta = safetensors_file.read(path, format=FORMAT, version=FORMAT_VERSION,
                                       what="a pruned model saved by graphopt", error=PruneError)
    keep = {name: np.asarray(index, np.int64) for name, index in json.loads(meta["keep"]).items()}
    original = graphopt.trace(fn, *args, params_argnums=params_argnums)
    deps = analyze(original)
    graph, _ = shrink(deps, keep)
    first = graph.param_argnums[0]
    params = _unflat_params(args[first], flat, graph, path)
    full = tuple(params if i == first else a for i, a in enumerate(args))
    for arg, leaf in zip(graph.inputs, jax.tree_util.tree_leaves(full)):
        if arg.role == "param" and tuple(np.shape(leaf)) != arg.type.shape:
            raise PruneError(f"{path}: parameter {arg.path} has shape {np.shape(leaf)}, but pruning this model "
                             f"with the saved channels gives {arg.type.shape}: it was saved from another model")
    return PrunedModel(graph, full, keep, build_report(original, graph, deps, keep, measure=False),
                       (fn, _abstract(args)))


def _abstract(args):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), args)


def _input_signature(graph) -> tuple:
    return tuple((a.type.shape, str(np.dtype(a.type.dtype))) for a in graph.inputs if a.role != "param")


def _retrace(source, inputs, param_argnums, keep):
    """The pruned graph for other input shapes: trace the unpruned model again, remove the same channels."""
    import graphopt

    fn, abstract = source
    rest = iter(inputs)
    args = [abstract[i] if i in param_argnums else next(rest) for i in range(len(abstract))]
    graph, _ = shrink(analyze(graphopt.trace(fn, *args, params_argnums=param_argnums)), keep)
    return graph


def _choose(deps: Dependencies, leaves, ratio, flops, method, scope, multiple, rules, batches, loss,
            layers: bool, normalize: bool) -> tuple:
    """(kept channels per group, the width multiple used, {multiple: measured seconds} if measured)."""
    scores = _importance.scores(deps, leaves, method, batches=batches, loss=loss)
    selection = Selection(sizes={g.name: g.size for g in deps.groups},
                          paths={g.name: [a.path for a, _ in g.params] for g in deps.groups},
                          flops_rows=flops_weights(deps) if flops is not None else None,
                          names=[g.name for g in deps.groups],
                          strides={g.name: _stride(deps, g) for g in deps.groups},
                          removable=frozenset(g.name for g in deps.groups if g.removable and layers))
    choose = lambda m: selection.choose(scores, ratio=ratio, flops=flops, scope=scope, multiple=m,  # noqa: E731
                                        rules=rules, normalize=normalize)
    if multiple != "auto":
        return choose(multiple), multiple, {}
    return _fastest_multiple(deps, choose)


def _fastest_multiple(deps: Dependencies, choose) -> tuple:
    """Choose with widths in multiples of each of AUTO_MULTIPLES[backend], time each pruned graph,
    keep the fastest (the smallest multiple unless a larger one is faster by more than 3%): how
    fast a width runs is the backend's business (XLA:CPU's convolutions ran 56 channels slower
    than 64 in our measurements), so it is measured, not assumed. A larger multiple rounds more
    coarsely; one that would remove more than OVERSHOOT of the model's FLOPs beyond what the
    smallest multiple removes is not a candidate: the target is the user's, not ours to exceed."""
    import jax

    from graphopt.cost import graph_flops
    from graphopt.implementations import time_graphs

    candidates, graphs, errors = {}, {}, []
    full = graph_flops(deps.graph)[0]
    first_flops = None  # of the first (finest) candidate
    for m in AUTO_MULTIPLES.get(jax.default_backend(), (8, 16, 32)):
        try:
            keep = choose(m)
        except PruneError as err:  # too coarse for this target
            errors.append(err)
            continue
        if any(_same(keep, other) for other in candidates.values()):
            continue
        graph = shrink(deps, keep)[0]
        flops = graph_flops(graph)[0]
        if first_flops is None:
            first_flops = flops
        elif flops < first_flops - OVERSHOOT * full:
            continue
        candidates[m], graphs[m] = keep, graph
    if not candidates:
        raise errors[0]
    if len(candidates) == 1:
        (m, keep), = candidates.items()
        return keep, m, {}
    times = {m: t for m, t in time_graphs(graphs).items() if isinstance(t, float)}
    best = min(times, key=times.get)
    first = next(iter(times))
    chosen = best if times[best] < 0.97 * times[first] else first
    return candidates[chosen], chosen, times


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# Width multiples `multiple="auto"` measures, per backend: SIMD-friendly widths on CPU, tensor-core
# tiles on GPU, the MXU's 128 lanes on TPU.
AUTO_MULTIPLES = {"cpu": (8, 16, 32), "gpu": (8, 16, 64), "cuda": (8, 16, 64), "tpu": (128,)}
OVERSHOOT = 0.05


def _stride(deps: Dependencies, group) -> int:
    """The smallest number of elements between consecutive channels of `group` in any parameter
    (flattened row-major): 1 for a layer's output channels, head_dim for attention heads."""
    strides = []
    for arg, axis in group.params:
        within = _importance.channel_stride(deps.dims[id(arg)][axis], group.dim)
        strides.append(within * int(np.prod(arg.type.shape[axis + 1:])))
    return min(strides)


def _examples(deps: Dependencies, leaves, batches, inputs) -> list | None:
    """(flat arguments, batch) per calibration batch: the parameters with the batch's inputs."""
    if batches is None:
        return None
    graph = deps.graph
    params = [i for i, a in enumerate(graph.inputs) if a.role == "param"]
    out = []
    for batch in batches:
        given = inputs(batch) if inputs is not None else batch
        given = tuple(given) if isinstance(given, (tuple, list)) else (given,)
        flat_inputs = jax.tree_util.tree_leaves(given)
        if len(flat_inputs) + len(params) != len(graph.inputs):
            raise PruneError(f"a calibration batch gives {len(flat_inputs)} input arrays; the model takes "
                             f"{len(graph.inputs) - len(params)} besides its parameters (use inputs= to pick "
                             "them out of a batch)")
        rest = iter(flat_inputs)
        out.append(([leaves[i] if a.role == "param" else next(rest) for i, a in enumerate(graph.inputs)], batch))
    return out


def _key(path) -> str:
    from graphopt.trace import key_path_name

    return key_path_name(path)


def _flat_params(params) -> dict:
    return {_key(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def _unflat_params(like, flat: dict, graph, path):
    leaves_with_paths, tree = jax.tree_util.tree_flatten_with_path(like)
    keys = [_key(p) for p, _ in leaves_with_paths]
    missing = [k for k in keys if k not in flat]
    if missing:
        raise PruneError(f"{path} lacks parameters {', '.join(missing[:5])}: it was saved from another model")
    return jax.tree_util.tree_unflatten(tree, [flat[k] for k in keys])

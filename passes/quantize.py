"""quantize: int8 / int4 / fp8 layers as a graph rewrite, each in the form fastest on the backend.

    %y = dot_general %x, %W           →    %q, %s = quantize[int8, per channel] %W      # prep (fold_params)
                                           %y = quantized_dot[scale_after] %x, %q, %s

Layers (`graphopt.quant.layers`: a dot_general, linear or convolution whose weight is computed
from parameters only) are picked by layer rules (`graphopt.quant.rules`: path regex, op, size;
first match wins; `graphopt.quant.dry_run` shows the plan); each gets its scheme or stays float.
`quantize` nodes read only parameters, so `fold_params`, which runs after this pass, computes
the codes and scales once per set of weights; the graph then takes int8 / packed int4 / fp8
weights. Static schemes (int8_static, fp8) first run the graph on the `calibration` batches to
fix one scale per activation (`graphopt.quant.observe`).

Form, by measurement: every quantized layer can run in its reference form (dequantize the weight,
then the float op) or in a kernel's (`lowering/quant_kernels.py`: scale after the matmul,
int8×int8→int32, fp8 dots). The pass times each supported form and the float layer, alone and
jitted, on the current backend, and keeps the fastest quantized form. With `prefer="speed"`
(default) a layer whose best quantized form is slower than float by more than `margin` keeps a
float weight at run time — the dequantized codes, computed once in the prep, so the numerics
are the quantized model's — and the report says the scheme gives memory, not speed, there (on
CPU, XLA writes a dequantized weight out in full before a matmul: weight-only layers are rarely
faster than float). `prefer="memory"` always keeps the codes. Layers timed alone miss what XLA
does around them (a float conv fused with its bias and ReLU, which a quantized form splits), so
the whole model is timed too, after fold_params: float, the per-layer choice, and every layer in
FLOAT_WEIGHTS (prefer="speed") or the reference form ("memory"); the faster of the last two is
kept, and the report says when the scheme still costs speed (activation rounding on CPU).
`check_model=False` skips this (three more compiles of the model).

`mode="train"`: the weights (and activations of activation-quantizing schemes) go through
`fake_quantize` (rounding with a straight-through gradient) and the float op, so `jax.grad` of
the lowered graph trains the quantized model (quantization-aware fine-tuning).

What the pass decided per layer is recorded as a `Recipe` in `graph.metadata["quantization"]`;
`recipe=` replays one (same schemes, forms and activation scales; no timing, no calibration), so
a saved artifact (`graphopt.quant.artifact`) loads into a freshly traced model.

Contract: approximate(0.25), relative to each output's largest magnitude. Quantization error is
the point of the pass; the bound catches a broken rewrite (a wrong axis gives errors of order 1),
not accuracy, which the benchmarks measure on data. NaN/±Inf inputs propagate through the
dequantized weights as through the float ones; NaN/±Inf weights are rejected when the prep
computes the scales (the error names the parameter). Activation-quantizing schemes need finite
activations: a row holding ±Inf gets an infinite dynamic scale and becomes NaN.

Example (a fake timer in which the quantized form wins):
    >>> import graphopt, jax.numpy as jnp
    >>> from graphopt.pipeline import PassSpec, run_pipeline
    >>> g = graphopt.trace(lambda p, x: x @ p["w"], {"w": jnp.ones((64, 32))}, jnp.ones((4, 64)), params_argnums=0)
    >>> fast = lambda graphs: {k: 1.0 if k == "float" else 0.5 for k in graphs}
    >>> g = run_pipeline(g, [PassSpec("quantize", ("int8",), {"timer": fast}), "fold_params", "dce"]).graph
    >>> [(n.op.name, n.params["implementation"]) for n in g.nodes]
    [('quantized_dot', None)]
    >>> [(a.path, str(a.type)) for a in g.params()]
    [('w:codes', 'i8[64,32]'), ('w:scale', 'f32[1,32]')]
    >>> g.metadata["quantization"].layers[0].scheme
    'int8'
"""

from __future__ import annotations

import numpy as np
from jax import lax

from graphopt import implementations
from graphopt.builder import Builder
from graphopt.pipeline import PassContext, approximate, register_pass, run_pipeline
from graphopt.quant.layers import find_layers, plan_sites
from graphopt.quant.ops import (dequantize_node, fake_quantize_node, quantize_node, quantized_node,
                                weight_layout, x_contracting)
from graphopt.quant.recipe import FLOAT_WEIGHTS, UNSET, LayerRecipe, Recipe
from graphopt.quant.scheme import Layout, QuantizationError, scheme_named


@register_pass("quantize", contract=approximate(0.25))
def quantize(graph, ctx, scheme="int8", *, group=None, symmetric=True, rules=(), calibration=None,
             smooth=None, prefer="speed", mode="inference", margin=0.05, timer=None, backend=None,
             recipe=None, check_model=True):
    """Quantize dot_general / linear / conv layers with parameter weights (see the module docstring)."""
    if prefer not in ("speed", "memory") or mode not in ("inference", "train"):
        raise QuantizationError(f"quantize: prefer must be 'speed' or 'memory' (got {prefer!r}), "
                                f"mode 'inference' or 'train' (got {mode!r})")
    sites = find_layers(graph)
    if recipe is not None:
        chosen = _replay_plan(sites, recipe)
    else:
        chosen = _plan(ctx, sites, scheme, rules, dict(group=group, symmetric=symmetric))
    float_model = graph.clone()[0] if check_model and recipe is None and mode == "inference" else None
    smoothing = _smooth(graph, ctx, chosen, calibration, smooth, recipe)
    act_scales = ({id(s.node): e.act_scale for s, e in chosen} if recipe is not None
                  else _calibrate(graph, chosen, calibration))
    position = {id(site.node): i for i, site in enumerate(sites)}
    chosen = [(position[id(site.node)], entry.with_act_scale(act_scales.get(id(site.node))))
              for site, entry in chosen]
    options = dict(prefer=prefer, margin=margin, timer=timer or implementations.time_graphs,
                   backend=backend or _default_backend(), measured={})
    if mode == "train":
        entries = _apply(graph, sites, chosen, ctx, train=True, **options)
    elif float_model is None:
        entries = _apply(graph, sites, chosen, ctx, **options)
    else:
        graph, entries = _whole_model_check(graph, sites, chosen, float_model, ctx, **options)
    _report_forms(ctx, options["measured"], options["backend"])
    previous = graph.metadata.get("quantization")
    graph.metadata["quantization"] = Recipe((previous.layers if previous else ()) + tuple(entries), mode,
                                            (previous.smoothing if previous else ()) + tuple(smoothing))
    return graph


def _apply(graph, sites, chosen, ctx, *, train=False, **options) -> list:
    """Rewrite the chosen layers ((index in `sites`, entry) pairs) of `graph`; the entries, each
    with the form it got."""
    entries = []
    for index, entry in chosen:
        site = sites[index]
        node = _dissolve_linear(graph, site.node)
        if train:
            _fake_quantize(graph, node, site, entry)
            ctx.count({f"fake-{entry.scheme}": 1})
        else:
            entry = _rewrite(graph, node, site, entry, **options)
            ctx.count({f"{entry.scheme}/{entry.form or 'reference'}": 1})
        entries.append(entry)
    return entries


def _whole_model_check(graph, sites, chosen, float_model, ctx, **options):
    """(graph, entries): the per-layer choice, unless the same layers all in one alternative form
    run the whole model faster by `margin` — FLOAT_WEIGHTS under prefer="speed", the reference
    form (which XLA fuses with its neighbours) under "memory". Layers timed alone miss what XLA
    does around them (a conv, its bias and ReLU fused into one kernel that a quantized form
    splits), so the models are timed whole, as they will run: after fold_params."""
    alternative = FLOAT_WEIGHTS if options["prefer"] == "speed" else None
    other = graph.clone()[0]
    entries = _apply(graph, sites, chosen, ctx, **options)
    if not entries or all(e.form == alternative for e in entries):
        return graph, entries
    other_entries = _apply(other, find_layers(other), [(i, e.with_form(alternative)) for i, e in chosen],
                           PassContext("quantize"), **options)
    label = f"all {alternative or 'reference'}"
    times = options["timer"]({"float": _as_run(float_model, copy=False), "per layer": _as_run(graph),
                              label: _as_run(other)})
    failed = [k for k, v in times.items() if not isinstance(v, (int, float))]
    if failed:
        ctx.note(f"model check skipped: {', '.join(failed)} failed to compile ({times[failed[0]]})")
        return graph, entries
    keep_other = times[label] * (1 + options["margin"]) < times["per layer"]
    best = times[label] if keep_other else times["per layer"]
    ctx.note(f"model on {options['backend']}: per-layer forms {times['per layer'] / times['float']:.2f}× the float "
             f"model's time, {label} {times[label] / times['float']:.2f}×; kept "
             f"{label if keep_other else 'the per-layer forms'}"
             + ("" if best <= times["float"] * (1 + options["margin"]) else
                f" (this scheme costs speed here: {best / times['float']:.2f}× float)"))
    return (other, other_entries) if keep_other else (graph, entries)


def _as_run(graph, copy=True):
    """`graph` (a copy of it) as it will run: parameter-only work moved to the prep."""
    return run_pipeline(graph.clone()[0] if copy else graph, ["fold_params", "dce"]).graph


def _default_backend() -> str:
    import jax

    return jax.default_backend()


# --- which layers, which scheme ------------------------------------------------------------------

def _plan(ctx, sites, scheme, rules, options) -> list:
    """(site, LayerRecipe without form) for every site a rule (or the default) quantizes."""
    layer_plan = plan_sites(sites, scheme, rules)
    for index in layer_plan.unused:
        ctx.note(f"rule {index} ({layer_plan.rules[index].describe()}) matched no layer")
    chosen = []
    for site, decision in zip(sites, layer_plan.decisions):
        if decision.scheme is None:
            ctx.count({"skipped-by-rule": 1})
            continue
        # The pass's group applies to the layers that get its scheme; a rule's scheme takes the
        # rule's options (an int8 rule beside an int4 default must not inherit group=32).
        layer_options = options if decision.rule is None else {"symmetric": options["symmetric"],
                                                               **decision.options}
        try:
            layer_scheme = scheme_named(decision.scheme, **layer_options)
        except QuantizationError as err:
            raise QuantizationError(f"{site.layer.path} ({site.node.describe()}): {err}") from None
        chosen.append((site, LayerRecipe.of(site.layer, site.occurrence, layer_scheme)))
    return chosen


def _replay_plan(sites, recipe) -> list:
    """The sites a saved recipe quantized, with its entries; an error if the graph lacks one."""
    by_key = {(site.layer.path, site.occurrence): site for site in sites}
    chosen = []
    for entry in recipe.layers:
        site = by_key.get((entry.path, entry.occurrence))
        if site is None or tuple(site.layer.shape) != tuple(entry.shape) or site.layer.op != entry.op:
            found = f"found {site.layer}" if site is not None else "no such layer in this graph"
            raise QuantizationError(f"quantize(recipe=...): the recipe quantizes {entry.op} layer {entry.path} "
                                    f"(#{entry.occurrence}, weight {tuple(entry.shape)}), {found}; trace the "
                                    "model the recipe was made for, with the same pipeline before quantize")
        chosen.append((site, entry))
    return chosen


def _smooth(graph, ctx, chosen, calibration, alpha, recipe) -> tuple:
    """SmoothQuant before the layers that quantize their activations (`graphopt.quant.smooth`);
    replayed from the recipe's statistics when it has some. The records for the new recipe."""
    replay = recipe.smoothing if recipe is not None else ()
    if alpha is None and not replay:
        return ()
    from graphopt.quant.smooth import smooth

    layers = [(s.node, s.side) for s, e in chosen if e.scheme_object.activation_mode is not None]
    if not layers:
        ctx.note("smooth: no layer quantizes its activations; nothing to smooth")
        return ()
    records = []
    if replay:
        alphas = {r["alpha"] for r in replay}
        notes = smooth(graph, layers, None, alphas.pop(), record=records,
                       activation_max=[r["activation_max"] for r in replay])
    else:
        notes = smooth(graph, layers, calibration, alpha, record=records)
    for text in notes:
        ctx.note(text)
    return tuple(records)


def _calibrate(graph, chosen, calibration) -> dict:
    """id(node) → calibrated activation scale (float) for the static-scheme layers."""
    static = [(site, e) for site, e in chosen if e.scheme_object.activation_mode == "static"]
    if not static:
        return {}
    if calibration is None:
        names = ", ".join(site.layer.path for site, _ in static[:3])
        raise QuantizationError(f"quantize: static activation scales need calibration data for {names}"
                                f"{'...' if len(static) > 3 else ''}; pass calibration=Calibration(batches) "
                                "or use a dynamic / weight-only scheme")
    from graphopt.quant.observe import observe

    values = [site.node.inputs[1 - site.side] for site, _ in static]
    names = [f"{site.layer.path} ({site.node.op.name} input)" for site, _ in static]
    scales = {}
    for (site, entry), observer in zip(static, observe(graph, values, calibration, names)):
        fmt = entry.scheme_object.activations
        lo, hi = observer.range(None if fmt.is_float else int(fmt.qmax - fmt.qmin), True)
        amax = max(abs(lo), abs(hi))
        scales[id(site.node)] = float(np.float32(amax / fmt.symmetric_max())) if amax > 0 else 1.0
    return scales


# --- rewriting -----------------------------------------------------------------------------------

def _builder(graph, node) -> Builder:
    return Builder(graph, before=node, made_by="quantize")


def _dissolve_linear(graph, node):
    """A `linear` composite (raise_ops) as its dot_general (+ bias add); the dot_general node."""
    if node.op.name != "linear":
        return node
    x, w, *bias = node.inputs
    p = node.params
    b = _builder(graph, node)
    y = b.jax(lambda x, w: lax.dot_general(x, w, p["dimension_numbers"], precision=p["precision"],
                                           preferred_element_type=p["preferred_element_type"]), x, w)
    dot = y.node
    if bias:
        y = b.jax(lambda y, bias: y + bias, y, bias[0])
    graph.replace_all_uses(node.output, y)
    graph.erase(node)
    return dot


def _act_scale_value(graph, node, scale: float | None):
    if scale is None:
        return None
    dtype = np.promote_types(node.inputs[0].type.dtype, np.float32)
    return _builder(graph, node).const(np.asarray(scale, dtype))


def _rewrite(graph, node, site, entry, *, prefer, margin, timer, backend, measured):
    """Replace `node` by its quantized form (the entry's, when it comes from a recipe; else the
    fastest by measurement); the entry with the form taken."""
    scheme, side, kind = entry.scheme_object, site.side, site.kind
    weight = node.inputs[side]
    op_params = dict(node.params)
    try:
        codes = quantize_node(_builder(graph, node), weight, scheme, weight_side=side,
                              dimension_numbers=op_params["dimension_numbers"], conv=kind == "quantized_conv")
    except QuantizationError as err:
        raise QuantizationError(f"{site.layer.path} ({node.describe()}, weight {weight.type}): {err}") from None
    act = _act_scale_value(graph, node, entry.act_scale)
    qvalue = quantized_node(_builder(graph, node), kind, node.inputs[1 - side], codes, scheme,
                            weight=weight.type, weight_side=side, op_params=op_params, act_scale=act)
    form = entry.form
    if form == UNSET:
        form = _choose_form(node, qvalue.node, site, entry, prefer, margin, backend, timer, measured)
    elif form != FLOAT_WEIGHTS and implementations.find(kind, form, backend) is None:
        form = None  # the recipe's kernel does not exist on this backend: same values, reference form
    if form == FLOAT_WEIGHTS:
        # Slower than float on this backend: keep a float weight at run time (the dequantized
        # codes, computed once in the prep); the codes still define the numerics.
        graph.erase(qvalue.node)
        if act is not None:
            graph.erase(act.node)
        layout = weight_layout(scheme, kind, weight.type, side, op_params)
        node.set_input(side, dequantize_node(_builder(graph, node), codes, scheme, layout, weight.type))
        if scheme.activation_mode is not None:  # the activations are still quantized: fake-quantize them
            _fake_activation(graph, node, side, entry)
        return entry.with_form(FLOAT_WEIGHTS)
    qvalue.node.params = {**qvalue.node.params, "implementation": form}
    graph.replace_all_uses(node.outputs[0], qvalue)
    graph.erase(node)
    return entry.with_form(form)


def _choose_form(float_node, qnode, site, entry, prefer, margin, backend, timer, measured):
    """The form `qnode` runs in: the fastest quantized one, or FLOAT_WEIGHTS when that is faster
    by `margin` and `prefer` is "speed". Each distinct layer signature is measured once: the float
    layer, every supported quantized form, and FLOAT_WEIGHTS (the float op on the dequantized
    weight, after the activation's rounding for activation-quantizing schemes)."""
    key = (tuple(float_node.input_types), repr(sorted(qnode.params.items())))
    if key not in measured:
        forms = [None] + [k.implementation for k in implementations.available(qnode.op.name, backend)
                          if k.unsupported(qnode.input_types, qnode.params) is None]
        graphs = {"float": implementations.single_node_graph(float_node)}
        for form in forms:
            graphs[form] = implementations.single_node_graph(qnode, {**qnode.params, "implementation": form})
        if entry.scheme_object.activation_mode is not None:
            graphs[FLOAT_WEIGHTS] = graph = implementations.single_node_graph(float_node)
            _fake_activation(graph, next(graph.nodes), site.side, entry)
        times = timer(graphs)
        failed = {k: v for k, v in times.items() if not isinstance(v, (int, float))}
        times = {k: v for k, v in times.items() if k not in failed}
        if None not in times or "float" not in times:
            raise QuantizationError(f"{site.layer.path} ({float_node.describe()}): {entry.scheme} cannot run on "
                                    f"{backend}: {failed.get(None) or failed.get('float')}; leave this layer "
                                    "float with a rule (scheme=None) or pick another scheme")
        times.setdefault(FLOAT_WEIGHTS, times["float"])
        best = min((f for f in times if f not in ("float", FLOAT_WEIGHTS)), key=times.get)
        if prefer == "speed" and times[FLOAT_WEIGHTS] * (1 + margin) < times[best]:
            best = FLOAT_WEIGHTS
        measured[key] = (best, times, qnode)
    return measured[key][0]


def _report_forms(ctx, measured, backend) -> None:
    for form, times, qnode in measured.values():
        shape = "×".join(map(str, qnode.input_types[0].shape))
        others = ", ".join(f"{k or 'reference'} {v * 1e6:.0f} µs" for k, v in times.items())
        if form == FLOAT_WEIGHTS:
            verdict = "memory, not speed: runs on the dequantized weight (no quantized form is faster)"
        elif times[form] < times["float"]:
            verdict = "faster than float"
        else:
            verdict = f"memory, not speed: {times[form] / times['float']:.2f}× the float layer's time"
        ctx.note(f"{qnode.op.name} x {shape} on {backend}: {form or 'reference'}, {verdict}; {others}")


# --- training ------------------------------------------------------------------------------------

def _fake_quantize(graph, node, site, entry) -> None:
    scheme, side = entry.scheme_object, site.side
    weight = node.inputs[side]
    layout = weight_layout(scheme, site.kind, weight.type, side, dict(node.params))
    fq = fake_quantize_node(_builder(graph, node), weight, scheme.weights.name, layout, symmetric=scheme.symmetric)
    node.set_input(side, fq)
    if scheme.activation_mode is not None:
        _fake_activation(graph, node, side, entry)


def _fake_activation(graph, node, side, entry) -> None:
    kind = "quantized_conv" if node.op.name == "conv_general_dilated" else "quantized_dot"
    x = node.inputs[1 - side]
    probe = {"op_params": tuple(dict(node.params).items()), "weight_side": side}
    static = entry.act_scale is not None
    layout = Layout(tuple(range(x.type.ndim))) if static else Layout(x_contracting(probe, kind))
    scale = _act_scale_value(graph, node, entry.act_scale)
    node.set_input(1 - side, fake_quantize_node(_builder(graph, node), x, entry.scheme_object.activations.name,
                                                layout, scale=scale))

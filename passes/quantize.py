"""quantize: int8 / int4 / fp8 layers as a graph rewrite, each in the form fastest on the backend.

    %y = dot_general %x, %W           →    %q, %s = quantize[int8, per channel] %W      # prep (fold_params)
                                           %y = quantized_dot[scale_after] %x, %q, %s

Any dot_general or convolution whose weight operand is computed from parameters only (a layer)
is a candidate; layer rules (`graphopt.quant.rules`: path regex, op, size; first match wins)
pick its scheme or leave it float. `quantize` nodes read only parameters, so `fold_params`, which
runs after this pass, computes the codes and scales once per set of weights; the graph then takes
int8 / packed int4 / fp8 weights. Static schemes (int8_static, fp8) first run the graph on the
`calibration` batches to fix one scale per activation (`graphopt.quant.observe`).

Form, by measurement: every quantized layer can run in its reference form (dequantize the weight,
then the float op) or in a kernel's (`lowering/quant_kernels.py`: scale after the matmul,
int8×int8→int32, fp8 dots). The pass times each supported form and the float layer, alone and
jitted, on the current backend, and keeps the fastest quantized form. With `prefer="speed"`
(default) a layer whose best quantized form is slower than float by more than `margin` keeps a
float weight at run time — the dequantized codes, computed once in the prep, so the numerics
are the quantized model's — and the report says the scheme gives memory, not speed, there (on
CPU, XLA writes a dequantized weight out in full before a matmul: batch-1 weight-only layers are
slower than float). `prefer="memory"` always keeps the codes.

`mode="train"`: the weights (and activations of activation-quantizing schemes) go through
`fake_quantize` (rounding with a straight-through gradient) and the float op, so `jax.grad` of
the lowered graph trains the quantized model (quantization-aware fine-tuning).

Contract: approximate(0.25), relative to each output's largest magnitude. Quantization error is
the point of the pass; the bound catches a broken rewrite (a wrong axis gives errors of order 1),
not accuracy, which the benchmarks measure on data. NaN/±Inf inputs propagate through the
dequantized weights as through the float ones; dynamic activation scales of a row holding ±Inf
are Inf, which makes that row NaN (document: activation-quantizing schemes need finite inputs).

Example (a fake timer in which the quantized form wins):
    >>> import graphopt, jax.numpy as jnp
    >>> from graphopt.pipeline import PassSpec, run_pipeline
    >>> g = graphopt.trace(lambda p, x: x @ p["w"], {"w": jnp.ones((64, 32))}, jnp.ones((4, 64)), params_argnums=0)
    >>> fast = lambda graphs: {k: 1.0 if k == "float" else 0.5 for k in graphs}
    >>> g = run_pipeline(g, [PassSpec("quantize", ("int8",), {"timer": fast}), "fold_params", "dce"]).graph
    >>> [(n.op.name, n.params["implementation"]) for n in g.nodes]
    [('quantized_dot', None)]
    >>> [(a.path, str(a.type)) for a in g.params()]
    [('w:quantize', 'i8[64,32]'), ('w:quantize#2', 'f32[1,32]')]
"""

from __future__ import annotations

import numpy as np

from graphopt import implementations
from graphopt.ops import CONSTANT, constant_params
from graphopt.pipeline import approximate, register_pass
from graphopt.quant.ops import (dequantize_node, fake_quantize_node, quantize_node, quantized_node,
                                weight_layout, x_contracting)
from graphopt.quant.rules import Layer, plan
from graphopt.quant.scheme import Layout, QuantizationError, scheme_named

KINDS = {"dot_general": ("quantized_dot", "dot_general"), "conv_general_dilated": ("quantized_conv", "conv")}


@register_pass("quantize", contract=approximate(0.25))
def quantize(graph, ctx, scheme="int8", *, group=None, symmetric=True, rules=(), calibration=None,
             prefer="speed", mode="inference", margin=0.05, timer=None, backend=None):
    """Quantize dot_general / conv layers with parameter weights (see the module docstring)."""
    if prefer not in ("speed", "memory") or mode not in ("inference", "train"):
        raise QuantizationError(f"quantize: prefer must be 'speed' or 'memory' (got {prefer!r}), "
                                f"mode 'inference' or 'train' (got {mode!r})")
    layers = _layers(graph)
    decisions, unused = plan([layer for layer, _, _ in layers], rules, scheme)
    for index in unused:
        ctx.note(f"rule {index} ({_rule_text(rules[index])}) matched no layer")
    chosen = []
    for (layer, node, side), decision in zip(layers, decisions):
        if decision.scheme is None:
            ctx.count({"skipped-by-rule": 1})
            continue
        options = {"group": group, "symmetric": symmetric, **decision.options}
        try:
            layer_scheme = scheme_named(decision.scheme, **options)
        except QuantizationError as err:
            raise QuantizationError(f"{layer.path} ({node.op.name}): {err}") from None
        chosen.append((layer, node, side, layer_scheme))
    act_scales = _calibrate(graph, chosen, calibration)
    timer = timer or (lambda graphs: implementations.time_graphs(graphs))
    backend = backend or _default_backend()
    measured: dict = {}
    for layer, node, side, layer_scheme in chosen:
        if mode == "train":
            _fake_quantize(graph, node, side, layer_scheme, act_scales.get(id(node)))
            ctx.count({f"fake-{layer_scheme.name}": 1})
            continue
        outcome = _rewrite(graph, node, side, layer, layer_scheme, act_scales.get(id(node)), prefer,
                           margin, timer, backend, measured)
        ctx.count({f"{layer_scheme.name}/{outcome}": 1})
    _report_forms(ctx, measured, backend)
    return graph


def _default_backend() -> str:
    import jax

    return jax.default_backend()


def _layers(graph) -> list[tuple[Layer, object, int]]:
    """(layer, node, weight operand index) for each top-level dot / conv with one parameter-derived
    float operand (the weight) and one that is not (the activation)."""
    sources = _param_sources(graph)
    found = []
    for node in graph.nodes:
        kind = KINDS.get(node.op.name)
        if kind is None:
            continue
        derived = [sources.get(id(v)) for v in node.inputs]
        if (derived[0] is None) == (derived[1] is None):
            continue
        side = 0 if derived[0] is not None else 1
        if kind[1] == "conv" and side == 0:
            continue  # a conv whose *input* is the parameter: not a layer
        if not all(np.issubdtype(v.type.dtype, np.floating) for v in node.inputs):
            continue
        found.append((Layer(derived[side].path or f"input {derived[side].index}", kind[1],
                            tuple(node.inputs[side].type.shape)), node, side))
    return found


def _param_sources(graph) -> dict:
    """id(value) → the (largest) parameter it is computed from, for values computed from
    parameters and constants only (outside regions, without effects)."""
    sources = {id(a): a for a in graph.params()}
    constant = set()
    for node in graph.nodes:
        if node.op.name == "constant":
            constant.add(id(node.outputs[0]))
            continue
        if node.effects or node.regions or not node.inputs:
            continue
        params = [sources.get(id(v)) for v in node.inputs]
        if any(p is None and id(v) not in constant for p, v in zip(params, node.inputs)):
            continue
        params = [p for p in params if p is not None]
        if not params:
            constant.update(id(v) for v in node.outputs)
            continue
        largest = max(params, key=lambda a: a.type.nbytes)
        for value in node.outputs:
            sources[id(value)] = largest
    return sources


def _rule_text(rule) -> str:
    return rule.describe() if hasattr(rule, "describe") else repr(rule)


def _calibrate(graph, chosen, calibration) -> dict:
    """id(node) → calibrated activation scale (float) for the static-scheme layers."""
    static = [(layer, node, side, s) for layer, node, side, s in chosen if s.activation_mode == "static"]
    if not static:
        return {}
    if calibration is None:
        names = ", ".join(layer.path for layer, *_ in static[:3])
        raise QuantizationError(f"quantize: static activation scales need calibration data for {names}"
                                f"{'...' if len(static) > 3 else ''}; pass calibration=Calibration(batches) "
                                "or use a dynamic / weight-only scheme")
    from graphopt.quant.observe import observe

    values = [node.inputs[1 - side] for _, node, side, _ in static]
    names = [f"{layer.path} ({node.op.name} input)" for layer, node, _, _ in static]
    observers = observe(graph, values, calibration, names)
    scales = {}
    for (layer, node, side, s), observer in zip(static, observers):
        fmt = s.activations
        levels = None if fmt.is_float else int(fmt.qmax - fmt.qmin)
        lo, hi = observer.range(levels, True)
        amax = max(abs(lo), abs(hi))
        scales[id(node)] = amax / fmt.symmetric_max() if amax > 0 else 1.0
    return scales


def _act_scale_value(graph, node, scale: float | None):
    if scale is None:
        return None
    dtype = np.promote_types(node.inputs[0].type.dtype, np.float32)
    return graph.add_node(CONSTANT, [], constant_params(np.asarray(scale, dtype)), before=node).outputs[0]


def _rewrite(graph, node, side, layer, scheme, act_scale, prefer, margin, timer, backend, measured) -> str:
    kind = KINDS[node.op.name][0]
    weight = node.inputs[side]
    op_params = dict(node.params)
    try:
        codes = quantize_node(graph_at(graph, node), weight, scheme, weight_side=side,
                              dimension_numbers=op_params["dimension_numbers"], conv=kind == "quantized_conv")
    except QuantizationError as err:
        raise QuantizationError(f"{layer.path} ({node.op.name}, weight {weight.type}): {err}") from None
    act = _act_scale_value(graph, node, act_scale)
    qvalue = quantized_node(graph_at(graph, node), kind, node.inputs[1 - side], codes, scheme,
                            weight=weight.type, weight_side=side, op_params=op_params, act_scale=act)
    form, times = _choose_form(node, qvalue.node, backend, timer, measured)
    if prefer == "speed" and times[form] > times["float"] * (1 + margin):
        # Slower than float on this backend: keep a float weight at run time (the dequantized
        # codes, computed once in the prep); the codes still define the numerics.
        graph.erase(qvalue.node)
        if act is not None:
            graph.erase(act.node)
        layout = weight_layout(scheme, kind, weight.type, side, op_params)
        node.set_input(side, dequantize_node(graph_at(graph, node), codes, scheme, layout, weight.type))
        if scheme.activation_mode is not None:  # the activations are still quantized: fake-quantize them
            _fake_activation(graph, node, side, scheme, act_scale)
        return "float-weights"
    qvalue.node.params = {**qvalue.node.params, "implementation": form}
    graph.replace_all_uses(node.outputs[0], qvalue)
    graph.erase(node)
    return form or "reference"


def graph_at(graph, node):
    from graphopt.builder import Builder

    return Builder(graph, before=node, made_by="quantize")


def _choose_form(float_node, qnode, backend, timer, measured):
    """(fastest quantized form, {form or "float": seconds}), measured once per layer signature."""
    key = (tuple(float_node.input_types), repr(sorted(qnode.params.items())))
    if key not in measured:
        forms = [None] + [k.implementation for k in implementations.available(qnode.op.name, backend)
                          if k.unsupported(qnode.input_types, qnode.params) is None]
        graphs = {"float": implementations.single_node_graph(float_node)}
        for form in forms:
            graphs[form] = implementations.single_node_graph(qnode, {**qnode.params, "implementation": form})
        times = timer(graphs)
        failed = {k: v for k, v in times.items() if not isinstance(v, (int, float))}
        times = {k: v for k, v in times.items() if k not in failed}
        if None not in times or "float" not in times:
            raise QuantizationError(f"{qnode.op.name}: the reference form failed to compile: "
                                    f"{failed.get(None) or failed.get('float')}")
        measured[key] = (min((f for f in times if f != "float"), key=times.get), times, qnode)
    form, times, _ = measured[key]
    return form, times


def _report_forms(ctx, measured, backend) -> None:
    for form, times, qnode in measured.values():
        quantized = times[form]
        shape = "×".join(map(str, qnode.input_types[0].shape))
        others = ", ".join(f"{k or 'reference'} {v * 1e6:.0f} µs" for k, v in times.items())
        verdict = ("faster than float" if quantized < times["float"]
                   else "memory, not speed (slower than float)")
        ctx.note(f"{qnode.op.name} x {shape} on {backend}: best {form or 'reference'}, {verdict}; {others}")


def _fake_quantize(graph, node, side, scheme, act_scale) -> None:
    kind = KINDS[node.op.name][0]
    weight = node.inputs[side]
    layout = weight_layout(scheme, kind, weight.type, side, dict(node.params))
    fq = fake_quantize_node(graph_at(graph, node), weight, scheme.weights.name, layout, symmetric=scheme.symmetric)
    node.set_input(side, fq)
    if scheme.activation_mode is not None:
        _fake_activation(graph, node, side, scheme, act_scale)


def _fake_activation(graph, node, side, scheme, act_scale) -> None:
    kind = KINDS[node.op.name][0]
    x = node.inputs[1 - side]
    params = {**dict(node.params)}
    probe = {"op_params": tuple(params.items()), "weight_side": side}
    layout = Layout(tuple(range(x.type.ndim))) if act_scale is not None else Layout(x_contracting(probe, kind))
    scale = _act_scale_value(graph, node, act_scale)
    node.set_input(1 - side, fake_quantize_node(graph_at(graph, node), x, scheme.activations.name, layout,
                                                    scale=scale))

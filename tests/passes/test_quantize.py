"""quantize: every scheme on linen, nnx, Equinox and hand-written layers computes the float model
with rounded weights (and activations); forms are chosen by the timer and show in the compiled HLO;
rules, recipes, train mode and bad input."""

import re
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.errors import PrepError
from graphopt.pipeline import PassSpec, run_pipeline
from graphopt.quant import Calibration, Rule
from graphopt.quant.scheme import FORMATS, Layout, QuantizationError, compute_scale, dequantize, quantize
from graphopt.testing import assert_equivalent

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared models
from models import eqx_models, linen_models, nnx_models  # noqa: E402

CLEANUP = ["canonicalize", "fold_constants", "cse"]
STATIC = ("int8_static", "fp8", "fp8_e5m2")
SCHEMES = ("int8", "int4", "int8_dynamic", "int8_static", "fp8", "fp8_e5m2")


def prefer(form):
    """A fake timer under which `form` (a kernel name, None: reference, "float") is fastest."""
    return lambda graphs: {k: 0.1 if k == form else 1.0 for k in graphs}


def quantized(fn, args, scheme, *, params_argnums=None, timer=prefer(None), pipeline=CLEANUP, run_args=None,
              **options):
    """(pipeline result, output) of `fn` traced on `args` and quantized; `run_args`: the lowered
    function's arguments when they differ from `args` (nnx and Equinox modules: state first)."""
    run_args = args if run_args is None else run_args
    graph = graphopt.trace(fn, *args, params_argnums=params_argnums)
    if scheme in STATIC and "calibration" not in options:
        options["calibration"] = Calibration([run_args], progress=False)
    spec = PassSpec("quantize", (scheme,), {"timer": timer, **options})
    result = run_pipeline(graph, [*pipeline, spec, "fold_params", "dce"], debug=True)
    return result, jax.jit(graphopt.lower(result.graph))(*graphopt.prepare(result.graph, *run_args))


def simulated(fn, args, scheme, *, params_argnums=None, pipeline=CLEANUP, run_args=None, **options):
    """The float model with rounded weights / activations: the train-mode graph's forward pass."""
    run_args = args if run_args is None else run_args
    graph = graphopt.trace(fn, *args, params_argnums=params_argnums)
    if scheme in STATIC and "calibration" not in options:
        options["calibration"] = Calibration([run_args], progress=False)
    spec = PassSpec("quantize", (scheme,), {**options, "mode": "train"})
    graph = run_pipeline(graph, [*pipeline, spec, "dce"], debug=True).graph
    return jax.jit(graphopt.lower(graph))(*run_args)


def ops(graph):
    return [n.op.name for n in graph.nodes]


def close(actual, expected, rtol=2e-5):
    """Equal up to float accumulation order, relative to the output's largest magnitude."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.abs(actual - expected).max() <= rtol * np.abs(expected).max() + 1e-30


# --- what the rewrite computes -------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("make", [linen_models.make_mlp, nnx_models.make_mlp, eqx_models.make_mlp],
                         ids=["linen", "nnx", "equinox"])
def test_scheme_is_the_float_model_on_rounded_values(make, scheme):
    case = make()
    options = {"group": 16} if scheme == "int4" else {}
    result, out = quantized(case.target, case.trace_args, scheme, run_args=case.args, **case.trace_kwargs,
                            **options)
    assert "dot_general" not in ops(result.graph)  # every layer quantized (reference form chosen)
    close(out, simulated(case.target, case.trace_args, scheme, run_args=case.args, **case.trace_kwargs,
                         **options))
    float_out = case.fn(*case.args)
    error = float(jnp.abs(out - float_out).max() / jnp.abs(float_out).max())
    assert 0 < error < {"int4": 0.3, "fp8_e5m2": 0.3}.get(scheme, 0.1), error


def test_rounded_weights_match_an_independent_numpy_quantizer():
    """int8 per output channel of a Dense kernel [in, out]: scale = max|column| / 127."""
    w = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    _, out = quantized(lambda p, x: x @ p, (w, x), "int8", params_argnums=0)
    scale = np.abs(w).max(axis=0, keepdims=True) / 127
    expected = x.astype(np.float64) @ (np.round(w / scale) * scale)
    close(out, expected, rtol=1e-6)


def test_int4_groups_run_along_the_contracting_axis():
    w = np.ones((64, 4), np.float32)
    w[:32] *= 1e-3  # the first group is tiny: per-channel scales would round it to zero
    x = np.ones((1, 64), np.float32)
    _, out = quantized(lambda p, x: x @ p, (w, x), "int4", params_argnums=0, group=32)
    close(out, x @ w, rtol=1e-6)


def test_conv_layers_linen_and_equinox():
    case = linen_models.make_cnn_bn()
    for scheme in ("int8", "int4", "int8_dynamic", "int8_static", "fp8"):
        # int4 groups run along the input channels: the RGB stem's 3 do not split into groups of 8
        options = {"group": 8, "rules": [Rule(path="Conv_0", scheme="int8")]} if scheme == "int4" else {}
        result, out = quantized(case.target, case.trace_args, scheme, **options)
        assert "conv_general_dilated" not in ops(result.graph), scheme
        close(out, simulated(case.target, case.trace_args, scheme, **options))
    eqx_case = eqx_models.make_cnn()
    result, out = quantized(eqx_case.target, eqx_case.trace_args, "int8", run_args=eqx_case.args)
    assert ops(result.graph).count("quantized_conv") == 2
    close(out, simulated(eqx_case.target, eqx_case.trace_args, "int8", run_args=eqx_case.args))


def test_weight_on_the_left_and_batched_einsums():
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 3)).astype(np.float32)
    result, out = quantized(lambda w, x: w @ x, (w, x), "int8_dynamic", params_argnums=0)  # equinox's W @ x
    assert ops(result.graph) == ["quantized_dot"]
    close(out, simulated(lambda w, x: w @ x, (w, x), "int8_dynamic", params_argnums=0))
    heads = rng.standard_normal((16, 4, 8)).astype(np.float32)  # d -> (heads, head dim)
    tokens = rng.standard_normal((2, 5, 16)).astype(np.float32)
    fn = lambda p, x: jnp.einsum("btd,dhk->bthk", x, p)  # noqa: E731
    result, out = quantized(fn, (heads, tokens), "int8", params_argnums=0)
    assert ops(result.graph) == ["quantized_dot"]
    close(out, simulated(fn, (heads, tokens), "int8", params_argnums=0))


@pytest.mark.parametrize("group", [16, 64, 128])
def test_int4_groups_span_a_contraction_over_several_axes(group):
    """An attention output projection [heads, head_dim, out] contracts over 4 × 32 = 128 elements:
    groups of 64 are two heads' worth, of 16 half a head, of 128 the whole (per channel)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 32, 16)).astype(np.float32)
    w[:2] *= 1e-3  # heads 0 and 1 are tiny: one scale for all four would round them to zero
    x = rng.standard_normal((2, 3, 4, 32)).astype(np.float32)
    fn = lambda w, x: jnp.einsum("bthk,hkd->btd", x, w)  # noqa: E731
    result, out = quantized(fn, (w, x), "int4", params_argnums=0, group=group)
    [node] = result.graph.nodes
    scale = next(a for a in result.graph.params() if a.path.endswith(":scale"))
    assert scale.type.shape == {16: (4, 2, 1, 16), 64: (2, 1, 1, 16), 128: (1, 1, 16)}[group]
    close(out, simulated(fn, (w, x), "int4", params_argnums=0, group=group))
    only_tiny = x.copy()
    only_tiny[:, :, 2:] = 0  # what the tiny heads contribute, through the quantized model
    run = jax.jit(graphopt.lower(result.graph))
    got = run(*graphopt.prepare(result.graph, w, only_tiny))
    expected = np.einsum("bthk,hkd->btd", only_tiny, w)
    relative = np.abs(got - expected).max() / np.abs(expected).max()
    assert (relative < 0.3) == (group < 128), relative  # groups within heads keep the tiny ones


def test_linear_ops_raised_by_raise_ops_are_quantized():
    case = linen_models.make_mlp()
    pipeline = CLEANUP + ["raise_ops"]
    graph = run_pipeline(graphopt.trace(case.target, *case.trace_args), pipeline).graph
    assert ops(graph).count("linear") == 3
    result, out = quantized(case.target, case.trace_args, "int8", pipeline=pipeline)
    assert "linear" not in ops(result.graph) and ops(result.graph).count("quantized_dot") == 3
    close(out, simulated(case.target, case.trace_args, "int8"))


@pytest.mark.parametrize("scheme", ["int8", "int4", "int8_dynamic", "fp8"])
def test_bfloat16_models(scheme):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.bfloat16)
    options = {"group": 32} if scheme == "int4" else {}
    result, out = quantized(lambda w, x: x @ w, (w, x), scheme, params_argnums=0, **options)
    assert out.dtype == jnp.bfloat16 and "quantized_dot" in ops(result.graph)  # (+ the fp8 act scale)
    close(out, simulated(lambda w, x: x @ w, (w, x), scheme, params_argnums=0, **options), rtol=1e-2)


def test_a_scheme_the_backend_cannot_compile_names_the_layer():
    fn, args = _mlp()
    broken = lambda graphs: {k: RuntimeError("no fp8 here") if k is None else 1.0 for k in graphs}  # noqa: E731
    with pytest.raises(QuantizationError, match=r"params/layers_0/kernel .*fp8 cannot run on cpu: no fp8 here"):
        quantized(fn, args, "fp8", timer=broken, pipeline=[])


def test_nan_and_inf_inputs_propagate_through_weight_only_layers():
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    x = np.array([[np.nan] + [1.0] * 7, [np.inf] + [0.0] * 7, [1.0] * 8], np.float32)
    _, out = quantized(lambda p, x: x @ p, (w, x), "int8", params_argnums=0)
    assert np.isnan(out[0]).all() and not np.isfinite(out[1]).any() and np.isfinite(out[2]).all()


# --- forms ---------------------------------------------------------------------------------------

def _mlp():
    model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(32)])
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 48)), jnp.float32)
    return model.apply, (model.init(jax.random.key(0), x), x)


def _hlo(result, args) -> str:
    prepared = graphopt.prepare(result.graph, *args)
    return jax.jit(graphopt.lower(result.graph)).lower(*prepared).compile().as_text()


def _dots(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines() if re.search(r"\bdot\(", line)]


# What each form compiles to on XLA:CPU for the first layer (x f32[16,48], codes s8[48,64]):
#   reference    the dequantized weight f32[48,64] (convert × scale) written out, a f32 dot
#   scale_after  the codes converted to f32[48,64] (no scale there), a f32 dot, × scale on f32[16,64]
#   integer      an s8 × s8 dot accumulating in s32
FORMS = {
    None: [r"f32\[48,64\]\{1,0\} multiply\(", r"f32\[16,64\]\{1,0\} dot\("],
    "scale_after": [r"f32\[48,64\]\{1,0\} convert\(", r"f32\[16,64\]\{1,0\} dot\(",
                    r"f32\[16,64\]\{1,0\} multiply\("],
    "integer": [r"s32\[16,64\]\{1,0\} dot\("],
}
NOT_IN = {None: [r"s32\["], "scale_after": [r"f32\[48,64\]\{1,0\} multiply\(", r"s32\["],
          "integer": [r"f32\[48,64\]"]}


@pytest.mark.parametrize("scheme,form", [("int8", "scale_after"), ("int8_dynamic", "integer"),
                                         ("int8_static", "integer"), ("int8", None)])
def test_the_chosen_form_is_what_xla_compiles_on_cpu(scheme, form):
    fn, args = _mlp()
    result, _ = quantized(fn, args, scheme, timer=prefer(form), pipeline=[])
    assert [e.form for e in result.graph.metadata["quantization"].layers] == [form, form]
    hlo = _hlo(result, args)
    assert re.search(r"s8\[48,64\]\{1,0\} parameter", hlo), "the int8 codes are a parameter of the program"
    assert len(_dots(hlo)) == 2
    for pattern in FORMS[form]:
        assert re.search(pattern, hlo), pattern
    for pattern in NOT_IN[form]:
        assert not re.search(pattern, hlo), pattern


def test_float_weights_when_float_is_faster():
    fn, args = _mlp()
    result, out = quantized(fn, args, "int8", timer=prefer("float"), pipeline=[])
    assert ops(result.graph).count("dot_general") == 2 and "quantized_dot" not in ops(result.graph)
    hlo = _hlo(result, args)
    assert "s8[" not in hlo, "no int8 at run time: the prep dequantized the codes once"
    assert {a.path.rsplit(":", 1)[-1] for a in result.graph.params()} >= {"dequantize"}
    close(out, simulated(fn, args, "int8"))  # the numerics are still the quantized model's
    notes = " ".join(next(r for r in result.report.records if r.name == "quantize").notes)
    assert "memory, not speed" in notes


@pytest.mark.parametrize("prefer_,alternative", [("speed", "float-weights"), ("memory", None)])
def test_the_whole_model_is_timed_too(prefer_, alternative):
    """Layers timed alone can each win and the model still lose (XLA fuses a float layer with its
    neighbours): the same layers all in the alternative form are timed whole, as they will run."""
    fn, args = _mlp()
    seen = []

    def timer(graphs):
        if "per layer" in graphs:  # the whole models: the per-layer choice is the slowest
            seen.append({k: sorted(a.path for a in g.params()) for k, g in graphs.items()})
            return {k: {"float": 1.0, "per layer": 1.5}.get(k, 1.1) for k in graphs}
        return prefer("integer")(graphs)

    result, out = quantized(fn, args, "int8_dynamic", timer=timer, pipeline=[], prefer=prefer_)
    assert [e.form for e in result.graph.metadata["quantization"].layers] == [alternative] * 2
    label = f"all {alternative or 'reference'}"
    assert any(p.endswith(":codes") for p in seen[0]["per layer"])  # timed after fold_params
    assert not any(p.endswith(":codes") for p in seen[0]["float"])
    notes = " ".join(next(r for r in result.report.records if r.name == "quantize").notes)
    assert f"per-layer forms 1.50× the float model's time, {label} 1.10×; kept {label}" in notes
    assert "this scheme costs speed here: 1.10× float" in notes
    close(out, simulated(fn, args, "int8_dynamic"), rtol=1e-4)


def test_prefer_memory_keeps_the_codes_even_when_slower():
    fn, args = _mlp()
    result, _ = quantized(fn, args, "int8", timer=prefer("float"), pipeline=[], prefer="memory")
    assert ops(result.graph).count("quantized_dot") == 2
    assert sorted(str(a.type.dtype) for a in result.graph.params() if a.path.endswith(":codes")) == ["int8"] * 2


def test_measured_forms_on_this_backend_keep_the_numerics():
    """The real timer: whatever it picks, the result is the quantized model's."""
    fn, args = _mlp()
    for scheme in ("int8", "int8_dynamic"):
        result, out = quantized(fn, args, scheme, timer=None, pipeline=[])
        forms = [e.form for e in result.graph.metadata["quantization"].layers]
        assert all(f in (None, "scale_after", "integer", "float-weights") for f in forms), forms
        close(out, simulated(fn, args, scheme), rtol=1e-4)


def test_one_measurement_per_layer_signature():
    calls = []

    def timer(graphs):
        calls.append(sorted(map(str, graphs)))
        return prefer(None)(graphs)

    w = jnp.ones((16, 16))
    fn = lambda p, x: x @ p["a"] @ p["b"] @ p["c"]  # noqa: E731
    quantized(fn, ({"a": w, "b": w, "c": w}, jnp.ones((2, 16))), "int8", params_argnums=0, timer=timer)
    assert calls == [["None", "float", "scale_after"],  # one layer signature, then the whole models
                     ["all float-weights", "float", "per layer"]]
    # activation-quantizing schemes also time the float op after the activation's rounding
    quantized(fn, ({"a": w, "b": w, "c": w}, jnp.ones((2, 16))), "int8_dynamic", params_argnums=0, timer=timer)
    assert calls[2] == ["None", "float", "float-weights", "integer"]


def test_float_weights_of_activation_schemes_are_timed_with_their_rounding():
    """fp8 activations are rounded in software on CPU: float weights alone would look free."""
    fn, args = _mlp()
    times = {"float": 1.0, "float-weights": 3.0, None: 2.0, "fp8": 2.5}
    slow_rounding = lambda graphs: {k: times.get(k, 1.0) for k in graphs}  # noqa: E731
    result, _ = quantized(fn, args, "fp8", timer=slow_rounding, pipeline=[])
    assert [e.form for e in result.graph.metadata["quantization"].layers] == [None, None]
    notes = " ".join(next(r for r in result.report.records if r.name == "quantize").notes)
    assert "2.00× the float layer's time" in notes


# --- rules, recipes, reports ---------------------------------------------------------------------

def test_rules_pick_schemes_and_unused_rules_are_reported():
    case = linen_models.make_mlp()
    rules = [Rule(path=r"Dense_2", scheme=None), Rule(path=r"Dense_0", scheme="int4", options={"group": 8}),
             Rule(path=r"no_such_layer", scheme="int8")]
    result, _ = quantized(case.target, case.trace_args, "int8_dynamic", rules=rules)
    layers = {e.path: e.scheme for e in result.graph.metadata["quantization"].layers}
    assert layers == {"params/Dense_0/kernel": "int4", "params/Dense_1/kernel": "int8_dynamic"}
    assert ops(result.graph).count("dot_general") == 1  # Dense_2 left float
    record = next(r for r in result.report.records if r.name == "quantize")
    assert any("rule 2" in n and "matched no layer" in n for n in record.notes)
    assert record.fired["skipped-by-rule"] == 1


def test_recipe_replays_without_timing_or_calibration():
    fn, args = _mlp()
    first, out = quantized(fn, args, "int8_static", timer=prefer("integer"), pipeline=[])
    recipe = first.graph.metadata["quantization"]

    def no_timer(graphs):
        raise AssertionError("a replay must not measure")

    graph = graphopt.trace(fn, *args)
    spec = PassSpec("quantize", options={"recipe": recipe, "timer": no_timer})
    replay = run_pipeline(graph, [spec, "fold_params", "dce"]).graph
    assert replay.metadata["quantization"] == recipe
    assert str(replay) == str(first.graph)
    assert_equivalent(jax.jit(graphopt.lower(replay))(*graphopt.prepare(replay, *args)), out, exact=True)


def test_recipe_for_another_model_is_rejected_naming_the_layer():
    fn, args = _mlp()
    first, _ = quantized(fn, args, "int8", pipeline=[])
    other = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(16)])
    variables = other.init(jax.random.key(0), args[1])
    graph = graphopt.trace(other.apply, variables, args[1])
    with pytest.raises(QuantizationError, match=r"params/layers_2/kernel.*found"):
        run_pipeline(graph, [PassSpec("quantize", options={"recipe": first.graph.metadata["quantization"]})])


def test_verify_checks_the_pass_against_its_contract():
    case = linen_models.make_mlp()
    pipeline = [*CLEANUP, PassSpec("quantize", ("int8",), {"timer": prefer(None)}), "fold_params", "dce"]
    optimized = graphopt.optimize(case.target, pipeline=pipeline, verify=True)
    out = optimized(*case.trace_args)
    assert "quantized_dot" in ops(optimized.graph)
    close(out, simulated(case.target, case.trace_args, "int8"))


# --- training ------------------------------------------------------------------------------------

def test_train_mode_gradients_are_straight_through():
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((16, 4)).astype(np.float32), rng.standard_normal((3, 16)).astype(np.float32)
    graph = graphopt.trace(lambda w, x: jnp.sum(jnp.tanh(x @ w)), w, x, params_argnums=0)
    graph = run_pipeline(graph, [PassSpec("quantize", ("int8",), {"mode": "train"})]).graph
    assert ops(graph)[0] == "fake_quantize"
    grad = jax.grad(graphopt.lower(graph))(w, x)
    scale = np.abs(w).max(0, keepdims=True) / 127
    rounded = np.round(w / scale) * scale
    expected = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(rounded)  # identity through the rounding
    close(grad, expected, rtol=1e-5)


# --- bad input -----------------------------------------------------------------------------------

def test_static_scheme_without_calibration_names_the_layers():
    fn, args = _mlp()
    graph = graphopt.trace(fn, *args)
    with pytest.raises(QuantizationError, match=r"calibration data for params/layers_0/kernel"):
        run_pipeline(graph, [PassSpec("quantize", ("int8_static",))])


def test_bad_options_are_clear_errors():
    fn, args = _mlp()
    for spec, message in [(PassSpec("quantize", ("int3",)), r"params/layers_0/kernel.*unknown quantization scheme"),
                          (PassSpec("quantize", ("int4",), {"group": 7}), r"params/layers_0/kernel.*group"),
                          (PassSpec("quantize", ("int4",), {"group": 32}), r"params/layers_0/kernel.*groups of 32"),
                          (PassSpec("quantize", ("fp8",), {"symmetric": False}), r"symmetric"),
                          (PassSpec("quantize", options={"prefer": "size"}), r"prefer")]:
        with pytest.raises(QuantizationError, match=message):
            run_pipeline(graphopt.trace(fn, *args), [spec])


def test_nan_weights_are_rejected_when_the_prep_runs():
    w = np.ones((8, 4), np.float32)
    result, _ = quantized(lambda p, x: x @ p["w"], ({"w": w}, np.ones((2, 8), np.float32)), "int8",
                          params_argnums=0)
    for bad in (np.nan, np.inf):
        broken = w.copy()
        broken[2, 1] = bad
        with pytest.raises(PrepError, match=r"w:scale.*parameter w holds NaN or ±Inf.*rule with scheme=None"):
            graphopt.prepare(result.graph, {"w": broken}, np.ones((2, 8), np.float32))


def test_the_users_arrays_are_not_modified():
    case = linen_models.make_mlp()
    before = jax.tree.map(np.array, case.trace_args)
    quantized(case.target, case.trace_args, "int8_static")
    assert_equivalent(case.trace_args, before, exact=True)


# --- property: random layer shapes ---------------------------------------------------------------

@settings(max_examples=max(4, settings().max_examples // 5))
@given(data=st.data())
def test_random_dense_stacks(data):
    widths = data.draw(st.lists(st.sampled_from([8, 16, 32]), min_size=2, max_size=4), "widths")
    scheme = data.draw(st.sampled_from(SCHEMES), "scheme")
    batch = data.draw(st.sampled_from([1, 3, 8]), "batch")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), "seed"))
    params = [rng.standard_normal((a, b)).astype(np.float32) / np.sqrt(a) for a, b in zip(widths, widths[1:])]
    x = rng.standard_normal((batch, widths[0])).astype(np.float32)

    def fn(params, x):
        for w in params:
            x = jax.nn.gelu(x @ w)
        return x

    options = {"group": 8} if scheme == "int4" else {}
    form = data.draw(st.sampled_from([None, "scale_after", "integer", "fp8", "float"]), "form")
    result, out = quantized(fn, (params, x), scheme, params_argnums=0, timer=prefer(form), **options)
    close(out, simulated(fn, (params, x), scheme, params_argnums=0, **options), rtol=1e-4)


def test_formats_table_is_what_the_tests_assume():
    assert set(FORMATS) == {"int8", "int4", "float8_e4m3fn", "float8_e5m2"}
    w = jnp.asarray(np.random.default_rng(0).standard_normal((16, 4)), jnp.float32)
    layout = Layout((0,))
    scale, _ = compute_scale(w, FORMATS["int8"], layout)
    back = dequantize(quantize(w, FORMATS["int8"], layout, scale), FORMATS["int8"], layout, scale, None, jnp.float32)
    assert float(jnp.abs(back - w).max()) <= float(scale.max()) / 2 + 1e-6

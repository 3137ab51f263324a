"""SmoothQuant as a graph rewrite (graphopt.quant.smooth): exact without quantization; the division
folded into the LayerNorm (node or primitives) when only the smoothed layers read it, an explicit
multiply otherwise; precomputed by fold_params for any weights; and worth it: static int8
activations of an outlier block lose far less accuracy after it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt.lowering.emit import lower
from graphopt.pipeline import PassSpec, run_pipeline
from graphopt.quant.calibrate import CalibrationError
from graphopt.quant.observe import Calibration, observe
from graphopt.quant.scheme import FORMATS, Layout, QuantizationError, compute_scale, dequantize, quantize
from graphopt.quant.smooth import smooth

D = 16
CLEANUP = ["canonicalize", "fold_constants", "cse", "dce"]


class Block(nn.Module):
    """A pre-LayerNorm transformer block: LN → Q, K, V → attention → O; LN → MLP."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (nn.Dense(D, name=name)(h) for name in "qkv")
        attended = jax.nn.softmax(q @ k.swapaxes(-1, -2) / np.sqrt(D), axis=-1) @ v
        x = x + nn.Dense(D, name="o")(attended)
        h = nn.LayerNorm(name="ln2")(x)
        return x + nn.Dense(D, name="fc2")(jax.nn.gelu(nn.Dense(2 * D, name="fc1")(h)))


MODEL = Block()


def _variables(seed, outliers=(3, 11), zero_channel=None, zero_row=None):
    """Random weights; LayerNorm scales ×50 on the outlier channels (the activation outliers), the
    weight rows reading them ÷10 (as in trained models, whose outputs stay of normal size)."""
    variables = MODEL.init(jax.random.PRNGKey(seed), jnp.ones((1, 4, D)))
    p = jax.tree.map(np.array, variables["params"])
    rng = np.random.RandomState(seed)
    for ln, channels, readers in (("ln1", list(outliers), "qkv"), ("ln2", [5], ["fc1"])):
        p[ln]["scale"][channels] *= 50.0
        p[ln]["bias"] = rng.normal(0, 0.1, D).astype(np.float32)
        for name in readers:
            p[name]["kernel"][channels] /= 10.0
    if zero_channel is not None:  # a dead activation channel: s = 1 there
        p["ln1"]["scale"][zero_channel] = p["ln1"]["bias"][zero_channel] = 0.0
    if zero_row is not None:  # a weight row that is 0 in Q, K and V: s = 1 there
        for name in "qkv":
            p[name]["kernel"][zero_row] = 0.0
    return {"params": jax.tree.map(jnp.asarray, p)}


VARIABLES = _variables(0)
X = jax.random.normal(jax.random.PRNGKey(1), (4, 8, D))
BATCHES = [(VARIABLES, jax.random.normal(jax.random.PRNGKey(10 + i), (4, 8, D))) for i in range(3)]


def _calibration():
    return Calibration(BATCHES, progress=False)


def _graph(raise_ops=False):
    graph = graphopt.trace(MODEL.apply, VARIABLES, X, params_argnums=0)
    return run_pipeline(graph, CLEANUP + (["raise_ops", "dce"] if raise_ops else [])).graph


def _layers(graph):
    """(node, 1) for each dot whose rhs is a parameter: the Dense layers."""
    return [(n, 1) for n in graph.nodes if n.op.name in ("dot_general", "linear")
            and getattr(n.inputs[1], "role", None) == "param"]


def _named(layers, *names):
    return [node for node, _ in layers if node.provenance.module_path.rsplit("/", 1)[-1] in names]


def _assert_same(got, want, rtol=2e-6):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.where(np.isinf(got), got, 0), np.where(np.isinf(want), want, 0))
    finite = np.isfinite(want)
    error = np.abs(got[finite] - want[finite]).max() / np.abs(want[finite]).max()
    assert error <= rtol, error


def _values(graph, values, *args):
    """The arrays `values` (of graph) take on `args`."""
    original = list(graph.outputs)
    graph.set_outputs(values)
    try:
        return [np.asarray(v) for v in jax.jit(lower(graph).flat)(*jax.tree_util.tree_leaves(args))]
    finally:
        graph.set_outputs(original)


def test_layer_norm_node_takes_the_division_and_qkv_share_one_note():
    graph = _graph(raise_ops=True)
    ln1 = next(n for n in graph.nodes if n.op.name == "layer_norm")
    layers = _layers(graph)
    assert len(layers) == 6
    notes = smooth(graph, layers, _calibration())
    graph.verify()
    _assert_same(graphopt.lower(graph)(VARIABLES, X), MODEL.apply(VARIABLES, X))
    # The LayerNorm's scale and bias became g/s and b/s; Q, K and V read its output as before.
    assert [v.node.op.name for v in ln1.inputs[1:]] == ["div", "div"]
    assert all(node.inputs[0] is ln1.output for node in _named(layers, "q", "k", "v"))
    qkv = [n for n in notes if "params/q/kernel, params/k/kernel, params/v/kernel" in n]
    assert len(qkv) == 1 and "folded into layer_norm scale and bias" in qkv[0], notes
    assert "folded into layer_norm" in next(n for n in notes if "fc1" in n)
    # O reads the attention, fc2 the gelu: no norm or affine to fold into, so an explicit multiply.
    explicit = [n for n in notes if "explicit mul" in n]
    assert len(explicit) == 2 and all("fc2" in n or "params/o/" in n for n in explicit), notes


def test_primitive_layer_norm_affine_takes_the_division():
    graph = _graph()
    layers = _layers(graph)
    q, k, v = _named(layers, "q", "k", "v")
    h = q.inputs[0]
    assert h.node.op.name == "add"  # LayerNorm spelled as ... * scale + bias
    notes = smooth(graph, layers, _calibration())
    graph.verify()
    special = X.at[0, 1, 2].set(jnp.nan).at[1, 3, 4].set(jnp.inf).at[2, 0, 3].set(-jnp.inf)
    for x in (X, special):
        _assert_same(graphopt.lower(graph)(VARIABLES, x), MODEL.apply(VARIABLES, x))
    assert all(node.inputs[0] is h for node in (q, k, v))  # no multiply inserted
    assert sum("folded into the affine on parameters (add, mul)" in n for n in notes) == 2, notes


def _residual(p, x):
    h = x * p["g"] + p["b"]
    return h @ p["w"] + h  # h is also the residual stream


RESIDUAL = {"g": jnp.array([1.0, 60.0, 1.0, 1.0, -40.0, 1.0]), "b": jnp.full(6, 0.1),
            "w": jax.random.normal(jax.random.PRNGKey(2), (6, 6))}


def test_activation_with_another_reader_gets_an_explicit_multiply():
    x = jax.random.normal(jax.random.PRNGKey(3), (5, 6))
    graph = graphopt.trace(_residual, RESIDUAL, x, params_argnums=0)
    [(dot, side)] = _layers(graph)
    h = dot.inputs[0]
    [note] = smooth(graph, [(dot, side)], Calibration([(RESIDUAL, x)], progress=False))
    graph.verify()
    assert "explicit mul(x, 1/s) (x is also read by add)" in note
    assert dot.inputs[0].node.op.name == "mul" and dot.inputs[0].node.inputs[0] is h
    assert sorted(n.op.name for n, _ in h.uses) == ["add", "mul"]  # the residual still reads h
    # Exact, and NaN / ±Inf inputs give NaN / ±Inf where the original's do.
    special = x.at[0, 1].set(jnp.nan).at[2, 3].set(jnp.inf).at[4, 0].set(-jnp.inf)
    for inputs in (x, special):
        _assert_same(graphopt.lower(graph)(RESIDUAL, inputs), _residual(RESIDUAL, inputs))


def test_fold_params_precomputes_the_scales_for_any_weights():
    # Calibrated where channel 6 is dead (s = 1 there); the second weights have a zero row 9 in Q,
    # K and V (s = 1 there too).
    other = _variables(7, outliers=(2,), zero_channel=6, zero_row=9)
    graph = _graph()
    smooth(graph, _layers(graph), Calibration([(other, x) for _, x in BATCHES], progress=False))
    graph = run_pipeline(graph, ["fold_params", "dce"]).graph
    q, k, v = (next(n for n in graph.nodes if n.provenance.module_path.endswith("/" + name))
               for name in "qkv")
    # s, W·s, g/s and b/s are computed in the prep; at run time smoothing costs the explicit
    # multiplies before O and fc2, by a precomputed 1/s.
    assert not {"abs", "pow"} & {n.op.name for n in graph.nodes}
    assert all(n.inputs[1].node is None for n in (q, k, v))
    assert [n.op.name for n in graph.nodes if n.provenance.made_by == "smooth"] == ["mul", "mul"]
    bias_over_s = next(a for a in q.inputs[0].node.inputs if a.node is None)  # the LayerNorm's b/s
    run = jax.jit(graphopt.lower(graph))
    scales = []
    for variables in (VARIABLES, other):
        args = graphopt.prepare(graph, variables, X)
        _assert_same(run(*args), MODEL.apply(variables, X))
        p = variables["params"]
        with np.errstate(invalid="ignore"):  # 0/0 where W or b is 0
            ratios = [np.asarray(args[0][n.inputs[1].path]) / np.asarray(p[name]["kernel"])
                      for n, name in zip((q, k, v), "qkv")]
            from_bias = np.asarray(p["ln1"]["bias"]) / np.asarray(args[0][bias_over_s.path]).ravel()
        s = np.where(np.isfinite(ratios[0][:, 0]), ratios[0][:, 0], from_bias)
        for ratio in ratios + [from_bias[:, None]]:  # one s for Q, K, V (along rows) and the LayerNorm
            rows = np.isfinite(ratio).all(axis=1)
            np.testing.assert_allclose(ratio[rows], np.broadcast_to(s[:, None], ratio.shape)[rows], rtol=1e-5)
        scales.append(s)
    assert scales[0][2] > 5 and scales[1][2] > 5  # the calibrated outlier moved, for both weights
    assert scales[0][6] == scales[1][6] == 1.0 and scales[1][9] == 1.0
    assert not np.allclose(scales[0], scales[1])  # recomputed from each set of weights


def _int8_error(x, w):
    """Relative error of per-tensor int8 x times per-output-channel int8 w (W8A8, static x)."""
    int8 = FORMATS["int8"]

    def fake(a, layout):
        scale, _ = compute_scale(a, int8, layout)
        return np.asarray(dequantize(quantize(a, int8, layout, scale), int8, layout, scale, None, np.float32))

    exact = x @ w
    got = fake(x, Layout(tuple(range(x.ndim)))) @ fake(w, Layout((0,)))
    return np.abs(got - exact).max() / np.abs(exact).max()


def test_smoothing_makes_static_int8_activations_accurate():
    graph = _graph()
    layers = _layers(graph)
    rows = [(node.inputs[0], node.inputs[1]) for node in _named(layers, "q", "fc1")]
    before = _values(graph, [v for pair in rows for v in pair], VARIABLES, X)
    smooth(graph, layers, _calibration())
    after = _values(graph, [v for node in _named(layers, "q", "fc1") for v in node.inputs[:2]], VARIABLES, X)
    for i in (0, 2):  # Q (after ln1), fc1 (after ln2)
        np.testing.assert_allclose(after[i] @ after[i + 1], before[i] @ before[i + 1], rtol=1e-4, atol=1e-4)
        plain, smoothed = _int8_error(*before[i:i + 2]), _int8_error(*after[i:i + 2])
        print(f"int8 W8A8 error: {plain:.4f} without smoothing, {smoothed:.4f} with")
        assert smoothed * 5 <= plain


def test_quantize_pass_with_smoothing_is_more_accurate():
    want = np.asarray(MODEL.apply(VARIABLES, X))
    fast = lambda graphs: {k: 1.0 if k == "float" else 0.5 for k in graphs}  # noqa: E731
    errors = {}
    for alpha in (None, 0.5):
        graph = _graph()
        spec = PassSpec("quantize", ("int8_static",), {"calibration": _calibration(), "smooth": alpha,
                                                        "timer": fast})
        graph = run_pipeline(graph, [spec, "fold_params", "dce"]).graph
        got = jax.jit(graphopt.lower(graph))(*graphopt.prepare(graph, VARIABLES, X))
        errors[alpha] = np.abs(got - want).max() / np.abs(want).max()
    print("int8_static block error:", errors)
    assert errors[0.5] * 5 <= errors[None]


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_alpha_outside_the_unit_interval_is_rejected(alpha):
    graph = graphopt.trace(_residual, RESIDUAL, jnp.ones((2, 6)), params_argnums=0)
    with pytest.raises(QuantizationError, match=r"alpha must be a number in \[0, 1\]"):
        smooth(graph, _layers(graph), Calibration([], progress=False), alpha)


def test_calibration_errors():
    graph = graphopt.trace(_residual, RESIDUAL, jnp.ones((2, 6)), params_argnums=0)
    with pytest.raises(QuantizationError, match="yielded nothing"):
        smooth(graph, _layers(graph), Calibration([], progress=False))
    with pytest.raises(QuantizationError, match="needs activation statistics"):
        smooth(graph, _layers(graph), None)
    nan = jnp.ones((2, 6)).at[1, 2].set(jnp.nan)
    before = str(graph)
    with pytest.raises(CalibrationError, match="w input: calibration batch has NaN"):
        smooth(graph, _layers(graph), Calibration([(RESIDUAL, nan)], progress=False))
    assert str(graph) == before


def test_a_pair_that_is_no_layer_is_an_error():
    graph = graphopt.trace(_residual, RESIDUAL, jnp.ones((2, 6)), params_argnums=0)
    [(dot, side)] = _layers(graph)
    with pytest.raises(QuantizationError, match=r"dot_general \(.*\): operand 0 must be the weight"):
        smooth(graph, [(dot, 0)], None)
    add = dot.inputs[0].node
    with pytest.raises(QuantizationError, match="not a dot_general, linear or convolution layer"):
        smooth(graph, [(add, 1)], None)


def test_one_shot_batch_iterator_is_kept_for_the_next_run():
    x = jnp.arange(12.0).reshape(2, 6)
    graph = graphopt.trace(_residual, RESIDUAL, x, params_argnums=0)
    [(dot, side)] = _layers(graph)
    calibration = Calibration(((RESIDUAL, x * i) for i in (1, 2, 3)), progress=False)
    smooth(graph, [(dot, side)], calibration)
    [obs] = observe(graph, [dot.inputs[0]], calibration)  # the static calibration, afterwards
    assert obs.count == 3 * x.size and len(calibration.batches) == 3


def test_convolutions_and_multi_axis_contractions_are_left_alone():
    def f(p, x):
        y = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.einsum("bhwc,hwcd->bd", y, p["w"])  # contracts over h, w and c

    p = {"k": jnp.ones((3, 3, 2, 2)), "w": jnp.ones((4, 4, 2, 3))}
    graph = graphopt.trace(f, p, jnp.ones((1, 4, 4, 2)), params_argnums=0)
    layers = [(n, 1) for n in graph.nodes if n.op.name in ("conv_general_dilated", "dot_general")]
    before = str(graph)
    notes = smooth(graph, layers, None)
    assert str(graph) == before
    assert notes == ["smooth: k left alone: convolutions are not smoothed",
                     "smooth: w left alone: it contracts over 3 axes, not one channel axis",
                     "smooth: nothing to smooth; the graph is unchanged"]

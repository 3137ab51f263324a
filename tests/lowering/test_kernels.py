"""lowering/kernels.py and the dispatch in emit: attention kernels against the reference over
drawn shapes (GQA groupings, causal, bias, masks, fills, both layouts, rank 3), and the errors for a
kernel that is missing on this backend or does not support a node."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import graphopt
from graphopt import implementations, nn_ops
from graphopt.errors import GraphError
from graphopt.ir import Graph
from graphopt.testing import assert_equivalent
from graphopt.types import TensorType

EXAMPLES = max(5, settings().max_examples // 5)
# XLA:CPU lacks the bf16 x bf16 -> f32 dot algorithm jax.nn.dot_product_attention asks for.
DTYPES = [np.float32] if jax.default_backend() == "cpu" else [np.float32, jnp.bfloat16]


def attention_graph(arrays, implementation, **params):
    g = Graph()
    inputs = [g.add_input(TensorType(a.shape, a.dtype)) for a in arrays]
    q, k, v, *extra = inputs
    bias = extra.pop(0) if params.pop("bias", False) else None
    mask = extra.pop(0) if params.pop("mask", False) else None
    g.set_outputs([nn_ops.attention_node(g, q, k, v, bias, mask, implementation=implementation, **params)])
    g.verify()
    return g


def run(g, arrays):
    return jax.jit(graphopt.lower(g).flat)(*arrays)[0]


@st.composite
def attention_cases(draw, dtypes=DTYPES, keys=st.integers(1, 6)):
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(["BTNH", "BNTH"]))
    batch = draw(st.sampled_from([None, 1, 2]))
    t, s, kv, groups, h = (draw(st.integers(1, 6)), draw(keys), draw(st.integers(1, 2)),
                           draw(st.integers(1, 3)), draw(st.sampled_from([4, 8])))
    n = kv * groups

    def shape(length, heads):
        dims = (length, heads, h) if layout == "BTNH" else (heads, length, h)
        return dims if batch is None else (batch, *dims)

    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    randn = lambda shape, dt=dtype: jnp.asarray(rng.standard_normal(shape), np.float32).astype(dt)
    arrays = [randn(shape(t, n)), randn(shape(s, kv)), randn(shape(s, kv))]
    scores = (n, t, s) if batch is None else (batch, n, t, s)

    def broadcast_shape():  # a shape broadcasting to the scores: some dims 1, maybe fewer dims
        dims = [d if draw(st.booleans()) else 1 for d in scores]
        return tuple(dims[draw(st.integers(0, len(dims) - 2)):])

    params = dict(is_causal=draw(st.booleans()), layout=layout, scale=draw(st.sampled_from([None, 0.3])))
    if draw(st.booleans()):
        params["bias"] = True
        arrays.append(randn(broadcast_shape(), draw(st.sampled_from([np.float32, dtype]))))
    if draw(st.booleans()):
        params["mask"] = True
        arrays.append(jnp.asarray(rng.random(broadcast_shape()) < 0.6))
    params["mask_value"] = draw(st.sampled_from([None, -1e9, float(jnp.finfo(np.float32).min)]))
    return arrays, params


def matches_reference(case, implementation):
    arrays, params = case
    note(f"types: {[TensorType(a.shape, a.dtype) for a in arrays]}, params: {params}")
    reference = run(attention_graph(arrays, None, **params), arrays)
    kernel = run(attention_graph(arrays, implementation, **params), arrays)
    loose = 2e-2 if arrays[0].dtype == jnp.bfloat16 else 2e-5
    assert_equivalent(kernel, reference, rtol=loose, atol=loose)


@settings(max_examples=EXAMPLES)
@given(case=attention_cases())
def test_xla_kernel_matches_reference(case):
    matches_reference(case, "xla")


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=attention_cases(dtypes=[np.float32, jnp.bfloat16], keys=st.sampled_from([256, 384, 1024])))
def test_chunked_kernel_matches_reference(case):
    # Key blocks of 512, 256 or 128 (1024: two of 512; 384: three of 128): masks, biases and
    # causal masks are cut per block, and fully masked rows still average v.
    matches_reference(case, "chunked")


def test_chunked_kernel_keeps_nan_and_fully_masked_rows():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 4, 2, 8)), np.float32)
    k = jnp.asarray(rng.standard_normal((1, 512, 2, 8)), np.float32)
    v = k.at[0, 3, 1, 0].set(jnp.nan)  # one NaN value: every row that weighs it is NaN
    mask = jnp.ones((1, 1, 4, 512), bool).at[0, 0, 2].set(False)  # row 2: fully masked
    arrays = [q, k, v, mask]
    reference = run(attention_graph(arrays, None, mask=True, mask_value=-1e9), arrays)
    kernel = run(attention_graph(arrays, "chunked", mask=True, mask_value=-1e9), arrays)
    assert_equivalent(kernel, reference, rtol=2e-5, atol=2e-5)
    assert np.isnan(np.asarray(kernel)[0, :, 1, 0]).all()


def test_chunked_kernel_needs_whole_key_blocks():
    from graphopt.lowering.chunked_attention import key_block

    assert (key_block(1024), key_block(768), key_block(384), key_block(512), key_block(200)) == \
        (512, 256, 128, 256, None)
    arrays = [jnp.ones((1, 3, 2, 8)), jnp.ones((1, 200, 2, 8)), jnp.ones((1, 200, 2, 8))]
    with pytest.raises(GraphError, match="200 keys: blocks of 512, 256, 128 keys, at least two"):
        run(attention_graph(arrays, "chunked"), arrays)


def test_chunked_kernel_needs_less_memory_than_the_scores():
    x = jax.ShapeDtypeStruct((1, 4096, 4, 32), jnp.float32)
    temps = {}
    for implementation in ("xla", "chunked"):
        g = attention_graph([x] * 3, implementation, is_causal=True)
        temps[implementation] = jax.jit(graphopt.lower(g).flat).lower(x, x, x).compile() \
            .memory_analysis().temp_size_in_bytes
    scores = 4 * 4096 * 4096 * 4  # bytes of [1, 4, 4096, 4096] f32
    block = 4 * 4096 * 512 * 4  # the scores of one 512-key block
    assert temps["xla"] >= scores and temps["chunked"] < 3 * block < scores / 2


def test_chunked_kernel_backward_memory_is_linear_in_the_sequence():
    """The scan body is rematerialized: the backward keeps each block's carry, not its weights."""
    temps = {}
    for seq in (2048, 4096):
        x = jax.ShapeDtypeStruct((1, seq, 4, 32), jnp.float32)
        f = graphopt.lower(attention_graph([x] * 3, "chunked", is_causal=True)).flat
        grad = jax.jit(jax.grad(lambda *a: f(*a)[0].sum(), argnums=(0, 1, 2)))
        temps[seq] = grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
    scores = 4 * 4096 * 4096 * 4  # bytes of [1, 4, 4096, 4096] f32
    assert temps[4096] < 2.5 * temps[2048] and temps[4096] < scores, temps  # no remat: 705 MiB


def test_chunked_kernel_gradients_match_reference():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 256, 2, 4)), np.float32) for _ in range(3))  # two key blocks
    grads = {}
    for implementation in (None, "chunked"):
        f = graphopt.lower(attention_graph([q, k, v], implementation, is_causal=True)).flat
        grads[implementation] = jax.jit(jax.grad(lambda *a: (f(*a)[0] ** 2).sum(), argnums=(0, 1, 2)))(q, k, v)
    assert_equivalent(grads["chunked"], grads[None], rtol=1e-4, atol=1e-5)


def test_xla_kernel_gradients_match_reference():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 4, 3, 8)), np.float32) for _ in range(3))
    q = jnp.tile(q, (1, 1, 2, 1))  # 6 query heads over 3 kv heads
    bias = jnp.asarray(rng.standard_normal((1, 6, 4, 4)), np.float32)
    mask = jnp.asarray(rng.random((2, 1, 4, 4)) < 0.7)
    arrays = [q, k, v, bias, mask]
    grads = {}
    for implementation in (None, "xla"):
        f = graphopt.lower(attention_graph(arrays, implementation, bias=True, mask=True, is_causal=True)).flat
        grads[implementation] = jax.jit(jax.grad(lambda *a: (f(*a)[0] ** 2).sum(), argnums=(0, 1, 2, 3)))(*arrays)
    assert_equivalent(grads["xla"], grads[None], rtol=1e-4, atol=1e-5)


def test_kernel_table():
    assert [k.implementation for k in implementations.available("attention", "cpu")] == ["chunked", "xla"]
    assert "cudnn" in [k.implementation for k in implementations.available("attention", "gpu")]
    assert implementations.find("attention", "cudnn", "cpu") is None
    assert implementations.find("attention", "xla", "gpu").backend is None
    assert implementations.find("attention", "xla", "cpu").backend == "cpu"  # no f16 there
    f16 = [TensorType((1, 2, 2, 8), np.float16)] * 3
    params = next(attention_graph([jnp.ones((1, 2, 2, 8))] * 3, None).nodes).params
    assert "F16_F16_F32" in implementations.find("attention", "xla", "cpu").unsupported(f16, params)
    bf16 = [TensorType((1, 2, 2, 8), jnp.bfloat16)] * 3
    assert "on CPU" in implementations.find("attention", "xla", "cpu").unsupported(bf16, params)
    assert implementations.find("attention", "xla", "gpu").unsupported(f16, params) is None
    assert "f32" in implementations.find("attention", "cudnn", "gpu").unsupported(
        [TensorType((1, 2, 2, 8), np.float32)] * 3, params)


def test_missing_kernel_is_an_error_not_a_fallback():
    arrays = [jnp.ones((1, 3, 2, 8))] * 3
    g = attention_graph(arrays, "cudnn")
    with pytest.raises(GraphError, match=r"attention: implementation 'cudnn' has no kernel on backend "
                                         r"'cpu' \(available here: \['chunked', 'xla'\]\)\. Run fuse_attention") as err:
        run(g, arrays)
    assert "set the node's implementation to None" in str(err.value)


@pytest.mark.parametrize("params, why", [
    (dict(mask=True, mask_value=float("-inf")), "mask_value -inf"),
    (dict(is_causal=True, mask_value=-10.0), r"mask_value -10\.0"),
])
def test_unsupported_node_is_an_error(params, why):
    arrays = [jnp.ones((1, 3, 2, 8))] * 3 + ([jnp.ones((3, 3), bool)] if params.get("mask") else [])
    with pytest.raises(GraphError, match=rf"kernel 'xla' on backend 'cpu' does not support this node: {why}"):
        run(attention_graph(arrays, "xla", **params), arrays)


def test_value_head_dim_other_than_query_head_dim_runs_on_the_reference_only():
    arrays = [jnp.ones((1, 3, 2, 8)), jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 16))]
    assert run(attention_graph(arrays, None), arrays).shape == (1, 3, 2, 16)
    with pytest.raises(GraphError, match="value head dim 16 differs"):
        run(attention_graph(arrays, "xla"), arrays)


def test_measure_times_each_candidate_and_reports_failures():
    arrays = [jnp.ones((1, 16, 2, 8))] * 3
    node = next(attention_graph(arrays, None, is_causal=True).nodes)
    times = implementations.measure(node, [None, "xla", "cudnn"], repeats=2)
    assert isinstance(times[None], float) and isinstance(times["xla"], float) and times[None] > 0
    assert isinstance(times["cudnn"], GraphError) and "no kernel on backend 'cpu'" in str(times["cudnn"])
    assert node.params["implementation"] is None  # the node itself is left alone

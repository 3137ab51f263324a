"""canonicalize: each rule as before/after on a small function, checked bit for bit.

Every case traces a JAX function, runs `canonicalize` and `dce`, compares the op sequence left
with the expected one, and runs the result against the original under jax.jit on inputs with NaN,
±Inf, ±0, subnormals and extremes: the results must be identical bit for bit.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from jax import lax

import graphopt
from graphopt.pipeline import run_pipeline
from graphopt.testing import assert_equivalent, programs
from graphopt.passes.canonicalize import CANONICAL_RULES, DOT_RULES

F32 = np.float32
TINY = np.finfo(F32).tiny
NASTY = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, TINY, -TINY, TINY / 2, -TINY / 3,
                  np.finfo(F32).smallest_subnormal, np.finfo(F32).max, -np.finfo(F32).max,
                  1.0, -1.5, 0.1, 3.0e-39, 7.0, -2.0, 1e30, -1e-30, 0.5, 2.5, -3.25, 65504.0],
                 F32).reshape(4, 6)
X = NASTY
W = np.linspace(-3, 3, 6 * 5, dtype=F32).reshape(6, 5)
V = NASTY[0]
S = np.float32(-0.0)
I = np.array([-2**31, -7, -1, 0, 1, 2**31 - 1], np.int32)
B = np.array([True, False, True], bool)


def canonical(fn, *args, dots=False):
    """(graph after canonicalize + dce, fire counts); asserts the result is fn's, bit for bit.

    With dots=True (the dot rules) results are compared with float tolerances: the products are
    the same, but XLA may sum them in another order.
    """
    graph = graphopt.trace(fn, *args)
    result = run_pipeline(graph, ["canonicalize(dots=True)" if dots else "canonicalize", "dce"],
                          debug=True)
    assert_equivalent(jax.jit(graphopt.lower(result.graph))(*args), jax.jit(fn)(*args), exact=not dots)
    return result.graph, result.report.records[0].fired


def ops(graph):
    return [n.op.name for n in graph.walk() if n.op.name != "constant"]


def constants(graph):
    return [n.params["value"].tolist() for n in graph.walk() if n.op.name == "constant"]


# rule → (function, arguments, the ops left). One case per rule; more cases further down.
CASES = {
    "constant-right": (lambda x: 2.0 * x, (X,), ["mul"]),
    "neg-neg": (lambda x: -(-x), (X,), []),
    "add-zero": (lambda x: x + (-0.0), (X,), []),
    "mul-one": (lambda x: x * 1.0, (X,), []),
    "copy": (lambda x: x.copy(), (X,), []),
    "sub-constant": (lambda x: x - 1.5, (X,), ["add"]),
    "div-power-of-two": (lambda x: x / 4.0, (X,), ["mul"]),
    "scalar-operand": (lambda x: x * jnp.full(x.shape, 3.0, F32), (X,), ["mul"]),
    "convert-identity": (lambda x: x.astype(jnp.bfloat16).astype(F32).astype(jnp.bfloat16), (X,),
                         ["convert_element_type"]),
    "convert-convert": (lambda x: x.astype(F32).astype(jnp.float16), (X.astype(jnp.bfloat16),),
                        ["convert_element_type"]),
    "convert-before-broadcast": (lambda v: jnp.broadcast_to(v, (3, 6)).astype(F32),
                                 (V.astype(jnp.float16),), ["convert_element_type", "broadcast_in_dim"]),
    "convert-constant": (lambda x: jnp.where(x > 0, x, 0.0), (X,), ["gt", "broadcast_in_dim", "select_n"]),
    "squeeze-to-reshape": (lambda x: x[None].squeeze(0), (X,), []),
    "expand-dims-to-reshape": (lambda x: x[:, None], (X,), ["reshape"]),
    "reshape-reshape": (lambda x: x.reshape(3, 8).reshape(24), (X,), ["reshape"]),
    "reshape-identity": (lambda x: x.reshape(6, 4).reshape(4, 6), (X,), []),
    "transpose-transpose": (lambda x: x.reshape(2, 3, 4).transpose(1, 0, 2).transpose(0, 2, 1), (X,),
                            ["reshape", "transpose"]),
    "transpose-identity": (lambda x: x.T.T, (X,), []),
    "splat": (lambda x: x * jnp.full(x.shape[1], 2.0, F32), (X,), ["mul"]),
}
# The dot rules run with canonicalize(dots=True).
DOT_CASES = {
    "dot-lhs-transpose": (lambda x, w: jnp.einsum("ji,jk->ik", x.T, w), (X, W), ["dot_general"]),
    "dot-rhs-transpose": (lambda x, w: x @ w.T, (X, np.ascontiguousarray(W.T)), ["dot_general"]),
    "transpose-dot": (lambda x, w: (w.T @ x.T).T, (X, W), ["dot_general"]),
}


def test_every_rule_has_a_case():
    assert {f"canonicalize/{name}" for name in CASES} == {r.name for r in CANONICAL_RULES}
    assert {f"canonicalize/{name}" for name in DOT_CASES} == {r.name for r in DOT_RULES}


@pytest.mark.parametrize("rule", sorted(CASES) + sorted(DOT_CASES))
def test_rule(rule):
    fn, args, left = CASES[rule] if rule in CASES else DOT_CASES[rule]
    graph, fired = canonical(fn, *args, dots=rule in DOT_CASES)
    assert fired[f"canonicalize/{rule}"] >= 1, fired
    assert ops(graph) == left


# --- what each rule produces ---------------------------------------------------------------------

def test_constants_and_scalars_move_right():
    graph, _ = canonical(lambda x, s: (jnp.maximum(0.0, x), jnp.minimum(-0.0, x), 1.0 == x,
                                       s * x, jnp.float32(0) != s), X, S)
    kinds = [["const" if v.node is not None and v.node.op.name == "constant" else v.type.shape
              for v in n.inputs] for n in graph.nodes if n.op.name != "constant"]
    assert ops(graph) == ["max", "min", "eq", "mul", "ne"]
    assert kinds == [[(4, 6), "const"], [(4, 6), "const"], [(4, 6), "const"], [(4, 6), ()], [(), "const"]]


def test_integer_and_bool_operands_move_right():
    graph, fired = canonical(lambda i, b: (3 + i, 1 * i, 0 + i, i - 5, True & b, False | b), I, B)
    assert ops(graph) == ["add", "add", "and", "or"]
    assert fired["canonicalize/constant-right"] == 5
    assert fired["canonicalize/mul-one"] == fired["canonicalize/add-zero"] == 1


def test_subtracting_a_constant_adds_its_negation():
    graph, _ = canonical(lambda x, i: (x - 1.5, x - (-0.0), x - 0.0, i - 7), X, I)
    assert ops(graph) == ["add", "add", "add"]  # x − 0.0 = x + −0.0 = x
    added = [n.inputs[1].node.params["value"] for n in graph.nodes if n.op.name == "add"]
    assert [(float(c), bool(np.signbit(c))) for c in added] == [(-1.5, True), (0.0, False), (-7, True)]


def test_division_by_powers_of_two_becomes_multiplication():
    cases = lambda x: (x / 4.0, x / 0.5, x / -1.0, x / 2.0 ** -126, x / 2.0 ** 126, x / 1.0)
    graph, fired = canonical(cases, X)
    assert ops(graph) == ["mul"] * 5
    assert constants(graph) == [0.25, 2.0, -1.0, 2.0 ** 126, 2.0 ** -126]
    bf16 = X.astype(jnp.bfloat16)
    graph, _ = canonical(lambda x: x / jnp.bfloat16(8), bf16)
    assert ops(graph) == ["mul"] and constants(graph) == [0.125]


def test_rewritten_graphs_keep_their_gradients():
    """Nodes the rules build carry the params JAX would give them (JAX 0.10's mul has out_dtype),
    so JAX's transpose rules accept them: gradients can still be taken, and are unchanged."""
    fn = lambda x: jnp.sum(jnp.sin(x / 8.0 - 1.5) * 2.0)
    graph, fired = canonical(fn, X)
    assert fired["canonicalize/div-power-of-two"] == fired["canonicalize/sub-constant"] == 1
    grad = jax.jit(jax.grad(graphopt.lower(graph)))(X)
    assert_equivalent(grad, jax.jit(jax.grad(fn))(X), exact=True)


def test_broadcast_scalars_become_scalar_operands():
    graph, fired = canonical(lambda x, s: (x * jnp.ones(x.shape, F32), x + jnp.broadcast_to(2.0, x.shape),
                                           jnp.broadcast_to(s, x.shape) - x, x * jnp.full(6, 1.0)), X, S)
    assert ops(graph) == ["add", "sub"]
    assert fired["canonicalize/scalar-operand"] == 4 and fired["canonicalize/splat"] == 1
    assert [v.type.shape for v in list(graph.nodes)[-1].inputs] == [(), (4, 6)]
    # Both operands the same broadcast: only one of them can become the scalar.
    graph, fired = canonical(lambda s: lax.ne(*2 * [jnp.broadcast_to(s, (3,))]), S)
    assert ops(graph) == ["broadcast_in_dim", "ne"] and fired["canonicalize/scalar-operand"] == 1


def test_real_broadcasts_stay():
    graph, fired = canonical(lambda x, v: (jnp.broadcast_to(v, x.shape) * x, x * v), X, V)
    assert ops(graph) == ["broadcast_in_dim", "mul", "reshape", "mul"]
    assert fired == {"canonicalize/expand-dims-to-reshape": 1}  # v[None], which mul broadcasts


def test_widening_convert_chains_collapse_exhaustively():
    bf16 = np.arange(2 ** 16, dtype=np.uint16).view(jnp.bfloat16)
    f16 = np.arange(2 ** 16, dtype=np.uint16).view(np.float16)
    f8 = np.arange(2 ** 8, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
    i8 = np.arange(-128, 128, dtype=np.int8)
    i16 = np.arange(-2 ** 15, 2 ** 15, dtype=np.int16)
    chains = [(bf16, F32, np.float16), (f16, F32, jnp.bfloat16), (f8, np.float16, jnp.bfloat16),
              (i8, np.int32, np.float16), (i16, F32, np.float16), (i8.view(np.uint8), jnp.bfloat16, F32),
              (i8, np.int16, np.uint8)]
    for x, mid, out in chains:
        graph, fired = canonical(lambda x: x.astype(mid).astype(out), x)
        assert ops(graph) == ["convert_element_type"], (x.dtype, mid, out)
        assert fired["canonicalize/convert-convert"] == 1


@pytest.mark.parametrize("x, mid, out", [
    (X, jnp.bfloat16, F32),                       # narrowing: the first convert rounds
    (X, np.float16, jnp.bfloat16),                # narrowing, and the ranges differ
    (np.array([300, -300, 2 ** 15 - 1], np.int16), F32, np.int8),  # float→int saturates, int→int wraps
    (np.array([16842753, 2 ** 31 - 1], np.int32), F32, jnp.bfloat16),  # i32 does not fit f32
], ids=["f32-bf16-f32", "f32-f16-bf16", "i16-f32-i8", "i32-f32-bf16"])
def test_narrowing_convert_chains_stay(x, mid, out):
    graph, fired = canonical(lambda x: x.astype(mid).astype(out), x)
    assert ops(graph) == ["convert_element_type"] * 2
    assert "canonicalize/convert-convert" not in fired


def test_expand_dims_squeeze_and_reshape_chains_collapse():
    fns = [lambda x: jnp.expand_dims(x, (0, 2)).squeeze((0, 2)),
           lambda x: x[:, None, :, None].reshape(24).reshape(4, 6),
           lambda x: jnp.squeeze(x.reshape(1, 4, 1, 6), 2)[0]]
    for fn in fns:
        graph, _ = canonical(fn, X)
        assert ops(graph) == []


def test_transpose_chains_compose():
    x = X.reshape(2, 3, 4)
    graph, _ = canonical(lambda x: x.transpose(1, 2, 0).transpose(2, 0, 1), x)
    assert ops(graph) == []
    graph, _ = canonical(lambda x: x.transpose(1, 2, 0).transpose(1, 0, 2).transpose(0, 2, 1), x)
    assert ops(graph) == ["transpose"]
    assert list(graph.nodes)[-1].params["permutation"] == (2, 0, 1)


MATMULS = {
    "ij,jk->ik": lambda x, w: jnp.einsum("ij,jk->ik", x, w),
    "ji,jk->ik": lambda x, w: jnp.einsum("ji,jk->ik", x.T, w),
    "ij,kj->ik": lambda x, w: jnp.einsum("ij,kj->ik", x, w.T),
    "x @ w": lambda x, w: x @ w,
    "(w.T @ x.T).T": lambda x, w: (w.T @ x.T).T,
    "dot_general": lambda x, w: lax.dot_general(w.T, x, (((1,), (1,)), ((), ())),
                                                preferred_element_type=F32).T,
}
# NaN, ±Inf and ±0 in x; no huge finite values, whose overflow could depend on summation order.
MATMUL_X = np.where(np.abs(NASTY) > 1e6, 1.0, NASTY)
MATMUL_W = np.random.default_rng(1).standard_normal((6, 5)).astype(F32)


def dot_form(graph):
    """The dot_general nodes: operand inputs and params, without source locations."""
    return [([v.index for v in n.inputs], str(sorted(n.params.items())))
            for n in graph.nodes if n.op.name == "dot_general"]


def test_every_matmul_spelling_is_one_dot_general():
    forms = {}
    for name, fn in MATMULS.items():
        graph, _ = canonical(fn, MATMUL_X, MATMUL_W, dots=True)
        assert ops(graph) == ["dot_general"], name
        forms[name] = dot_form(graph)
    assert len(set(map(str, forms.values()))) == 1, forms
    assert forms["x @ w"][0][0] == [0, 1]


def test_batched_attention_scores_drop_their_transposes():
    rng = np.random.default_rng(2)
    q, k = rng.standard_normal((2, 7, 3, 16), F32), rng.standard_normal((2, 9, 3, 16), F32)
    spellings = [lambda q, k: jnp.einsum("bqhd,bkhd->bhqk", q, k),
                 lambda q, k: q.transpose(0, 2, 1, 3) @ k.transpose(0, 2, 3, 1),
                 lambda q, k: jnp.swapaxes(k.transpose(0, 2, 1, 3) @ q.transpose(0, 2, 3, 1), -1, -2)]
    forms = set()
    for fn in spellings:
        graph, _ = canonical(fn, q, k, dots=True)
        assert ops(graph) == ["dot_general"]
        forms.add(str(dot_form(graph)))
    assert len(forms) == 1, forms


def test_dots_are_left_alone_by_default():
    # With dots=True the transpose is absorbed, and XLA:CPU (jaxlib 0.10) then sums this
    # matrix-vector product in another order: 3 of 3 results differ in the last bits (also 0.12).
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((1, 1000), F32), rng.standard_normal((3, 1000), F32)
    graph, fired = canonical(lambda x, w: x @ w.T, x, w)
    assert ops(graph) == ["transpose", "dot_general"] and not fired


# --- rules that must not fire --------------------------------------------------------------------

@pytest.mark.parametrize("fn, left", [
    (lambda x: x + 0.0, ["add"]),                 # −0 + 0 = +0
    (lambda x: x / 3.0, ["div"]),                 # 1/3 rounds
    (lambda x: x / 2.0 ** 127, ["div"]),          # 2^−127 is subnormal
    (lambda x: x / 2.0 ** -127, ["div"]),         # the divisor is subnormal: flushed to 0 on CPU
    (lambda x: x / 0.0, ["div"]),
    (lambda x: 2.0 - x, ["sub"]),                 # sub is not commutative
    (lambda x: x.transpose(1, 0).reshape(2, 12), ["transpose", "reshape"]),
], ids=["add-plus-zero", "div-3", "div-2^127", "div-subnormal", "div-0", "const-minus-x",
        "transpose-reshape"])
def test_inexact_rewrites_do_not_fire(fn, left):
    graph, fired = canonical(fn, X)
    assert ops(graph) == left, fired
    assert not fired, fired


def test_complex_multiplication_by_one_stays():
    z = np.array([complex(np.inf, 1.0), complex(1.0, np.nan), complex(-0.0, 2.0)], np.complex64)
    graph, fired = canonical(lambda z: (z * (1 + 0j), (1 + 0j) * z), z)
    assert ops(graph) == ["mul", "mul"] and not fired


def test_dot_keeps_transposes_it_cannot_absorb():
    a = np.random.default_rng(3).standard_normal((2, 3, 6), F32)
    # The transpose reorders the lhs free dims: a dot_general cannot express that.
    graph, fired = canonical(lambda a, w: a.transpose(1, 0, 2) @ w, a, W, dots=True)
    assert ops(graph) == ["transpose", "dot_general"] and not fired
    # The output transpose only reorders lhs free dims: it is not a swap of the operands.
    graph, fired = canonical(lambda a, w: (a @ w).transpose(1, 0, 2), a, W, dots=True)
    assert ops(graph) == ["dot_general", "transpose"] and not fired


def test_transpose_of_a_shared_dot_stays():
    def fn(x, w):
        y = x @ w
        return y.T, y
    graph, fired = canonical(fn, X, W, dots=True)
    assert ops(graph) == ["dot_general", "transpose"] and not fired


def test_rules_inside_regions():
    def fn(x):
        return lax.fori_loop(0, 3, lambda i, c: -(-c) * 1.0 - 0.0 + c / 2.0, x)
    graph, fired = canonical(fn, X)
    assert fired["canonicalize/neg-neg"] == 1 and fired["canonicalize/div-power-of-two"] == 1
    assert "neg" not in ops(graph)


def test_types_are_kept():
    # A weakly typed x plus a strong −0 is strong: dropping the add would change the type.
    graph, fired = canonical(lambda x: lax.add(x, np.float32(-0.0)), 1.5)
    assert graph.inputs[0].type.weak_type and not graph.outputs[0].type.weak_type
    assert ops(graph) == ["add"] and not fired
    # A weakly typed constant stays weakly typed when negated.
    graph, fired = canonical(lambda x: x - 1.0, 1.5)
    assert ops(graph) == ["add"] and fired["canonicalize/sub-constant"] == 1
    assert all(v.type.weak_type for v in list(graph.nodes)[-1].inputs)
    # Broadcasting (1, 6) against (4, 6) needs the broadcast scalar's shape.
    graph, fired = canonical(lambda x: lax.mul(x[:1], jnp.broadcast_to(2.0, x.shape)), X)
    assert ops(graph) == ["slice", "broadcast_in_dim", "mul"] and not fired


@settings(max_examples=20)
@given(programs())
def test_random_programs_keep_their_bits(program):
    graph = graphopt.trace(program, *program.args)
    result = run_pipeline(graph, ["canonicalize", "dce"], debug=True)
    expected = jax.jit(program)(*program.args)
    actual = jax.jit(graphopt.lower(result.graph))(*program.args)
    assert_equivalent(actual, expected, exact=True, err_msg=f"{program}\n{result.graph}")

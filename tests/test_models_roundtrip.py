"""Round-trip tests on real (small) models: trace -> verify -> lower -> compare.

Every model registered in ``tests/models/`` (Flax linen, Flax nnx,
Equinox) is traced with ``graphopt.trace`` and lowered back with
``graphopt.lower``.  For each model the tests check that

* the graph verifies and has the expected structure: region ops (``scan``,
  ``while``, ``cond``, ``remat``, ``custom_jvp_call``, ``custom_vjp_call``)
  where the model uses them, each holding a region; no nested ``jit`` left
  un-inlined; one ``param`` input per parameter leaf with a meaningful path;
* the compiled lowered function matches the compiled original;
* gradients w.r.t. params and float inputs match (forward mode for models
  whose while-loops are not reverse-differentiable);
* ``jax.vmap`` of the lowered function over an extra batch axis of the data
  inputs matches ``jax.vmap`` of the original.

Tracing and lowering are done once per model and cached.  Every comparison
compiles both sides with the same reduced XLA optimization level
(``FAST_COMPILE``) to keep the file at well under a minute of CPU time.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt.testing import assert_equivalent, primitive_counts
# tests/models/: pytest puts tests/ (no __init__.py) on sys.path.
from models import ModelCase, all_models, is_float_tree

MODELS = all_models()
NAMES = sorted(MODELS)

#: Ops whose nodes must carry at least one region (sub-graph).
REGION_OPS = frozenset({"scan", "while", "cond", "remat", "custom_jvp_call", "custom_vjp_call"})
#: Call-like ops the tracer must inline rather than keep as nodes.
INLINED_OPS = frozenset({"jit", "pjit", "closed_call", "core_call"})
#: JAX primitive name -> graphopt region op name.
PRIMITIVE_TO_REGION_OP = {
    "scan": "scan",
    "while": "while",
    "cond": "cond",
    "checkpoint": "remat",  # jax.checkpoint's primitive; "remat2" in recent JAX
    "remat": "remat",
    "remat2": "remat",
    "custom_jvp_call": "custom_jvp_call",
    "custom_vjp_call": "custom_vjp_call",
    "custom_vjp_call_jaxpr": "custom_vjp_call",
}
#: Size of the extra axis used by the vmap test.
VMAP_SIZE = 3
#: XLA options for every compiled comparison.  XLA compilation (of the
#: transformers' backward passes above all) dominates this file's run time on
#: CPU; these options cut it by half to two thirds.  Both sides of every
#: comparison are compiled the same way, so the checks are unchanged: they
#: compare the semantics of the lowered program, not XLA's optimizations.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_fast(fn, *args):
    """``jax.jit(fn)(*args)``, compiled with ``FAST_COMPILE``."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


@functools.cache
def prepared(name: str):
    """(case, graph, lowered) for model ``name``; traced once per test session."""
    case: ModelCase = MODELS[name]()
    graph = graphopt.trace(case.target, *case.trace_args, **case.trace_kwargs)
    return case, graph, graphopt.lower(graph)


def _rng(name: str, salt: str) -> np.random.Generator:
    """Deterministic per-model generator (``hash()`` of str is salted per process)."""
    return np.random.default_rng(list(f"{name}/{salt}".encode()))


def _float_leaf(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


# ---------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_graph_structure(name):
    case, graph, _ = prepared(name)
    graph.verify()

    ops = [node.op.name for node in graph.walk()]
    assert len(list(graph.nodes)) > 0
    missing = case.expected_ops - set(ops)
    assert not missing, f"{name}: ops {sorted(missing)} not in graph; has {sorted(set(ops))}"
    leftover = INLINED_OPS & set(ops)
    assert not leftover, f"{name}: call ops {sorted(leftover)} were not inlined"
    for node in graph.walk():
        if node.op.name in REGION_OPS:
            assert node.regions, f"{name}: {node.op.name} node has no region"
            assert all(region.parent is node for region in node.regions)

    # Every control-flow / custom-derivative primitive of the original program
    # (after inlining its nested jits) is one region op in the graph.
    original = collections.Counter()
    for p, count in primitive_counts(case.fn, *case.args).items():
        if p in PRIMITIVE_TO_REGION_OP:
            original[PRIMITIVE_TO_REGION_OP[p]] += count
    traced = collections.Counter(op for op in ops if op in REGION_OPS)
    assert traced == original, f"{name}: region ops {dict(traced)} != original {dict(original)}"


@pytest.mark.parametrize("name", NAMES)
def test_graph_inputs(name):
    case, graph, _ = prepared(name)
    roles = {arg.role for arg in graph.inputs}
    assert roles <= {"param", "input"}, roles

    # One graph input per array leaf, params first-class and in pytree order.
    param_leaves = jax.tree.leaves([case.args[i] for i in case.param_argnums])
    input_leaves = jax.tree.leaves([case.args[i] for i in case.input_argnums])
    params = [a for a in graph.inputs if a.role == "param"]
    inputs = [a for a in graph.inputs if a.role == "input"]
    assert [(a.type.shape, a.type.dtype) for a in params] == [
        (tuple(l.shape), l.dtype) for l in param_leaves
    ]
    assert [(a.type.shape, a.type.dtype) for a in inputs] == [
        (tuple(l.shape), l.dtype) for l in input_leaves
    ]

    paths = [a.path for a in params]
    assert all(paths), f"{name}: empty param path in {paths}"
    assert len(set(paths)) == len(paths), f"{name}: duplicate param paths {paths}"
    for hint in case.param_path_hints:
        assert any(hint in p for p in paths), f"{name}: no param path contains {hint!r}: {paths}"

    summary = graph.summary()
    assert summary.params == sum(l.size for l in param_leaves)
    assert summary.param_bytes == sum(l.nbytes for l in param_leaves)
    assert summary.nodes == sum(1 for _ in graph.walk())
    assert summary.inputs == len(graph.inputs)


# ---------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_forward(name):
    case, _, lowered = prepared(name)
    expected = run_fast(case.fn, *case.args)
    actual = run_fast(lowered, *case.args)
    assert_equivalent(actual, expected, err_msg=f"{name}: forward")


def _diff_argnums(case: ModelCase) -> tuple[int, ...]:
    return tuple(i for i, a in enumerate(case.args) if is_float_tree(a))


def _with_args(fn, args, argnums):
    """``fn`` as a function of ``args[argnums]`` only (the rest closed over)."""

    def partial_fn(*diff):
        full = list(args)
        for i, value in zip(argnums, diff):
            full[i] = value
        return fn(*full)

    return partial_fn


@pytest.mark.parametrize("name", NAMES)
def test_gradients(name):
    case, _, lowered = prepared(name)
    if case.grad_mode == "none":
        pytest.skip(f"{name} is not differentiable")
    argnums = _diff_argnums(case)
    assert set(case.param_argnums) <= set(argnums), "params must be differentiable"
    rng = _rng(name, "grad")

    if case.grad_mode == "reverse":
        # Random cotangents for the float outputs; integer outputs are skipped.
        cotangents = [
            jnp.asarray(rng.standard_normal(s.shape), s.dtype) if _float_leaf(s) else None
            for s in jax.tree.leaves(jax.eval_shape(case.fn, *case.args))
        ]

        def grads(fn):
            def loss(*args):
                outs = jax.tree.leaves(fn(*args))
                return sum(jnp.vdot(o, c) for o, c in zip(outs, cotangents) if c is not None)

            return run_fast(jax.grad(loss, argnums=argnums), *case.args)

        expected, actual = grads(case.fn), grads(lowered)
    else:  # forward mode
        primals = tuple(case.args[i] for i in argnums)
        tangents = jax.tree.map(
            lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), primals
        )

        def jvp(fn):
            return run_fast(
                lambda p, t: jax.jvp(_with_args(fn, case.args, argnums), p, t), primals, tangents
            )

        expected, actual = jvp(case.fn), jvp(lowered)

    # Guard against a vacuous comparison (e.g. all-zero gradients everywhere).
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(expected))
    assert_equivalent(actual, expected, err_msg=f"{name}: {case.grad_mode}-mode derivatives")


def _batched(x, rng: np.random.Generator):
    """Stack ``VMAP_SIZE`` distinct variants of an input leaf along a new axis 0."""
    x = np.asarray(x)
    if _float_leaf(x):
        variants = [x, -x] + [
            x * rng.uniform(0.5, 1.5) + 0.1 * rng.standard_normal(x.shape)
            for _ in range(VMAP_SIZE - 2)
        ]
    else:  # token ids / lengths: permute the values so they stay in range
        variants = [x] + [rng.permutation(x.ravel()).reshape(x.shape) for _ in range(VMAP_SIZE - 1)]
    return jnp.asarray(np.stack(variants).astype(x.dtype))


@pytest.mark.parametrize("name", NAMES)
def test_vmap(name):
    case, _, lowered = prepared(name)
    rng = _rng(name, "vmap")
    args = tuple(
        a if i in case.param_argnums else jax.tree.map(lambda x: _batched(x, rng), a)
        for i, a in enumerate(case.args)
    )
    in_axes = tuple(None if i in case.param_argnums else 0 for i in range(len(args)))
    expected = run_fast(jax.vmap(case.fn, in_axes=in_axes), *args)
    actual = run_fast(jax.vmap(lowered, in_axes=in_axes), *args)
    assert_equivalent(actual, expected, err_msg=f"{name}: vmap")

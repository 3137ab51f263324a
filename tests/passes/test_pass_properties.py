"""Property: every registered pass keeps the results of random JAX programs, and a valid graph.

For each pass in `graphopt.pipeline.PASSES` (parametrized over the names, so a new pass is covered
as soon as it registers), hypothesis draws programs from `graphopt.testing.programs`: ~90 lax
primitives, regions, literals, NaN/±Inf/−0 inputs; some arguments are parameters, so passes that
work on weights (fold_params) have something to do. The program is traced, the pass runs with
`debug=True` (so `Graph.verify()` checks its result), and the lowered graph after the pass is
compared with the lowered graph before it, both under `jax.jit`:

- passes in `BITWISE` must give the same bits (NaN payloads aside). They only delete or merge
  nodes, so XLA compiles the same computations: XLA runs its own DCE and CSE anyway.
- other exact passes are held to the exact contract: per-dtype tolerances on finite values (they
  may round differently: `x / c → x * (1/c)`, a dot whose operand is pre-transposed by fold_params
  accumulates in another order), and NaN positions, infinities and the sign of zeros unchanged;
- approximate passes are held to their bound, as translation validation measures it.

Per pass, a quarter of the hypothesis profile's examples: 12 under `ci`, 500 under `deep`.
"""

import jax
import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import graphopt
import graphopt.passes  # noqa: F401  (registers the built-in passes)
from graphopt.frameworks import adapt
from graphopt.param_prep import prepare
from graphopt.pipeline import PASSES, run_pipeline
from graphopt.testing import assert_equivalent, programs
from graphopt.validate import compare

# Passes whose result compiles to the same XLA computations: compared bit for bit.
BITWISE = {"dce", "cse"}

# Passes that need options to run, as pipeline specs: {"quantize": "quantize(int8)"}.
PASS_SPECS: dict[str, str] = {}

EXAMPLES = max(5, settings().max_examples // 4)


@pytest.mark.parametrize("name", sorted(PASSES))
@settings(max_examples=EXAMPLES)
@given(program=programs(), data=st.data())
def test_pass_keeps_results(name, program, data):
    params = data.draw(st.sampled_from([None, (0,), (len(program.args) - 1,)]), "params_argnums")
    graph = graphopt.trace(program, *program.args, params_argnums=params)
    args = adapt(program, program.args, params).args
    before = graph.clone()[0]
    note(f"before {name}:\n{before}")
    after = run_pipeline(graph, [PASS_SPECS.get(name, name)], debug=True).graph
    note(f"after {name}:\n{after}")
    expected = jax.jit(graphopt.lower(before))(*args)
    actual = jax.jit(graphopt.lower(after))(*prepare(after, *args))
    contract = PASSES[name].contract
    if contract.kind == "exact":
        assert_equivalent(actual, expected, exact=name in BITWISE,
                          err_msg=f"pass {name!r} changed the results")
        _assert_same_zero_signs(actual, expected, name)
    else:
        result = compare(jax.tree.leaves(actual), jax.tree.leaves(expected), contract)
        assert result.problem is None, f"pass {name!r} breaks its contract {contract}: {result.problem}"


def test_every_pass_can_run_without_options():
    """A pass with required options needs an entry in PASS_SPECS to be covered above."""
    import inspect

    missing = []
    for name, info in PASSES.items():
        required = [p.name for p in list(inspect.signature(info.fn).parameters.values())[2:]
                    if p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD
                    and p.kind is not p.VAR_POSITIONAL]
        if required and name not in PASS_SPECS:
            missing.append(f"{name} (needs {', '.join(required)})")
    assert not missing, f"add these passes to PASS_SPECS in {__file__}: {missing}"


def _assert_same_zero_signs(actual, expected, name: str) -> None:
    """assert_equivalent's tolerance check lets −0 pass for +0; the exact contract does not."""
    for (path, a), (_, e) in zip(jax.tree_util.tree_flatten_with_path(actual)[0],
                                 jax.tree_util.tree_flatten_with_path(expected)[0]):
        a, e = np.asarray(a), np.asarray(e)
        if a.dtype.kind in "biu" or a.size == 0:
            continue
        a, e = a.astype(np.complex128 if a.dtype.kind == "c" else np.float64), \
            e.astype(np.complex128 if e.dtype.kind == "c" else np.float64)
        for part in ((a.real, e.real), (a.imag, e.imag)) if a.dtype.kind == "c" else ((a, e),):
            flipped = (part[0] == 0) & (part[1] == 0) & (np.signbit(part[0]) != np.signbit(part[1]))
            assert not flipped.any(), (
                f"pass {name!r} changed the sign of zero at {jax.tree_util.keystr(path) or '<root>'} "
                f"index {tuple(int(i) for i in np.argwhere(flipped)[0])}")

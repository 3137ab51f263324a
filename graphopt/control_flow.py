"""Region ops: scan, while, cond, remat, custom_jvp_call, custom_vjp_call.

Each holds its body as sub-graphs (`node.regions`). The shape rule checks that the regions fit the
operands; the implementation rebuilds the computation with public JAX (`lax.scan`,
`lax.while_loop`, `lax.switch`, `jax.checkpoint`), so the lowered program is ordinary JAX that
can be jitted, differentiated and vmapped. Custom derivatives keep the user's rule and take the
primal from the (possibly rewritten) region.

Operand layouts follow the JAX primitives:
    scan  (consts..., carry..., xs...)             -> (carry..., ys...)
    while (cond_consts..., body_consts..., init...) -> (final...)
    cond  (index, operands...)                      -> (branch results...)

Example:
    >>> import graphopt, jax, jax.numpy as jnp
    >>> g = graphopt.trace(lambda x: jax.lax.scan(lambda c, v: (c + v, c), 0.0, x), jnp.ones(3))
    >>> [n.op.name for n in g.nodes]
    ['constant', 'scan']
"""

from __future__ import annotations

import jax
from jax import lax

from graphopt import _jax_compat as compat
from graphopt.ops import OpDef, register
from graphopt.types import TensorType


def _types(graph_values) -> list[TensorType]:
    return [v.type for v in graph_values]


def _expect(what: str, got: list[TensorType], want: list[TensorType]) -> None:
    # Weak types may differ across a region boundary (JAX promotes them), shapes and dtypes not.
    if [t.strong() for t in got] != [t.strong() for t in want]:
        raise TypeError(f"{what}: expected ({', '.join(map(str, want))}), "
                        f"got ({', '.join(map(str, got))})")


# --- scan ----------------------------------------------------------------------------------------

def _scan_infer(in_types, params, regions):
    (body,) = regions
    n_consts, n_carry, length = params["num_consts"], params["num_carry"], params["length"]
    consts, carry, xs = in_types[:n_consts], in_types[n_consts:n_consts + n_carry], in_types[n_consts + n_carry:]
    for x in xs:
        if not x.shape or x.shape[0] != length:
            raise TypeError(f"scan over length {length} got an xs operand {x}")
    x_slices = [TensorType(x.shape[1:], x.dtype, x.weak_type) for x in xs]
    _expect("scan body inputs", _types(body.inputs), consts + carry + x_slices)
    outs = _types(body.outputs)
    _expect("scan body carry outputs", outs[:n_carry], carry)
    ys = [TensorType((length, *t.shape), t.dtype, t.weak_type) for t in outs[n_carry:]]
    return outs[:n_carry] + ys


def _scan_impl(*args, regions, num_consts, num_carry, length, reverse, unroll, **extra):
    (body,) = regions
    consts, init, xs = args[:num_consts], args[num_consts:num_consts + num_carry], args[num_consts + num_carry:]

    def step(carry, x):
        out = body(*consts, *carry, *x)
        return list(out[:num_carry]), list(out[num_carry:])

    options = {"_split_transpose": True} if extra.get("_split_transpose") else {}
    carry, ys = lax.scan(step, list(init), list(xs), length=length, reverse=reverse,
                         unroll=unroll, **options)
    return [*carry, *ys]


SCAN = register(OpDef("scan", _scan_infer, _scan_impl, region_names=("body",)))


# --- while ---------------------------------------------------------------------------------------

def _while_infer(in_types, params, regions):
    cond, body = regions
    nc, nb = params["cond_nconsts"], params["body_nconsts"]
    cond_consts, body_consts, init = in_types[:nc], in_types[nc:nc + nb], in_types[nc + nb:]
    _expect("while cond inputs", _types(cond.inputs), cond_consts + init)
    (pred,) = _types(cond.outputs)
    if pred.shape != () or pred.dtype != bool:
        raise TypeError(f"while cond must return bool[], returns {pred}")
    _expect("while body inputs", _types(body.inputs), body_consts + init)
    _expect("while body outputs", _types(body.outputs), init)
    return _types(body.outputs)  # as JAX's rule: the body's types (weak flags may differ from init)


def _while_impl(*args, regions, cond_nconsts, body_nconsts, **_):
    cond, body = regions
    cond_consts, body_consts = args[:cond_nconsts], args[cond_nconsts:cond_nconsts + body_nconsts]
    init = list(args[cond_nconsts + body_nconsts:])
    return lax.while_loop(lambda c: cond(*cond_consts, *c)[0],
                          lambda c: list(body(*body_consts, *c)), init)


WHILE = register(OpDef("while", _while_infer, _while_impl, region_names=("cond", "body")))


# --- cond ----------------------------------------------------------------------------------------

def _cond_infer(in_types, params, regions):
    index, operands = in_types[0], in_types[1:]
    if index.shape != () or index.dtype.kind not in "iu":
        raise TypeError(f"cond index must be an integer scalar, got {index}")
    results = _types(regions[0].outputs)
    for i, branch in enumerate(regions):
        _expect(f"cond branch {i} inputs", _types(branch.inputs), operands)
        _expect(f"cond branch {i} outputs", _types(branch.outputs), results)
    return results


def _cond_impl(index, *operands, regions, **_):
    branches = [lambda *ops, b=b: list(b(*ops)) for b in regions]
    return lax.switch(index, branches, *operands)


COND = register(OpDef("cond", _cond_infer, _cond_impl, region_names=("branch",)))


# --- remat (jax.checkpoint) ----------------------------------------------------------------------

def _call_infer(what):
    def infer(in_types, params, regions):
        (body,) = regions
        _expect(f"{what} body inputs", _types(body.inputs), in_types)
        return _types(body.outputs)
    return infer


def _remat_impl(*args, regions, prevent_cse, policy, **_):
    (body,) = regions
    return list(jax.checkpoint(lambda *a: list(body(*a)), prevent_cse=prevent_cse, policy=policy)(*args))


REMAT = register(OpDef("remat", _call_infer("remat"), _remat_impl, region_names=("body",)))


# --- custom derivatives --------------------------------------------------------------------------

def _custom_impl(primitive):
    def impl(*args, regions, **params):
        (body,) = regions
        avals = [v.type.aval() for v in body.graph.inputs]
        return compat.rebind_custom_call(primitive, args, body, avals, params)
    return impl


CUSTOM_JVP = register(OpDef("custom_jvp_call", _call_infer("custom_jvp_call"),
                            _custom_impl(compat.CUSTOM_JVP), region_names=("primal",)))
CUSTOM_VJP = register(OpDef("custom_vjp_call", _call_infer("custom_vjp_call"),
                            _custom_impl(compat.CUSTOM_VJP), region_names=("primal",)))

# The region op for each JAX control-flow primitive, and the params that become regions.
REGION_OPS = {"scan": SCAN, "while": WHILE, "cond": COND, "remat": REMAT,
              "custom_jvp_call": CUSTOM_JVP, "custom_vjp_call": CUSTOM_VJP}

"""Which groups may lose every channel: those whose layer sits on a residual branch.

Removing all of a group's channels makes each of its exits (the contractions that read it) a sum
over nothing: zero. That removes a whole layer, and leaves a working model, only when the exit
feeds a skip connection: `x + down(gelu(up(x)))` with no hidden units is `x + bias`, an attention
block with no heads is `x + bias` (the block is gone, the residual stream carries on). Without a
skip connection the model's output would no longer depend on its input.

A group is *removable* when every exit's result reaches, through ops whose other operands are
parameters or constants (bias adds, scales, reshapes, casts), an `add` whose other operand does
not depend on the exit: the residual. Attention's query/key dimension is not removable (its exit,
the attention scores, feeds a softmax: emptied, attention becomes uniform, not absent).

    x ──────────────────────────────┐
    └─ ln ─ up ─ gelu ─ down ─ +b ─ add ─▶      down's contraction is the hidden units' exit

Example:
    >>> import graphopt, jax, jax.numpy as jnp
    >>> from graphopt.passes.prune.deps import analyze
    >>> p = {"up": jnp.ones((4, 16)), "down": jnp.ones((16, 4)), "head": jnp.ones((4, 16)),
    ...      "out": jnp.ones((16, 2))}
    >>> def fn(p, x):
    ...     x = x + jax.nn.relu(x @ p["up"]) @ p["down"]       # residual MLP: removable
    ...     return jax.nn.relu(x @ p["head"]) @ p["out"]        # no skip connection
    >>> sorted(removable_groups(analyze(graphopt.trace(fn, p, jnp.ones((2, 4)), params_argnums=0))))
    ['up:1']
"""

from __future__ import annotations

from graphopt.param_derived import param_derived_values

# Ops a zero branch passes through and stays constant (when their other operands are constant).
_PASS_THROUGH = frozenset({"add", "sub", "mul", "div", "neg", "convert_element_type", "reshape", "transpose",
                           "broadcast_in_dim", "squeeze", "copy", "reduce_precision"})


def removable_groups(deps) -> set[str]:
    """Names of the groups of `deps` that may be pruned to zero channels (see the module docstring)."""
    graph = deps.graph
    constant_like, constant = param_derived_values(graph)
    constant_like = set(constant_like) | constant
    out = set()
    for group in deps.groups:
        exits = {id(node): node for node, _, _ in group.exits}
        if all(node.graph is graph and _reaches_residual(node, constant_like) for node in exits.values()):
            out.add(group.name)
    return out


def _reaches_residual(exit_node, constant_like: set) -> bool:
    """Whether every path from the exit's result reaches a skip-connection add (through ops whose
    other operands are constant) before anything else, and at least one path does."""
    stack, seen, found = [exit_node.outputs[0]], set(), False
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if any(node is None for node, _ in value.uses):
            return False  # the branch itself is a model output
        for node in value.users():
            others = [v for v in node.inputs if v is not value]
            if node.op.name == "add" and others and not all(id(v) in constant_like for v in others):
                if any(_depends_on(v, exit_node) for v in others):
                    return False
                found = True
            elif node.op.name in _PASS_THROUGH and all(id(v) in constant_like for v in others):
                stack.extend(node.outputs)
            else:
                return False
    return found


def _depends_on(value, node) -> bool:
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v.node is node:
            return True
        if v.node is not None and id(v.node) not in seen:
            seen.add(id(v.node))
            stack.extend(v.node.inputs)
    return False

"""Which values of a graph are computed from frozen parameters (and constants) only.

fold_params precomputes them once per set of weights; the quantize pass finds its layers by them
(a dot whose one operand is parameter-derived); both name what they make after the largest
parameter such a value comes from.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> g = graphopt.trace(lambda p, x: x @ p["w"].T, {"w": jnp.ones((2, 3))}, jnp.ones(3), params_argnums=0)
    >>> transpose, dot = g.nodes
    >>> derived, constant = param_derived_values(g)
    >>> id(transpose.output) in derived, id(dot.output) in derived, largest_source(transpose.output).path
    (True, False, 'w')
"""

from __future__ import annotations


def param_derived_values(graph) -> tuple[dict, set]:
    """id(value) -> (value, source param bytes) for every value computed from params (and
    constants), in program order, a node's outputs all or none; and the ids of the values
    computed from constants only."""
    derived = {id(a): (a, a.type.nbytes) for a in graph.params()}
    constant = set()  # ids of values computed from constants only (a scale 1/sqrt(d), say)
    for node in graph.nodes:
        if node.op.name == "constant":
            constant.add(id(node.outputs[0]))
            continue
        # Nearly every node reads a non-derived value: stop at the first one (a plain loop; this
        # runs once per node of the model).
        source_bytes = None
        for value in node.inputs:
            entry = derived.get(id(value))
            if entry is not None:
                source_bytes = (source_bytes or 0) + entry[1]
            elif id(value) not in constant:
                break
        else:
            if node.effects or node.regions or node.op.kind == "opaque" or not node.inputs:
                continue
            if source_bytes is None:  # constants only: the prep computes it if a derived value needs it
                constant.update(id(v) for v in node.outputs)
                continue
            for value in node.outputs:
                derived[id(value)] = (value, source_bytes)
    return derived, constant


def unique_name(name: str, taken: set) -> str:
    """`name`, or `name#2`, `name#3`, ... if taken; the result is added to `taken`."""
    base, n = name, 1
    while name in taken:
        n += 1
        name = f"{base}#{n}"
    taken.add(name)
    return name


def param_name(value) -> str:
    """'<source param path>:<op>', naming the largest parameter `value` is computed from (the one
    it replaces, e.g. the base weight of a LoRA merge); `<op>` is the output's name for ops that
    name their outputs (`kernel:scale` of a quantize node)."""
    names = value.node.op.output_names
    return f"{largest_source(value).path}:{names[value.index] if value.index < len(names) else value.node.op.name}"


def largest_source(value):
    """The graph input `value` mainly comes from: following, from `value` up, the largest operand
    of each node first (ties: the earlier operand), the first input reached. The weight of a
    transpose, of a scale product `W * s` (even when s is computed from other weights, as
    SmoothQuant's), of a LoRA merge `W + A @ B`, of quantized codes."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v.node is None:
            return v
        if id(v.node) in seen:
            continue
        seen.add(id(v.node))
        ranked = sorted(enumerate(v.node.inputs), key=lambda item: (-item[1].type.nbytes, item[0]))
        stack.extend(operand for _, operand in reversed(ranked))
    raise ValueError(f"{value!r} is computed from constants only")

"""Recognize attention: softmax(scale · q·kᵀ + bias, masked) · v, in every spelling that traces to
two dot_generals around a softmax node (raise_ops raises softmax first).

    %0 = div %q, 2.83                                         %0 = attention[scale=0.354
    %1 = dot_general[(((3,),(3,)),((0,2),(0,2)))] %0, %k            is_causal=True layout=BTNH
    %2 = select_n %causal, -1e9, %1                    →            mask_value=-1e9 ...] %q, %k, %v
    %3 = softmax[axes=(3,)] %2                                    decomposition(...) { %0 ... %5 }
    %4 = dot_general[(((1,),(3,)),((0,2),(0,1)))] %v, %3
    %5 = transpose[permutation=(0,3,1,2)] %4

How. Every dim of every tensor on the path gets a label: B (batch), T (queries), S (keys), K (kv
heads), G (query heads per kv head, for GQA), H (head dim). q, k and v start labelled by the
layout tried (BTNH: q [B,T,N,H], k and v [B,S,K,H]; BNTH: [B,N,T,H], [B,K,S,H]); reshapes that
split q's heads N into (K, G) and merge them back, transposes, and the dot_generals' dimension
numbers carry the labels along. A match needs: the q·k dot contracts H with H and batches B and K;
the softmax runs over S alone; the p·v dot contracts S with S; the output is labelled as the
layout's q with v's head dim. Flax linen's einsum attention, `jax.nn.dot_product_attention`
(which nnx uses: q reshaped to [B,T,K,G,H], scores transposed to [G,B,K,T,S]), `q @ k.T`, and
grouped-query attention all come out of the same rules.

Between the q·k dot and the softmax, in this order: scaling by constants (of q, k or the scores),
an additive bias, a mask `select_n(keep, fill, scores)` (jnp.where). The op's semantics fix the
order (scale, then bias, then mask); another order is not attention as nn_ops defines it.
The bias and mask operands are the values the user passed in: the reshapes and transposes that
bring them to the scores' layout move into the decomposition, after a check that evaluates them
on a random array and compares with numpy broadcasting to [B,N,T,S] (scores past 16M elements:
only an operand already in the scores' layout). A mask computed from constants only (tril,
iotas) is evaluated: the causal one (keep s <= t) gives is_causal=True, an all-true one nothing,
another one is a mask operand; `and(mask, causal)` gives both. A mask too large to evaluate here
(a long sequence's tril, 67M elements at 8192 tokens) is compared with the causal pattern by XLA,
in one compiled program that materializes neither.

Example:
    >>> import graphopt, jax, jax.numpy as jnp
    >>> from graphopt.pipeline import run_pipeline
    >>> q = jnp.ones((1, 4, 2, 8))
    >>> g = graphopt.trace(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True), q, q, q)
    >>> g = run_pipeline(g, ["canonicalize", "cse", "raise_ops"]).graph
    >>> [(n.op.name, n.params["is_causal"], n.params["layout"]) for n in g.nodes]
    [('attention', True, 'BTNH')]
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

from graphopt import _jax_compat as compat
from graphopt.builder import Builder
from graphopt.errors import GraphError
from graphopt.ir import Graph, Node, Value
from graphopt.nn_ops import COMPOSITE_OPS, attention_node
from graphopt.ops import CONSTANT
from graphopt.outline import OutlineError, outline_into, outline_slice
from graphopt.recognize import constant_array, constant_only, evaluate_slice

LAYOUTS = {"BTNH": (("B", "T", "N", "H"), ("B", "S", "K", "H")),
           "BNTH": (("B", "N", "T", "H"), ("B", "K", "S", "H"))}
_MOVES = ("reshape", "transpose", "broadcast_in_dim")
# Bias and mask chains are checked by evaluating them on a random array as big as the scores;
# past this many elements only an operand already in the scores' layout is taken.
MAX_CHECKED_ELEMENTS = 1 << 24


def raise_attention(graph: Graph) -> Counter:
    """Replace every recognized attention in `graph` (and its regions, not those of composites)."""
    fired: Counter = Counter()
    constants: dict = {}  # id -> (value, array): unrolled layers share one mask (after cse)
    for node in list(graph.nodes):
        if node.graph is not graph:
            continue  # erased by an earlier match
        if node.op.name not in COMPOSITE_OPS:
            for region in node.regions:
                fired.update(raise_attention(region))
        if node.op.name == "dot_general":
            match = match_attention(node, constants)
            if match is not None and _replace(match):
                fired["raise_ops/attention"] += 1
    return fired


@dataclasses.dataclass
class AttentionMatch:
    """What `match_attention` found: operands, the output value, and the attention params."""

    q: Value
    k: Value
    v: Value
    bias: Value | None
    mask: Value | None
    out: Value
    scale: float
    is_causal: bool
    mask_value: float | None
    layout: str


def match_attention(pv: Node, constants: dict | None = None) -> AttentionMatch | None:
    """The attention whose p·v product is `pv` (a dot_general), or None. `constants` memoizes
    the constant masks read (see `_constant`) across calls on one unchanged region of a graph."""
    if pv.params.get("out_sharding") is not None:
        return None
    for side in (0, 1):
        probs = _through(pv.inputs[side], ("convert_element_type",))
        if probs.node is not None and probs.node.op.name == "softmax":
            for layout in LAYOUTS:
                found = _match(pv, side, probs.node, layout, constants)
                if found is not None:
                    return found
    return None


# --- matching ------------------------------------------------------------------------------------

def _match(pv: Node, side: int, softmax: Node, layout: str, constants) -> AttentionMatch | None:
    q_labels, kv_labels = LAYOUTS[layout]
    found = _score_chain(softmax.inputs[0], [])
    if found is None:
        return None
    qk, steps = found
    for q_side in (0, 1):
        q, q_factor, q_ops = _strip(qk.inputs[q_side])
        k, k_factor, k_ops = _strip(qk.inputs[1 - q_side])
        if q.type.ndim != 4 or k.type.ndim != 4:
            continue
        kv_heads = k.type.shape[kv_labels.index("K")]
        q_lab = _propagate(tuple("K" if a == "N" else a for a in q_labels), q, q_ops, kv_heads)
        k_lab = _propagate(kv_labels, k, k_ops, kv_heads)
        if q_lab is None or k_lab is None:
            continue
        operands = (q_lab, k_lab) if q_side == 0 else (k_lab, q_lab)
        labels = _dot_labels(qk, *operands, contract="H")
        if labels is None or sorted(labels) != sorted({"B", "K", "T", "S"} | ({"G"} & set(labels))):
            continue
        match = _match_scores(pv, side, softmax, layout, q, k, labels, steps, q_factor * k_factor,
                              constants)
        if match is not None:
            return match
    return None


def _match_scores(pv, side, softmax, layout, q, k, labels, steps, scale, constants):
    q_labels, kv_labels = LAYOUTS[layout]
    sizes = dict(zip(("B", "T"), (q.type.shape[q_labels.index("B")], q.type.shape[q_labels.index("T")])))
    sizes.update(N=q.type.shape[q_labels.index("N")], S=k.type.shape[kv_labels.index("S")],
                 K=k.type.shape[kv_labels.index("K")])
    bias = mask = None
    is_causal, mask_value, kinds = False, None, []
    for kind, data in steps:  # upward, from the q·k dot to the softmax
        if kind == "transpose":
            labels = tuple(labels[p] for p in data)
            continue
        if kind == "convert":
            continue
        kinds.append(kind)
        if kind == "scale":
            scale *= data
        elif kind == "bias":
            bias = _user_operand(data, labels, sizes)
            if bias is None:
                return None
        else:  # mask
            pred, fill = data
            found = _mask_operand(pred, labels, sizes, constants)
            if found is None:
                return None
            mask, is_causal = found
            mask_value = fill if (mask is not None or is_causal) else None
    if not _in_order(kinds) or tuple(softmax.params["axes"]) != (labels.index("S"),):
        return None
    v, v_factor, v_ops = _strip(pv.inputs[1 - side])
    if v_factor != 1.0 or v.type.ndim != 4:
        return None
    v_lab = _propagate(kv_labels, v, v_ops, sizes["K"])
    if v_lab is None:
        return None
    out_lab = _dot_labels(pv, *((labels, v_lab) if side == 0 else (v_lab, labels)), contract="S")
    want = tuple("K" if a == "N" else a for a in q_labels)
    out = None if out_lab is None else _follow_output(pv.outputs[0], out_lab, want)
    if out is None:
        return None
    return AttentionMatch(q, k, v, bias, mask, out, float(scale), is_causal, mask_value, layout)


def _score_chain(value: Value, steps: list):
    """Walk down from the softmax input to the q·k dot_general: (dot node, steps upward) or None.
    Steps: ("transpose", perm), ("convert", None), ("scale", factor), ("bias", operand),
    ("mask", (pred, fill))."""
    node = value.node
    if node is None:
        return None
    name = node.op.name
    if name == "dot_general":
        return (node, steps[::-1]) if node.params.get("out_sharding") is None else None
    if name == "convert_element_type" and np.issubdtype(value.type.dtype, np.floating):
        return _score_chain(node.inputs[0], steps + [("convert", None)])
    if name == "transpose":
        return _score_chain(node.inputs[0], steps + [("transpose", tuple(node.params["permutation"]))])
    if name in ("mul", "div"):
        factor = _scalar(node.inputs[1])
        if factor is not None and factor != 0:
            factor = factor if name == "mul" else 1.0 / factor
            return _score_chain(node.inputs[0], steps + [("scale", factor)])
        return None
    if name == "select_n" and len(node.inputs) == 3 and node.inputs[0].type.dtype == np.bool_:
        fill = _splat(node.inputs[1])
        if fill is None:
            return None
        return _score_chain(node.inputs[2], steps + [("mask", (node.inputs[0], fill))])
    if name == "add":
        for i in (0, 1):
            found = _score_chain(node.inputs[i], steps + [("bias", node.inputs[1 - i])])
            if found is not None:
                return found
    return None


def _strip(value: Value):
    """(base, constant factor, ops) for value = ops(base · factor): transposes, reshapes and
    multiplications or divisions by constants, outermost first."""
    factor, ops = 1.0, []
    while value.node is not None:
        node = value.node
        if node.op.name in ("mul", "div") and (c := _scalar(node.inputs[1])) is not None and c != 0:
            factor *= c if node.op.name == "mul" else 1.0 / c
        elif node.op.name == "transpose" or (node.op.name == "reshape" and value.type.ndim == 5
                                             and node.inputs[0].type.ndim == 4):
            ops.append(node)  # a head split (q of grouped attention) or a layout transpose
        else:
            break
        value = node.inputs[0]
    return value, factor, ops


def _propagate(labels, base: Value, ops: list, kv_heads: int):
    """Labels of base after `ops` (outermost first): transposes permute them; a reshape may only
    split the heads K into (kv_heads, G) (q of grouped attention)."""
    shape = base.type.shape
    for node in reversed(ops):
        if node.op.name == "transpose":
            perm = node.params["permutation"]
            labels, shape = tuple(labels[p] for p in perm), tuple(shape[p] for p in perm)
            continue
        if "G" in labels or node.params.get("dimensions") is not None:
            return None
        i = labels.index("K")
        split = shape[:i] + (kv_heads, shape[i] // kv_heads) + shape[i + 1:]
        if shape[i] % kv_heads or node.outputs[0].type.shape != split:
            return None
        labels, shape = labels[:i] + ("K", "G") + labels[i + 1:], split
    return labels


def _dot_labels(node: Node, lhs, rhs, contract: str):
    """The labels of a dot_general's output, if it contracts `contract` with itself only and
    batches equal labels."""
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    if len(lc) != 1 or lhs[lc[0]] != contract or rhs[rc[0]] != contract:
        return None
    if any(lhs[i] != rhs[j] for i, j in zip(lb, rb)):
        return None
    free_l = [lhs[i] for i in range(len(lhs)) if i not in lc and i not in lb]
    free_r = [rhs[i] for i in range(len(rhs)) if i not in rc and i not in rb]
    out = tuple([lhs[i] for i in lb] + free_l + free_r)
    return out if len(set(out)) == len(out) else None


def _follow_output(value: Value, labels, want):
    """Follow single readers (transposes, the reshape merging (K, G)) until labels are `want`."""
    while True:
        if labels == want:
            return value
        readers = value.users()
        if len(value.uses) != 1 or not readers:
            return None
        node = readers[0]
        if node.op.name == "transpose":
            labels = tuple(labels[p] for p in node.params["permutation"])
        elif node.op.name == "reshape" and "G" in labels and node.params.get("dimensions") is None:
            i = labels.index("K")
            shape = value.type.shape
            if labels[i + 1:i + 2] != ("G",) or node.outputs[0].type.shape != \
                    shape[:i] + (shape[i] * shape[i + 1],) + shape[i + 2:]:
                return None
            labels = labels[:i + 1] + labels[i + 2:]
        else:
            return None
        value = node.outputs[0]


def _in_order(kinds) -> bool:
    """scale* bias? mask?: the order in which nn_ops' attention applies them."""
    rank = {"scale": 0, "bias": 1, "mask": 2}
    ranks = [rank[k] for k in kinds]
    return ranks == sorted(ranks) and kinds.count("bias") <= 1 and kinds.count("mask") <= 1


# --- bias and mask operands ----------------------------------------------------------------------

def _to_layout(array: np.ndarray, labels, sizes) -> np.ndarray:
    """A [B,N,T,S] array as the scores at `labels` hold it (N split into (K, G) if G is there)."""
    full = np.broadcast_to(array, (sizes["B"], sizes["N"], sizes["T"], sizes["S"]))
    names = ("B", "K", "T", "S")
    if "G" in labels:
        full = full.reshape(sizes["B"], sizes["K"], sizes["N"] // sizes["K"], sizes["T"], sizes["S"])
        names = ("B", "K", "G", "T", "S")
    return np.transpose(full, [names.index(a) for a in labels])


def _user_operand(value: Value, labels, sizes):
    """The value the user passed: the deepest of value's single-use reshapes, transposes,
    broadcasts and `and`s with all-true constants whose numpy broadcast to [B,N,T,S], brought to
    the scores' layout (checked on a random array), is what `value` holds; None if none is."""
    candidates, current = [value], value
    while len(current.uses) == 1 and current.node is not None:
        node = current.node
        if node.op.name in _MOVES:
            current = node.inputs[0]
        elif node.op.name == "and" and _splat(node.inputs[0]) is True:
            current = node.inputs[1]
        elif node.op.name == "and" and _splat(node.inputs[1]) is True:
            current = node.inputs[0]
        else:
            break
        candidates.append(current)
    target = (sizes["B"], sizes["N"], sizes["T"], sizes["S"])
    layout_shape = _layout_shape(labels, sizes)
    try:
        if np.broadcast_shapes(value.type.shape, layout_shape) != layout_shape:
            return None
    except ValueError:
        return None
    if int(np.prod(layout_shape)) > MAX_CHECKED_ELEMENTS and len(candidates) > 1:
        candidates = candidates[:1]  # too big to check a chain on a sample: the value itself only
    rng = np.random.default_rng(0)
    for candidate in reversed(candidates):
        if candidate is value and labels == ("B", "K", "T", "S") and value.type.ndim in (0, 4):
            return value  # already in the scores' layout: lax broadcasts size-1 dims as numpy does
        shape = candidate.type.shape
        if len(shape) > 4 or any(d not in (1, t) for d, t in zip(shape[::-1], target[::-1])):
            continue
        if candidate.type.dtype == np.bool_:
            sample = rng.random(shape) < 0.5
        else:
            sample = rng.standard_normal(shape).astype(candidate.type.dtype)
        got = evaluate_slice([candidate], [sample], [value])
        if got is None or got[0].shape != value.type.shape:
            continue
        if np.array_equal(np.broadcast_to(got[0], layout_shape), _to_layout(sample, labels, sizes),
                          equal_nan=True):
            return candidate
    return None


def _layout_shape(labels, sizes) -> tuple:
    return tuple(sizes["N"] // sizes["K"] if a == "G" else sizes[a] for a in labels)


def _mask_operand(pred: Value, labels, sizes, constants=None):
    """(mask operand or None, is_causal) for a select's predicate, or None if not recognized."""
    keep = _constant(pred, constants)
    if keep is None:
        if _causal_constant(pred, labels, sizes, constants):  # too large to evaluate here
            return (None, True)
        mask = _user_operand(pred, labels, sizes)
        if mask is None and pred.node is not None and pred.node.op.name == "and":
            # jax.nn.dot_product_attention(mask=m, is_causal=True): and(m, causal)
            for causal, user in (pred.node.inputs, pred.node.inputs[::-1]):
                if _causal_constant(causal, labels, sizes, constants) and len(user.uses) == 1:
                    mask = _user_operand(user, labels, sizes)
                    if mask is not None:
                        return (mask, True)
        return None if mask is None else (mask, False)
    if keep.all():
        return (None, False)
    if _causal_constant(pred, labels, sizes, constants):
        return (None, True)
    mask = _user_operand(pred, labels, sizes)  # another constant mask: an operand
    return None if mask is None else (mask, False)


def _constant(value: Value, constants: dict | None):
    """constant_array(value), memoized in `constants` (id -> (value, array); holding the value
    keeps its id from being reused) when given."""
    if constants is None:
        return constant_array(value)
    found = constants.get(id(value))
    if found is None:
        found = constants[id(value)] = (value, constant_array(value))
    return found[1]


def _causal_constant(value: Value, labels, sizes, constants: dict | None) -> bool:
    """Whether value is a constant mask keeping s <= t (as nn_ops' causal); memoized in
    `constants` when given."""
    key = ("causal", id(value), labels, tuple(sizes.items()))
    found = None if constants is None else constants.get(key)
    if found is None:
        keep = _constant(value, constants)
        found = (value, _is_causal(keep, labels, sizes) if keep is not None
                 else _is_large_causal(value, labels, sizes))
        if constants is not None:
            constants[key] = found
    return found[1]


def _is_causal(keep, labels, sizes) -> bool:
    """Whether `keep` (a constant mask, None if not constant) keeps s <= t, as nn_ops' causal.
    Compared at keep's own shape (broadcast against the T and S axes only), never at the size
    of the scores."""
    shapes = None if keep is None else _causal_shapes(keep.shape, labels, sizes)
    if shapes is None:
        return False
    shape, t_shape, s_shape = shapes
    causal = np.arange(sizes["S"]).reshape(s_shape) <= np.arange(sizes["T"]).reshape(t_shape)
    keep = keep.reshape(shape)
    shape = np.broadcast_shapes(keep.shape, causal.shape)
    return bool(np.array_equal(np.broadcast_to(keep, shape), np.broadcast_to(causal, shape)))


def _is_large_causal(value: Value, labels, sizes) -> bool:
    """_is_causal for a constant-only mask too large to evaluate here (the causal mask of a long
    sequence, which fold_constants keeps lazy as iotas and a comparison): one program compiled
    for this machine's CPU computes it and compares it with s <= t; XLA fuses both into the
    reduction, so neither is materialized."""
    shapes = _causal_shapes(value.type.shape, labels, sizes)
    if shapes is None or value.type.dtype != np.bool_ or not constant_only(value, max_elements=float("inf")):
        return False
    shape, t_shape, s_shape = shapes

    def check():
        results: dict = {}

        def compute(v):
            node = v.node
            if id(node) not in results:
                results[id(node)] = ([compat.make_constant(**node.params)] if node.op is CONSTANT else
                                     compat.bind(node.op.primitive, [compute(x) for x in node.inputs],
                                                 node.params))
            return results[id(node)][v.index]

        causal = jnp.arange(sizes["S"]).reshape(s_shape) <= jnp.arange(sizes["T"]).reshape(t_shape)
        return jnp.all(compute(value).reshape(shape) == causal)

    # Compiled and run now, also when the pass runs under a trace (`@optimize` inside jax.jit).
    cpu = jax.local_devices(backend="cpu")[0]
    try:
        with jax.default_device(cpu):
            return bool(jax.jit(check).lower().compile()())
    except Exception:  # noqa: BLE001  (a primitive the CPU cannot run: not known causal, an operand)
        return False


def _causal_shapes(keep_shape, labels, sizes):
    """(keep's shape at the scores' rank, T's and S's broadcast shapes), or None if a mask of
    `keep_shape` cannot line up with the scores' layout."""
    if len(keep_shape) > len(labels):
        return None
    shape = (1,) * (len(labels) - len(keep_shape)) + tuple(keep_shape)
    if any(d not in (1, n) for d, n in zip(shape, _layout_shape(labels, sizes))):
        return None
    return (shape, [sizes["T"] if a == "T" else 1 for a in labels],
            [sizes["S"] if a == "S" else 1 for a in labels])


def _through(value: Value, ops) -> Value:
    """value, or what it is computed from by a chain of `ops` (e.g. converts)."""
    while value.node is not None and value.node.op.name in ops:
        value = value.node.inputs[0]
    return value


def _scalar(value: Value):
    if value.type.size != 1:
        return None
    array = constant_array(value)
    if array is None or array.dtype.kind in "bcOSU":  # bfloat16 & co. are kind "V"
        return None
    return float(array.reshape(()))


def _splat(value: Value):
    """The one value a constant-only array holds everywhere (a Python scalar), else None."""
    node = value.node
    if node is not None and node.op.name == "broadcast_in_dim" and node.inputs[0].type.ndim == 0:
        return _splat(node.inputs[0])  # without materializing the broadcast
    array = constant_array(value)
    if array is None or array.size == 0:
        return None
    first = array.reshape(-1)[0]
    if not np.all(array == first):
        return None
    return first.item() if array.dtype.kind in "biuf" else float(first)


# --- rewriting -----------------------------------------------------------------------------------

def _replace(m: AttentionMatch) -> bool:
    inputs = [m.q, m.k, m.v] + [x for x in (m.bias, m.mask) if x is not None]
    try:
        order = outline_slice(inputs, [m.out])
    except OutlineError:
        return False
    b = Builder(m.out.graph, before=m.out.node, made_by="raise_ops")
    try:
        new = attention_node(b, m.q, m.k, m.v, m.bias, m.mask, scale=m.scale, is_causal=m.is_causal,
                             mask_value=m.mask_value, layout=m.layout)
    except GraphError as err:  # the op's shape rule raised TypeError: it rejects these operands
        if not isinstance(err.__cause__, TypeError):
            raise
        return False
    if new.type != m.out.type:
        b.discard()
        return False
    outline_into(new.node, inputs, [m.out], order)
    return True

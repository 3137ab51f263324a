"""graphopt's IR: a typed SSA graph with regions, parameter roles and provenance.

- A `Graph` holds its inputs (`Argument`s with a role, `param` or `input`, and a pytree path), an
  ordered list of `Node`s, and its outputs. Nested computations (scan bodies, while and cond
  branches, remat, custom derivatives) are sub-graphs in `node.regions`; a region sees only its own
  inputs, so every value belongs to exactly one graph.
- Each `Node` has an `Op` and params; its output types come from the op's shape rule when the node
  is built. Rewiring keeps types (`replace_all_uses` refuses a value of another type), so types
  cannot go stale.
- Use lists are kept by the graph: passes call `add_node`, `replace_all_uses`, `set_input` and
  `erase`, never edit `inputs` or `uses` themselves.

Example:
    >>> import jax, numpy as np
    >>> from graphopt.types import TensorType
    >>> from graphopt.ops import primitive_op
    >>> g = Graph()
    >>> x = g.add_input(TensorType((3,), np.float32), path="x")
    >>> y = g.add_node(primitive_op(jax.lax.sin_p), [x]).output
    >>> g.set_outputs([y])
    >>> g.verify()
    >>> print(g)
    graph(%x: f32[3]) {
      %0 = sin %x : f32[3]
      return %0
    }
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from graphopt.cost import plain_flops
from graphopt.errors import GraphError
from graphopt.gc_pause import gc_paused
from graphopt.provenance import Provenance
from graphopt.ops import CONSTANT, NO_EFFECTS, Op, constant_params
from graphopt.types import TensorType


class Value:
    """An SSA value: the output `index` of `node` (or a graph input, see `Argument`)."""

    __slots__ = ("type", "node", "index", "uses")

    def __init__(self, type: TensorType, node: "Node | None", index: int):
        self.type = type
        self.node = node
        self.index = index
        # (node, operand index) -> None, in insertion order; node is None for a use as a graph
        # output at that position. A dict, not a list: erasing one of many readers of a shared
        # value (a literal) must not cost a scan of all of them.
        self.uses: dict[tuple[Node | None, int], None] = {}

    @property
    def graph(self) -> "Graph":
        return self.node.graph

    def users(self) -> list["Node"]:
        """Distinct nodes that read this value, in use order."""
        seen = {}
        for node, _ in self.uses:
            if node is not None:
                seen.setdefault(id(node), node)
        return list(seen.values())

    def __repr__(self):
        return f"<Value {self.type} of {self.node.op.name if self.node else 'input'}>"


class Argument(Value):
    """A graph input. `role` is "param" (a weight; frozen at inference) or "input"."""

    __slots__ = ("role", "path", "_graph")

    def __init__(self, type: TensorType, graph: "Graph", index: int, role: str, path: str):
        super().__init__(type, None, index)
        if role not in ("param", "input"):
            raise ValueError(f"input role must be 'param' or 'input', got {role!r}")
        self.role = role
        self.path = path
        self._graph = graph

    @property
    def graph(self) -> "Graph":
        return self._graph

    def __repr__(self):
        return f"<Argument {self.role} {self.path or self.index}: {self.type}>"


class Node:
    """One operation: `op` applied to `inputs` with `params`, producing `outputs`."""

    __slots__ = ("op", "inputs", "outputs", "params", "regions", "provenance", "effects",
                 "graph", "_prev", "_next", "_flops")

    @property
    def output(self) -> Value:
        """The single output (error if the node has several)."""
        if len(self.outputs) != 1:
            raise GraphError(f"{self.op.name} has {len(self.outputs)} outputs; use .outputs", self)
        return self.outputs[0]

    @property
    def input_types(self) -> list[TensorType]:
        return [v.type for v in self.inputs]

    def set_input(self, index: int, value: Value) -> None:
        """Rewire operand `index` to `value`, which must have the same type."""
        old = self.inputs[index]
        _check_same_type(old, value, self)
        del old.uses[(self, index)]
        self.inputs[index] = value
        value.uses[(self, index)] = None

    def describe(self) -> str:
        return f"{self.op.name} ({self.provenance.describe()})"

    def __repr__(self):
        return f"<Node {self.op.name} -> {', '.join(str(v.type) for v in self.outputs)}>"


class Graph:
    """A typed SSA graph: inputs, ordered nodes, outputs. See the module docstring."""

    def __init__(self, name: str = "graph"):
        self.name = name
        self.inputs: list[Argument] = []
        self.outputs: list[Value] = []
        self.in_tree = None   # pytree structure of the traced function's arguments
        self.out_tree = None  # ... and of its result
        self.parent: Node | None = None  # the node holding this graph, for a region
        self.param_argnums: tuple[int, ...] = ()  # top-level arguments that hold parameters
        self.prep = None  # ParamPrep: how param inputs are computed from the user's (fold_params)
        # What passes record about the graph as a whole, JSON-able (the quantization recipe);
        # copied (shallowly) by clone, so a reverted pass's entries go with its graph.
        self.metadata: dict[str, Any] = {}
        self._first: Node | None = None
        self._last: Node | None = None
        self._len = 0
        # Running totals over this graph's own nodes, for graphopt.cost's statistics (a pass
        # report asks after every pass): FLOPs of the nodes as if without regions, constant
        # bytes, opaque nodes; and the nodes holding regions, whose FLOPs come from those.
        self._plain_flops = 0
        self._constant_bytes = 0
        self._opaque = 0
        self._holders: dict[Node, None] = {}
        self._param_totals = None  # (elements, bytes) of the param inputs, kept by graphopt.cost
        self._insert_before: Node | None = None  # default insertion point; see inserting_before

    # --- building ------------------------------------------------------------------------------

    def add_input(self, type: TensorType, role: str = "input", path: str = "") -> Argument:
        arg = Argument(type, self, len(self.inputs), role, path)
        self.inputs.append(arg)
        self._param_totals = None
        return arg

    def add_node(self, op: Op, inputs: Sequence[Value], params: dict | None = None,
                 regions: Sequence["Graph"] = (), provenance: Provenance | None = None, *,
                 before: Node | None = None, after: Node | None = None,
                 _types: Sequence[TensorType] | None = None, _effects=None) -> Node:
        """Create a node, compute its output types from the op's shape rule, and insert it.

        Inserted at the end, or `before`/`after` an existing node of this graph. (`_types` and
        `_effects` are for the tracer only: types JAX already computed with the same rules.)
        """
        params = dict(params or {})
        inputs = list(inputs)
        self._check_inputs(op, inputs)
        node = Node.__new__(Node)
        node.op, node.inputs, node.params = op, inputs, params
        node.regions = tuple(regions)
        node.provenance = provenance or Provenance()
        node.graph = self
        if _types is None:
            in_types = [v.type for v in inputs]
            try:
                _types, effects = op.signature(in_types, params, node.regions)
            except Exception as err:
                raise GraphError(f"{op.name}: inputs ({', '.join(map(str, in_types))}) are not "
                                 f"accepted: {err}", node) from err
            if _types is None:
                raise GraphError(f"{op.name} is opaque: its output types must come from a trace", node)
            _effects = effects if _effects is None else _effects
        node.effects = frozenset(_effects) if _effects else NO_EFFECTS
        node._flops = None  # FLOPs, cached by graphopt.cost: op, params and types are fixed
        node.outputs = tuple([Value(t, node, i) for i, t in enumerate(_types)])
        for region in node.regions:
            region.parent = node
        for i, value in enumerate(inputs):
            value.uses[(node, i)] = None
        self._link(node, before, after)
        return node

    def constant(self, value, dtype=None, weak_type: bool = False, *, before: Node | None = None,
                 provenance: Provenance | None = None) -> Value:
        """Add a constant node holding `value` (kept as given, never copied) and return its value."""
        return self.add_node(CONSTANT, [], constant_params(value, dtype, weak_type),
                             provenance=provenance, before=before).output

    def set_outputs(self, values: Sequence[Value]) -> None:
        for i, value in enumerate(self.outputs):
            del value.uses[(None, i)]
        self.outputs = list(values)
        for i, value in enumerate(self.outputs):
            if value.graph is not self:
                raise GraphError("a graph output belongs to another graph")
            value.uses[(None, i)] = None

    def remove_inputs(self, args: Sequence[Argument]) -> None:
        """Remove unused graph inputs; the remaining inputs keep their order."""
        doomed = {id(a) for a in args}
        for arg in args:
            if arg.graph is not self or self.inputs[arg.index] is not arg:
                raise GraphError(f"remove_inputs: {arg!r} is not an input of this graph")
            if arg.uses:
                raise GraphError(f"cannot remove input {arg.path or arg.index!r}: it still has "
                                 f"{len(arg.uses)} use(s)")
        self.reorder_inputs([a for a in self.inputs if id(a) not in doomed], _subset=True)

    def reorder_inputs(self, order: Sequence[Argument], *, _subset: bool = False) -> None:
        """Set the order of the graph inputs (a permutation of them); indexes follow."""
        ids = set(map(id, self.inputs))
        if len(set(map(id, order))) != len(order) or not all(id(a) in ids for a in order) or (
                not _subset and len(order) != len(self.inputs)):
            raise GraphError("reorder_inputs needs a permutation of the graph's inputs")
        self.inputs = list(order)
        self._param_totals = None
        for i, arg in enumerate(self.inputs):
            arg.index = i

    def clone(self) -> tuple["Graph", dict]:
        """A deep copy (nodes, values, regions; params shared, they are never mutated) and the map
        from each original node and value, by id, to its copy."""
        mapping: dict[int, Any] = {}
        with gc_paused():
            copy = self._clone_into(mapping)
        return copy, mapping

    def _clone_into(self, mapping) -> "Graph":
        copy = Graph(self.name)
        copy.in_tree, copy.out_tree = self.in_tree, self.out_tree
        copy.param_argnums, copy.prep = self.param_argnums, self.prep  # prep is never mutated
        copy.metadata = dict(self.metadata)
        for arg in self.inputs:
            mapping[id(arg)] = copy.add_input(arg.type, arg.role, arg.path)
        # Linked here, not by add_node, and the running totals taken from this graph: a clone
        # costs a third less (stamping a model's repeated layers clones every layer's regions).
        last = None
        for node in self.nodes:
            new = _copy_node(copy, node, [mapping[id(v)] for v in node.inputs], None, mapping)
            new._prev = last
            if last is None:
                copy._first = new
            else:
                last._next = new
            last = new
            if new.regions:
                copy._holders[new] = None
            mapping[id(node)] = new
            for old_value, new_value in zip(node.outputs, new.outputs):
                mapping[id(old_value)] = new_value
        if last is not None:
            last._next = None
        copy._last, copy._len = last, self._len
        copy._plain_flops, copy._constant_bytes, copy._opaque = self._plain_flops, self._constant_bytes, self._opaque
        copy.set_outputs([mapping[id(v)] for v in self.outputs])
        return copy

    def add_copy(self, node: Node, inputs: Sequence[Value], provenance: Provenance | None = None, *,
                 before: Node | None = None) -> Node:
        """Insert, as add_node does, a copy of `node` (from any graph) that reads `inputs`, with
        its regions cloned. Its types, effects and FLOPs are the node's: nothing is recomputed."""
        inputs = list(inputs)
        self._check_inputs(node.op, inputs)
        new = _copy_node(self, node, inputs, provenance, {})
        self._link(new, before, None)
        return new

    def add_copies(self, nodes: Sequence[Node], mapping: dict) -> list[Node]:
        """Insert copies of `nodes` in order, as add_copy does, at the insertion point: each reads,
        for an operand, `mapping[id(operand)]` where there is one, else the operand itself, and
        maps its outputs there (copying a layer onto the layer before)."""
        nxt = self._insert_before
        prev = self._last if nxt is None else nxt._prev
        get, copies = mapping.get, []
        for node in nodes:
            inputs = [get(id(v), v) for v in node.inputs]
            self._check_inputs(node.op, inputs)
            new = _copy_node(self, node, inputs, None, {})
            self._splice(new, prev, nxt)
            prev = new
            mapping.update(zip(map(id, node.outputs), new.outputs))
            copies.append(new)
        return copies

    # --- rewriting -----------------------------------------------------------------------------

    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Make every reader of `old` (nodes and graph outputs) read `new` instead."""
        if old is new:
            return
        _check_same_type(old, new, old.node)
        if new.graph is not self or old.graph is not self:
            raise GraphError("replace_all_uses: both values must belong to this graph")
        for node, i in old.uses:
            if node is None:
                self.outputs[i] = new
            else:
                node.inputs[i] = new
            new.uses[(node, i)] = None
        old.uses = {}

    def modify(self, node: Node, op: Op, inputs: Sequence[Value], params: dict,
               provenance: Provenance | None = None) -> list[Node]:
        """Make `node` compute `op(*inputs, **params)` in place, when that gives the same output
        types and effects (another spelling of the same value: its readers need no rewiring, no
        node is made or erased; MLIR's modifyOpInPlace). Returns the nodes that computed its
        former operands, some of which may be dead now. Raises GraphError, changing nothing, if
        the types or effects would differ or the node holds regions.
        """
        if node.graph is not self:
            raise GraphError("modify: the node belongs to another graph", node)
        inputs = list(inputs)
        self._check_inputs(op, inputs, node)
        in_types = [v.type for v in inputs]
        try:
            types, effects = op.signature(in_types, params, ())
        except Exception as err:
            raise GraphError(f"{op.name}: inputs ({', '.join(map(str, in_types))}) are not "
                             f"accepted: {err}", node) from err
        outputs = node.outputs
        if node.regions or types is None or len(types) != len(outputs) or effects != node.effects or \
                any(t != v.type for t, v in zip(types, outputs)):
            raise GraphError(f"cannot modify {node.op.name} into {op.name} in place: the types or "
                             "effects would change (build a new node and replace_all_uses)", node)
        former = []
        for i, value in enumerate(node.inputs):
            del value.uses[(node, i)]
            if value.node is not None:
                former.append(value.node)
        if op is node.op and op is not CONSTANT and op.kind != "opaque":
            # Same op: only the FLOPs total can change (constants and opaque ops count apart).
            old = node._flops if node._flops is not None else plain_flops(node)
            node.inputs, node.params = inputs, dict(params)
            node._flops = new = plain_flops(node)
            self._plain_flops += new - old
        else:
            self._count(node, -1)
            node.op, node.inputs, node.params, node._flops = op, inputs, dict(params), None
            self._count(node, 1)
        for i, value in enumerate(inputs):
            value.uses[(node, i)] = None
        if provenance is not None:
            node.provenance = provenance
        return former

    def _check_inputs(self, op: Op, inputs: Sequence[Value], node: Node | None = None) -> None:
        for value in inputs:
            if value.graph is not self:
                raise GraphError(f"{op.name}: an input belongs to another graph (regions only see "
                                 "their own inputs)", node)

    def erase(self, node: Node) -> None:
        """Remove a node whose outputs are unused."""
        if node.graph is not self:
            raise GraphError("erase: the node belongs to another graph", node)
        for value in node.outputs:
            if value.uses:
                raise GraphError(f"cannot erase {node.op.name}: output {value.index} still has "
                                 f"{len(value.uses)} use(s); replace_all_uses first", node)
        for i, value in enumerate(node.inputs):
            del value.uses[(node, i)]
        self._unlink(node)
        node.graph = None

    def move_to_end(self, nodes: Sequence[Node], source: "Graph") -> None:
        """Move `nodes` (in this order) from `source` to the end of this graph, uses and all; the
        caller rewires their operands that belong to `source` (see graphopt.outline.outline_into).
        Raises GraphError, moving nothing, if one of them is not in `source`."""
        for node in nodes:
            if node.graph is not source or source is self:
                raise GraphError("move_to_end: the node belongs to another graph", node)
        # One loop for the unlink, the link and the running totals: raise_ops moves most nodes
        # of a transformer this way, a few per op.
        last, flops = self._last, 0
        for node in nodes:
            prev, nxt = node._prev, node._next
            if prev is None:
                source._first = nxt
            else:
                prev._next = nxt
            if nxt is None:
                source._last = prev
            else:
                nxt._prev = prev
            node._prev, node._next = last, None
            if last is None:
                self._first = node
            else:
                last._next = node
            last = node
            node.graph = self
            op = node.op
            if op is not CONSTANT and op.kind != "opaque" and not node.regions:
                f = node._flops
                if f is None:
                    f = node._flops = plain_flops(node)
                flops += f
            else:  # constants, opaque ops and region holders have totals of their own
                source._count(node, -1)
                self._count(node, 1)
        self._last = last
        source._len -= len(nodes)
        self._len += len(nodes)
        source._plain_flops -= flops
        self._plain_flops += flops

    def inserting_before(self, node: Node | None):
        """Context in which `add_node` (without `before`/`after`) inserts before `node`.

        >>> with graph.inserting_before(node):  # doctest: +SKIP
        ...     graph.add_node(...)
        """
        return _InsertionPoint(self, node)

    def _link(self, node: Node, before: Node | None, after: Node | None) -> None:
        if before is not None and after is not None:
            raise GraphError("add_node: give `before` or `after`, not both")
        if before is None and after is None:
            before = self._insert_before
        anchor = before or after
        if anchor is not None and anchor.graph is not self:
            raise GraphError("add_node: the anchor node belongs to another graph", anchor)
        if before is not None:
            prev, nxt = before._prev, before
        elif after is not None:
            prev, nxt = after, after._next
        else:
            prev, nxt = self._last, None
        self._splice(node, prev, nxt)

    def _splice(self, node: Node, prev: Node | None, nxt: Node | None) -> None:
        """Put `node` between `prev` and `nxt` (neighbours, or None at an end)."""
        node._prev, node._next = prev, nxt
        if prev is None:
            self._first = node
        else:
            prev._next = node
        if nxt is None:
            self._last = node
        else:
            nxt._prev = node
        self._len += 1
        self._count(node, 1)

    def _unlink(self, node: Node) -> None:
        prev, nxt = node._prev, node._next
        if prev is None:
            self._first = nxt
        else:
            prev._next = nxt
        if nxt is None:
            self._last = prev
        else:
            nxt._prev = prev
        node._prev = node._next = None
        self._len -= 1
        self._count(node, -1)

    def _count(self, node: Node, sign: int) -> None:
        """Add (sign 1) or remove (-1) `node` from the running totals."""
        flops = node._flops
        if flops is None:
            flops = node._flops = plain_flops(node)
        self._plain_flops += sign * flops
        op = node.op
        if op is CONSTANT:
            self._constant_bytes += sign * node.outputs[0].type.nbytes
        elif op.kind == "opaque":
            self._opaque += sign
        if node.regions:
            if sign > 0:
                self._holders[node] = None
            else:
                del self._holders[node]

    def set_regions(self, node: Node, regions: Sequence["Graph"]) -> None:
        """Give `node`, which holds none, its regions (see graphopt.outline.outline_into); the
        caller checks they fit its op."""
        if node.graph is not self or node.regions:
            raise GraphError("set_regions: the node belongs to another graph or holds regions", node)
        node.regions = tuple(regions)
        for region in node.regions:
            region.parent = node
        if node.regions:
            self._holders[node] = None

    # --- reading -------------------------------------------------------------------------------

    @property
    def nodes(self) -> Iterator[Node]:
        """Nodes in order. Erasing the current node while iterating is allowed."""
        node = self._first
        while node is not None:
            nxt = node._next
            yield node
            node = nxt

    def walk(self) -> Iterator[Node]:
        """Every node, regions included (a region's nodes follow the node that holds it).
        Erasing the current node while walking is allowed, as with `nodes`."""
        resume: list[Node | None] = []  # where to go on once a region is done
        node = self._first
        while True:
            while node is not None:
                nxt, regions = node._next, node.regions
                yield node
                if regions:  # one generator for any depth: a pass walks every node
                    resume.append(nxt)
                    resume.extend(r._first for r in reversed(regions[1:]))
                    nxt = regions[0]._first
                node = nxt
            if not resume:
                return
            node = resume.pop()

    def params(self) -> list[Argument]:
        return [a for a in self.inputs if a.role == "param"]

    def __len__(self) -> int:
        return self._len

    def __str__(self) -> str:
        from graphopt.show import format_graph

        return format_graph(self)

    def summary(self):
        """Counts by op, parameter count and bytes, FLOPs. See `graphopt.show.Summary`."""
        from graphopt.show import summarize

        return summarize(self)

    def diff(self, other: "Graph"):
        """What changed from this graph to `other`, by module path and by pass (`graphopt.diff`)."""
        from graphopt.diff import diff

        return diff(self, other)

    def _repr_html_(self) -> str:
        from graphopt.show import graph_html

        return graph_html(self)

    def __treescope_repr__(self, path, subtree_renderer):
        from graphopt.show import treescope_rendering

        return treescope_rendering(self, path, subtree_renderer)

    # --- checking ------------------------------------------------------------------------------

    def verify(self) -> None:
        """Check the invariants: links, SSA order, use lists, types from shape rules, regions.

        Raises GraphError naming the node (op, module path, source line) on the first violation.
        """
        from graphopt.verify import verify_graph

        verify_graph(self)


def _copy_node(graph: Graph, node: Node, inputs: list, provenance, region_mapping: dict) -> Node:
    """A copy of `node` in `graph` reading `inputs`, not yet linked into its node list."""
    new = Node.__new__(Node)
    new.op, new.inputs, new.params = node.op, inputs, dict(node.params)
    new.regions = tuple([r._clone_into(region_mapping) for r in node.regions])
    for region in new.regions:
        region.parent = new
    new.provenance = provenance or node.provenance
    new.graph, new.effects, new._flops = graph, node.effects, node._flops
    new.outputs = tuple([Value(v.type, new, v.index) for v in node.outputs])
    for i, value in enumerate(inputs):
        value.uses[(new, i)] = None
    return new


def erase_dead(candidates: Sequence[Node]) -> int:
    """Erase the candidates that have no readers and no effects, and the producers that become
    dead in turn; returns how many nodes were erased."""
    erased = 0
    stack = list(candidates)
    while stack:
        node = stack.pop()
        if node.graph is None or node.effects or is_read(node):
            continue
        producers = [v.node for v in node.inputs if v.node is not None]
        node.graph.erase(node)
        erased += 1
        stack.extend(producers)
    return erased


def is_read(node: Node) -> bool:
    """Whether a node or a graph output reads one of `node`'s outputs."""
    for value in node.outputs:  # a plain loop: this runs for every candidate of every erasure
        if value.uses:
            return True
    return False


class _InsertionPoint:
    def __init__(self, graph: Graph, node: Node | None):
        self.graph, self.node = graph, node

    def __enter__(self):
        self.saved = self.graph._insert_before
        self.graph._insert_before = self.node
        return self.graph

    def __exit__(self, *exc):
        self.graph._insert_before = self.saved


def _check_same_type(old: Value, new: Value, node) -> None:
    if old.type != new.type:
        raise GraphError(f"type mismatch: cannot replace a {old.type} value with a {new.type} value "
                         "(a rewrite must preserve types; insert a convert or reshape)", node)

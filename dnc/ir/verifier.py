"""The verifier: the IR's invariants, checked after lowering and after every pass.

It trusts nothing a node carries. `check_structure` checks what any IR must hold:
a `Node` record under its own path, attributes of its op's type, a typed unit, the
op's arity with ports 0..n-1, creation order a topological order, every `pre`
reference (pass fold_preact_bn), one input, one output. For an inferred IR, `verify`
then re-derives each node's shape, state_dict tensors, parameter count and MACs from
the op table (`derive`, which inference fills nodes from too) on the shapes its
inputs carry, and refuses any difference, naming the node and both values. So a pass
that edits a node after inference, or leaves a stale shape behind, is caught at the
step that did it.

Verifying a graph again costs what changed. A node's checks read only its record, its
input edges and their ports, and its inputs' records; so after an inferred verification
`verify` keeps a snapshot of each node's fields and edges (copies, compared by value: it
trusts no pass to say what it touched), and the next `verify` of that graph runs the
per-node checks and the re-derivation on every node where any of those differ, and on
every reader of such a node. Each other node would get the very answer it got before.
The checks that span the graph (unique orders, `pre` references and their channels,
one input, one output) run over every node each time.

Cost: O(V + E log E). Each node is visited once and applies its rules to its own
inputs (a concatenation costs its inputs); `inputs` sorts each node's edges by port,
`ordered` the nodes by creation order; no walk revisits the graph. A repeated
verification compares each node's fields and edges (in C) and checks the rest again.
No torch here.
"""

from __future__ import annotations

import functools
import operator
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import compress

import networkx as nx

from dnc.ir.graph import (
    IRError,
    Node,
    Unit,
    UnitKind,
    commutes_with_affine,
    edge_ports,
    graph_input,
    in_port_order,
    inputs,
    node,
    output,
    takes_pre,
)
from dnc.ir.ops import OPS, OpKind, RuleError, Shape, Tensor, param_count


@dataclass(frozen=True)
class Derived:
    """What the op table says a node carries, given its inputs' shapes."""

    shape: Shape
    tensors: tuple[Tensor, ...]
    params: int
    macs: int


def derive(n: Node, shapes: list[Shape]) -> Derived:
    """The shape, tensors, params and MACs of `n` on inputs of `shapes`, from the op table.

    A `RuleError` means the rule cannot apply to these sizes (inference reports it as the
    user's ShapeError); anything else a rule raises is a malformed node: an IRError naming it.
    """
    try:
        if len(shapes) == 1:  # the op table's rules are pure: one op on one input shape is derived once
            return _derived(n.op, n.attrs, shapes[0])
        return _derive(n.op, n.attrs, shapes)
    except RuleError:
        raise
    except Exception as err:
        raise IRError(
            f"{n.scope}: {n.op.value} rule fails on inputs {_shapes(shapes)}: {type(err).__name__}: {err}"
        ) from err


def _derive(op: OpKind, attrs, shapes: list[Shape]) -> Derived:
    opdef = OPS[op]
    shape = opdef.shape(attrs, shapes)
    tensors = tuple(opdef.tensors(attrs, shapes))
    return Derived(shape, tensors, param_count(tensors), opdef.macs(attrs, shapes, shape))


@functools.lru_cache(maxsize=1 << 16)
def _derived(op: OpKind, attrs, shape: Shape) -> Derived:
    # NOTE: a maximal spec's IR is verified after every pass: most of its 14,000 nodes are the same op on the same
    # shape each time, so the rule's answer is kept (lru_cache keeps no exception: a failing rule fails again)
    return _derive(op, attrs, [shape])


def verify(graph: nx.DiGraph, *, inferred: bool = False, full: bool = False) -> None:
    """Check the IR's invariants; raise IRError naming the node that breaks one.

    `inferred`: every node must carry its shape, tensors, params and MACs, each equal to
    what the op table derives from its inputs' carried shapes. Unless `full`, a graph
    verified before is checked again where it changed since (see the module's docstring).
    """
    before = _VERIFIED.pop(graph, None)  # a graph that fails keeps no snapshot
    if not inferred:
        _structure(graph, _Snapshot.edges_only(graph))
        return
    snapshot = _Snapshot.take(graph, None if full else before)
    ins, pres = _structure(graph, snapshot)
    _check_inferred(graph, ins)
    _check_pre_channels(graph, pres)
    _VERIFIED[graph] = snapshot


@dataclass
class _Snapshot:
    """Each node's fields and input edges as last verified, and what must be checked again."""

    fields: dict[str, dict]  # scope -> the record's fields (a copy)
    edges: dict[str, tuple[list[str], list]]  # scope -> its inputs as stored, and their ports
    todo: list[str]  # the nodes whose record is checked and re-derived, in graph order
    rewired: set[str]  # nodes whose input edges or ports changed: their ports and order are checked
    reordered: set[str]  # nodes whose order changed: they and each of their readers are checked for order

    @staticmethod
    def take(graph: nx.DiGraph, before: _Snapshot | None) -> _Snapshot:
        # NOTE: each step maps over every node in C (a maximal spec's IR has 14,000 nodes and 540,000 edges); only
        # the nodes that differ are looked at one by one
        scopes = list(graph._node)  # NOTE: networkx's own dicts
        records = map(_record, graph._node.values())
        nows = [rec.__dict__ if isinstance(rec, Node) else {"record": rec} for rec in records]
        preds = list(map(graph._pred.__getitem__, scopes))
        edges = dict(zip(scopes, zip(map(list, preds), map(edge_ports, preds), strict=True), strict=True))
        if before is None:
            fields = dict(zip(scopes, map(dict, nows), strict=True))
            return _Snapshot(fields, edges, scopes, set(scopes), set(scopes))
        was = list(map(before.fields.get, scopes))
        fields = dict(zip(scopes, was, strict=True))  # unchanged values are the same objects
        changed, reshaped, reordered = set(), set(), set()
        for i in compress(range(len(scopes)), map(operator.ne, was, nows)):  # dict comparison, in C
            scope, old, now = scopes[i], was[i], nows[i]
            if old is None or old.get("shape") != now.get("shape"):
                reshaped.add(scope)  # what its readers' rules read
            if old is None or old.get("order") != now.get("order"):
                reordered.add(scope)  # what its own and its readers' order checks read
            fields[scope] = dict(now)
            changed.add(scope)
        rewired = set(compress(scopes, map(operator.ne, map(before.edges.get, scopes), edges.values())))
        again = changed | rewired
        if reshaped:
            again.update(reader for scope in reshaped for reader in graph._succ[scope])
        todo = [s for s in scopes if s in again] if again else []
        return _Snapshot(fields, edges, todo, rewired, reordered)

    @staticmethod
    def edges_only(graph: nx.DiGraph) -> _Snapshot:
        """Everything to check, and the edges to check it with (no fields: a structural check keeps no snapshot)."""
        edges = {scope: (list(pred), edge_ports(pred)) for scope, pred in graph._pred.items()}
        return _Snapshot({}, edges, list(graph), set(graph), set(graph))


# graph -> its snapshot as last verified with shapes (weak: a snapshot lives as long as its graph)
_VERIFIED: weakref.WeakKeyDictionary[nx.DiGraph, _Snapshot] = weakref.WeakKeyDictionary()


_record = operator.methodcaller("get", "node")


def check_structure(graph: nx.DiGraph) -> None:
    """The invariants that need no inferred shapes (inference checks them before it starts)."""
    _structure(graph, _Snapshot.edges_only(graph))


def _structure(graph: nx.DiGraph, snapshot: _Snapshot) -> tuple[dict[str, list[str]], list[tuple[Node, Node]]]:
    """`check_structure` of what `snapshot` says to check, and the graph-wide invariants; returns the inputs of
    each node of `snapshot.todo`, in port order, and each node that has a `pre` with its BN_CLAMP."""
    ins: dict[str, list[str]] = {}
    for scope in snapshot.todo:
        n = graph._node[scope].get("node")  # NOTE: networkx's own dicts, read once
        if not isinstance(n, Node):
            raise IRError(f"{scope}: no Node record")
        if n.scope != scope or ".".join(n.path) != scope:
            raise IRError(f"{scope}: node id differs from its path {'.'.join(n.path)!r}")
        if not isinstance(n.op, OpKind) or n.op not in OPS or not isinstance(n.attrs, OPS[n.op].attrs):
            raise IRError(f"{scope}: {n.op} carries {type(n.attrs).__name__}")
        if not isinstance(n.unit, Unit) or (n.op is OpKind.INPUT) != (n.unit.kind is UnitKind.INPUT):
            raise IRError(f"{scope}: {n.op} node in unit {n.unit!r}")
        srcs, ports = snapshot.edges[scope]
        arity = OPS[n.op].arity
        if (arity is None and not ports) or (arity is not None and len(ports) != arity):
            raise IRError(f"{scope}: {n.op.value} takes {arity or 'one or more'} inputs, has {len(ports)}")
        # NOTE: each test runs in C: a maximal spec's concats have 540,000 inputs
        stored = ports == list(range(len(ports)))  # in port order, as lowering adds them
        if scope in snapshot.rewired and (  # else its ports are the ones checked last time
            set(map(type, ports)) - {int} or not (stored or sorted(ports) == list(range(len(ports))))
        ):
            shown = sorted(p for p in ports if type(p) is int) + [p for p in ports if type(p) is not int]
            raise IRError(f"{scope}: input ports {shown} are not 0..n-1")
        ins[scope] = srcs if stored else in_port_order(graph._pred[scope], ports)
    records = [data["node"] for data in graph._node.values()]  # each a Node: checked now or when last verified
    orders = {n.scope: n.order for n in records}
    if len(set(orders.values())) != len(orders):
        seen: set[int] = set()
        for scope, order in orders.items():
            if order in seen:
                raise IRError(f"{scope}: order {order} is not unique")
            seen.add(order)
    # creation order must be a topological order: checked where an edge or an order changed
    if len(snapshot.todo) == len(graph):
        topo: Iterable[str] = graph
    else:
        again = snapshot.rewired | snapshot.reordered
        again |= {reader for src in snapshot.reordered for reader in graph._succ[src]}
        topo = [s for s in graph if s in again]
    for scope in topo:
        pred, order = graph._pred[scope], orders[scope]
        if pred and max(map(orders.__getitem__, pred)) >= order:  # NOTE: in C: concats have many inputs
            src = next(src for src in pred if orders[src] >= order)
            raise IRError(f"{scope}: input {src} does not come before it (order {order})")
    claimed: set[str] = set()
    pres = [(n, _check_pre(graph, n, claimed)) for n in records if n.op in _PRE_TAKERS and n.attrs.pre]
    orphans = sorted(n.scope for n in records if n.op is OpKind.BN_CLAMP and n.scope not in claimed)
    if orphans:
        raise IRError(f"{orphans[0]}: a bn_clamp that no conv or linear takes as its pre")
    graph_input(graph)
    output(graph)
    return ins, pres


def _check_inferred(graph: nx.DiGraph, ins: dict[str, list[str]]) -> None:
    """Re-derive the nodes of `ins` (in creation order) from their inputs' carried shapes."""
    nodes = sorted((node(graph, scope) for scope in ins), key=operator.attrgetter("order"))
    for n in nodes:
        if n.shape is None or n.tensors is None or n.params is None or n.macs is None:
            raise IRError(f"{n.scope}: shape, tensors, params or MACs not inferred")
    shape = {scope: data["node"].shape for scope, data in graph._node.items()}
    for n in nodes:
        shapes = list(map(shape.__getitem__, ins[n.scope]))  # NOTE: in C: concats have many inputs
        try:
            want = derive(n, shapes)
        except RuleError as err:
            raise IRError(f"{n.scope}: {n.op.value} cannot take inputs {_shapes(shapes)}: {err}") from None
        _compare(n, want, shapes)


def _check_pre_channels(graph: nx.DiGraph, pres: list[tuple[Node, Node]]) -> None:
    """Each node with a `pre` reads as many features as its BN_CLAMP has channels (every such node, every time:
    the clamp lies a few nodes up, beyond what a node's own checks read)."""
    for n, clamp in pres:
        features = node(graph, inputs(graph, n.scope)[0]).shape[0]
        if features != clamp.shape[0]:
            raise IRError(f"{n.scope}: reads {features} features, its pre {clamp.scope} has {clamp.shape[0]}")


def _compare(n: Node, want: Derived, shapes: list[Shape]) -> None:
    """Refuse the first field `n` carries that differs from what the op table derives."""
    problem = None
    if n.shape != want.shape:
        problem = f"shape {_shape(n.shape)}, the op table gives {_shape(want.shape)}"
    elif n.tensors != want.tensors:
        problem = _tensors_differ(n.tensors, want.tensors)
    elif n.params != want.params:
        problem = f"{n.params} params, the op table gives {want.params}"
    elif n.macs != want.macs:
        problem = f"{n.macs} MACs, the op table gives {want.macs}"
    if problem:
        raise IRError(f"{n.scope}: {n.op.value} on inputs {_shapes(shapes)} carries {problem}")


def _tensors_differ(got: tuple[Tensor, ...], want: tuple[Tensor, ...]) -> str:
    for a, b in zip(got, want, strict=False):
        if (a.name, a.shape) != (b.name, b.shape):
            return f"tensor {a.name} {_shape(a.shape)}, the op table gives {b.name} {_shape(b.shape)}"
        if a != b:
            return f"tensor {a}, the op table gives {b}"
    return f"{len(got)} tensors, the op table gives {len(want)}"


def _shape(shape) -> str:
    if isinstance(shape, tuple) and all(type(d) is int for d in shape):
        return "x".join(map(str, shape)) or "scalar"
    return repr(shape)


def _shapes(shapes: list[Shape]) -> str:
    return ", ".join(_shape(s) for s in shapes) or "none"


_PRE_TAKERS = frozenset({OpKind.CONV, OpKind.CONV_BN, OpKind.LINEAR})  # the ops whose attributes have a `pre`


def pre_clamp(graph: nx.DiGraph, n: Node) -> Node | None:
    """The BN_CLAMP node whose batch norm `n` applies to its input first (ConvAttrs.pre), or None."""
    pre = n.attrs.pre if n.op in _PRE_TAKERS else ()
    if not pre:
        return None
    scope = ".".join((*n.path[:-1], *pre))
    if scope not in graph:
        raise IRError(f"{n.scope}: pre {pre} names no node ({scope})")
    return node(graph, scope)


def _check_pre(graph: nx.DiGraph, n: Node, claimed: set[str]) -> Node:
    """`n`'s `pre` reference: a BN_CLAMP reaching `n` along sole consumers through affine-commuting ops only.

    Each clamp is claimed once and its walk ends at its one taker, so the walks together cost O(V)."""
    clamp = pre_clamp(graph, n)
    if clamp.op is not OpKind.BN_CLAMP or clamp.scope in claimed:
        raise IRError(f"{n.scope}: pre {clamp.scope} is a {clamp.op.value} or another op's pre already")
    claimed.add(clamp.scope)
    if not takes_pre(n):
        raise IRError(f"{n.scope}: pads its input, so it cannot apply the batch norm of its pre {clamp.scope}")
    at = clamp
    while at.scope != n.scope:
        succ = list(graph._succ[at.scope])  # NOTE: networkx's own dict
        if len(succ) != 1 or (at is not clamp and not commutes_with_affine(at)):
            raise IRError(f"{n.scope}: {at.scope} lies between it and its pre {clamp.scope}")
        at = node(graph, succ[0])
    return clamp

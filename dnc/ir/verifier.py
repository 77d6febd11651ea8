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

Cost: O(V + E log E). Each node is visited once and applies its rules to its own
inputs (a concatenation costs its inputs); `inputs` sorts each node's edges by port,
`ordered` the nodes by creation order; no walk revisits the graph. No torch here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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
    node,
    ordered,
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


def verify(graph: nx.DiGraph, *, inferred: bool = False) -> None:
    """Check the IR's invariants; raise IRError naming the node that breaks one.

    `inferred`: every node must carry its shape, tensors, params and MACs, each equal to
    what the op table derives from its inputs' carried shapes.
    """
    ins = _structure(graph)
    if inferred:
        _check_inferred(graph, ins)


def _spans(ports: set[int]) -> tuple[int, int]:
    return (min(ports), max(ports)) if ports else (0, -1)


def check_structure(graph: nx.DiGraph) -> None:
    """The invariants that need no inferred shapes (inference checks them before it starts)."""
    _structure(graph)


def _structure(graph: nx.DiGraph) -> dict[str, list[str]]:
    """`check_structure`; returns each node's inputs in port order, read on the way."""
    orders: dict[str, int] = {}  # node -> creation order
    ins: dict[str, list[str]] = {}
    seen: set[int] = set()
    for scope in graph:
        n = graph.nodes[scope].get("node")
        if not isinstance(n, Node):
            raise IRError(f"{scope}: no Node record")
        if n.scope != scope:
            raise IRError(f"{scope}: node id differs from its path {n.scope!r}")
        if not isinstance(n.op, OpKind) or n.op not in OPS or not isinstance(n.attrs, OPS[n.op].attrs):
            raise IRError(f"{scope}: {n.op} carries {type(n.attrs).__name__}")
        if not isinstance(n.unit, Unit) or (n.op is OpKind.INPUT) != (n.unit.kind is UnitKind.INPUT):
            raise IRError(f"{scope}: {n.op} node in unit {n.unit!r}")
        pred = graph._pred[scope]  # NOTE: networkx's own dict, read once
        ports = edge_ports(pred)
        arity = OPS[n.op].arity
        if (arity is None and not ports) or (arity is not None and len(ports) != arity):
            raise IRError(f"{scope}: {n.op.value} takes {arity or 'one or more'} inputs, has {len(ports)}")
        distinct = set(ports)  # NOTE: set, map, min and max run in C: a maximal spec's concats have 540,000 inputs
        if len(distinct) != len(ports) or set(map(type, distinct)) - {int} or _spans(distinct) != (0, len(ports) - 1):
            shown = sorted(p for p in ports if type(p) is int) + [p for p in ports if type(p) is not int]
            raise IRError(f"{scope}: input ports {shown} are not 0..n-1")
        # ports are 0..n-1 here: the inputs in port order (usually the order the edges are stored in)
        ins[scope] = in_port_order(pred, ports)
        if n.order in seen:
            raise IRError(f"{scope}: order {n.order} is not unique")
        seen.add(n.order)
        orders[scope] = n.order
    for scope, order in orders.items():  # creation order must be a topological order
        pred = graph._pred[scope]
        if pred and max(map(orders.__getitem__, pred)) >= order:  # NOTE: in C: concats have many inputs
            src = next(src for src in pred if orders[src] >= order)
            raise IRError(f"{scope}: input {src} does not come before it (order {order})")
    claimed: set[str] = set()
    for scope in graph:
        _check_pre(graph, node(graph, scope), claimed)
    orphans = sorted(s for s in graph if node(graph, s).op is OpKind.BN_CLAMP and s not in claimed)
    if orphans:
        raise IRError(f"{orphans[0]}: a bn_clamp that no conv or linear takes as its pre")
    graph_input(graph)
    output(graph)
    return ins


def _check_inferred(graph: nx.DiGraph, ins: dict[str, list[str]]) -> None:
    nodes = ordered(graph)
    for n in nodes:
        if n.shape is None or n.tensors is None or n.params is None or n.macs is None:
            raise IRError(f"{n.scope}: shape, tensors, params or MACs not inferred")
    shape = {n.scope: n.shape for n in nodes}
    for n in nodes:
        shapes = list(map(shape.__getitem__, ins[n.scope]))  # NOTE: in C: concats have many inputs
        try:
            want = derive(n, shapes)
        except RuleError as err:
            raise IRError(f"{n.scope}: {n.op.value} cannot take inputs {_shapes(shapes)}: {err}") from None
        _compare(n, want, shapes)
        clamp = pre_clamp(graph, n)
        if clamp is not None and shapes[0][0] != clamp.shape[0]:
            raise IRError(f"{n.scope}: reads {shapes[0][0]} features, its pre {clamp.scope} has {clamp.shape[0]}")


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


def pre_clamp(graph: nx.DiGraph, n: Node) -> Node | None:
    """The BN_CLAMP node whose batch norm `n` applies to its input first (ConvAttrs.pre), or None."""
    pre = n.attrs.pre if n.op in (OpKind.CONV, OpKind.CONV_BN, OpKind.LINEAR) else ()
    if not pre:
        return None
    scope = ".".join((*n.path[:-1], *pre))
    if scope not in graph:
        raise IRError(f"{n.scope}: pre {pre} names no node ({scope})")
    return node(graph, scope)


def _check_pre(graph: nx.DiGraph, n: Node, claimed: set[str]) -> None:
    """A `pre` reference: a BN_CLAMP reaching `n` along sole consumers through affine-commuting ops only.

    Each clamp is claimed once and its walk ends at its one taker, so the walks together cost O(V)."""
    clamp = pre_clamp(graph, n)
    if clamp is None:
        return
    if clamp.op is not OpKind.BN_CLAMP or clamp.scope in claimed:
        raise IRError(f"{n.scope}: pre {clamp.scope} is a {clamp.op.value} or another op's pre already")
    claimed.add(clamp.scope)
    if not takes_pre(n):
        raise IRError(f"{n.scope}: pads its input, so it cannot apply the batch norm of its pre {clamp.scope}")
    at = clamp
    while at.scope != n.scope:
        succ = list(graph.succ[at.scope])
        if len(succ) != 1 or (at is not clamp and not commutes_with_affine(at)):
            raise IRError(f"{n.scope}: {at.scope} lies between it and its pre {clamp.scope}")
        at = node(graph, succ[0])

"""Infer stage: IR -> IR with each node's output shape, state_dict tensors, parameter count and MACs.

Every rule comes from the op table (ops.OPS), applied by `verifier.derive`, which the
verifier re-derives with. Sizes follow PyTorch's floor rule for convolutions and
pools; a tensor with no channels or a map that would shrink to nothing is a
ShapeError naming the stage and the network input size. A malformed IR (a missing
edge, a wrong arity, an input created after its reader) is an IRError naming the
node, found by `verifier.check_structure` before any rule runs.
"""

from __future__ import annotations

import heapq

import networkx as nx

from dnc.errors import ShapeError
from dnc.ir.graph import Node, Shape, Tensor, copy, graph_input, inputs, node, ordered, replace_node
from dnc.ir.ops import RuleError
from dnc.ir.verifier import check_structure, derive


def infer(graph: nx.DiGraph) -> nx.DiGraph:
    """Return a copy of `graph` with every node's shape, tensors, params and MACs filled in."""
    check_structure(graph)  # creation order is then a topological order: inputs are inferred first
    return infer_in_place(copy(graph), every_node=True)


def infer_in_place(graph: nx.DiGraph, every_node: bool = False) -> nx.DiGraph:
    """`infer` on a graph the caller owns (a pass, on the copy it rewrote): fills it in and returns it.

    Unless `every_node`, only the nodes whose tensors a pass cleared (passes._change) are computed again, and
    the readers of each one whose shape changed, in creation order: the cost follows the change, not the graph
    (the verifier re-derives every node the pass touched, and every reader of one, from scratch all the same).
    """
    if every_node:
        shape: dict[str, Shape] = {}  # scope -> its shape: inputs come first in creation order
        for n in ordered(graph):
            shapes = list(map(shape.get, inputs(graph, n.scope)))  # NOTE: in C: concats have many inputs
            shape[n.scope] = _infer_node(graph, n, shapes).shape
        return graph
    records = {scope: data["node"] for scope, data in graph._node.items()}  # NOTE: networkx's own dict
    shape = {scope: n.shape for scope, n in records.items()}  # scope -> its shape so far
    todo = [(n.order, scope) for scope, n in records.items() if n.shape is None or n.tensors is None]
    heapq.heapify(todo)
    done: set[str] = set()
    while todo:
        _, scope = heapq.heappop(todo)
        if scope in done:
            continue
        done.add(scope)
        n = node(graph, scope)
        shapes = list(map(shape.__getitem__, inputs(graph, scope)))  # NOTE: in C: concats have many inputs
        shape[scope] = _infer_node(graph, n, shapes).shape
        if shape[scope] != n.shape:  # its readers' rules now see another input
            for reader in graph._succ[scope]:
                heapq.heappush(todo, (node(graph, reader).order, reader))
    return graph


def _infer_node(graph: nx.DiGraph, n: Node, shapes: list[Shape]) -> Node:
    """`n` with what the op table derives on inputs of `shapes`, put in its place; a rule that fails is the user's
    ShapeError."""
    try:
        d = derive(n, shapes)
    except RuleError as err:
        raise _fail(graph, n, shapes, str(err)) from None
    new = n.replace(shape=d.shape, tensors=d.tensors, params=d.params, macs=d.macs)
    replace_node(graph, new)
    return new


def _fail(graph: nx.DiGraph, n: Node, shapes: list[Shape], message: str) -> ShapeError:
    got = ", ".join(fmt_shape(s) for s in shapes)
    where = f" (input {got})" if shapes else ""
    network = graph_input(graph).shape  # inferred first; None while the input itself fails
    tail = f"; network input {fmt_shape(network)}" if network else ""
    # the size the user chose is usually what to change, so the message names it
    return ShapeError(f"stage {n.stage}: {n.scope} ({n.op.value}) {message}{where}{tail}", n.origin)


def fmt_shape(shape: Shape) -> str:
    return "x".join(map(str, shape))


def state_dict_layout(graph: nx.DiGraph) -> dict[str, Tensor]:
    """The torch state_dict of the network: key -> tensor description, in module order."""
    return {n.key(t): t for n in ordered(graph) for t in n.tensors}


def state_dict_shapes(graph: nx.DiGraph) -> dict[str, tuple[int, ...]]:
    """The torch state_dict keys of the network and their shapes, in torchvision's order."""
    return {key: t.shape for key, t in state_dict_layout(graph).items()}

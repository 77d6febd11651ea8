"""Infer stage: IR -> IR with each node's output shape, state_dict tensors, parameter count and MACs.

Every rule comes from the op table (ops.OPS), applied by `verifier.derive`, which the
verifier re-derives with. Sizes follow PyTorch's floor rule for convolutions and
pools; a tensor with no channels or a map that would shrink to nothing is a
ShapeError naming the stage and the network input size. A malformed IR (a missing
edge, a wrong arity, an input created after its reader) is an IRError naming the
node, found by `verifier.check_structure` before any rule runs.
"""

from __future__ import annotations

import networkx as nx

from dnc.errors import ShapeError
from dnc.ir.graph import Node, Shape, Tensor, copy, graph_input, inputs, ordered, replace_node
from dnc.ir.ops import RuleError
from dnc.ir.verifier import check_structure, derive


def infer(graph: nx.DiGraph) -> nx.DiGraph:
    """Return a copy of `graph` with every node's shape, tensors, params and MACs filled in."""
    check_structure(graph)  # creation order is then a topological order: inputs are inferred first
    return infer_in_place(copy(graph), every_node=True)


def infer_in_place(graph: nx.DiGraph, every_node: bool = False) -> nx.DiGraph:
    """`infer` on a graph the caller owns (a pass, on the copy it rewrote): fills it in and returns it.

    Unless `every_node`, a node that is already inferred, and none of whose inputs changed shape in this sweep,
    is kept as it is: a pass clears what it changes (passes._change), so only those nodes and what they feed are
    computed again (the verifier re-derives every node after every pass all the same).
    """
    changed: set[str] = set()
    shape: dict[str, Shape] = {}  # scope -> its shape so far: inputs come first in creation order
    for n in ordered(graph):
        fresh = changed and _any_in(changed, graph._pred[n.scope])  # an input changed shape in this sweep
        kept = n.shape is not None and n.tensors is not None and not fresh
        if kept and not every_node:
            shape[n.scope] = n.shape
            continue
        shapes = list(map(shape.get, inputs(graph, n.scope)))  # NOTE: in C: concats have many inputs
        try:
            d = derive(n, shapes)
        except RuleError as err:
            raise _fail(graph, n, shapes, str(err)) from None
        if d.shape != n.shape:
            changed.add(n.scope)
        shape[n.scope] = d.shape
        replace_node(graph, n.replace(shape=d.shape, tensors=d.tensors, params=d.params, macs=d.macs))
    return graph


def _any_in(few: set[str], many) -> bool:
    """Whether any of `few` is in `many` (a node's inputs): a lookup per element of the smaller side."""
    return any(s in many for s in few) if len(few) < len(many) else not few.isdisjoint(many)


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

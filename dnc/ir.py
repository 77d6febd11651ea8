"""The IR: a networkx DiGraph whose nodes map to frozen `Node` records.

Node ids are scopes: the module path torchvision uses for the same parameter
(`features.denseblock2.denselayer7.conv1`), or, for ops without parameters, the
path they would have (`features.denseblock2.denselayer7.cat`). Edges carry `port`,
the input's position, so a concat's inputs are ordered. Graph attributes hold what
concerns the whole network (name, source spec, options). No torch here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum

import networkx as nx

from dnc.errors import Location

Shape = tuple[int, ...]  # per-sample: (C, H, W) for feature maps, (F,) after flatten


class OpKind(StrEnum):
    INPUT = "input"
    CONV = "conv"
    BATCHNORM = "batchnorm"
    RELU = "relu"
    MAXPOOL = "maxpool"
    AVGPOOL = "avgpool"
    CONCAT = "concat"
    DROPOUT = "dropout"
    GLOBAL_AVGPOOL = "global_avgpool"
    FLATTEN = "flatten"
    LINEAR = "linear"


@dataclass(frozen=True)
class InputAttrs:
    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class ConvAttrs:
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    bias: bool = False


@dataclass(frozen=True)
class BatchNormAttrs:
    eps: float = 1e-5
    momentum: float = 0.1


@dataclass(frozen=True)
class PoolAttrs:
    kernel: int
    stride: int
    padding: int = 0


@dataclass(frozen=True)
class DropoutAttrs:
    rate: float


@dataclass(frozen=True)
class LinearAttrs:
    out_features: int
    bias: bool = True


@dataclass(frozen=True)
class NoAttrs:
    pass


Attrs = InputAttrs | ConvAttrs | BatchNormAttrs | PoolAttrs | DropoutAttrs | LinearAttrs | NoAttrs

ATTRS_OF: dict[OpKind, type] = {
    OpKind.INPUT: InputAttrs,
    OpKind.CONV: ConvAttrs,
    OpKind.BATCHNORM: BatchNormAttrs,
    OpKind.RELU: NoAttrs,
    OpKind.MAXPOOL: PoolAttrs,
    OpKind.AVGPOOL: PoolAttrs,
    OpKind.CONCAT: NoAttrs,
    OpKind.DROPOUT: DropoutAttrs,
    OpKind.GLOBAL_AVGPOOL: NoAttrs,
    OpKind.FLATTEN: NoAttrs,
    OpKind.LINEAR: LinearAttrs,
}

# How many inputs each op takes (None: one or more, in order).
ARITY: dict[OpKind, int | None] = {op: 1 for op in OpKind} | {OpKind.INPUT: 0, OpKind.CONCAT: None}


@dataclass(frozen=True)
class Node:
    """One operator. The inferred fields are None until `infer.infer` fills them in."""

    scope: str  # module path, e.g. features.denseblock1.denselayer1.conv1; also the node id
    op: OpKind
    attrs: Attrs
    stage: str  # stem, denseblock1, transition1, ..., head
    order: int  # creation order: the tie-break that keeps every walk deterministic
    origin: Location | None = None  # the spec field this node comes from, for errors
    shape: Shape | None = None
    params: int | None = None
    macs: int | None = None

    def replace(self, **changes) -> Node:
        return dataclasses.replace(self, **changes)


class IRError(AssertionError):
    """A broken invariant of the IR itself: a bug in dnc, not a user's mistake."""


def node(graph: nx.DiGraph, scope: str) -> Node:
    return graph.nodes[scope]["node"]


def inputs(graph: nx.DiGraph, scope: str) -> list[str]:
    """The node's inputs, in port order."""
    return sorted(graph.pred[scope], key=lambda src: graph.pred[scope][src]["port"])


def ordered(graph: nx.DiGraph) -> list[Node]:
    """All nodes in a stable topological order: creation order, which `verify` checks is one."""
    return sorted((data["node"] for _, data in graph.nodes(data=True)), key=lambda n: n.order)


def stages(graph: nx.DiGraph) -> list[str]:
    """Stage names in network order."""
    seen: dict[str, None] = {}
    for n in ordered(graph):
        if n.op is not OpKind.INPUT:
            seen.setdefault(n.stage)
    return list(seen)


def graph_input(graph: nx.DiGraph) -> Node:
    """The network's one INPUT node."""
    found = [n for n in graph if graph.nodes[n]["node"].op is OpKind.INPUT]
    if len(found) != 1:
        raise IRError(f"expected one input node, found {sorted(found)}")
    return node(graph, found[0])


def output(graph: nx.DiGraph) -> Node:
    sinks = [n for n in graph if graph.out_degree(n) == 0]
    if len(sinks) != 1:
        raise IRError(f"expected one output node, found {sorted(sinks)}")
    return node(graph, sinks[0])


def replace_node(graph: nx.DiGraph, new: Node) -> None:
    graph.nodes[new.scope]["node"] = new


def verify(graph: nx.DiGraph, *, inferred: bool = False) -> None:
    """Check the IR's invariants; raise IRError naming the node that breaks one."""
    orders = set()
    for scope in graph:
        n = graph.nodes[scope].get("node")
        if not isinstance(n, Node):
            raise IRError(f"{scope}: no Node record")
        if n.scope != scope:
            raise IRError(f"{scope}: node id differs from its scope {n.scope!r}")
        if not isinstance(n.attrs, ATTRS_OF[n.op]):
            raise IRError(f"{scope}: {n.op.value} carries {type(n.attrs).__name__}")
        ports = sorted(edge["port"] for edge in graph.pred[scope].values())
        arity = ARITY[n.op]
        if (arity is None and not ports) or (arity is not None and len(ports) != arity):
            raise IRError(f"{scope}: {n.op.value} takes {arity or 'one or more'} inputs, has {len(ports)}")
        if ports != list(range(len(ports))):
            raise IRError(f"{scope}: input ports {ports} are not 0..n-1")
        if n.order in orders:
            raise IRError(f"{scope}: order {n.order} is not unique")
        for src in graph.predecessors(scope):  # creation order must be a topological order
            if graph.nodes[src]["node"].order >= n.order:
                raise IRError(f"{scope}: input {src} does not come before it (order {n.order})")
        orders.add(n.order)
        if inferred and (n.shape is None or n.params is None or n.macs is None):
            raise IRError(f"{scope}: shape, params or MACs not inferred")
    output(graph)


class Builder:
    """Appends nodes in order; used by lowering and by passes that rebuild a graph."""

    def __init__(self, **graph_attrs):
        self.graph = nx.DiGraph(**graph_attrs)

    def add(self, scope: str, op: OpKind, attrs: Attrs, stage: str, inputs: list[str], origin=None) -> str:
        if scope in self.graph:
            raise IRError(f"{scope}: added twice")
        n = Node(scope=scope, op=op, attrs=attrs, stage=stage, order=len(self.graph), origin=origin)
        self.graph.add_node(scope, node=n)
        for port, src in enumerate(inputs):
            self.graph.add_edge(src, scope, port=port)
        return scope

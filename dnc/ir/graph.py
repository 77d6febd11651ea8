"""The IR: a networkx DiGraph whose nodes map to frozen `Node` records.

Each node carries its op and attributes (the op table in ops.py says what they
mean), its module path as a tuple (`("features", "denseblock2", "denselayer7",
"conv1")`, torchvision's layout; ops torchvision calls functionally get a path
beside them), and its typed `Unit`: which stem, dense layer, block output,
transition or head it belongs to, with block and layer indices. Structure is read
from these, never from strings. The node id is the dotted path (`scope`). Edges
carry `port`, the input's position, so a concat's inputs are ordered. Graph
attributes hold what concerns the whole network (name, source spec, options).
No torch here.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from enum import StrEnum

import networkx as nx

from dnc.errors import Location
from dnc.ir.ops import (  # noqa: F401 (re-exported: the IR's vocabulary)
    OPS,
    Attrs,
    BatchNormAttrs,
    BufferAttrs,
    ConvAttrs,
    ConvBNAttrs,
    DropoutAttrs,
    InputAttrs,
    LinearAttrs,
    NoAttrs,
    OpKind,
    PoolAttrs,
    Shape,
    Tensor,
    tensor_key,
)
from dnc.ir.settings import settings


class UnitKind(StrEnum):
    INPUT = "input"
    STEM = "stem"
    DENSE_LAYER = "dense_layer"
    BLOCK_OUTPUT = "block_output"  # the concatenation that ends a dense block
    TRANSITION = "transition"
    HEAD = "head"


@dataclass(frozen=True, order=True)
class Unit:
    """What a node belongs to. `block` and `layer` are 1-based; 0 where they do not apply."""

    kind: UnitKind
    block: int = 0
    layer: int = 0

    @property
    def stage(self) -> str:
        """The stage a summary shows this unit in: stem, denseblockN, transitionN, head (or input)."""
        if self.kind in (UnitKind.DENSE_LAYER, UnitKind.BLOCK_OUTPUT):
            return f"denseblock{self.block}"
        if self.kind is UnitKind.TRANSITION:
            return f"transition{self.block}"
        return self.kind.value

    def __str__(self) -> str:
        if self.kind is UnitKind.DENSE_LAYER:
            return f"{self.stage}.denselayer{self.layer}"
        return self.stage


@dataclass(frozen=True)
class Node:
    """One operator. The inferred fields are None until `infer.infer` fills them in."""

    path: tuple[str, ...]  # module path, e.g. ("features", "denseblock1", "denselayer1", "conv1")
    op: OpKind
    attrs: Attrs
    unit: Unit
    order: int  # creation order: the tie-break that keeps every walk deterministic
    origin: Location | None = None  # the spec field this node comes from, for errors
    shape: Shape | None = None
    tensors: tuple[Tensor, ...] | None = None  # state_dict entries, from the op table
    params: int | None = None
    macs: int | None = None
    # a training pass chose to keep nothing of this op for backward: what its backward needs is recomputed (or, for
    # -O1's stem ReLU, read off the max pool's output at the maxima)
    recomputed: bool = False
    # the dotted module path: the node id, and the prefix of its state_dict keys (joined once: it is read often)
    scope: str = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scope", ".".join(self.path))

    @property
    def name(self) -> str:
        """The module's own name inside its parent (`conv1`)."""
        return self.path[-1]

    @property
    def stage(self) -> str:
        return self.unit.stage

    def key(self, t: Tensor) -> str:
        """The state_dict key of one of this node's tensors."""
        return tensor_key(self.path, t)

    def replace(self, **changes) -> Node:
        """A copy with `changes` (dataclasses.replace, without re-running __init__: inference replaces every node
        of a maximal spec's half-million-edge IR after every pass)."""
        unknown = changes.keys() - _NODE_FIELDS
        if unknown:
            raise TypeError(f"Node has no field {sorted(unknown)[0]!r}")
        new = object.__new__(Node)
        new.__dict__.update(self.__dict__, **changes)
        if "path" in changes:
            new.__dict__["scope"] = ".".join(new.path)
        return new


_NODE_FIELDS = frozenset(f.name for f in dataclasses.fields(Node) if f.init)


class IRError(AssertionError):
    """A broken invariant of the IR itself: a bug in dnc (or in a pass), not a user's mistake."""


def copy(graph: nx.DiGraph) -> nx.DiGraph:
    """A copy of `graph`: its attributes, nodes and edges with their data dicts copied, node records shared (frozen).

    What `graph.copy()` makes, built straight into networkx's adjacency dicts: a pass copies the IR before it
    rewrites it, and a maximal spec's dense blocks hold half a million edges (`tests/test_ir.py` compares the two).
    """
    new = graph.__class__()
    new.graph.update(graph.graph)
    succ, pred = new._succ, new._pred  # NOTE: networkx's own adjacency (DiGraph._adj is _succ); networkx is pinned
    for n, data in graph._node.items():
        new._node[n] = data.copy()
        succ[n], pred[n] = {}, {}
    for u, nbrs in graph._succ.items():
        out = succ[u]
        for v, data in nbrs.items():
            out[v] = pred[v][u] = data.copy()  # one dict per edge, in both directions, as networkx keeps it
    return new


def node(graph: nx.DiGraph, scope: str) -> Node:
    return graph._node[scope]["node"]  # NOTE: networkx's node dict; its public view costs a call per lookup


_PORT = operator.itemgetter("port")
_ORDER = operator.attrgetter("order")


def edge_ports(pred: dict) -> list:
    """The port of each of a node's input edges (`graph._pred[scope]`), in the order stored; None where one has none."""
    try:
        return list(map(_PORT, pred.values()))  # NOTE: in C: a maximal spec's concats have half a million inputs in all
    except KeyError:
        return [edge.get("port") for edge in pred.values()]


def in_port_order(pred: dict, ports: list) -> list[str]:
    """A node's inputs sorted by their ports (`edge_ports(pred)`; 0..n-1 in a verified IR)."""
    srcs = list(pred)
    if ports == list(range(len(ports))):  # edges stored in port order, as lowering adds them (== runs in C)
        return srcs
    if len(srcs) == 1:
        return srcs
    # a rewired input is stored last: sorted and picked in C (a concat after pool_first has hundreds of inputs)
    return list(operator.itemgetter(*sorted(range(len(srcs)), key=ports.__getitem__))(srcs))


def inputs(graph: nx.DiGraph, scope: str) -> list[str]:
    """The node's inputs, in port order."""
    pred = graph._pred[scope]  # NOTE: networkx's own dict
    return in_port_order(pred, edge_ports(pred))


def input_nodes(graph: nx.DiGraph, n: Node) -> list[Node]:
    return [node(graph, src) for src in inputs(graph, n.scope)]


def ordered(graph: nx.DiGraph) -> list[Node]:
    """All nodes in a stable topological order: creation order, which `verify` checks is one."""
    return sorted([data["node"] for data in graph._node.values()], key=_ORDER)  # NOTE: networkx's own dict


def units(graph: nx.DiGraph) -> dict[Unit, list[Node]]:
    """Each unit's nodes, units in network order, nodes in order."""
    out: dict[Unit, list[Node]] = {}
    for n in ordered(graph):
        out.setdefault(n.unit, []).append(n)
    return out


def stages(graph: nx.DiGraph) -> dict[str, list[Unit]]:
    """Stage name -> its units, in network order (the input aside)."""
    out: dict[str, list[Unit]] = {}
    for unit in units(graph):
        if unit.kind is not UnitKind.INPUT:
            out.setdefault(unit.stage, []).append(unit)
    return out


def unit_output(graph: nx.DiGraph, members: list[Node]) -> Node:
    """The node of a unit that other units read: the one whose consumers lie outside it."""
    inside = {n.scope for n in members}
    succ = graph._succ  # NOTE: networkx's own dict
    outs = [n for n in members if not succ[n.scope] or any(s not in inside for s in succ[n.scope])]
    if len(outs) != 1:
        raise IRError(f"unit {members[0].unit} has {len(outs)} outputs: {[n.scope for n in outs]}")
    return outs[0]


def growth(graph: nx.DiGraph, members: list[Node]) -> int:
    """The channels a dense layer adds to its block: those of its output (inferred graph)."""
    return unit_output(graph, members).shape[0]


def graph_input(graph: nx.DiGraph) -> Node:
    """The network's one INPUT node."""
    found = [scope for scope, data in graph._node.items() if data["node"].op is OpKind.INPUT]  # NOTE: networkx's
    if len(found) != 1:
        raise IRError(f"expected one input node, found {sorted(found)}")
    return node(graph, found[0])


def output(graph: nx.DiGraph) -> Node:
    sinks = [scope for scope, succ in graph._succ.items() if not succ]  # NOTE: networkx's own dict
    if len(sinks) != 1:
        raise IRError(f"expected one output node, found {sorted(sinks)}")
    return node(graph, sinks[0])


def inference_only(graph: nx.DiGraph) -> list[str]:
    """Why the network computes what it says in eval mode only, in words (eval-only ops and settings); [] if not."""
    ops = {OPS[n.op].eval_only for n in ordered(graph)} - {""}
    return sorted(ops) + ([settings(graph).eval_only] if settings(graph).eval_only else [])


def commutes_with_affine(n: Node) -> bool:
    """Whether a per-channel scale and shift may move across `n` unchanged: linear per channel, no padding."""
    if n.op is OpKind.AVGPOOL:
        return n.attrs.padding == 0
    return n.op in (OpKind.GLOBAL_AVGPOOL, OpKind.FLATTEN)


def conv_attrs(n: Node) -> ConvAttrs | None:
    """The convolution attributes of a conv or conv_bn node; None for any other op."""
    if n.op is OpKind.CONV_BN:
        return n.attrs.conv
    return n.attrs if n.op is OpKind.CONV else None


def takes_pre(n: Node) -> bool:
    """Whether `n` can apply a batch norm to its input first (a `pre`): a linear layer, or a conv that pads nothing."""
    conv = conv_attrs(n)
    return n.op is OpKind.LINEAR or (conv is not None and conv.padding == 0)


def replace_input(graph: nx.DiGraph, old: str, new: str) -> None:
    """Every reader of `old` reads `new` instead, at the same port and in the same place among its inputs.

    networkx's add_edge would store the new edge last, and a concat whose edges are not stored in port order is
    sorted on every read (`in_port_order`); so the reader's input dict is rebuilt in its order (in C)."""
    succ, pred = graph._succ, graph._pred  # NOTE: networkx's own adjacency; networkx is pinned
    for dst, edge in list(succ[old].items()):
        inputs = pred[dst]
        if new in inputs:
            raise IRError(f"{dst}: reads {old} and {new}; one edge may join them")
        srcs = list(inputs)
        srcs[srcs.index(old)] = new
        pred[dst] = dict(zip(srcs, inputs.values(), strict=True))  # the edge dicts stay: succ and pred share them
        succ[new][dst] = edge
        del succ[old][dst]
    nx._clear_cache(graph)


def replace_node(graph: nx.DiGraph, new: Node) -> None:
    graph._node[new.scope]["node"] = new


class Builder:
    """Appends nodes in order; used by lowering and by passes that rebuild a graph."""

    def __init__(self, **graph_attrs):
        self.graph = nx.DiGraph(**graph_attrs)

    def add(self, path: tuple[str, ...], op: OpKind, attrs: Attrs, unit: Unit, inputs: list[str], origin=None) -> str:
        n = Node(path=path, op=op, attrs=attrs, unit=unit, order=len(self.graph), origin=origin)
        scope = n.scope
        if scope in self.graph:
            raise IRError(f"{scope}: added twice")
        self.graph.add_node(scope, node=n)
        for port, src in enumerate(inputs):
            self.graph.add_edge(src, scope, port=port)
        return scope

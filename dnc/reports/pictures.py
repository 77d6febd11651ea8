"""`dnc graph`: architecture pictures from the inferred IR.

The IR is contracted to units: one per stage (`--detail block`), or, inside dense
blocks, one per dense layer plus the block's final concatenation (`--detail layer`).
An edge joins two units wherever an IR edge does, labelled with the tensor it
carries, so the dense connectivity drawn is the IR's own concat inputs. The view
data is plain strings, escaped here for each format; the templates in
templates/graph/ only loop and substitute. SVG and PNG come from Graphviz `dot`.
"""

from __future__ import annotations

import shutil
import subprocess
import zlib
from dataclasses import dataclass, field

import networkx as nx

from dnc.errors import DncError
from dnc.ir.graph import Node, OpKind, UnitKind, growth, inputs, node, ordered, output
from dnc.jinja import environment
from dnc.targets.provenance import MARK, PNG_MARK, PNG_SIGNATURE
from dnc.text import visible

TEXT_FORMATS = ("dot", "mermaid")
IMAGE_FORMATS = ("svg", "png")
NO_DOT = (
    "Graphviz 'dot' not found; install it (apt-get install graphviz / brew install graphviz) "
    "or use --format dot|mermaid"
)
# NOTE: dot's crossing minimisation dominates a layer picture (a dense block's skip edges span many
# ranks): limiting its iterations took densenet121's from 26 s to 2 s, and the picture stays legible.
LAYOUT = ("-Gmclimit=0.1", "-Gnslimit=1")
# What dot's layout costs grows with the ranks its edges span (it adds a virtual node per rank crossed).
# Measured on the 2-core development machine with LAYOUT: densenet121's layers (4,439 ranks) 2 s,
# densenet161's (12,609) 19 s, densenet_bc250_k24's (39,737) 110 s, densenet264's (69,275) over 600 s.
MAX_LAYOUT_RANKS = 10_000
DOT_SECONDS = 60  # a backstop: pictures too large to lay out in time are refused before dot runs
INSTEAD = "use --format dot or mermaid (no layout), or --detail block"
_MERMAID = {ord(ch): f"#{name};" for ch, name in [("#", "35"), ('"', "quot"), ("<", "lt"), (">", "gt")]} | {
    ord(ch): f"#{ord(ch)};" for ch in "|[](){}`&"
}


@dataclass
class Unit:
    id: str  # a valid identifier in DOT and Mermaid
    lines: list[str]  # label, one line each
    cluster: str | None = None  # the dense block a layer unit sits in (layer detail)
    nodes: list[Node] = field(default_factory=list)


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    label: str  # the tensor carried, e.g. "256ch 56x56"; empty inside a dense block


@dataclass(frozen=True)
class Picture:
    name: str
    units: list[Unit]
    clusters: list[tuple[str, str]]  # (dense block id, its title), layer detail only
    edges: list[Edge]


# -- IR -> picture -----------------------------------------------------------------


def picture(graph: nx.DiGraph, detail: str = "block") -> Picture:
    """Contract the IR to stage units (or layer units inside dense blocks) and their edges."""
    unit_of: dict[str, str] = {}
    units: dict[str, Unit] = {}
    clusters: dict[str, str] = {}
    for n in ordered(graph):
        uid, cluster = _unit_id(n, detail)
        unit_of[n.scope] = uid
        units.setdefault(uid, Unit(uid, [], cluster)).nodes.append(n)
        if cluster:
            clusters.setdefault(cluster, "")
    out = output(graph)
    units["output"] = Unit("output", ["output", _shape(out.shape)])
    for unit in units.values():
        if unit.nodes:
            unit.lines = _label(graph, unit, detail)
    for block in clusters:
        layers = [n for u in units.values() if u.cluster == block for n in u.nodes]
        count = len({n.unit for n in layers if n.unit.kind is UnitKind.DENSE_LAYER})
        clusters[block] = f"{block}: {count} layer{'s' if count != 1 else ''}, k={_growth(graph, layers)}"
    edges: dict[tuple[str, str], Edge] = {}
    labelled: set[str] = set()  # a feature map fanning out to a whole block is labelled once
    for n in ordered(graph):
        for src in inputs(graph, n.scope):
            a, b = unit_of[src], unit_of[n.scope]
            if a != b and (a, b) not in edges:
                inner = units[a].cluster is not None and units[a].cluster == units[b].cluster
                edges[(a, b)] = Edge(a, b, "" if inner or src in labelled else _shape(node(graph, src).shape))
                labelled.add(src)
    edges[(unit_of[out.scope], "output")] = Edge(unit_of[out.scope], "output", _shape(out.shape))
    return Picture(graph.graph["name"], list(units.values()), list(clusters.items()), list(edges.values()))


def _unit_id(n: Node, detail: str) -> tuple[str, str | None]:
    """The picture's unit a node belongs to, and the dense block it is drawn inside (layer detail)."""
    unit = n.unit
    if detail == "layer" and unit.kind is UnitKind.DENSE_LAYER:
        return f"{unit.stage}_denselayer{unit.layer}", unit.stage
    if detail == "layer" and unit.kind is UnitKind.BLOCK_OUTPUT:
        return f"{unit.stage}_cat", unit.stage
    return unit.stage, None


def _shape(shape) -> str:
    if len(shape) == 3:
        c, h, w = shape
        return f"{c}ch {h}x{w}"
    return "x".join(map(str, shape))


def _growth(graph: nx.DiGraph, nodes: list[Node]) -> str:
    """The growth of the dense layers among `nodes` ("12", or "12 and 24" where they differ)."""
    layers: dict = {}
    for n in nodes:
        if n.unit.kind is UnitKind.DENSE_LAYER:
            layers.setdefault(n.unit, []).append(n)
    return " and ".join(str(g) for g in sorted({growth(graph, members) for members in layers.values()}))


def _op(n: Node, graph: nx.DiGraph) -> str | None:
    """A short name for an op worth drawing: convs, pools, linear; None for BN, ReLU and the like."""
    a = n.attrs
    if n.op is OpKind.CONV:
        stride = f"/{a.stride}" if a.stride > 1 else ""
        return f"conv{a.kernel}x{a.kernel}{stride} {a.out_channels}"
    if n.op in (OpKind.MAXPOOL, OpKind.AVGPOOL):
        return f"{n.op.value}{a.kernel}x{a.kernel}/{a.stride}"
    if n.op is OpKind.GLOBAL_AVGPOOL:
        return "global avgpool"
    if n.op is OpKind.LINEAR:
        return f"linear {node(graph, inputs(graph, n.scope)[0]).shape[0]}→{a.out_features}"
    if n.op is OpKind.DROPOUT:
        return f"dropout {a.rate:g}"
    return None


def _label(graph: nx.DiGraph, unit: Unit, detail: str) -> list[str]:
    first, nodes = unit.nodes[0], unit.nodes
    if first.op is OpKind.INPUT:
        return ["input", _shape(first.shape)]
    ops = [op for op in (_op(n, graph) for n in nodes) if op]
    if unit.cluster is None and first.unit.kind is UnitKind.DENSE_LAYER:
        layers = sorted({n.unit for n in nodes if n.unit.kind is UnitKind.DENSE_LAYER})
        per_layer = [_op(n, graph) for n in nodes if n.op is OpKind.CONV and n.unit == layers[0]]
        count = f"{len(layers)} layer{'s' if len(layers) != 1 else ''}"
        return [first.stage, f"{count}, k={_growth(graph, nodes)}", "each: " + ", ".join(per_layer)]
    if unit.cluster is not None:
        if first.unit.kind is UnitKind.BLOCK_OUTPUT:
            return ["concat", _shape(nodes[-1].shape)]
        channels_in = (
            first.shape[0] if first.op is OpKind.CONCAT else node(graph, inputs(graph, first.scope)[0]).shape[0]
        )
        return [f"denselayer{first.unit.layer}", f"{channels_in}ch in", ", ".join(ops)]
    return [first.stage, *_chunks(ops)]


def _chunks(ops: list[str], width: int = 3) -> list[str]:
    return [", ".join(ops[i : i + width]) for i in range(0, len(ops), width)] or [""]


def check_layout(p: Picture) -> None:
    """Refuse, before Graphviz runs, a picture too large for it to lay out in DOT_SECONDS (see MAX_LAYOUT_RANKS)."""
    position = {u.id: i for i, u in enumerate(p.units)}  # units come in topological order, as dot ranks them
    ranks = sum(abs(position[e.dst] - position[e.src]) for e in p.edges)
    if ranks > MAX_LAYOUT_RANKS:
        raise DncError(
            f"{p.name} is too large a picture for Graphviz to lay out in time ({ranks:,} ranks spanned by its "
            f"edges, over {MAX_LAYOUT_RANKS:,}): {INSTEAD}"
        )


# -- picture -> text ---------------------------------------------------------------


def _dot_label(lines: list[str]) -> str:
    # DOT's \n escape is a centred line break inside a quoted label; `visible` keeps each line one
    # line, then backslashes and quotes are escaped so nothing ends the string or starts an escape
    escaped = "\\n".join(visible(line).replace("\\", "\\\\").replace('"', '\\"') for line in lines)
    return f'"{escaped}"'


def _mermaid_label(lines: list[str]) -> str:
    # NOTE: Mermaid labels have no backslash escapes; entity codes are its way, <br> its newline.
    # Every character that could end a label or an edge text, or start markup, becomes an entity.
    def escape(line: str) -> str:
        return visible(line).translate(_MERMAID)

    return '"' + "<br>".join(escape(line) for line in lines) + '"'


def _view(p: Picture, fmt: str) -> dict:
    """Plain data for a template: identifiers, quoted labels, edges in order."""
    label = _dot_label if fmt == "dot" else _mermaid_label

    def unit(u: Unit) -> dict:
        return {"id": u.id, "label": label(u.lines)}

    def arrow(e: Edge) -> str:
        if fmt == "dot":
            return f" [label={label([e.label])}]" if e.label else ""
        return f"-->|{label([e.label])}|" if e.label else "-->"

    prefix = "cluster_" if fmt == "dot" else ""  # DOT draws a box only around subgraphs named cluster*
    clusters = [
        {"id": prefix + cid, "label": label([title]), "units": [unit(u) for u in p.units if u.cluster == cid]}
        for cid, title in p.clusters
    ]
    return {
        "title": label([p.name]),
        "units": [unit(u) for u in p.units if u.cluster is None],
        "clusters": clusters,
        "edges": [{"src": e.src, "dst": e.dst, "arrow": arrow(e)} for e in p.edges],
    }


def render_text(p: Picture, fmt: str) -> str:
    """DOT or Mermaid source of a picture."""
    return environment().get_template(f"graph/graph.{fmt}.j2").render(_view(p, fmt))


def render_image(dot: str, fmt: str) -> bytes:
    """SVG or PNG bytes from DOT source, by Graphviz `dot`, marked as dnc's (see `provenance.made_by_dnc`)."""
    exe = shutil.which("dot")
    if exe is None:
        raise DncError(NO_DOT)
    try:
        done = subprocess.run([exe, f"-T{fmt}", *LAYOUT], input=dot.encode(), capture_output=True, timeout=DOT_SECONDS)
    except subprocess.TimeoutExpired:
        raise DncError(f"Graphviz 'dot' took over {DOT_SECONDS} s; {INSTEAD}") from None
    if done.returncode:
        lines = done.stderr.decode(errors="replace").strip().splitlines() or [f"exit status {done.returncode}"]
        raise DncError(f"Graphviz 'dot' failed: {lines[0]}")
    return _marked(done.stdout, fmt)


def _marked(image: bytes, fmt: str) -> bytes:
    """The image with dnc's mark: an XML comment after the SVG's declaration, a text chunk after the PNG's header."""
    if fmt == "png" and image.startswith(PNG_SIGNATURE):
        data = PNG_MARK[4:] + b" graph; do not edit."  # keyword, NUL, text; PNG_MARK[:4] is the chunk type
        chunk = len(data).to_bytes(4, "big") + b"tEXt" + data + zlib.crc32(b"tEXt" + data).to_bytes(4, "big")
        end = len(PNG_SIGNATURE) + 25  # the IHDR chunk comes first: length, type, 13 bytes, CRC
        return image[:end] + chunk + image[end:]
    if fmt == "svg":
        comment = f"<!-- {MARK} graph; do not edit. -->\n".encode()
        end = image.index(b"\n") + 1 if image.startswith(b"<?xml") and b"\n" in image else 0
        return image[:end] + comment + image[end:]
    return image

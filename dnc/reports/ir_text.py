"""The IR as text, one line per node (`dnc ir`), in the spirit of torch.fx's graph print.

    %features.denseblock1.denselayer2.cat = concat(%features.pool0, %features.denseblock1.denselayer1.conv2) : 96x56x56

A comment line names each unit as it begins. Attributes that keep their default are
left out. Deterministic, no torch: small golden tests of lowering and passes read it.
"""

from __future__ import annotations

import dataclasses

import networkx as nx

from dnc.ir.graph import Node, UnitKind, graph_input, inference_only, inputs, ordered, output
from dnc.ir.infer import fmt_shape
from dnc.ir.settings import settings


def ir_text(graph: nx.DiGraph) -> str:
    """The whole graph: a title line, then units and their nodes in order, then totals."""
    nodes = ordered(graph)
    first, last = graph_input(graph), output(graph)
    # what passes decided for the whole network (dnc/ir/settings.py); none at -O0
    notes = settings(graph).notes() + (["inference only"] if inference_only(graph) else [])
    tail = "".join(f", {note}" for note in notes)
    lines = [f"graph {graph.graph.get('name', '?')} ({_shape(first)} -> {_shape(last)}){tail}:"]
    unit = None
    for n in nodes:
        if n.unit != unit and n.unit.kind is not UnitKind.INPUT:
            unit = n.unit
            where = "".join(f", {k} {v}" for k, v in (("block", unit.block), ("layer", unit.layer)) if v)
            lines.append(f"  # {unit.kind.value}{where}")
        lines.append("  " + node_line(graph, n))
    if all(n.params is not None for n in nodes):
        lines.append(f"  # {sum(n.params for n in nodes):,} parameters, {sum(n.macs for n in nodes):,} MACs")
    return "\n".join(lines) + "\n"


def node_line(graph: nx.DiGraph, n: Node) -> str:
    """`%name = op[attrs](%inputs) : shape` for one node."""
    args = ", ".join(f"%{src}" for src in inputs(graph, n.scope))
    attrs = _attrs(n.attrs)
    kept = ", recomputed in backward" if n.recomputed else ""
    return f"%{n.scope} = {n.op.value}{f'[{attrs}]' if attrs else ''}({args}) : {_shape(n)}{kept}"


def _attrs(attrs) -> str:
    """`name=value` for each attribute that differs from its default; nested attributes as `name[...]`."""
    parts = []
    for f in dataclasses.fields(attrs):
        value = getattr(attrs, f.name)
        if f.default is dataclasses.MISSING or value != f.default:
            parts.append(f"{f.name}[{_attrs(value)}]" if dataclasses.is_dataclass(value) else f"{f.name}={value!r}")
    return ", ".join(parts)


def _shape(n: Node) -> str:
    return "?" if n.shape is None else fmt_shape(n.shape)

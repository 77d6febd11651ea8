"""Per-stage totals of an inferred IR: what `dnc summary` prints and `dnc diff` compares."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import networkx as nx

from dnc.ir.graph import (
    OpKind,
    Shape,
    UnitKind,
    graph_input,
    growth,
    input_nodes,
    inputs,
    node,
    ordered,
    output,
    stages,
    unit_output,
    units,
)


@dataclass(frozen=True)
class StageRow:
    stage: str  # stem, denseblock1, transition1, ..., head
    layers: int  # dense layers (dense blocks only; 0 elsewhere)
    growth_rate: int  # channels each layer adds (dense blocks only; 0 elsewhere)
    input_shape: Shape
    output_shape: Shape
    params: int
    macs: int


@dataclass(frozen=True)
class Summary:
    name: str
    input_shape: Shape
    output_shape: Shape
    params: int
    macs: int
    stages: list[StageRow]
    notes: list[str]  # things a user may not expect, e.g. a pool that drops a row

    def to_json(self) -> dict:
        data = asdict(self)
        for key in ("input_shape", "output_shape"):
            data[key] = list(data[key])
        for row in data["stages"]:
            row["input_shape"], row["output_shape"] = list(row["input_shape"]), list(row["output_shape"])
        return data


def summarize(graph: nx.DiGraph) -> Summary:
    """Totals per stage, in network order, from an inferred graph's units."""
    groups = units(graph)
    rows = []
    for stage, members in stages(graph).items():
        nodes = [n for unit in members for n in groups[unit]]
        layers = [groups[u] for u in members if u.kind is UnitKind.DENSE_LAYER]
        growths = {growth(graph, layer) for layer in layers}
        rows.append(
            StageRow(
                stage=stage,
                layers=len(layers),
                growth_rate=growths.pop() if len(growths) == 1 else 0,
                input_shape=input_nodes(graph, nodes[0])[0].shape,
                output_shape=unit_output(graph, groups[members[-1]]).shape,
                params=sum(n.params for n in nodes),
                macs=sum(n.macs for n in nodes),
            )
        )
    return Summary(
        name=graph.graph["name"],
        input_shape=graph_input(graph).shape,
        output_shape=output(graph).shape,
        params=sum(r.params for r in rows),
        macs=sum(r.macs for r in rows),
        stages=rows,
        notes=_notes(graph),
    )


def _notes(graph: nx.DiGraph) -> list[str]:
    notes = []
    for n in ordered(graph):
        if n.op is OpKind.AVGPOOL and n.attrs.padding == 0:
            _, h, w = node(graph, inputs(graph, n.scope)[0]).shape
            k, s = n.attrs.kernel, n.attrs.stride
            if (h - k) % s or (w - k) % s:
                notes.append(
                    f"{n.scope}: {h}x{w} does not divide by its {k}x{k}/{s} window; "
                    f"the last row or column is dropped ({h}x{w} -> {n.shape[1]}x{n.shape[2]}), as in PyTorch"
                )
    return notes

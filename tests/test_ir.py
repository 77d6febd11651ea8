"""The IR and its pipeline without torch: units, the verifier's every branch, passes, golden text."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import networkx as nx
import pytest
from conftest import ROOT

from dnc.errors import ShapeError
from dnc.frontend.loader import load_spec
from dnc.ir.graph import (
    Builder,
    InputAttrs,
    IRError,
    NoAttrs,
    OpKind,
    Unit,
    UnitKind,
    inputs,
    node,
    ordered,
    replace_node,
    units,
)
from dnc.ir.infer import infer
from dnc.ir.passes import select
from dnc.ir.verifier import verify
from dnc.pipeline import build, compile_spec
from dnc.reports.ir_text import ir_text

GOLDEN = Path(__file__).parent / "golden"
TINY = """\
version: 1
name: tiny
input: {channels: 3, size: [8, 8]}
stem: {kind: cifar, width: 4}
growth_rate: 2
bn_size: 2
compression: 0.5
drop_rate: 0.1
dropout_at: every_conv
blocks: [2, {layers: 1, bn_size: null}]
head: {classes: 3}
"""


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.mark.parametrize("name", ["tiny", "densenet121"])
def test_lowering_matches_the_golden_ir_text(name, tiny):
    """The whole lowered and inferred IR, one line a node; regenerate with `dnc ir` if lowering changes."""
    _, graph = build(tiny if name == "tiny" else ROOT / "specs" / "densenet121.yaml")
    assert ir_text(graph) == (GOLDEN / f"{name}.ir").read_text()


def test_every_node_has_a_typed_unit_and_its_module_path(tiny):
    _, graph = build(tiny)
    kinds = [(u.kind, u.block, u.layer) for u in units(graph)]
    assert kinds == [
        (UnitKind.INPUT, 0, 0),
        (UnitKind.STEM, 0, 0),
        (UnitKind.DENSE_LAYER, 1, 1),
        (UnitKind.DENSE_LAYER, 1, 2),
        (UnitKind.BLOCK_OUTPUT, 1, 0),
        (UnitKind.TRANSITION, 1, 0),
        (UnitKind.DENSE_LAYER, 2, 1),
        (UnitKind.BLOCK_OUTPUT, 2, 0),
        (UnitKind.HEAD, 0, 0),
    ]
    conv = node(graph, "features.denseblock1.denselayer2.conv1")
    assert conv.path == ("features", "denseblock1", "denselayer2", "conv1")
    assert conv.unit == Unit(UnitKind.DENSE_LAYER, 1, 2) and conv.stage == "denseblock1" and conv.name == "conv1"


def test_a_transition_that_compresses_to_no_channels_is_refused(tiny):
    spec = load_spec(tiny, ["compression=0.1"])  # floor(0.1 * 8) = 0
    with pytest.raises(
        ShapeError, match=r"stage transition1: features.transition1.conv \(conv\) would have 0 channels"
    ):
        compile_spec(spec)


# -- the pipeline of passes ---------------------------------------------------------------


def _renamed(graph: nx.DiGraph) -> nx.DiGraph:
    out = graph.copy()
    out.graph["name"] = "renamed"
    return out


def _broken(graph: nx.DiGraph) -> nx.DiGraph:
    out = graph.copy()
    out.remove_edge("features.conv0", "features.denseblock1.denselayer1.norm1")
    return out


def test_passes_run_in_order_after_inference_and_are_verified(tiny):
    spec = load_spec(tiny)
    seen = []

    def record(graph):
        seen.append(all(node(graph, s).shape is not None for s in graph))
        return graph

    graph = compile_spec(spec, passes=[("record", record), ("rename", _renamed)])
    assert seen == [True] and graph.graph["name"] == "renamed"
    with pytest.raises(IRError, match=r"after broken: features.denseblock1.denselayer1.norm1: batchnorm takes 1"):
        compile_spec(spec, passes=[("broken", _broken)])


# -- every branch of the verifier ------------------------------------------------------------


def _graph(tiny):
    return build(tiny)[1].copy()


def _add(graph, new, srcs):
    graph.add_node(new.scope, node=new)
    for port, src in enumerate(srcs):
        graph.add_edge(src, new.scope, port=port)


def _set(graph, scope, **changes):
    replace_node(graph, node(graph, scope).replace(**changes))


BREAKS = {
    "no Node record": lambda g: g.add_node("stray"),
    "node id differs from its path": lambda g: g.nodes["features.conv0"].update(
        node=node(g, "features.conv0").replace(path=("features", "conv9"))
    ),
    "carries NoAttrs": lambda g: _set(g, "features.conv0", attrs=NoAttrs()),
    "conv node in unit": lambda g: _set(g, "features.conv0", unit=Unit(UnitKind.INPUT)),
    "takes 1 inputs, has 2": lambda g: g.add_edge("input", "features.denseblock1.denselayer1.norm1", port=1),
    "takes one or more inputs, has 0": lambda g: [
        g.remove_edge(s, "features.denseblock1.cat") for s in list(g.predecessors("features.denseblock1.cat"))
    ],
    "input ports [0, 2] are not 0..n-1": lambda g: g.edges[
        "features.denseblock1.denselayer1.drop2", "features.denseblock1.denselayer2.cat"
    ].update(port=2),
    "is not unique": lambda g: _set(g, "features.conv0", order=0),
    "does not come before it": lambda g: _set(g, "input", order=10_000),
    "not inferred": lambda g: _set(g, "features.conv0", shape=None),
    "expected one input node": lambda g: _add(g, node(g, "input").replace(path=("input2",), order=10_000), []),
    "expected one output node": lambda g: _add(
        g, node(g, "features.relu5").replace(path=("extra",), order=10_000), ["features.norm5"]
    ),
}


@pytest.mark.parametrize("message", list(BREAKS))
def test_the_verifier_names_each_broken_invariant(tiny, message):
    graph = _graph(tiny)
    verify(graph, inferred=True)  # intact
    BREAKS[message](graph)
    with pytest.raises(IRError, match=message.replace("[", r"\[").replace("]", r"\]")):
        verify(graph, inferred=True)


def _pre(graph, scope, pre=None, **changes):
    """Set a conv's or linear's `pre` (and other attributes) in a graph after pass fold_preact_bn."""
    n = node(graph, scope)
    attrs = dataclasses.replace(n.attrs, **changes, **({} if pre is None else {"pre": pre}))
    replace_node(graph, n.replace(attrs=attrs))


PRE_BREAKS = {  # pass fold_preact_bn's references, checked by the verifier
    "names no node": lambda g: _pre(g, "classifier", ("features", "norm9")),
    "is a conv or another op's pre already": lambda g: _pre(g, "classifier", ("features", "conv0")),
    "a bn_clamp that no conv or linear takes as its pre": lambda g: _pre(g, "classifier", ()),
    "pads its input": lambda g: _pre(g, "features.transition1.conv", padding=1),
    "lies between it and its pre": lambda g: [
        _pre(g, "features.transition1.conv", ()),
        _pre(g, "classifier", ("features", "transition1", "norm")),
    ],
    # consistent shapes, but the classifier reads norm5's 6x4x4 map flattened, not its 6 channels
    "reads 96 features, its pre features.norm5 has 6": lambda g: _reinferred(g, _bypass(g, "avgpool")),
}


def _bypass(graph, scope):
    """Remove a one-input node; its consumers read its input instead."""
    (src,) = inputs(graph, scope)
    for dst, edge in list(graph.succ[scope].items()):
        graph.add_edge(src, dst, port=edge["port"])
    graph.remove_node(scope)


def _reinferred(graph, _=None):
    """Fill `graph`'s nodes in place with what inference derives for them."""
    for n in ordered(infer(graph)):
        replace_node(graph, n)


@pytest.mark.parametrize("message", list(PRE_BREAKS))
def test_the_verifier_checks_what_a_folded_batch_norm_refers_to(tiny, message):
    graph = build(tiny, passes=select("torch", 0, enable=["fold_preact_bn"]))[1].copy()
    verify(graph, inferred=True)
    assert node(graph, "classifier").attrs.pre == ("features", "norm5")
    PRE_BREAKS[message](graph)
    with pytest.raises(IRError, match=message):
        verify(graph, inferred=True)


def test_a_rebuilt_node_must_not_be_added_twice():
    b = Builder()
    b.add(("input",), OpKind.INPUT, InputAttrs(3, 8, 8), Unit(UnitKind.INPUT), [])
    with pytest.raises(IRError, match="added twice"):
        b.add(("input",), OpKind.RELU, NoAttrs(), Unit(UnitKind.STEM), [])


def test_inference_fills_tensors_from_the_op_table(tiny):
    _, graph = build(tiny)
    norm = node(graph, "features.denseblock1.denselayer2.norm1")
    assert [(t.name, t.shape, t.trainable, t.onnx) for t in norm.tensors] == [
        ("weight", (6,), True, True),
        ("bias", (6,), True, True),
        ("running_mean", (6,), False, True),
        ("running_var", (6,), False, True),
        ("num_batches_tracked", (), False, False),
    ]
    assert norm.params == 12
    assert [n.scope for n in ordered(graph)][:2] == ["input", "features.conv0"]
    assert inputs(graph, "features.denseblock1.cat") == [
        "features.conv0",
        "features.denseblock1.denselayer1.drop2",
        "features.denseblock1.denselayer2.drop2",
    ]


def test_dnc_ir_prints_the_text_form(tiny):
    from click.testing import CliRunner

    from dnc.cli import main

    result = CliRunner().invoke(main, ["ir", str(tiny), "--set", "head.classes=5"])
    assert result.exit_code == 0, result.output
    assert result.output == ir_text(build(tiny, ["head.classes=5"])[1])
    assert result.output.splitlines()[-2] == "  %classifier = linear[out_features=5](%flatten) : 5"


def test_copy_is_what_networkx_copies_and_shares_nothing_mutable():
    from dnc.ir.graph import copy
    from dnc.ir.infer import infer
    from dnc.ir.lower import lower

    graph = infer(lower(load_spec(ROOT / "specs" / "densenet121.yaml", ["blocks=[3,2]"])))
    graph.graph["settings"] = "anything"
    new = copy(graph)
    want = graph.copy()
    assert new.graph == want.graph and dict(new.nodes(data=True)) == dict(want.nodes(data=True))
    assert sorted(new.edges(data=True)) == sorted(want.edges(data=True))
    assert all(new.pred[v][u] is new.succ[u][v] for u, v in new.edges)  # one data dict per edge, as networkx keeps it
    new.remove_node("features.denseblock1.cat")
    new.edges["features.conv0", "features.norm0"]["port"] = 7
    new.graph["name"] = "other"
    assert "features.denseblock1.cat" in graph and graph.edges["features.conv0", "features.norm0"]["port"] == 0
    assert graph.graph["name"] == "densenet121"


# -- passes infer what they change, and keep edges in port order ------------------------------------------


@pytest.mark.parametrize("spec", ["densenet121", "densenet_bc100_k12", "tiny"])
@pytest.mark.parametrize("level", [1, 2])
def test_each_pass_infers_what_a_full_inference_gives_and_keeps_edges_in_port_order(spec, level, tiny):
    """A pass re-infers only the nodes it changed and the readers of those that changed shape; the result must
    be every record a full inference of the same graph gives. Rewired readers keep their edges stored in port
    order (networkx would store a re-added edge last, and every later read would sort a concat's inputs)."""
    from dnc.ir.graph import copy, edge_ports
    from dnc.ir.infer import infer_in_place
    from dnc.ir.passes import Rewrite

    path = tiny if spec == "tiny" else ROOT / "specs" / f"{spec}.yaml"
    graph = compile_spec(load_spec(path))
    rewrites = [(name, step) for name, step in select("torch", level) if isinstance(step, Rewrite)]
    assert rewrites
    for name, step in rewrites:
        graph = step.in_place(graph)
        again = infer_in_place(copy(graph), every_node=True)
        assert [node(graph, s) for s in graph] == [node(again, s) for s in again], name
        for scope in graph:
            pred = graph._pred[scope]
            assert edge_ports(pred) == list(range(len(pred))), (name, scope)
        verify(graph, inferred=True, full=True)


def test_replace_input_keeps_each_reader_s_port_and_place():
    from dnc.ir.graph import replace_input

    graph = nx.DiGraph()
    for port, src in enumerate("abc"):
        graph.add_edge(src, "cat", port=port)
    graph.add_edge("x", "y", port=0)
    replace_input(graph, "b", "x")
    assert list(graph.pred["cat"]) == ["a", "x", "c"]
    assert [graph.edges[src, "cat"]["port"] for src in "axc"] == [0, 1, 2]
    assert set(graph.succ["x"]) == {"y", "cat"} and not graph.succ["b"]
    with pytest.raises(IRError, match="^cat: reads a and x; one edge may join them"):
        replace_input(graph, "a", "x")

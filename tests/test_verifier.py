"""The verifier re-derives every node from the op table, inference names the node of a malformed IR, and
verification costs the same per node and edge however deep the network; verifying a graph again checks what
changed since, found by comparing, not by trusting the pass. No torch."""

from __future__ import annotations

import dataclasses
import re
import sys

import pytest
from conftest import spec_path

from dnc.frontend.loader import load_spec
from dnc.ir.graph import IRError, OpKind, inputs, node, ordered, replace_node
from dnc.ir.infer import infer
from dnc.ir.lower import lower
from dnc.ir.ops import Init, Tensor
from dnc.ir.verifier import derive, verify
from dnc.pipeline import build, compile_spec

CONV = "features.denseblock1.denselayer1.conv2"  # 128x56x56 in, growth 32 out


@pytest.fixture(scope="module")
def densenet121():
    return build(spec_path("densenet121"))[1]


def _set(graph, scope, **changes):
    replace_node(graph, node(graph, scope).replace(**changes))


def _conv_attrs(graph, scope, **changes):
    _set(graph, scope, attrs=dataclasses.replace(node(graph, scope).attrs, **changes))


STALE = {
    # the two cases: attributes changed after inference, and a shape no rule gives
    "conv on inputs 128x56x56 carries shape 32x56x56, the op table gives 16x56x56": lambda g: _conv_attrs(
        g, CONV, out_channels=16
    ),
    "conv on inputs 128x56x56 carries shape 100x56x56, the op table gives 32x56x56": lambda g: _set(
        g, CONV, shape=(100, 56, 56)
    ),
    "carries tensor weight 32x128x1x1, the op table gives weight 32x128x3x3": lambda g: _set(
        g, CONV, tensors=(Tensor("weight", (32, 128, 1, 1), Init.HE_NORMAL, True),)
    ),
    "carries tensor Tensor(name='weight', shape=(32, 128, 3, 3), init=<Init.HE_NORMAL: 'he_normal'>, "
    "trainable=False": lambda g: _set(g, CONV, tensors=(Tensor("weight", (32, 128, 3, 3), Init.HE_NORMAL, False),)),
    "carries 0 tensors, the op table gives 1": lambda g: _set(g, CONV, tensors=()),
    "carries 1 params, the op table gives 36864": lambda g: _set(g, CONV, params=1),
    "carries 2 MACs, the op table gives 115605504": lambda g: _set(g, CONV, macs=2),
}


@pytest.mark.parametrize("message", list(STALE))
def test_a_node_that_disagrees_with_the_op_table_is_refused_naming_it_and_both_values(densenet121, message):
    graph = densenet121.copy()
    verify(graph, inferred=True)
    STALE[message](graph)
    with pytest.raises(IRError, match=f"^{re.escape(CONV)}: .*{re.escape(message)}"):
        verify(graph, inferred=True)


def test_the_first_stale_node_in_network_order_is_named(densenet121):
    """A stale shape makes its readers' rules disagree too; the node that went wrong comes first."""
    graph = densenet121.copy()
    _set(graph, "features.conv0", shape=(99, 112, 112))
    with pytest.raises(IRError, match=r"^features.conv0: conv on inputs 3x224x224 carries shape 99x112x112"):
        verify(graph, inferred=True)


@pytest.mark.parametrize("verified_before", [False, True], ids=["fresh", "verified before"])
def test_inputs_each_right_but_wrong_together_are_refused_naming_their_reader(densenet121, verified_before):
    """conv2 with stride 2, its shape, params and MACs re-derived: it agrees with the op table, but the
    concatenation after it now joins 56x56 and 28x28 maps. Verified before, the concat itself is unchanged:
    it is checked again because what it reads changed shape."""
    graph = densenet121.copy()
    if verified_before:
        verify(graph, inferred=True)
    _conv_attrs(graph, CONV, stride=2)
    conv = node(graph, CONV)
    d = derive(conv, [node(graph, src).shape for src in inputs(graph, CONV)])
    _set(graph, CONV, shape=d.shape, tensors=d.tensors, params=d.params, macs=d.macs)
    assert d.shape == (32, 28, 28)
    with pytest.raises(
        IRError,
        match=r"^features.denseblock1.denselayer2.cat: concat cannot take inputs 64x56x56, 32x28x28: joins feature "
        r"maps of different spatial sizes$",
    ):
        verify(graph, inferred=True)


def test_a_pass_that_leaves_a_stale_node_is_named_with_the_step():
    """A pass that edits a node after inference (instead of re-inferring) would have both targets emit it."""
    spec = load_spec(spec_path("densenet121"))

    def narrow(graph):
        graph = graph.copy()
        _conv_attrs(graph, CONV, out_channels=16)
        return graph

    with pytest.raises(IRError, match=rf"^after narrow: {re.escape(CONV)}: conv .* the op table gives 16x56x56"):
        compile_spec(spec, passes=[("narrow", narrow)])


# -- inference never raises a bare Python error ---------------------------------------------------


@pytest.fixture
def lowered():
    return lower(load_spec(spec_path("densenet121")))


def _without_edge(graph, src, dst):
    graph.remove_edge(src, dst)


MALFORMED = {
    "features.norm0: batchnorm takes 1 inputs, has 0": lambda g: _without_edge(g, "features.conv0", "features.norm0"),
    "features.norm0: batchnorm takes 1 inputs, has 2": lambda g: g.add_edge("input", "features.norm0", port=1),
    "features.denseblock1.cat: input ports [0, 1, 2, 3, 4, 6] are not 0..n-1": lambda g: _without_edge(
        g, "features.denseblock1.denselayer5.conv2", "features.denseblock1.cat"
    ),
    "features.norm0: input ports [None] are not 0..n-1": lambda g: g.edges["features.conv0", "features.norm0"].pop(
        "port"
    ),
    "features.norm0: input features.conv0 does not come before it": lambda g: _set(g, "features.conv0", order=10**6),
    "features.conv0: conv rule fails on inputs 3x224x224: TypeError": lambda g: _conv_attrs(
        g, "features.conv0", kernel="7"
    ),
    "features.conv0: conv carries NoAttrs": lambda g: _set(g, "features.conv0", attrs=node(g, "features.relu0").attrs),
}


@pytest.mark.parametrize("message", list(MALFORMED))
def test_inference_names_the_node_of_a_malformed_ir(lowered, message):
    MALFORMED[message](lowered)
    with pytest.raises(IRError, match=f"^{re.escape(message)}"):
        infer(lowered)


def test_inference_of_a_rewired_but_legal_ir_derives_it(lowered):
    """A concat that loses an input is a legal (different) network: inference derives it, the verifier agrees."""
    cat = "features.denseblock1.denselayer3.cat"
    lowered.remove_edge("features.denseblock1.denselayer2.conv2", cat)
    graph = infer(lowered)
    verify(graph, inferred=True)
    assert inputs(graph, cat) == ["features.pool0", "features.denseblock1.denselayer1.conv2"]
    assert node(graph, cat).shape == (96, 56, 56)
    assert node(graph, "features.denseblock1.denselayer3.conv1").tensors[0].shape == (128, 96, 1, 1)


# -- the verifier's cost ---------------------------------------------------------------------------

DEEP = """\
version: 1
name: deep
input: {{channels: 3, size: [32, 32]}}
stem: {{kind: cifar, width: 16}}
growth_rate: 12
bn_size: 4
blocks: [{0}, {0}, {0}]
head: {{classes: 10}}
"""


def _lines_run(fn) -> int:
    """How many lines of Python `fn()` executes: a deterministic measure of its work (sorting in C aside)."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        count += event == "line"
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(previous)
    return count


def test_verification_costs_the_same_per_node_and_edge_at_four_times_the_depth(write_spec):
    """Four times the layers per block is four times the nodes and 14 times the edges (a dense block's
    concatenations grow with the square of its layers): the verifier's work per node and edge must not grow."""
    per_item = []
    for layers in (6, 24):
        _, graph = build(write_spec(DEEP.format(layers), f"deep{layers}.yaml"))
        size = graph.number_of_nodes() + graph.number_of_edges()
        per_item.append(_lines_run(lambda graph=graph: verify(graph, inferred=True, full=True)) / size)
        assert sum(n.op is OpKind.CONCAT for n in ordered(graph)) == 3 * layers
    assert per_item[1] <= 1.1 * per_item[0], per_item


# -- verifying again checks what changed, found by comparison ----------------------------------------------


def test_a_graph_verified_again_costs_what_changed_and_full_checks_everything(densenet121):
    graph = densenet121.copy()
    full = _lines_run(lambda: verify(graph, inferred=True))
    again = _lines_run(lambda: verify(graph, inferred=True))
    assert again < full / 3, (again, full)
    assert _lines_run(lambda: verify(graph, inferred=True, full=True)) > full * 0.9
    _set(graph, CONV, macs=2)  # one node changed: its checks run again
    with pytest.raises(IRError, match=f"^{re.escape(CONV)}: .*carries 2 MACs"):
        verify(graph, inferred=True)
    with pytest.raises(IRError, match=f"^{re.escape(CONV)}: .*carries 2 MACs"):  # a failure keeps no snapshot
        verify(graph, inferred=True)


def test_a_record_changed_in_place_behind_the_verifier_is_caught(densenet121):
    """A frozen record written through its __dict__ keeps its identity: the verifier compares the fields."""
    graph = densenet121.copy()
    _set(graph, CONV)  # a record of its own (a copied graph shares the fixture's records)
    verify(graph, inferred=True)
    node(graph, CONV).__dict__["shape"] = (16, 56, 56)
    with pytest.raises(IRError, match=f"^{re.escape(CONV)}: conv on inputs 128x56x56 carries shape 16x56x56"):
        verify(graph, inferred=True)


def test_an_edge_port_changed_in_place_is_caught(densenet121):
    """networkx's add_edge on an existing edge updates its data dict in place: the verifier reads every port."""
    graph = densenet121.copy()
    verify(graph, inferred=True)
    cat = "features.denseblock1.denselayer3.cat"
    graph.add_edge("features.pool0", cat, port=2)
    with pytest.raises(IRError, match=rf"^{re.escape(cat)}: input ports \[1, 2, 2\] are not 0..n-1"):
        verify(graph, inferred=True)


def test_a_node_whose_order_alone_changed_is_checked_against_its_readers(densenet121):
    """The reader is unchanged (same record, same edges); its input now comes after it in creation order."""
    graph = densenet121.copy()
    verify(graph, inferred=True)
    reader = node(graph, "features.denseblock1.denselayer1.norm1")
    _set(graph, "features.pool0", order=max(n.order for n in ordered(graph)) + 1)
    with pytest.raises(IRError, match=rf"^{re.escape(reader.scope)}: input features.pool0 does not come before it"):
        verify(graph, inferred=True)

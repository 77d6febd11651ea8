"""Emitters follow the IR's wiring: a mutated IR gives code that computes exactly that.

Each mutation is made on the lowered IR, which is then inferred again. The torch
target's output is checked numerically against the ONNX target's output for the same
IR and the same weights; the ONNX emitter writes one node per IR node along its edges.
A unit no pattern class matches gets graph-following code of its own, and a network
that does not flow stage to stage is emitted as graph-following code whole: either way
it computes what the IR says, trains and scripts.
"""

from __future__ import annotations

import pytest
from conftest import ROOT, import_file

from dnc.errors import EmitError
from dnc.frontend.loader import load_spec
from dnc.ir.graph import node
from dnc.ir.infer import infer, state_dict_layout
from dnc.ir.lower import lower
from dnc.ir.verifier import verify
from dnc.reports.pictures import picture
from dnc.targets.torch import emit as emit_torch
from dnc.weights import seeded_state

SPEC = ROOT / "specs" / "densenet_bc100_k12.yaml"
SMALL = ["blocks=[3,2]", "input.size=[16,12]"]


def lowered():
    return lower(load_spec(SPEC, SMALL), source="specs/densenet_bc100_k12.yaml")


def reverse_concat(g):
    cat = "features.denseblock1.denselayer3.cat"
    edges = sorted(g.in_edges(cat, data=True), key=lambda e: e[2]["port"])
    for port, (_, _, data) in enumerate(reversed(edges)):
        data["port"] = port
    return g


def pool_before_conv(g):
    relu, conv, pool = (f"features.transition1.{n}" for n in ("relu", "conv", "pool"))
    consumers = [(dst, data["port"]) for _, dst, data in g.out_edges(pool, data=True)]
    g.remove_edges_from([(relu, conv), (conv, pool), *[(pool, dst) for dst, _ in consumers]])
    g.add_edge(relu, pool, port=0)
    g.add_edge(pool, conv, port=0)
    for dst, port in consumers:
        g.add_edge(conv, dst, port=port)
    a, b = node(g, conv), node(g, pool)  # creation order must stay a topological order
    g.nodes[conv]["node"], g.nodes[pool]["node"] = a.replace(order=b.order), b.replace(order=a.order)
    return g


def drop_concat_input(g):
    """The concat of denselayer3 loses its second input (denselayer1's features); the ports are renumbered."""
    cat = "features.denseblock1.denselayer3.cat"
    g.remove_edge("features.denseblock1.denselayer1.conv2", cat)
    for port, (_, _, data) in enumerate(sorted(g.in_edges(cat, data=True), key=lambda e: e[2]["port"])):
        data["port"] = port
    return g


def reorder_block_output(g):
    """The block returns its features with the last layer's first."""
    cat = "features.denseblock1.cat"
    edges = sorted(g.in_edges(cat, data=True), key=lambda e: e[2]["port"])
    order = [edges[-1], *edges[:-1]]
    for port, (_, _, data) in enumerate(order):
        data["port"] = port
    return g


def skip_across_blocks(g):
    """denselayer2 of the second block also reads denselayer1's bottleneck, which is not one of the block's
    features: no layer of a block can be handed it, so the network is not laid out by stages any more."""
    cat = "features.denseblock2.denselayer2.cat"
    g.add_edge("features.denseblock2.denselayer1.conv1", cat, port=len(g.pred[cat]))
    return g


def drop_batchnorm(g):
    norm = "features.denseblock1.denselayer2.norm2"
    (src,) = g.predecessors(norm)
    (dst,) = g.successors(norm)
    g.remove_node(norm)
    g.add_edge(src, dst, port=0)
    return g


def mutated(mutation):
    g = mutation(lowered())
    verify(g)
    return infer(g)


def run_both(graph, tmp_path):
    """The torch target's and the ONNX target's outputs for the same IR, weights and input."""
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    from dnc.targets.onnx.emit import emit_onnx
    from dnc.weights import to_torch

    state = seeded_state(state_dict_layout(graph), seed=5)
    path = tmp_path / f"{graph.graph['name']}.py"
    path.write_text(emit_torch.emit(graph))
    model = import_file(path, f"mutated_{tmp_path.name}").DenseNet().eval()
    model.load_state_dict(to_torch(state), strict=True)
    x = np.random.default_rng(0).standard_normal((2, *node(graph, "input").shape)).astype(np.float32)
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(emit_onnx(graph, state).SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, {"input": x})[0]
    return got, want


def rel_error(a, b) -> float:
    return float(abs(a - b).max() / abs(b).max())


@pytest.mark.parametrize("mutation", [pool_before_conv, drop_batchnorm], ids=["pool before conv", "drop a BN"])
def test_the_torch_code_computes_the_mutated_ir(mutation, tmp_path):
    original, graph = infer(lowered()), mutated(mutation)
    assert emit_torch.emit(graph) != emit_torch.emit(original)
    got, want = run_both(graph, tmp_path)
    assert rel_error(got, want) <= 1e-5
    (tmp_path / "original").mkdir()
    before, _ = run_both(original, tmp_path / "original")
    if mutation is drop_batchnorm:
        assert rel_error(got, before) > 1e-3  # a different network
    else:  # a 1x1 conv and a 2x2 average pool commute: the same numbers for a quarter of the MACs
        assert rel_error(got, before) <= 1e-5
        conv = "features.transition1.conv"
        assert node(graph, conv).macs * 4 == node(original, conv).macs


def test_pool_before_conv_is_emitted_in_that_order():
    code = emit_torch.emit(mutated(pool_before_conv))
    forward = code[code.index("class Transition") :].split("def forward", 1)[1].split("return x", 1)[0]
    assert forward.index("self.pool(x)") < forward.index("self.conv(x)")
    # its MACs are a quarter of the conv's before: the docstring's total says so
    assert "Batch norm, ReLU, 2x2 average pool, 1x1 conv to `out_channels` channels." in code


def test_a_dropped_batchnorm_gets_its_own_layer_class():
    code = emit_torch.emit(mutated(drop_batchnorm))
    assert "block.denselayer2 = DenseLayer2(in_channels=" in code
    assert "self.norm2" not in code.split("class DenseLayer2", 1)[1].split("class ", 1)[0]


GRAPH_CODE = [reverse_concat, drop_concat_input, reorder_block_output]


@pytest.mark.parametrize("mutation", GRAPH_CODE, ids=["reversed concat", "dropped input", "block output reordered"])
def test_a_unit_no_pattern_matches_gets_graph_code_that_computes_the_ir(mutation, tmp_path):
    graph = mutated(mutation)
    code = emit_torch.emit(graph)
    assert "Graph(" in code and "class DenseLayer(" in code  # the other layers keep their pattern class
    got, want = run_both(graph, tmp_path)
    assert rel_error(got, want) <= 1e-5


def test_a_network_that_does_not_flow_by_stages_is_emitted_as_graph_code(tmp_path):
    graph = mutated(skip_across_blocks)
    code = emit_torch.emit(graph)
    assert "self.features = features = nn.Module()" in code and "class DenseLayer(" not in code
    got, want = run_both(graph, tmp_path)
    assert rel_error(got, want) <= 1e-5


@pytest.mark.parametrize("mutation", [reverse_concat, skip_across_blocks], ids=["unit", "whole network"])
def test_graph_code_keeps_the_state_dict_trains_and_scripts(mutation, tmp_path):
    torch = pytest.importorskip("torch")
    from dnc.weights import to_torch

    graph = mutated(mutation)
    path = tmp_path / "net.py"
    path.write_text(emit_torch.emit(graph))
    model = import_file(path, f"graph_code_{tmp_path.name}").DenseNet()
    layout = state_dict_layout(graph)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: t.shape for k, t in layout.items()}
    model.load_state_dict(to_torch(seeded_state(layout, seed=1)), strict=True)
    x = torch.randn(2, *node(graph, "input").shape)
    model.train()(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), rtol=1e-5, atol=1e-6)
        assert len(scripted.forward_blocks(x)) == len(model.forward_blocks(x)) == 2


def test_onnx_follows_the_reversed_concat(tmp_path):
    onnx = pytest.importorskip("onnx")
    from dnc.targets.onnx.emit import emit_onnx

    graph = mutated(reverse_concat)
    model = emit_onnx(graph, seeded_state(state_dict_layout(graph)))
    (cat,) = [n for n in model.graph.node if n.name == "features.denseblock1.denselayer3.cat"]
    assert list(cat.input) == [
        "features.denseblock1.denselayer2.conv2",
        "features.denseblock1.denselayer1.conv2",
        "features.pool0" if False else "features.conv0",
    ]
    onnx.checker.check_model(model, full_check=True)


def test_the_picture_follows_the_wiring():
    labels = {u.id: u.lines for u in picture(mutated(pool_before_conv)).units}
    assert labels["transition1"] == ["transition1", "avgpool2x2/2, conv1x1 30"]


def test_onnx_refuses_a_batch_norm_moved_into_the_next_layer():
    """fold_preact_bn is a torch pass: the ONNX emitter has no rule for its clamps and says so."""
    pytest.importorskip("onnx")
    from dnc.ir.passes import fold_preact_bn
    from dnc.targets.onnx.emit import emit_onnx

    graph = fold_preact_bn(infer(lowered()))
    with pytest.raises(EmitError, match=r"features.denseblock1.denselayer1.norm1: no ONNX rule for op 'bn_clamp'"):
        emit_onnx(graph, seeded_state(state_dict_layout(graph)))

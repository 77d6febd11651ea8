"""`activation: relu | silu | gelu | mish`, for the network or per block, through both targets and every level.

Every emitted model is compared with the IR interpreter (its own code for each activation), and the compiled
model with the reference DenseNet in tests/reference_densenet.py (tests/test_reference.py, case "activations").
"""

from __future__ import annotations

import pytest
from conftest import ROOT, dnc_cli

from dnc.ir.graph import OpKind, ordered
from dnc.ir.infer import state_dict_layout
from dnc.ir.passes import select
from dnc.pipeline import build
from dnc.weights import seeded_state

SPEC = ROOT / "specs" / "densenet_bc100_k12.yaml"
SMALL = ["blocks=[2,2,2]", "input.size=[20,20]"]
ACTIVATIONS = ["silu", "gelu", "mish"]


def graph_of(activation: str, level: int = 0, target: str = "torch", *more: str):
    return build(SPEC, [*SMALL, f"activation={activation}", *more], passes=select(target, level))[1]


@pytest.mark.parametrize("activation", ["relu", *ACTIVATIONS])
def test_lowering_puts_the_activation_after_every_batch_norm(activation):
    graph = graph_of(activation)
    norms = [n for n in ordered(graph) if n.op is OpKind.BATCHNORM and n.path[-1] != "norm0"]
    after = {node.op for n in norms for node in (graph.nodes[s]["node"] for s in graph.succ[n.scope])}
    assert after == {OpKind(activation)}
    names = {n.name for n in ordered(graph) if n.op is OpKind(activation)}
    assert names == ({"relu1", "relu2", "relu", "relu5"} if activation == "relu" else {"act1", "act2", "act", "act5"})


def test_a_block_may_have_its_own_activation():
    graph = graph_of("silu", 0, "torch", "blocks=[2,{layers: 2, activation: mish},2]")
    ops = {n.scope: n.op for n in ordered(graph)}
    assert ops["features.denseblock2.denselayer1.act1"] is OpKind.MISH
    assert ops["features.transition2.act"] is OpKind.MISH  # the transition after the block
    assert ops["features.denseblock1.denselayer1.act2"] is OpKind.SILU
    assert ops["features.transition1.act"] is OpKind.SILU and ops["features.act5"] is OpKind.SILU


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_the_relu_fusions_leave_other_activations_alone(activation):
    graph = graph_of(activation, 2)
    ops = {n.op for n in ordered(graph)}
    assert OpKind.BN_CLAMP not in ops and OpKind.BN_RELU not in ops and OpKind(activation) in ops
    assert OpKind.CONV_BN in ops  # what holds for any activation still runs


@pytest.mark.parametrize("target", ["torch", "onnx"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_level_of_both_targets_matches_the_interpreter(activation, target):
    for level in (0, 1, 2) if target == "torch" else (0, 2):
        sets = [a for s in [*SMALL, f"activation={activation}"] for a in ("--set", s)]
        result = dnc_cli("verify", SPEC, *sets, "--target", target, f"-O{level}", "--batch", "2")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "vs the interpreter (float64, -O0 IR)" in result.stdout and result.stdout.rstrip().endswith(": ok")


@pytest.mark.parametrize(
    ("activation", "opset", "ops"),
    [
        ("silu", 17, {"Sigmoid", "Mul"}),
        ("silu", 28, {"Sigmoid", "Mul"}),  # no SiLU op in any opset: x * sigmoid(x)
        ("gelu", 17, {"Div", "Erf", "Add", "Mul"}),  # 0.5 * x * (1 + erf(x / sqrt(2)))
        ("gelu", 20, {"Gelu"}),
        ("mish", 17, {"Softplus", "Tanh", "Mul"}),  # x * tanh(softplus(x))
        ("mish", 18, {"Mish"}),
    ],
)
def test_onnx_uses_native_ops_where_the_opset_has_them(activation, opset, ops):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    from dnc.ir.interpret import interpret
    from dnc.targets.onnx.emit import emit_onnx
    from dnc.weights import to_torch

    graph = graph_of(activation, 0, "onnx")
    state = seeded_state(state_dict_layout(graph), seed=2)
    model = emit_onnx(graph, state, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    emitted = {n.op_type for n in model.graph.node} - {"Conv", "BatchNormalization", "Concat", "AveragePool"}
    emitted -= {"MaxPool", "GlobalAveragePool", "Flatten", "Gemm", "Constant"}
    assert emitted == ops
    x = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0]).double()
    want = interpret(graph, to_torch(state), x.double()).output
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def test_the_activation_is_in_the_schema_and_in_a_diff():
    import json

    schema = json.loads(dnc_cli("schema").stdout)
    assert schema["properties"]["activation"]["enum"] == ["relu", "silu", "gelu", "mish"]
    result = dnc_cli("diff", SPEC, SPEC, "--set", "activation=gelu", "--format", "json")
    assert result.returncode == 1, result.stderr
    changes = json.loads(result.stdout)
    assert {"field": "activation", "a": "relu", "b": "gelu"} in changes["fields"]

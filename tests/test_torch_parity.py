"""The generated PyTorch models against torchvision's DenseNet: same weights, same numbers.

Weights are seeded (`weights.seeded_state`), BN running statistics randomised, and
loaded into both models with strict=True, which also proves the state_dict keys and
shapes are torchvision's. The models under test are the committed files in generated/
(test_torch_target checks they are what `dnc compile` emits).
"""

from __future__ import annotations

import pytest
from conftest import CIFAR_SPECS, ROOT, TORCHVISION_SPECS, import_file, spec_path

from dnc.ir.graph import graph_input, ordered, output
from dnc.ir.infer import state_dict_layout, state_dict_shapes
from dnc.pipeline import build
from dnc.weights import seeded_state

torch = pytest.importorskip("torch", exc_type=ImportError)  # no torch: skip the module

from dnc.check.reference import torchvision_densenet  # noqa: E402  (needs torch)
from dnc.weights import to_torch  # noqa: E402  (needs torch)

SLOW = {"densenet161", "densenet201", "densenet264"}
SLOW_CIFAR = {"densenet100_k24", "densenet_bc190_k40", "densenet_bc250_k24"}  # 15M to 27M parameters
SIZES = [(224, 224), (97, 131)]  # the spec's size, and an odd one where every pool floors
RTOL = 1e-5


def models(name: str, device: str = "cpu"):
    """(generated, torchvision, graph), both with the same seeded weights, in eval mode."""
    spec, graph = build(spec_path(name))
    state = to_torch(seeded_state(state_dict_layout(graph), seed=1))
    generated = import_file(ROOT / "generated" / f"{name}.py").DenseNet()
    reference = torchvision_densenet(spec)
    generated.load_state_dict(state, strict=True)
    reference.load_state_dict(state, strict=True)
    return generated.to(device).eval(), reference.to(device).eval(), graph


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(
    scope="module", params=[pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in TORCHVISION_SPECS]
)
def pair(request):
    return models(request.param)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_eval_matches_torchvision(pair, size):
    generated, reference, _ = pair
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for batch in (x, x[:1]):  # batch 2 and batch 1
            out, ref = generated(batch), reference(batch)
            assert out.shape == ref.shape == (len(batch), 1000)
            assert rel_err(out, ref) <= RTOL


def test_state_dict_is_torchvisions(pair):
    generated, reference, graph = pair
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in generated.state_dict().items()}
    assert list(got.items()) == list(want.items()) == list(state_dict_shapes(graph).items())


def test_forward_blocks_and_features(pair):
    generated, reference, graph = pair
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        blocks = generated.forward_blocks(x)
        features = generated.forward_features(x)
        ref_features = torch.relu(reference.features(x))  # torchvision applies relu5 in forward
    want = [graph.nodes[f"features.denseblock{i}.cat"]["node"].shape for i in range(1, len(blocks) + 1)]
    assert [tuple(b.shape[1:]) for b in blocks] == want
    assert rel_err(features, ref_features) <= RTOL


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", TORCHVISION_SPECS)
def test_eval_matches_torchvision_on_cuda(name, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full float32, or the tolerance means nothing
    generated, reference, _ = models(name, "cuda")
    for size in SIZES:
        x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(0)).cuda()
        with torch.no_grad():
            assert rel_err(generated(x), reference(x)) <= RTOL
            assert rel_err(generated(x[:1]), reference(x[:1])) <= RTOL


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_CIFAR else []) for n in CIFAR_SPECS]
)
def test_cifar_shapes_and_params_as_inferred(name):
    _, graph = build(spec_path(name))
    model = import_file(ROOT / "generated" / f"{name}.py").DenseNet()
    model.load_state_dict(to_torch(seeded_state(state_dict_layout(graph))), strict=True)
    x = torch.randn(2, *graph_input(graph).shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.eval()(x)
        blocks = model.forward_blocks(x)
    assert tuple(out.shape) == (2, *output(graph).shape)
    assert torch.isfinite(out).all()
    assert sum(p.numel() for p in model.parameters()) == sum(n.params for n in ordered(graph))
    want = [n.shape for n in ordered(graph) if n.scope.endswith(".cat") and n.scope.count(".") == 2]
    assert [tuple(b.shape[1:]) for b in blocks] == want

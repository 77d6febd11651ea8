"""The generated model in training and under torch's compilers, on a tiny spec written here.

Gradients are compared with torchvision's DenseNet of the same configuration: same
weights, same input, same dropout RNG stream, batch statistics in train mode.
"""

from __future__ import annotations

import inspect
import re

import pytest
from conftest import dnc_cli, import_file

from dnc.ir.infer import state_dict_layout
from dnc.pipeline import build
from dnc.weights import seeded_state

torch = pytest.importorskip("torch", exc_type=ImportError)  # no torch: skip the module

from dnc.check.reference import torchvision_densenet  # noqa: E402  (needs torch)
from dnc.weights import to_torch  # noqa: E402  (needs torch)

TINY = """\
version: 1
name: tiny
input: {channels: 3, size: [32, 32]}
stem: {kind: imagenet, width: 16}
growth_rate: 8
bn_size: 2
drop_rate: 0.2
blocks: [2, 3]
head: {classes: 5}
"""


def compile_tiny(tmp_path, *overrides: str):
    """Compile the tiny spec with the real CLI; return (module, spec, graph)."""
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(TINY)
    sets = [a for o in overrides for a in ("--set", o)]
    result = dnc_cli("compile", spec_file, "-o", tmp_path / "out", *sets)
    assert result.returncode == 0, result.stderr
    spec, graph = build(spec_file, sets[1::2])
    return import_file(tmp_path / "out" / "tiny.py", f"tiny_{tmp_path.name}"), spec, graph


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return compile_tiny(tmp_path_factory.mktemp("tiny"))


def pair(module, spec, graph, **kwargs):
    state = to_torch(seeded_state(state_dict_layout(graph), seed=3))
    generated, reference = module.DenseNet(**kwargs), torchvision_densenet(spec)
    if "memory_efficient" in kwargs:
        reference = type(reference)(
            growth_rate=8, block_config=(2, 3), num_init_features=16, bn_size=2, drop_rate=0.2, num_classes=5, **kwargs
        )
    generated.load_state_dict(state, strict=True)
    reference.load_state_dict(state, strict=True)
    return generated, reference


def train_step(model, x):
    torch.manual_seed(0)  # the same dropout masks in both models
    out = model.train()(x)
    out.square().mean().backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_gradients_match_torchvision(tiny, memory_efficient):
    generated, reference = pair(*tiny, memory_efficient=memory_efficient)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out, grads = train_step(generated, x)
    x_grad = x.grad.clone()
    x.grad = None
    ref, ref_grads = train_step(reference, x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6), name
    assert torch.allclose(x_grad, x.grad, rtol=1e-4, atol=1e-7)
    # train mode updated the BN running statistics the same way
    for (key, a), b in zip(generated.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), key


def test_train_mode_uses_dropout_and_batch_statistics(tiny):
    model = tiny[0].DenseNet().train()
    x = torch.randn(4, 3, 32, 32)
    assert not torch.equal(model(x), model(x))  # dropout at rate 0.2
    model.eval()
    assert torch.equal(model(x), model(x))


def test_memory_efficient_from_the_spec_and_dropout_at_every_conv(tmp_path):
    module, _, _ = compile_tiny(tmp_path, "memory_efficient=true", "dropout_at=every_conv")
    model = module.DenseNet()
    layer = model.features.denseblock1.denselayer1
    assert layer.memory_efficient and layer.drop_rate == 0.2
    assert model.features.transition1.drop_rate == 0.2
    forward = inspect.getsource(type(layer).forward)  # every_conv: dropout after conv1 and after conv2
    assert forward.count("F.dropout") == 1 and inspect.getsource(type(layer).bottleneck).count("F.dropout") == 1
    assert not module.DenseNet(memory_efficient=False).features.denseblock2.denselayer3.memory_efficient


# modules whose outputs torchvision's in-place ReLUs modify, which breaks full backward hooks there
HOOKED = ["features", "features.norm0", "features.denseblock1.denselayer1.norm1", "features.transition1"]


@pytest.mark.parametrize("name", HOOKED)
def test_full_backward_hooks_work_where_torchvisions_fail(tiny, name):
    module, spec, _ = tiny

    def backward_with_hook(model) -> list[str]:
        seen = []
        model.train().get_submodule(name).register_full_backward_hook(lambda m, gi, go: seen.append(name))
        model(torch.randn(2, 3, 32, 32, requires_grad=True)).sum().backward()
        return seen

    assert backward_with_hook(module.DenseNet()) == [name]
    if name != "features.transition1":  # its output feeds no in-place op in torchvision either
        with pytest.raises(RuntimeError, match="modified inplace"):
            backward_with_hook(torchvision_densenet(spec))


def test_loads_old_torchvision_keys(tiny):
    module, spec, graph = tiny
    state = torchvision_densenet(spec).state_dict()
    old = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    model = module.DenseNet()
    model.load_state_dict(old, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert list(module.upgrade_state_dict(old)) == list(state)
    # the oldest checkpoints (before PyTorch 0.4) have no num_batches_tracked at all
    older = {k: v for k, v in old.items() if not k.endswith("num_batches_tracked")}
    module.DenseNet().load_state_dict(older, strict=True)


def eval_pair(tiny):
    generated, _ = pair(*tiny)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return generated.eval(), x, generated(x)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torch_jit_script(tiny):
    model, x, want = eval_pair(tiny)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.equal(scripted(x), want)
        assert len(scripted.forward_blocks(x)) == 2


def test_torch_export(tiny):
    model, x, want = eval_pair(tiny)
    batch = torch.export.Dim("batch", min=2, max=64)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), want, rtol=1e-5, atol=1e-6)
        assert exported.module()(torch.cat([x, x])).shape == (4, 5)


@pytest.mark.slow  # inductor compiles C++ for the CPU: about 40 s on two cores
def test_torch_compile(tiny):
    model, x, want = eval_pair(tiny)
    compiled = torch.compile(model)
    with torch.no_grad():
        assert torch.allclose(compiled(x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # as above
def test_torch_compile_O2(tiny, tmp_path):
    """The -O2 module under torch.compile (traced, it concatenates instead of writing into buffer views)."""
    model, x, want = eval_pair(tiny)
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(TINY)
    result = dnc_cli("compile", spec_file, "-O2", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    optimised = import_file(tmp_path / "out" / "tiny.py", "tiny_O2").DenseNet(tile_bytes=1)
    optimised.load_state_dict(model.state_dict(), strict=True)
    compiled = torch.compile(optimised)
    with torch.no_grad():
        assert torch.allclose(optimised(x), want, rtol=1e-4, atol=1e-5)  # eager: one sample per tile
        assert torch.allclose(compiled(x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        ["stem.kind=deep", "stem.mid_width=8"],
        ["stem.kind=cifar", "bn_size=null", "compression=1.0"],
        ["blocks=[{layers: 2, growth_rate: 4, drop_rate: 0.1}, 3]", "dropout_at=every_conv"],
    ],
    ids=["deep-stem", "plain-cifar", "per-block"],
)
def test_specs_torchvision_cannot_express(tmp_path, overrides):
    """Stems, layers and per-block settings beyond torchvision: shapes and parameters as inferred."""
    from dnc.ir.graph import ordered, output

    module, _, graph = compile_tiny(tmp_path, *overrides)
    model = module.DenseNet()
    model.load_state_dict(to_torch(seeded_state(state_dict_layout(graph))), strict=True)
    out = model.eval()(torch.randn(2, 3, 32, 32))
    assert tuple(out.shape) == (2, *output(graph).shape)
    assert sum(p.numel() for p in model.parameters()) == sum(n.params for n in ordered(graph))
    blocks = model.forward_blocks(torch.randn(1, 3, 32, 32))
    assert [tuple(b.shape[1:]) for b in blocks] == [
        graph.nodes[f"features.denseblock{i}.cat"]["node"].shape for i in (1, 2)
    ]

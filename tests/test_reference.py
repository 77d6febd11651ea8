"""The specs torchvision cannot express, against an independent DenseNet written from the paper.

tests/reference_densenet.py builds each network from plain arguments written here by
hand (the paper's Table 2 for the zoo), sharing no code with dnc. dnc compiles the
spec through its command line; both models get the same seeded random weights (BN
running statistics randomised) and must compute the same numbers, with the same
state_dict keys and shapes, in eval mode and in train mode.
"""

from __future__ import annotations

import pytest
from conftest import dnc_cli, import_file, spec_path

torch = pytest.importorskip("torch", exc_type=ImportError)  # no torch: skip the module

from reference_densenet import BlockArgs, DenseNet, compressed, random_state  # noqa: E402  (needs torch)

RTOL = 1e-6  # at -O0 the two compute the same ops in the same order: today the outputs are bit-identical


def blocks(n: int, layers: int, **kwargs) -> list[BlockArgs]:
    return [BlockArgs(layers, **kwargs) for _ in range(n)]


PLAIN = {"bn_size": None, "compression": 1.0}
BC = {"bn_size": 4, "compression": 0.5}
CIFAR = {"stem": "cifar", "classes": 10}

# spec name -> (the paper's network as reference arguments, input (C, H, W), parameters in Table 2)
ZOO = {
    "densenet40_k12": ({**CIFAR, "width": 16, "blocks": blocks(3, 12, growth=12, **PLAIN)}, (3, 32, 32), "1.0M"),
    "densenet100_k12": ({**CIFAR, "width": 16, "blocks": blocks(3, 32, growth=12, **PLAIN)}, (3, 32, 32), "7.0M"),
    "densenet100_k24": ({**CIFAR, "width": 16, "blocks": blocks(3, 32, growth=24, **PLAIN)}, (3, 32, 32), "27.2M"),
    "densenet_bc100_k12": ({**CIFAR, "width": 24, "blocks": blocks(3, 16, growth=12, **BC)}, (3, 32, 32), "0.8M"),
    "densenet_bc250_k24": ({**CIFAR, "width": 48, "blocks": blocks(3, 41, growth=24, **BC)}, (3, 32, 32), "15.3M"),
    "densenet_bc190_k40": ({**CIFAR, "width": 80, "blocks": blocks(3, 31, growth=40, **BC)}, (3, 32, 32), "25.6M"),
}
SLOW = {"densenet100_k24", "densenet_bc250_k24", "densenet_bc190_k40"}

# specs written here -> (YAML after `version: 1`, reference arguments, input (C, H, W))
EXTRA = {
    "deep_stem": (
        "input: {size: [64, 64]}\nstem: {kind: deep, width: 24, mid_width: 16}\n"
        "growth_rate: 8\nbn_size: 2\nblocks: [2, 3]\nhead: {classes: 7}\n",
        {
            "stem": "deep",
            "width": 24,
            "mid_width": 16,
            "classes": 7,
            "blocks": [BlockArgs(2, 8, 2), BlockArgs(3, 8, 2)],
        },
        (3, 64, 64),
    ),
    "deep_stem_default_mid_width": (
        "input: {size: [32, 32]}\nstem: {kind: deep, width: 12}\ngrowth_rate: 4\nblocks: [1, 2]\nhead: {classes: 3}\n",
        {"stem": "deep", "width": 12, "classes": 3, "blocks": [BlockArgs(1, 4), BlockArgs(2, 4)]},
        (3, 32, 32),
    ),
    "per_block": (
        "input: {size: [48, 48]}\nstem: {width: 16}\ngrowth_rate: 8\nbn_size: 4\ndrop_rate: 0.1\nblocks:\n"
        "  - {layers: 2, growth_rate: 4, bn_size: 2, compression: 0.6}\n"
        "  - {layers: 3, growth_rate: 10, bn_size: null, drop_rate: 0.0, compression: 0.3}\n"
        "  - {layers: 2, drop_rate: 0.2}\nhead: {classes: 5}\n",
        {
            "width": 16,
            "classes": 5,
            "blocks": [
                BlockArgs(2, growth=4, bn_size=2, drop=0.1, compression=0.6),
                BlockArgs(3, growth=10, bn_size=None, drop=0.0, compression=0.3),
                BlockArgs(2, growth=8, bn_size=4, drop=0.2),
            ],
        },
        (3, 48, 48),
    ),
    "plain_and_bottleneck": (
        "input: {size: [32, 32]}\nstem: {kind: cifar, width: 16}\ngrowth_rate: 6\nbn_size: null\n"
        "compression: 1.0\nblocks: [3, {layers: 2, bn_size: 4}, 2]\nhead: {classes: 10}\n",
        {
            **CIFAR,
            "width": 16,
            "blocks": [BlockArgs(3, 6, **PLAIN), BlockArgs(2, 6, bn_size=4, compression=1.0), BlockArgs(2, 6, **PLAIN)],
        },
        (3, 32, 32),
    ),
    # 30 + 5 * 12 = 90 channels into transition1, and 0.7 * 90 is 62.99999999999999 in binary floating point
    "compression_0_7": (
        "input: {size: [32, 32]}\nstem: {kind: cifar, width: 30}\ngrowth_rate: 12\nbn_size: null\n"
        "compression: 0.7\nblocks: [5, 2]\nhead: {classes: 10}\n",
        {**CIFAR, "width": 30, "blocks": [BlockArgs(5, 12, None, compression=0.7), BlockArgs(2, 12, None)]},
        (3, 32, 32),
    ),
    "every_conv_dropout": (
        "input: {size: [32, 32]}\nstem: {kind: cifar, width: 24}\ngrowth_rate: 12\ndrop_rate: 0.2\n"
        "dropout_at: every_conv\nblocks: [2, 2, {layers: 2, bn_size: null}]\nhead: {classes: 10}\n",
        {
            **CIFAR,
            "width": 24,
            "dropout_at": "every_conv",
            "blocks": [BlockArgs(2, 12, drop=0.2), BlockArgs(2, 12, drop=0.2), BlockArgs(2, 12, None, drop=0.2)],
        },
        (3, 32, 32),
    ),
    "one_channel": (
        "input: {channels: 1, size: [28, 28]}\nstem: {kind: cifar, width: 16}\ngrowth_rate: 12\n"
        "blocks: [3, 3]\nhead: {classes: 10}\n",
        {**CIFAR, "width": 16, "in_channels": 1, "blocks": [BlockArgs(3, 12), BlockArgs(3, 12)]},
        (1, 28, 28),
    ),
    "activations": (  # SiLU for the network, GELU and Mish for two blocks (their layers and transitions)
        "input: {size: [40, 40]}\nstem: {width: 16}\ngrowth_rate: 8\nbn_size: 2\nactivation: silu\n"
        "blocks: [{layers: 2, activation: gelu}, {layers: 2, activation: mish}, 2]\nhead: {classes: 5}\n",
        {
            "width": 16,
            "classes": 5,
            "activation": "silu",
            "blocks": [
                BlockArgs(2, 8, 2, activation="gelu"),
                BlockArgs(2, 8, 2, activation="mish"),
                BlockArgs(2, 8, 2, activation="silu"),
            ],
        },
        (3, 40, 40),
    ),
    "non_square": (  # odd sizes: every pool floors
        "input: {channels: 4, size: [45, 71]}\nstem: {width: 16}\ngrowth_rate: 8\nbn_size: 2\n"
        "blocks: [2, 2, 1]\nhead: {classes: 6}\n",
        {
            "width": 16,
            "classes": 6,
            "in_channels": 4,
            "blocks": [BlockArgs(2, 8, 2), BlockArgs(2, 8, 2), BlockArgs(1, 8, 2)],
        },
        (4, 45, 71),
    ),
}


def _param(name: str):
    return pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name


def compile_spec(name: str, folder, target: str = "torch", *options: str):
    """Compile a zoo spec or one of EXTRA with the command line into `folder`; return the output's path."""
    if name in ZOO:
        path = spec_path(name)
    else:
        path = folder / f"{name}.yaml"
        path.write_text("version: 1\n" + EXTRA[name][0])
    result = dnc_cli("compile", path, "--target", target, "-o", folder / "out", *options)
    assert result.returncode == 0, result.stderr
    return folder / "out" / f"{name}.{'py' if target == 'torch' else 'onnx'}"


def reference_of(name: str) -> tuple[DenseNet, tuple[int, int, int]]:
    kwargs, shape = ZOO[name][:2] if name in ZOO else EXTRA[name][1:]
    kwargs = dict(kwargs)
    return DenseNet(kwargs.pop("blocks"), **kwargs), shape


class Pair:
    """The generated model and the reference, with the same seeded weights, and an input for them."""

    def __init__(self, name: str, folder) -> None:
        module = import_file(compile_spec(name, folder), f"reference_test_{name}")
        self.generated = module.DenseNet()
        self.reference, shape = reference_of(name)
        state = random_state(self.reference, seed=1)
        self.generated.load_state_dict(state, strict=True)
        self.reference.load_state_dict(state, strict=True)
        self.x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=[_param(n) for n in ZOO] + list(EXTRA))
def pair(request, tmp_path_factory):
    return Pair(request.param, tmp_path_factory.mktemp(request.param))


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", [_param(n) for n in ZOO])
def test_the_reference_has_the_papers_parameter_counts(name):
    """The reference itself, against Huang et al.'s Table 2 (C10 networks, counts to 0.1M)."""
    reference, _ = reference_of(name)
    assert f"{sum(p.numel() for p in reference.parameters()) / 1e6:.1f}M" == ZOO[name][2]


def test_state_dict_keys_shapes_and_parameters(pair):
    want = [(k, tuple(v.shape)) for k, v in pair.reference.state_dict().items()]
    got = [(k, tuple(v.shape)) for k, v in pair.generated.state_dict().items()]
    assert got == want
    count = sum(p.numel() for p in pair.reference.parameters())
    assert sum(p.numel() for p in pair.generated.parameters()) == count


def test_eval_outputs_match(pair):
    generated, reference = pair.generated.eval(), pair.reference.eval()
    with torch.no_grad():
        out, want = generated(pair.x), reference(pair.x)
        assert out.shape == want.shape
        assert rel_err(out, want) <= RTOL
        assert rel_err(generated(pair.x[:1]), want[:1]) <= RTOL  # batch 1: no batch statistics anywhere
        assert rel_err(generated.forward_features(pair.x), reference.features(pair.x)) <= RTOL
        blocks, want_blocks = generated.forward_blocks(pair.x), reference.forward_blocks(pair.x)
    assert [b.shape for b in blocks] == [b.shape for b in want_blocks]
    for block, want_block in zip(blocks, want_blocks, strict=True):
        assert rel_err(block, want_block) <= RTOL


def test_compression_is_floor_of_the_exact_product(tmp_path):
    """0.7 * 90 channels: floor(63) = 63 channels, not the 62 that floating point multiplication gives."""
    assert int(0.7 * 90) == 62 and compressed(90, 0.7) == 63
    pair = Pair("compression_0_7", tmp_path)
    assert pair.generated.state_dict()["features.transition1.conv.weight"].shape == (63, 90, 1, 1)


def train_step(model, x):
    torch.manual_seed(0)  # the same dropout masks, wherever both models drop the same tensors
    x = x.clone().requires_grad_()
    out = model.train()(x)
    out.square().mean().backward()
    return out.detach(), x.grad, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "name", ["deep_stem", "plain_and_bottleneck", "non_square", "per_block", "every_conv_dropout", "activations"]
)
def test_train_mode_outputs_gradients_and_statistics_match(name, tmp_path):
    """Batch statistics, backward, running statistics; with dropout, the same masks at the same places."""
    pair = Pair(name, tmp_path)
    out, x_grad, grads = train_step(pair.generated, pair.x)
    want, want_x_grad, want_grads = train_step(pair.reference, pair.x)
    assert rel_err(out, want) <= 1e-5
    assert rel_err(x_grad, want_x_grad) <= 1e-5
    assert grads.keys() == want_grads.keys()
    for key, grad in grads.items():
        assert rel_err(grad, want_grads[key]) <= 1e-4, key
    reference = pair.reference.state_dict()
    for key, value in pair.generated.state_dict().items():
        assert torch.allclose(value.float(), reference[key].float(), rtol=1e-5, atol=1e-7), key


def test_dropout_changes_train_outputs_only(tmp_path):
    """Dropout is really there (and so the train-mode test above compares masks, not two identities)."""
    model = Pair("every_conv_dropout", tmp_path).generated
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model.train()(x), model(x))
        assert torch.equal(model.eval()(x), model(x))


@pytest.mark.parametrize("name", ["densenet40_k12", "per_block", "activations"])
def test_onnx_model_matches_the_reference(name, tmp_path):
    """`dnc compile --target onnx -O0 --seed 0` on onnxruntime, its own initializers loaded into the reference.

    -O0: one node per IR op and initializers named by state_dict keys (the default -O2 folds some).
    """
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = compile_spec(name, tmp_path, "onnx", "-O0", "--seed", "0")
    model = onnx.load(path)
    state = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    reference, shape = reference_of(name)
    missing, unexpected = reference.load_state_dict(state, strict=False)  # every tensor but the BN counters
    assert unexpected == [] and all(k.endswith(".num_batches_tracked") for k in missing)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(4))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = reference.eval()(x)
    assert got.shape == tuple(want.shape)
    assert rel_err(torch.from_numpy(got), want) <= 1e-5

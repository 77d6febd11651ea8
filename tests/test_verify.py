"""`dnc verify`: the real command, with seeded weights, .pth and .safetensors checkpoints."""

from __future__ import annotations

import re

import pytest
from conftest import dnc_cli, run_dnc

from dnc.pipeline import build
from dnc.targets import TARGETS

torch = pytest.importorskip("torch", exc_type=ImportError)  # no torch: skip the module

from safetensors.torch import save_file  # noqa: E402  (needs torch)

from dnc.check.reference import torchvision_densenet  # noqa: E402  (needs torch)

# A small network torchvision can express, so the tests stay quick on two cores.
SMALL = """\
version: 1
name: small
input: {channels: 3, size: [64, 64]}
growth_rate: 12
bn_size: 4
blocks: [2, 3, 2]
head: {classes: 7}
"""


@pytest.fixture
def small(write_spec):
    return write_spec(SMALL, "small.yaml")


def torchvision_state(path) -> dict[str, torch.Tensor]:
    spec, _ = build(path)
    torch.manual_seed(0)
    model = torchvision_densenet(spec)
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


def errors(line: str) -> dict[str, tuple[float, float]]:
    """Reference -> (max abs error, max rel error), as a result line prints them."""
    found = re.findall(r"vs ([^:]+): max abs error ([^,]+), max rel error ([^;:]+)", line)
    return {name: (float(a), float(r)) for name, a, r in found}


def test_verify_seeded_against_the_interpreter_and_torchvision(small):
    result = run_dnc("verify", small, "--seed", "3", "--batch", "1")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"{small}: seeded weights (seed 3), input (1, 3, 64, 64) on cpu: vs the interpreter")
    assert line.endswith(": ok")
    found = errors(line)
    assert list(found) == ["the interpreter (float64, -O0 IR)", "torchvision"]
    assert 0 < found["the interpreter (float64, -O0 IR)"][1] <= 1e-5  # float32 against float64
    assert found["torchvision"] == (0, 0)  # -O0 is torchvision's code: bit-identical


def test_verify_pth_old_and_new_keys(small, tmp_path):
    state = torchvision_state(small)
    torch.save(state, tmp_path / "new.pth")
    old = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()}
    assert "features.denseblock1.denselayer1.conv.2.weight" in old
    torch.save({"state_dict": old}, tmp_path / "old.pth")
    oldest = {k: v for k, v in old.items() if not k.endswith("num_batches_tracked")}  # before PyTorch 0.4
    torch.save(oldest, tmp_path / "oldest.pth")
    for name in ("new.pth", "old.pth", "oldest.pth"):
        result = dnc_cli("verify", small, "--weights", tmp_path / name)
        assert result.returncode == 0, result.stderr
        assert f"weights {tmp_path / name}" in result.stdout
        assert result.stdout.strip().endswith(": ok")


def test_verify_safetensors(small, tmp_path):
    save_file({k: v.contiguous() for k, v in torchvision_state(small).items()}, tmp_path / "w.safetensors")
    result = dnc_cli("verify", small, "--weights", tmp_path / "w.safetensors")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": ok")


def test_verify_wrong_checkpoint_is_one_line(small, tmp_path, write_spec):
    other = write_spec(SMALL.replace("growth_rate: 12", "growth_rate: 8"), "other.yaml")
    torch.save(torchvision_state(other), tmp_path / "other.pth")
    result = dnc_cli("verify", small, "--weights", tmp_path / "other.pth")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "other.pth: error: checkpoint does not fit the network" in result.stderr
    assert "of another shape" in result.stderr


@pytest.mark.parametrize("target", ["torch", "onnx"])
def test_verify_without_torchvision_compares_numbers_with_the_interpreter(target):
    result = dnc_cli("verify", "specs/densenet40_k12.yaml", "--batch", "1", "--target", target, "-O2")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert "; no torchvision reference (torchvision's DenseNet cannot express densenet40_k12: it lacks" in line
    (name, (_, rel)), *_ = errors(line).items()
    assert name == "the interpreter (float64, -O0 IR)" and 0 < rel <= 1e-5 and line.endswith(": ok")


@pytest.mark.parametrize("target", ["torch", "onnx"])
def test_a_sabotaged_emitter_fails_verify_for_a_spec_torchvision_cannot_express(monkeypatch, target):
    """An emitter writing GELU (torch) or ELU (ONNX) where the IR says ReLU: only a numerical check against an
    independent reference sees it (the output shape and the parameter count are unchanged). Both emitters read
    an op's form from the op table; the interpreter has its own code, so the sabotage does not reach it."""
    import dataclasses

    from dnc.ir.graph import OpKind
    from dnc.ir.ops import OPS, Module, OnnxNode, TorchForm

    relu = OPS[OpKind.RELU]
    if target == "torch":
        sabotaged = TorchForm(lambda a, ctx: (Module(ctx.name, "nn.GELU"),), fresh=False)
        monkeypatch.setitem(OPS, OpKind.RELU, dataclasses.replace(relu, torch=sabotaged))
        _, graph = build("specs/densenet_bc100_k12.yaml")
        assert "nn.GELU()" in TARGETS["torch"].emit(graph, {}).decode()  # the sabotage took
    else:
        elu = lambda a, ins, out, name, opset: [OnnxNode("Elu", tuple(ins), (out,), name)]  # noqa: E731
        monkeypatch.setitem(OPS, OpKind.RELU, dataclasses.replace(relu, onnx=elu))
    result = dnc_cli("verify", "specs/densenet_bc100_k12.yaml", "--batch", "1", "--target", target)
    assert result.returncode == 1, result.stderr
    line = result.stdout.strip()
    assert line.startswith("specs/densenet_bc100_k12.yaml")
    assert "seeded weights (seed 0), input (1, 3, 32, 32) on cpu:" in line
    assert line.endswith(": MISMATCH (tolerance 1e-05)")
    assert errors(line)["the interpreter (float64, -O0 IR)"][1] > 1e-3


def test_verify_O1_checks_a_training_step_and_sees_a_wrong_gradient(monkeypatch):
    """-O1's training rewrites change only training: verify runs one step in float64 against the interpreter's. A
    runtime whose per-map normalisation backward is off by 0.1% passes the eval check and fails this one."""
    from dnc.targets.torch import emit as emit_torch

    args = ("verify", "specs/densenet_bc100_k12.yaml", "--batch", "1", "-O1")
    result = dnc_cli(*args)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    found = re.search(
        r"a training step \(fused\) in float64 vs the interpreter: gradients (\S+), input gradient (\S+), "
        r"running statistics (\S+): ok$",
        line,
    )
    assert found, line
    assert all(0 <= float(v.rstrip(",;")) <= 1e-12 for v in found.groups())
    original = emit_torch.emit
    backward = "_normalize_backward(g, xhat, invstd, ctx.eps)"

    def sabotaged(graph, options=None):
        source = original(graph, options)
        assert backward in source
        return source.replace(backward, backward + " * 1.001")

    monkeypatch.setattr(emit_torch, "emit", sabotaged)
    result = dnc_cli(*args)
    assert result.returncode == 1, result.stderr
    assert "max rel error" in result.stdout and result.stdout.strip().endswith(": MISMATCH (tolerance 1e-05)")
    gradients = float(re.search(r"gradients (\S+),", result.stdout).group(1))
    assert gradients > 1e-4


def test_verify_onnx_against_torchvision_with_a_checkpoint(small, tmp_path):
    ckpt = tmp_path / "small.pth"
    torch.save(torchvision_state(small), ckpt)
    result = dnc_cli("verify", small, "--target", "onnx", "--weights", ckpt, "--batch", "3")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"{small} (onnx, onnxruntime): weights {ckpt}, input (3, 3, 64, 64) on cpu: vs the")
    assert max(rel for _, rel in errors(line).values()) <= 1e-5 and line.endswith(": ok")
    assert len(errors(line)) == 2


def test_verify_unknown_target(small):
    result = dnc_cli("verify", small, "--target", "tensorflow")
    assert (result.returncode, result.stderr) == (
        2,
        "dnc: error: unknown target 'tensorflow': expected one of torch, onnx\n",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_verify_cuda_without_cuda(small):
    result = dnc_cli("verify", small, "--device", "cuda")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "dnc: error: --device cuda: no CUDA device is available here (torch.cuda.is_available() is False)"
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_verify_on_cuda(small):
    result = dnc_cli("verify", small, "--device", "cuda")
    assert result.returncode == 0, result.stderr
    assert "on cuda" in result.stdout


def test_verify_mismatch_exits_1(small, monkeypatch, tmp_path):
    """A generated model that computes something else fails verification with exit 1."""
    import dnc.check.verify
    import dnc.targets.torch.run

    _, graph = build(small)
    module = dnc.targets.torch.run.load_generated(graph)

    class Broken(module.DenseNet):
        def forward(self, x):
            return super().forward(x) * 1.001

    monkeypatch.setattr(dnc.targets.torch.run, "load_generated", lambda g: type("M", (), {"DenseNet": Broken}))
    spec, graph = build(small)
    outcome = dnc.check.verify.verify(spec, graph, "small", target=TARGETS["torch"])
    assert not outcome.ok
    assert "MISMATCH" in outcome.line


@pytest.mark.parametrize(
    "args",
    [["--batch", "10000000000"], ["--set", "input.size=[4096,4096]", "--set", "stem.width=512", "--batch", "1"]],
    ids=["huge batch", "huge input"],
)
def test_verify_refuses_what_would_not_fit_before_allocating(args):
    import time

    start = time.perf_counter()
    result = dnc_cli("verify", "specs/densenet121.yaml", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert "GiB of activations (dnc verify runs its reference in float64), over the activations limit of 64.0" in (
        result.stderr
    )
    assert result.stderr.count("\n") == 1 and time.perf_counter() - start < 10

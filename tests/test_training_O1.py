"""-O1, the training build (pass share_bn_stats): the same training as -O0, fused.

In train mode with gradients on, `features` normalises each dense block's maps once and every batch norm reading
them applies only its own scale and shift (docs/training.md). Everything here compares -O1 with -O0 (torchvision's
computation, tests/test_torch_training.py) on the same weights: in float64 the gradients, the input's gradient and
the running statistics agree to rounding; elsewhere (hooks, eval, no_grad, TorchScript, SyncBatchNorm) -O1 runs the
modules in turn, and says why.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import dnc_cli, import_file

torch = pytest.importorskip("torch", exc_type=ImportError)  # no torch: skip the module
F = torch.nn.functional

# an ImageNet stem (fused), bottleneck layers, two blocks: every fused Function runs
BOTTLENECK = """\
version: 1
name: fused_b
input: {channels: 3, size: [32, 32]}
stem: {kind: imagenet, width: 16}
growth_rate: 8
bn_size: 2
blocks: [3, 2]
head: {classes: 5}
"""
# a CIFAR stem (run as modules), plain layers, dropout after every conv (the transition's before its pool)
PLAIN = """\
version: 1
name: fused_p
input: {channels: 3, size: [16, 16]}
stem: {kind: cifar, width: 8}
growth_rate: 4
bn_size: null
drop_rate: 0.2
dropout_at: every_conv
blocks: [2, 3]
head: {classes: 3}
"""
SPECS = {"bottleneck": BOTTLENECK, "plain": PLAIN}
SIZES = {"bottleneck": 32, "plain": 16}


def compile_pair(tmp_path, text: str, *args: str):
    """The spec compiled at -O0 and -O1 by the real CLI: (module -O0, module -O1)."""
    spec = tmp_path / "net.yaml"
    spec.write_text(text)
    modules = []
    for level in ("-O0", "-O1"):
        out = tmp_path / level
        result = dnc_cli("compile", spec, "-o", out, level, *args)
        assert result.returncode == 0, result.stderr
        (path,) = out.glob("*.py")
        modules.append(import_file(path, f"{path.stem}{level[1:]}_{tmp_path.name}"))
    return modules


@pytest.fixture(scope="module", params=list(SPECS))
def pair(request, tmp_path_factory):
    return request.param, *compile_pair(tmp_path_factory.mktemp(request.param), SPECS[request.param])


def build(module, dtype=torch.float64, **kwargs):
    """A model with seeded weights and randomised running statistics, in `dtype`, in train mode."""
    torch.manual_seed(0)
    model = module.DenseNet(**kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.to(dtype).train()


def models(pair, dtype=torch.float64, **kwargs):
    name, o0, o1 = pair
    m0, m1 = build(o0, dtype, **kwargs), build(o1, dtype, **kwargs)
    m1.load_state_dict(m0.state_dict(), strict=True)
    return m0, m1


def batch(name: str, dtype=torch.float64, n: int = 4):
    g = torch.Generator().manual_seed(1)
    size = SIZES[name]
    return torch.randn(n, 3, size, size, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def step(model, x, y) -> dict:
    """One training step's numbers: loss, the input's gradient, each parameter's gradient, the state after it."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(7)  # the same dropout masks in both models
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return {
        "loss": loss.detach(),
        "input": x.grad,
        "grads": {k: p.grad for k, p in model.named_parameters()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def rel(a, b) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


@pytest.mark.parametrize(("memory_efficient", "memory_format"), [(False, "auto"), (True, "auto"), (False, "input")])
def test_float64_gradients_and_running_statistics_equal_O0s(pair, memory_efficient, memory_format):
    """With memory_efficient, -O0 (as torchvision) updates each first batch norm's running statistics twice per
    step: torch.utils.checkpoint runs the bottleneck again in backward, in train mode. -O1 recomputes without
    touching them: its statistics are those of one update, -O0's without memory_efficient. memory_format "input":
    the fused path in NCHW, as it runs off the CPU (with torch's batch-norm kernels), here on the CPU."""
    name = pair[0]
    m0, m1 = models(pair, memory_efficient=memory_efficient)
    m1.features.fused_memory_format = memory_format
    x, y = batch(name)
    assert m1.features.fused_reason(x.requires_grad_()) is None  # the fused path is what is checked
    ref, got = step(m0, x, y), step(m1, x, y)
    if memory_efficient:
        ref["state"] = step(models(pair)[0], x, y)["state"]
    assert rel(got["loss"], ref["loss"]) <= 1e-12
    assert rel(got["input"], ref["input"]) <= 1e-12
    assert list(got["grads"]) == list(ref["grads"])  # the same parameters in the same order
    assert rel(flat(got["grads"]), flat(ref["grads"])) <= 1e-12
    for key, g in ref["grads"].items():
        assert rel(got["grads"][key], g) <= 1e-9, key
    for key, v in ref["state"].items():
        if v.is_floating_point():
            assert rel(got["state"][key], v) <= 1e-12, key
        else:  # num_batches_tracked: each module counts its own batches
            assert torch.equal(got["state"][key], v), key


@pytest.mark.parametrize("size", [36, 44])
def test_odd_sized_transition_inputs_equal_O0s(tmp_path, size):
    """The transition's pool backward runs fused (ReLU mask and 2x2 spread in one pass) on even maps and as torch's
    ops on odd ones, whose last row and column the pool drops: 36 -> 9x9 and 44 -> 11x11 into the transition."""
    o0, o1 = compile_pair(tmp_path, BOTTLENECK.replace("[32, 32]", f"[{size}, {size}]"))
    m0, m1 = build(o0), build(o1)
    m1.load_state_dict(m0.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64), torch.tensor([0, 4])
    assert m1.features.fused_reason(x.requires_grad_()) is None
    ref, got = step(m0, x, y), step(m1, x, y)
    assert rel(got["input"], ref["input"]) <= 1e-12
    for key, grad in ref["grads"].items():
        assert rel(got["grads"][key], grad) <= 1e-9, key


@pytest.mark.parametrize("memory_format", ["auto", "input"])
def test_float32_error_at_most_twice_O0s(pair, memory_format):
    """Against float64 -O0, -O1 in float32 is at most twice as far off as -O0 in float32 (batch statistics by
    cascade sums in channels_last, docs/training.md), in the output, the gradients and the running statistics."""
    name = pair[0]
    reference = step(models(pair)[0], *batch(name))
    errors = []
    m0, m1 = models(pair, torch.float32)
    m1.features.fused_memory_format = memory_format
    for model in (m0, m1):
        x, y = batch(name, torch.float32)
        got = step(model, x, y)
        stats = [k for k, v in reference["state"].items() if v.is_floating_point() and "running" in k]
        errors.append(
            (
                rel(got["loss"], reference["loss"]),
                rel(flat(got["grads"]), flat(reference["grads"])),
                max(rel(got["state"][k], reference["state"][k]) for k in stats),
            )
        )
    (loss0, grads0, stats0), (loss1, grads1, stats1) = errors
    assert loss1 <= 2 * loss0 + 1e-7
    assert grads1 <= 2 * grads0
    assert stats1 <= 2 * stats0


def test_momentum_none_and_untracked_statistics_as_O0(pair):
    name = pair[0]
    m0, m1 = models(pair)
    for model in (m0, m1):
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for i, m in enumerate(norms):
            if i % 3 == 0:
                m.momentum = None  # a cumulative average over num_batches_tracked
            elif i % 3 == 1:
                m.track_running_stats = False  # batch statistics only, no update, no count
                m.running_mean = m.running_var = m.num_batches_tracked = None
    x, y = batch(name)
    for _ in range(2):
        ref, got = step(m0, x, y), step(m1, x, y)
        assert rel(flat(got["grads"]), flat(ref["grads"])) <= 1e-12
        assert got["state"].keys() == ref["state"].keys()
        for key, v in ref["state"].items():
            assert rel(got["state"][key], v) <= 1e-12 if v.is_floating_point() else torch.equal(got["state"][key], v)


def test_the_fused_path_says_when_it_does_not_run(pair):
    name = pair[0]
    _, m1 = models(pair)
    x, _ = batch(name)
    features = m1.features
    assert features.fused_reason(x) is None
    with torch.no_grad():
        assert features.fused_reason(x) == "gradients are off"
    m1.eval()
    assert "eval mode" in features.fused_reason(x)
    m1.train()
    block = next(m for m in features.modules() if type(m).__name__ == "DenseBlock")
    layer = next(iter(block.values()))
    handle = layer.register_forward_hook(lambda *a: None)
    assert "has hooks" in features.fused_reason(x)
    handle.remove()
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(m1)
    assert "SyncBatchNorm" in synced.features.fused_reason(x)


def test_syncbatchnorm_and_hooks_run_O0s_computation(pair):
    """Where the fused path cannot run, the modules run in turn: a backward hook on a dense layer's first batch
    norm sees -O0's grad_input and grad_output; SyncBatchNorm (one process: plain batch norm) gives -O0's numbers."""
    name = pair[0]
    m0, m1 = models(pair)
    x, y = batch(name)
    seen = {}
    for key, model in (("O0", m0), ("O1", m1)):
        norm = model.get_submodule("features.denseblock1.denselayer1.norm1")
        norm.register_full_backward_hook(lambda m, gi, go, key=key: seen.update({key: (gi[0], go[0])}))
    ref, got = step(m0, x, y), step(m1, x, y)
    assert rel(flat(got["grads"]), flat(ref["grads"])) <= 1e-12
    assert rel(seen["O1"][0], seen["O0"][0]) <= 1e-12 and rel(seen["O1"][1], seen["O0"][1]) <= 1e-12
    m0, m1 = models(pair)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(m1)
    assert rel(flat(step(synced, x, y)["grads"]), flat(step(m0, x, y)["grads"])) <= 1e-12


@pytest.mark.parametrize("frozen", ["stem and block 1", "block 2's first layer", "all but the head"])
def test_frozen_parts_train_the_rest_as_O0(pair, frozen):
    """Gradients for part of the network only (fine-tuning): a block whose maps need no gradient is skipped in
    backward, one whose first layer is frozen still passes its maps' gradients through; the input needs none."""
    name = pair[0]
    m0, m1 = models(pair)
    for model in (m0, m1):
        for key, p in model.named_parameters():
            p.requires_grad_(
                {
                    "stem and block 1": not key.startswith(
                        ("features.conv0", "features.norm0", "features.denseblock1")
                    ),
                    "block 2's first layer": not key.startswith("features.denseblock2.denselayer1."),
                    "all but the head": key.startswith("classifier"),
                }[frozen]
            )
    x, y = batch(name)
    assert m1.features.fused_reason(x) is None
    got = []
    for model in (m0, m1):
        torch.manual_seed(7)
        F.cross_entropy(model(x), y).backward()
        got.append({k: p.grad for k, p in model.named_parameters()})
    assert [k for k, g in got[1].items() if g is not None] == [k for k, g in got[0].items() if g is not None]
    for key, g in got[0].items():
        if g is not None:
            assert rel(got[1][key], g) <= 1e-9, key


FSDP2_POLICY = """\
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
sys.path.insert(0, sys.argv[1])
import importlib
module = importlib.import_module(sys.argv[2])
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
x = torch.randn(2, 3, 32, 32)
for policy in (None, MixedPrecisionPolicy(param_dtype=torch.bfloat16)):
    model = module.DenseNet().train()
    for m in model.modules():
        if type(m).__name__ == "DenseLayer":
            fully_shard(m, **({"mp_policy": policy} if policy else {}))
    print(model.features.fused_reason(x))
dist.destroy_process_group()
"""


def test_fsdp2_casting_inputs_runs_the_modules_in_turn(tmp_path):
    """FSDP2's mixed precision would hand each dense layer a bfloat16 copy of its block's buffer (the fused path
    writes each layer's features into the buffer the next layer reads): -O1 then runs the modules in turn, saying why;
    plain FSDP2 runs fused. One rank, in its own process (a process group is process-wide)."""
    _, o1 = compile_pair(tmp_path, BOTTLENECK)
    (tmp_path / "check.py").write_text(FSDP2_POLICY)
    path = Path(o1.__file__)
    out = subprocess.run(
        [sys.executable, tmp_path / "check.py", path.parent, path.stem], capture_output=True, text=True, timeout=300
    )
    if out.returncode and "fully_shard" in out.stderr and "gloo" in out.stderr.lower():
        pytest.skip(f"FSDP2 on CPU/gloo unavailable: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr
    plain, mixed = out.stdout.strip().splitlines()[-2:]
    assert plain == "None"
    assert mixed == (
        "denseblock1.denselayer1 is sharded by FSDP2 with a policy that casts its inputs: its block's buffer would be "
        "copied"
    )


def test_two_forwards_before_one_backward_retain_graph_and_no_double_backward(pair):
    name = pair[0]
    m0, m1 = models(pair)
    x, y = batch(name)
    for model in (m0, m1):
        torch.manual_seed(7)
        loss = F.cross_entropy(model(x), y) + F.cross_entropy(model(x.flip(0)), y)  # buffers are per forward
        loss.backward(retain_graph=True)
        loss.backward()  # retain_graph: the saved tensors are still there
    grads = [flat({k: p.grad for k, p in m.named_parameters()}) for m in (m0, m1)]
    assert rel(grads[1], grads[0]) <= 1e-12
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(F.cross_entropy(m0(xr), y), xr, create_graph=True)
    gx.sum().backward()  # -O0 differentiates twice
    # -O1's maps pass their gradients outside autograd: a graph of the gradient is refused when it would be built
    with pytest.raises(RuntimeError, match="differentiate twice.*create_graph=True needs the modules run in turn"):
        torch.autograd.grad(F.cross_entropy(m1(xr), y), xr, create_graph=True)
    g = []
    for model in (m0, m1):  # -O1 still trains after the refusal
        torch.manual_seed(7)
        g += torch.autograd.grad(F.cross_entropy(model(xr), y), xr)
    assert rel(g[1], g[0]) <= 1e-12


def test_optimizer_state_moves_between_O0_and_O1(pair):
    """The same parameters in the same order: an optimizer state_dict saved with -O0 loads into -O1 and back."""
    name = pair[0]
    m0, m1 = models(pair)
    x, y = batch(name)
    opt0 = torch.optim.SGD(m0.parameters(), lr=0.1, momentum=0.9)
    opt1 = torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9)
    step(m0, x, y)
    opt0.step()
    m1.load_state_dict(m0.state_dict())
    opt1.load_state_dict(copy.deepcopy(opt0.state_dict()))  # else both step one momentum buffer
    for model, opt in ((m0, opt0), (m1, opt1)):
        opt.zero_grad(set_to_none=True)
        step(model, x, y)
        opt.step()
    for (key, a), b in zip(m1.state_dict().items(), m0.state_dict().values(), strict=True):
        assert (rel(a, b) <= 1e-12) if a.is_floating_point() else torch.equal(a, b), key
    opt0.load_state_dict(copy.deepcopy(opt1.state_dict()))  # and back


def test_torchscript_runs_the_modules_in_turn(pair):
    name = pair[0]
    m0, m1 = models(pair)
    scripted = torch.jit.script(m1)
    x, y = batch(name)
    ref, got = step(m0, x, y), step(scripted, x, y)
    assert rel(got["loss"], ref["loss"]) <= 1e-12 and rel(got["input"], ref["input"]) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_step(pair, dtype):
    """Under autocast the fused path casts as autocast would: its bfloat16 (or float16) step is as far from float64
    as -O0's (at most twice) and every gradient keeps its parameter's dtype."""
    name = pair[0]
    reference = step(models(pair)[0], *batch(name))
    errors = []
    m0, m1 = models(pair, torch.float32)
    for model in (m0, m1):
        x, y = batch(name, torch.float32)
        with torch.autocast("cpu", dtype=dtype):
            if model is m1:
                assert model.features.fused_reason(x.requires_grad_()) is None
            got = step(model, x, y)
        assert all(g.dtype == torch.float32 for g in got["grads"].values())
        errors.append(rel(flat(got["grads"]), flat(reference["grads"])))
    assert errors[1] <= 2 * errors[0]


def test_autocast_converts_no_more_feature_maps_than_O0(pair):
    """Under autocast the fused path keeps its feature maps in the autocast dtype: the per-channel scales and shifts
    meet them in it, so no op of its own copies a map to float32 and back (on the CPU an op on mixed dtypes does: it
    made the bfloat16 step 2.2x slower). What it converts, -O0 converts too (autocast's casts: the input, the head).
    (With memory_efficient, backward recomputes BN2 + ReLU as torch's kernel computed them in forward, from float32
    scales: that recomputation converts its input.)"""
    name = pair[0]
    converted = []
    for model in models(pair, torch.float32):
        x, y = batch(name, torch.float32, n=5)  # a batch no convolution's weight has as its leading size
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step(model, x, y)  # warm: the 1x1 kernel choice and the unit statistics are made once
            with torch.profiler.profile(record_shapes=True) as prof:
                step(model, x, y)
        shapes = [e.input_shapes[0] for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes]
        converted.append(sorted(s for s in shapes if len(s) == 4 and s[0] == x.shape[0]))  # (N, C, H, W): a map
    o0, o1 = converted
    extra = [s for s in o1 if s not in o0 or o1.count(s) > o0.count(s)]
    assert not extra, f"-O1 converts feature maps -O0 does not: {extra[:5]}"


@pytest.mark.slow
def test_torch_compile_of_a_training_step(pair):
    """torch.compile traces the modules in turn (Inductor fuses them itself): the same step as -O0's compiled."""
    name = pair[0]
    m0, m1 = models(pair, torch.float32)
    x, y = batch(name, torch.float32)
    ref, got = step(torch.compile(m0), x, y), step(torch.compile(m1), x, y)
    assert rel(got["loss"], ref["loss"]) <= 1e-5
    assert rel(flat(got["grads"]), flat(ref["grads"])) <= 1e-4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("memory_format", ["auto", "channels_last"])
def test_training_on_cuda_matches_O0_on_the_cpu(pair, memory_format):
    """On the GPU the fused path runs in the input's format ("auto") or NHWC, with torch's batch-norm kernels: a
    float64 step equals -O0's on the CPU, and a float32 one is as far from it as -O0's on the GPU (at most twice)."""
    name = pair[0]
    m0, m1 = models(pair)
    m1 = m1.cuda()
    m1.features.fused_memory_format = memory_format
    x, y = batch(name)
    assert m1.features.fused_reason(x.cuda().requires_grad_()) is None
    ref, got = step(m0, x, y), step(m1, x.cuda(), y.cuda())
    assert rel(got["input"].cpu(), ref["input"]) <= 1e-10
    assert rel(flat(got["grads"]).cpu(), flat(ref["grads"])) <= 1e-10
    errors = []
    m0, m1 = models(pair, torch.float32)
    m1.features.fused_memory_format = memory_format
    for model in (m0.cuda(), m1.cuda()):
        got = step(model, x.float().cuda(), y.cuda())
        errors.append(rel(flat(got["grads"]).cpu(), flat(ref["grads"])))
    assert errors[1] <= 2 * errors[0]

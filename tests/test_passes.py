"""Optimisation passes and -O levels: each pass changes the IR and keeps the numbers.

Every pass is checked alone against -O0 (the IR it changed, the MACs or nodes it
saved, the outputs within 1e-5); every zoo spec at every level against -O0 at batch 1
and 3 on a non-square input; the -O2 torch module keeps torchvision's state_dict,
loads old checkpoints, refuses training, and runs under TorchScript and torch.export;
the -O2 ONNX model folds its weights and has fewer nodes. Inputs are small.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ALL_SPECS, ROOT, TORCHVISION_SPECS, import_file, run_dnc, spec_path

from dnc.errors import DncError
from dnc.frontend.loader import load_spec
from dnc.ir.graph import OpKind, inference_only, ordered
from dnc.ir.infer import state_dict_layout
from dnc.ir.passes import PASSES, names, select
from dnc.ir.settings import settings
from dnc.pipeline import build
from dnc.reports.ir_text import ir_text
from dnc.targets.onnx.emit import emit_onnx
from dnc.targets.torch import emit as emit_torch
from dnc.weights import seeded_state, to_torch

torch = pytest.importorskip("torch", exc_type=ImportError)  # no torch: skip the module

from dnc.check.reference import torchvision_densenet  # noqa: E402  (needs torch)
from dnc.targets.torch.run import load_generated  # noqa: E402  (needs torch)

torch.set_num_threads(2)
SMALL = ["input.size=[64,96]"]  # non-square, and small enough for every ImageNet spec
SLOW = {"densenet161", "densenet201", "densenet264", "densenet_bc190_k40", "densenet_bc250_k24"}
RTOL = 1e-5


def overrides(name: str) -> list[str]:
    return SMALL if name in TORCHVISION_SPECS else []


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def torch_model(name: str, passes, state=None):
    _, graph = build(spec_path(name), overrides(name), passes=passes)
    model = load_generated(graph).DenseNet()
    state = state if state is not None else to_torch(seeded_state(state_dict_layout(graph), seed=3))
    model.load_state_dict(state, strict=True)
    return model.eval(), graph, state


def sample(graph, batch: int = 3) -> torch.Tensor:
    shape = (batch, *ordered(graph)[0].shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def reference():
    """densenet121 at -O0 (64x96 input): model, graph, weights, input, output."""
    model, graph, state = torch_model("densenet121", [])
    x = sample(graph)
    with torch.no_grad():
        return model, graph, state, x, model(x)


def _op_calls(model, x, op: str) -> int:
    """How often `model(x)` calls the aten op `op`, on one thread (where torch picks a GEMM for 1x1 convs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(x)
    finally:
        torch.set_num_threads(threads)
    return sum(e.count for e in prof.key_averages() if e.key == op)


def _one(name: str):
    return select("torch", 0, enable=[name])


@pytest.mark.parametrize("name", list(PASSES))
def test_each_pass_changes_the_ir_and_keeps_the_numbers(reference, name):
    _, graph0, state, x, ref = reference
    model, graph, _ = torch_model("densenet121", _one(name), state)
    assert ir_text(graph) != ir_text(graph0)
    with torch.no_grad():
        assert rel_err(model(x), ref) <= RTOL
    macs = sum(n.macs for n in ordered(graph)), sum(n.macs for n in ordered(graph0))
    if name == "pool_first":  # a quarter of each transition conv's MACs
        convs = [n for n in ordered(graph0) if n.op is OpKind.CONV and n.unit.kind.value == "transition"]
        assert macs[1] - macs[0] == sum(n.macs * 3 // 4 for n in convs) > 0
    elif name == "fold_conv_bn":  # norm0 and every norm2
        assert len(graph0) - len(graph) == 1 + 58
    elif name == "fuse_bn_relu":  # every BN with its ReLU after it: norm1s, transitions, norm5
        assert len(graph0) - len(graph) == 58 + 58 + 3 + 1 + 1
    elif name == "block_buffer":
        assert not any(n.op is OpKind.CONCAT for n in ordered(graph))
    elif name == "fold_preact_bn":  # every norm1, transition norm and norm5: their ReLUs become clamps
        clamps = [n for n in ordered(graph) if n.op is OpKind.BN_CLAMP]
        assert len(clamps) == len(graph0) - len(graph) == 58 + 3 + 1
        takers = [n for n in ordered(graph) if n.op in (OpKind.CONV, OpKind.LINEAR) and n.attrs.pre]
        assert len(takers) == len(clamps) and {"features.transition3.conv", "classifier"} <= {t.scope for t in takers}
    elif name == "measure_1x1":  # every 1x1 conv chooses its kernel; pinned to oneDNN, each runs oneDNN's
        pointwise = [n for n in ordered(graph) if n.op is OpKind.CONV and n.attrs.pointwise]
        assert len(pointwise) == 58 + 3 and settings(graph).conv1x1 == "measured"
        module = type(model).forward.__globals__  # the generated module's namespace
        policy, module["CONV1X1_POLICY"] = module["CONV1X1_POLICY"], "onednn"
        try:
            counts = [_op_calls(m, x[:1], "aten::mkldnn_convolution") for m in (reference[0], model)]
        finally:
            module["CONV1X1_POLICY"] = policy
        assert counts[1] - counts[0] == len(pointwise)
    elif name == "channels_last":
        assert settings(graph).memory_format == "channels_last" and graph.nodes == graph0.nodes
    elif name == "batch_tile":
        assert settings(graph).batch_tile_bytes > 0 and inference_only(graph)


def test_O1_keeps_training(reference):
    """-O1 still trains: the same gradients as -O0.

    Compared in float64, where the algebra shows (they agree to ~1e-15): in float32 torch's own
    weight gradient of the 56x56 transition conv is off by 2.4e-4 on one thread, for -O0 alone.
    In float32 -O1's 1x1 convs may run oneDNN's kernels (measure_1x1), backward too: its gradients
    agree with the float64 ones as closely as -O0's do.
    """
    model0, _, state, x, _ = reference
    model1, _, _ = torch_model("densenet121", select("torch", 1), state)
    grads = []
    for m, dtype in (
        (model0, torch.float64),
        (model1, torch.float64),
        (model0, torch.float32),
        (model1, torch.float32),
    ):
        m = copy.deepcopy(m).to(dtype)
        m(x[:2].to(dtype)).square().sum().backward()
        grads.append((m.features.transition1.conv.weight.grad, m.features.denseblock1.denselayer1.conv1.weight.grad))
    assert max(rel_err(a, b) for a, b in zip(grads[1], grads[0], strict=True)) <= 1e-12
    float32 = [max(rel_err(a, b.float()) for a, b in zip(g, grads[0], strict=True)) for g in grads[2:]]
    assert float32[1] <= max(2 * float32[0], 1e-5)
    model1.train()(x[:2]).sum().backward()  # and in train mode
    assert model1.features.transition1.conv.weight.grad is not None
    model1.eval()


def test_passes_are_per_target_and_named():
    assert [n for n, _ in select("onnx", 2)] == ["pool_first", "fold_conv_bn", "fuse_bn_relu"]
    assert [n for n, _ in select("torch", 2, disable=["channels_last"])][-1] == "pack_weights"
    assert select("torch", 0) == []
    # the training build's rewrite stops at -O1: -O2 folds every batch norm instead
    assert "share_bn_stats" in names(select("torch", 1)) and "share_bn_stats" not in names(select("torch", 2))
    assert PASSES["share_bn_stats"].levels == "-O1" and PASSES["pool_first"].levels == "-O1+"
    with pytest.raises(DncError, match="unknown pass 'fold'"):
        select("torch", 2, disable=["fold"])
    with pytest.raises(DncError, match="not for --target onnx"):
        select("onnx", 0, enable=["block_buffer"])


@pytest.mark.parametrize(
    "name", [pytest.param(p.stem, marks=[pytest.mark.slow] if p.stem in SLOW else []) for p in ALL_SPECS]
)
@pytest.mark.parametrize("level", [1, 2])
def test_every_spec_at_every_level_matches_O0(name, level):
    model0, graph0, state = torch_model(name, [])
    model, _, _ = torch_model(name, select("torch", level), state)
    x = sample(graph0)
    with torch.no_grad():
        for batch in (x, x[:1]):
            assert rel_err(model(batch), model0(batch)) <= RTOL


def test_O2_module_keeps_checkpoints_and_refuses_training(reference, tmp_path):
    model0, _, state, x, ref = reference
    _, graph = build(spec_path("densenet121"), SMALL, passes=select("torch", 2))
    (tmp_path / "o2.py").write_text(emit_torch.emit(graph))  # on disk: TorchScript reads the source
    model = import_file(tmp_path / "o2.py").DenseNet()
    model.load_state_dict(state, strict=True)
    assert list(model.state_dict()) == list(model0.state_dict())  # torchvision's keys, nothing folded
    saved = torchvision_densenet(load_spec(spec_path("densenet121"), SMALL))  # what it saves loads there
    saved.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(saved.eval()(x), ref) == 0
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()}
    assert old != state
    fresh, _, _ = torch_model("densenet121", select("torch", 2), old)  # old keys, strict=True, refolded
    with torch.no_grad():
        assert rel_err(fresh(x), ref) <= RTOL
        assert rel_err(model(x.contiguous(memory_format=torch.channels_last)), ref) <= RTOL
    with pytest.raises(RuntimeError, match="inference only"):
        model.train()
    with pytest.raises(RuntimeError, match="inference only"):
        model(x.clone().requires_grad_())
    assert rel_err(model(x).detach(), ref) <= RTOL  # grad mode on, nothing requires grad: fine
    scripted = torch.jit.script(model)
    exported = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        assert rel_err(scripted(x), ref) <= RTOL
        assert rel_err(exported(x), ref) <= RTOL


def test_batch_tiles_keep_the_numbers(reference, tmp_path):
    """-O2 dense blocks and transitions on batch tiles: one sample, two, or the whole batch per tile, the same
    numbers; under TorchScript, and under torch.export with a dynamic batch (which runs whole batches)."""
    _, _, state, x, ref = reference
    _, graph = build(spec_path("densenet121"), SMALL, passes=select("torch", 2))
    source = emit_torch.emit(graph)
    assert "for tile in [out] if step >= n else out.split(step):" in source
    assert "def run(self, x: Tensor) -> Tensor:" in source  # the transition's chain, called per tile
    (tmp_path / "tiled.py").write_text(source)
    module = import_file(tmp_path / "tiled.py")
    per_sample = 256 * 16 * 24 * 4  # denseblock1's buffer, one 64x96 sample, float32
    tiles = {}
    for tile_bytes in (0, 1, 2 * per_sample, 1 << 30):
        model = module.DenseNet(tile_bytes=tile_bytes)
        model.load_state_dict(state, strict=True)
        seen: list[int] = []
        hook = model.features.denseblock1.denselayer1.register_forward_hook(
            lambda m, i, o, seen=seen: seen.append(len(o))
        )
        with torch.no_grad():
            assert rel_err(model(x), ref) <= RTOL
        hook.remove()
        tiles[tile_bytes] = seen
    assert tiles == {0: [3], 1: [1, 1, 1], 2 * per_sample: [2, 1], 1 << 30: [3]}
    model = module.DenseNet(tile_bytes=1)
    model.load_state_dict(state, strict=True)
    scripted = torch.jit.script(model)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},)).module()
    with torch.no_grad():
        assert rel_err(scripted(x), ref) <= RTOL
        assert rel_err(exported(x), ref) <= RTOL
        assert rel_err(exported(x[:2]), ref[:2]) <= RTOL


def test_fold_preact_bn_keeps_the_numbers_whatever_the_sign_of_a_scale(reference):
    """Batch norm scales below zero (a two-sided clamp), exactly zero, and so small that -b/s is beyond float32
    (the channel gives relu(b)): -O2 still matches -O0, which computes relu(s*x + b) as torchvision does."""
    _, _, state, x, _ = reference
    state = {k: v.clone() for k, v in state.items()}
    for key in [k for k in state if k.endswith(("norm1.weight", "transition1.norm.weight", "norm5.weight"))]:
        weight, bias = state[key], state[key.removesuffix("weight") + "bias"]
        weight[0::4] *= -1
        weight[1] = 0.0
        weight[2], bias[2] = 1e-41, -1.0  # relu(b) = 0
        weight[3], bias[3] = 1e-41, 0.5  # relu(b) = 0.5
    model0, _, _ = torch_model("densenet121", [], state)
    model2, _, _ = torch_model("densenet121", select("torch", 2), state)
    with torch.no_grad():
        assert rel_err(model2(x), model0(x)) <= RTOL
    lower, upper, two_sided = model2.features.denseblock1.denselayer1.norm1.kept_bounds()
    assert two_sided and not model2.features.transition2.norm.kept_bounds()[2]
    assert torch.isinf(lower[1:4]).all() and torch.isinf(upper[1:4]).all()  # no clamp: s is 0 there, or tiny
    assert torch.isfinite(upper[0]) and lower[0] == -float("inf")


def test_O0_relu_is_in_place_only_without_grad(reference):
    model0, _, _, x, _ = reference
    seen = []
    handle = model0.features.denseblock1.denselayer1.relu2.register_full_backward_hook(
        lambda m, gi, go: seen.append(go[0].shape)
    )
    try:
        model0(x[:1]).sum().backward()  # eval mode with gradients (grad-CAM): hooks work
    finally:
        handle.remove()
    assert seen


def test_onnx_O2_folds_weights_and_matches(reference):
    import onnxruntime as ort

    _, graph0, state, x, ref = reference
    _, graph = build(spec_path("densenet121"), SMALL, passes=select("onnx", 2))
    numpy_state = {k: v.numpy() for k, v in state.items()}
    m0, m2 = emit_onnx(graph0, numpy_state), emit_onnx(graph, numpy_state)
    names = {i.name for i in m2.graph.initializer}
    assert "features.conv0.folded_weight" in names and "features.norm0.weight" not in names
    assert len(m2.graph.node) < len(m0.graph.node)
    session = ort.InferenceSession(m2.SerializeToString(), providers=["CPUExecutionProvider"])
    assert rel_err(session.run(None, {"input": x.numpy()})[0], ref.numpy()) <= RTOL


def test_cli_levels():
    listed = run_dnc("passes")
    assert listed.returncode == 0 and all(name in listed.stdout for name in PASSES)
    rewrites, settings_ = listed.stdout.split("settings (")
    assert {p.name for p in PASSES.values() if p.kind == "setting"} == {
        "measure_1x1",
        "batch_tile",
        "pack_weights",
        "channels_last",
    }
    assert all((name in settings_) == (PASSES[name].kind == "setting") for name in PASSES)
    o0 = run_dnc("summary", "specs/densenet121.yaml", "--format", "json")
    o2 = run_dnc("summary", "-O2", "specs/densenet121.yaml", "--format", "json")
    assert o0.returncode == o2.returncode == 0
    assert '"macs": 2602950656' in o2.stdout and '"macs": 2834161664' in o0.stdout
    ir = run_dnc("ir", "-O2", "--no-pass", "fuse_bn_relu", "specs/densenet40_k12.yaml")
    assert "conv_bn" not in ir.stdout and "buffer_concat" in ir.stdout
    bad = run_dnc("ir", "--pass", "nope", "specs/densenet40_k12.yaml")
    assert bad.returncode == 2 and "unknown pass 'nope'" in bad.stderr
    ok = run_dnc("verify", "-O2", "specs/densenet121.yaml", *[a for s in SMALL for a in ("--set", s)])
    assert ok.returncode == 0 and "(-O2)" in ok.stdout and ": ok" in ok.stdout


# -- on a GPU (skipped without one; `make test-gpu` runs them) ----------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("name", ["densenet121", "densenet_bc100_k12"])
@pytest.mark.usefixtures("full_float32")
def test_every_level_on_cuda_matches_O0(name, level):
    """-O1 and -O2 moved to the GPU agree with -O0 on the CPU; -O2 runs channels_last there and, with tiles
    asked for, still whole batches (tiles are for a CPU's caches)."""
    model0, graph0, state = torch_model(name, [])
    _, graph = build(spec_path(name), overrides(name), passes=select("torch", level))
    model = load_generated(graph).DenseNet(**({"tile_bytes": 1} if level == 2 else {}))
    model.load_state_dict(state, strict=True)
    model = model.eval().cuda()
    x = sample(graph0)
    seen: list[int] = []
    first = next(m for m in model.modules() if type(m).__name__.startswith("DenseLayer"))
    first.register_forward_hook(lambda m, i, o: seen.append(len(o)))
    with torch.no_grad():
        for batch in (x, x[:1]):
            assert rel_err(model(batch.cuda()).cpu(), model0(batch)) <= RTOL
    assert seen == [3, 1]
    if level == 2:
        assert model.features.conv0.folded_weight.is_cuda
        assert model.forward_features(x.cuda()).is_contiguous(memory_format=torch.channels_last)


@pytest.fixture
def full_float32(monkeypatch):
    """No TF32 on the GPU: full float32, or a 1e-5 tolerance means nothing."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_gpu_timing_script_runs():
    """benchmarks/opt_levels.py --device cuda: every model timed on the GPU, ratios printed."""
    done = subprocess.run(
        [sys.executable, "benchmarks/opt_levels.py", "--device", "cuda", "--batch", "2", "--rounds", "1",
         "--runs", "1", "--models", "torchvision", "torchvision_cl", "O0", "O2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()[-4:]] == ["torchvision", "torchvision_cl", "O0", "O2"]

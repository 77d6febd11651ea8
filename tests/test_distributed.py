"""Generated models train under DistributedDataParallel and FSDP2: two processes, gloo, CPU.

Two ranks each take half of every batch (tests/distributed_worker.py, in a fresh process).
Train-mode BN normalises each half with its own statistics (CPU has no SyncBatchNorm), so
the reference is one process putting each half through the model in train mode and
averaging the gradients; with BN frozen in eval mode it is one process on the whole batch.
Gradients of the first step and the weights after SGD with momentum must agree.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from conftest import ROOT, import_file, run_dnc

torch = pytest.importorskip("torch", exc_type=ImportError)  # no torch: skip the module

from distributed_worker import CONFIGS, LR, MOMENTUM, STEPS, config_name, freeze_bn  # noqa: E402  (needs torch)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

TINY = """\
version: 1
name: tiny_dist
input: {channels: 3, size: [16, 16]}
stem: {kind: cifar, width: 8}
growth_rate: 4
bn_size: 2
blocks: [2, 2]
head: {classes: 3}
"""
BATCH = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=["-O0", "-O1"])
def distributed(request, tmp_path_factory):
    """Compile the tiny spec at a level, run both ranks over every configuration; return (module, state, batches,
    out). -O1 trains fused: each rank's dense layers under DDP or FSDP2 (which shards each of them)."""
    tmp = tmp_path_factory.mktemp("dist")
    (tmp / "tiny_dist.yaml").write_text(TINY)
    result = run_dnc("compile", tmp / "tiny_dist.yaml", "-o", tmp / "gen", request.param)
    assert result.returncode == 0, result.stderr
    model_file = tmp / "gen" / "tiny_dist.py"
    module = import_file(model_file, f"tiny_dist_{tmp.name}")
    torch.manual_seed(0)
    model = module.DenseNet()
    with torch.no_grad():  # BN statistics that are not the identity, so frozen BN matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    state = model.state_dict()
    batches = torch.randn(STEPS, BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.save(state, tmp / "state.pt")
    torch.save(batches, tmp / "batches.pt")
    (tmp / "out").mkdir()
    worker = ROOT / "tests" / "distributed_worker.py"
    args = [model_file, tmp / "state.pt", tmp / "batches.pt", tmp / "out", free_port()]
    ranks = [
        subprocess.Popen(
            [sys.executable, worker, str(rank), *map(str, args)],
            cwd=tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    for rank in ranks:
        output, _ = rank.communicate(timeout=240)
        assert rank.returncode == 0, output[-3000:]
    return module, state, batches, tmp / "out"


def single_process(module, state, batches, memory_efficient: bool, bn: str) -> dict:
    """The same work in one process: per-half forward and averaged gradients, or the whole batch (frozen BN)."""
    torch.set_num_threads(1)
    model = module.DenseNet(memory_efficient=memory_efficient)
    model.load_state_dict(state, strict=True)
    freeze_bn(model) if bn == "frozen" else model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    grads = {}
    for step, batch in enumerate(batches):
        if bn == "frozen":
            model(batch).square().mean().backward()
        else:
            for half in batch.chunk(2):
                (model(half).square().mean() / 2).backward()
        if step == 0:
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    return {"grads": grads, "weights": {name: p.detach().clone() for name, p in model.named_parameters()}}


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(("wrapper", "memory_efficient", "bn"), CONFIGS, ids=[config_name(*c) for c in CONFIGS])
def test_distributed_training_equals_one_process(distributed, wrapper, memory_efficient, bn):
    module, state, batches, out = distributed
    name = config_name(wrapper, memory_efficient, bn)
    unsupported = out / f"{name}.unsupported"
    if unsupported.exists():
        pytest.skip(f"{wrapper} does not run on CPU with gloo in torch {torch.__version__}: {unsupported.read_text()}")
    got = torch.load(out / f"{name}.pt", weights_only=True)
    if hasattr(module, "fused_block"):  # -O1: fused with batch statistics; with frozen batch norms, not
        assert (got["fused"] is None) == (bn == "train"), got["fused"]
    want = single_process(module, state, batches, memory_efficient, bn)
    assert_same(got["grads"], want["grads"])
    assert_same(got["weights"], want["weights"])
    # the run changed the weights, so agreeing says something
    assert any(not torch.equal(got["weights"][k], state[k]) for k in got["weights"])


def test_whole_batch_differs_from_halves_in_train_mode(distributed):
    """Why the train-mode reference averages halves: per-process BN statistics change the gradients."""
    module, state, batches, _ = distributed
    halves = single_process(module, state, batches, False, "train")["grads"]
    model = module.DenseNet()
    model.load_state_dict(state, strict=True)
    model.train()(batches[0]).square().mean().backward()
    assert any(not torch.allclose(p.grad, halves[n], atol=1e-6) for n, p in model.named_parameters())

"""Setting measure_1x1 (-O1): a 1x1 conv picks oneDNN's kernel or torch's own on its first calls, timed where the
model runs. The runtime of a generated -O1 module, exercised on its own (a fake clock makes choices certain),
under TorchScript, tracing, torch.export and torch.compile, and under torch.distributed (2 gloo ranks).
"""

from __future__ import annotations

import atexit
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, dnc_cli, import_file

torch = pytest.importorskip("torch", exc_type=ImportError)
F = torch.nn.functional
nn = torch.nn

SPEC = ROOT / "specs" / "densenet_bc100_k12.yaml"


def _compile(folder: Path) -> Path:
    result = dnc_cli("compile", SPEC, "-O1", "-o", folder)
    assert result.returncode == 0, result.stderr
    return folder / "densenet_bc100_k12.py"


FOLDER = Path(tempfile.mkdtemp(prefix="dnc-conv1x1-"))  # the generated module the tests (and the ranks) import
atexit.register(shutil.rmtree, FOLDER, ignore_errors=True)
GENERATED = _compile(FOLDER)
conv_choice = import_file(GENERATED, "conv1x1_choice_o1")
CALLS = conv_choice._WARMUP * 2 + conv_choice._SAMPLES * 2  # calls of one key until it is decided
TORCH_RUNS_ONEDNN = conv_choice._torch_runs_onednn  # the fixture below replaces it


def reset():
    for kept in (conv_choice._decided, conv_choice._trials, conv_choice._times):
        kept.clear()


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    reset()
    monkeypatch.setattr(conv_choice, "CONV1X1_POLICY", "measure")
    monkeypatch.setattr(conv_choice, "_torch_runs_onednn", lambda *args: False)  # always a trial, unless a test says
    yield
    reset()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 8, 1)
        self.b = nn.Conv2d(8, 4, 1, bias=False)

    def forward(self, x):
        x = conv_choice.conv1x1(x, self.a.weight, self.a.bias)
        return conv_choice.conv1x1(torch.relu(x), self.b.weight, self.b.bias)


def reference(net, x):
    return F.conv2d(torch.relu(F.conv2d(x, net.a.weight, net.a.bias)), net.b.weight)


def spy(monkeypatch):
    """Record which kernel runs each call."""
    ran = []
    run = conv_choice._run

    def recording(kernel, *args):
        ran.append(kernel)
        return run(kernel, *args)

    monkeypatch.setattr(conv_choice, "_run", recording)
    return ran


@pytest.mark.parametrize("policy", ["onednn", "conv2d"])
def test_pinned_kernel_runs_every_call_and_computes_the_convolution(monkeypatch, policy):
    monkeypatch.setattr(conv_choice, "CONV1X1_POLICY", policy)
    ran = spy(monkeypatch)
    net, x = Net().eval(), torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(net, x))
    assert ran == [policy, policy] and conv_choice.conv1x1_choices() == []


def test_first_calls_alternate_then_the_faster_runs(monkeypatch):
    ran = []
    # conv2d calls take 3 ms, onednn calls 1 ms: a fake clock makes the choice certain
    ticks = {"conv2d": 3e-3, "onednn": 1e-3}
    now = [0.0]

    def fake_run(kernel, *args):
        now[0] += ticks[kernel]
        ran.append(kernel)
        return F.conv2d(*args[:3])

    monkeypatch.setattr(conv_choice, "_run", fake_run)
    monkeypatch.setattr(conv_choice, "_clock", lambda: now[0])
    w, x = torch.randn(4, 8, 1, 1), torch.randn(1, 8, 5, 5)
    for _ in range(CALLS + 3):
        torch.testing.assert_close(conv_choice.conv1x1(x, w, None), F.conv2d(x, w))
    assert ran[:CALLS] == ["conv2d", "onednn"] * (CALLS // 2)
    assert ran[CALLS:] == ["onednn"] * 3
    (line,) = conv_choice.conv1x1_choices()
    threads = torch.get_num_threads()
    want = f"onednn torch.float32 x[1, 8, 5, 5] contiguous w[4, 8, 1, 1] {threads} threads eval: conv2d 3.000 ms, "
    assert line == want + "onednn 1.000 ms"


def test_where_torch_itself_calls_onednn_there_is_no_trial(monkeypatch):
    """The same kernel either way: in eval it is called directly (no dispatch layers), in training through F.conv2d
    (autograd records the convolution as at -O0)."""
    monkeypatch.setattr(conv_choice, "_torch_runs_onednn", lambda *args: True)
    ran = spy(monkeypatch)
    w, x = torch.randn(4, 8, 1, 1), torch.randn(16, 8, 5, 5)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(conv_choice.conv1x1(x, w, None), F.conv2d(x, w))
    assert ran == ["onednn"] * 3
    w.requires_grad_()
    for _ in range(3):
        torch.testing.assert_close(conv_choice.conv1x1(x, w, None), F.conv2d(x, w))
    assert ran == ["onednn"] * 3 + ["conv2d"] * 3
    assert [line.split()[0] for line in conv_choice.conv1x1_choices()] == ["onednn", "conv2d"]
    assert all(line.endswith(": torch calls oneDNN itself") for line in conv_choice.conv1x1_choices())


def test_torchs_backend_selection_is_read_right():
    """float32 on one thread: torch's GEMM below batch 16 (a trial), oneDNN from 16 on (none)."""
    threads = torch.get_num_threads()
    w = torch.randn(8, 16, 1, 1)
    try:
        torch.set_num_threads(1)
        assert not TORCH_RUNS_ONEDNN(torch.randn(1, 16, 7, 7), w, None)
        assert TORCH_RUNS_ONEDNN(torch.randn(16, 16, 7, 7), w, None) == torch.backends.mkldnn.is_available()
    finally:
        torch.set_num_threads(threads)


def test_a_new_batch_or_thread_count_or_mode_is_a_new_decision():
    w = torch.randn(4, 8, 1, 1, requires_grad=True)
    with torch.no_grad():
        for _ in range(CALLS):
            conv_choice.conv1x1(torch.randn(1, 8, 5, 5), w, None)
            conv_choice.conv1x1(torch.randn(2, 8, 5, 5), w, None)
    for _ in range(CALLS):
        conv_choice.conv1x1(torch.randn(1, 8, 5, 5), w, None).sum().backward()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        with torch.no_grad():
            for _ in range(CALLS):
                conv_choice.conv1x1(torch.randn(1, 8, 5, 5), w, None)
    finally:
        torch.set_num_threads(threads)
    assert len(conv_choice.conv1x1_choices()) == 4
    assert sum(" train:" in line for line in conv_choice.conv1x1_choices()) == 1


def test_gradients_are_the_convolutions_whichever_kernel():
    net = Net()
    x = torch.randn(3, 16, 6, 6, requires_grad=True)
    expected = torch.autograd.grad(reference(net, x).square().sum(), [x, *net.parameters()])
    for _ in range(CALLS + 2):
        got = torch.autograd.grad(net(x).square().sum(), [x, *net.parameters()])
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e)


def test_bfloat16_is_measured_too():
    w, x = torch.randn(8, 16, 1, 1).bfloat16(), torch.randn(2, 16, 7, 7).bfloat16()
    for _ in range(CALLS):
        out = conv_choice.conv1x1(x, w, None)
    torch.testing.assert_close(out, F.conv2d(x, w))
    (line,) = conv_choice.conv1x1_choices()
    assert " torch.bfloat16 " in line


def test_scripted_code_keeps_conv2d_and_never_measures(monkeypatch):
    ran = spy(monkeypatch)
    net, x = Net().eval(), torch.randn(2, 16, 9, 9)
    scripted = torch.jit.script(net)
    for _ in range(CALLS):
        torch.testing.assert_close(scripted(x), reference(net, x))
    assert ran == [] and conv_choice.conv1x1_choices() == []


def test_traced_code_keeps_conv2d_and_never_measures(monkeypatch):
    ran = spy(monkeypatch)
    net, x = Net().eval(), torch.randn(2, 16, 9, 9)
    traced = torch.jit.trace(net, x, check_trace=False)  # its check would call net eagerly: measured, rightly
    assert "mkldnn_convolution" not in str(traced.graph)
    assert ran == [] and conv_choice.conv1x1_choices() == []
    exported = torch.export.export(net, (x,))
    assert "mkldnn_convolution" not in str(exported.graph)
    assert ran == [] and conv_choice.conv1x1_choices() == []


def test_compiled_code_never_measures(monkeypatch):
    ran = spy(monkeypatch)
    net, x = Net().eval(), torch.randn(2, 16, 9, 9)
    compiled = torch.compile(net, backend="eager")  # dynamo's tracing is what matters, not Inductor's code
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference(net, x))
    assert ran == [] and conv_choice.conv1x1_choices() == []


def test_a_bad_policy_names_the_choices(monkeypatch):
    monkeypatch.setattr(conv_choice, "CONV1X1_POLICY", "fast")
    with pytest.raises(ValueError, match="DNC_CONV1X1='fast': expected measure, conv2d or onednn"):
        conv_choice.conv1x1(torch.randn(1, 8, 5, 5), torch.randn(4, 8, 1, 1), None)


def test_the_environment_pins_the_kernel():
    code = "import generated; print(generated.CONV1X1_POLICY)"
    out = subprocess.run(
        [sys.executable, "-c", code.replace("generated", GENERATED.stem)],
        cwd=FOLDER,
        env={"DNC_CONV1X1": "onednn"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.stdout.strip() == "onednn", out.stderr


WORKER = textwrap.dedent(
    """
    import sys, json, torch, torch.distributed as dist
    import importlib.util
    spec = importlib.util.spec_from_file_location("generated", sys.argv[3])
    conv_choice = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv_choice)
    rank, port = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # each rank's own clock says the opposite: rank 0 finds onednn faster (5 ms against 1), rank 1 conv2d
    # (3 ms against 1); summed, conv2d 6 ms and onednn 4 ms: onednn on both
    cost = {"conv2d": 5e-3, "onednn": 1e-3} if rank == 0 else {"conv2d": 1e-3, "onednn": 3e-3}
    now = [0.0]
    run = conv_choice._run
    def timed_run(kernel, *args):
        now[0] += cost[kernel]
        return run(kernel, *args)
    conv_choice._run = timed_run
    conv_choice._clock = lambda: now[0]
    conv_choice._torch_runs_onednn = lambda *args: False  # a trial for every key, whatever torch would pick
    torch.manual_seed(0)
    class Wrapped(torch.nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv = conv
        def forward(self, x):
            return conv_choice.conv1x1(x, self.conv.weight, self.conv.bias)
    model = torch.nn.parallel.DistributedDataParallel(Wrapped(torch.nn.Conv2d(8, 4, 1)))
    for step in range(8):
        model(torch.randn(2, 8, 5, 5)).sum().backward()       # training: agreed across ranks
    with torch.no_grad():
        for step in range(8 if rank == 0 else 0):              # evaluation on rank 0 only: local, no collective
            model.module(torch.randn(3, 8, 5, 5))
    print(json.dumps(conv_choice.conv1x1_choices()))
    dist.barrier()  # both done before either tears gloo down (a rank leaving first made the other abort, rarely)
    dist.destroy_process_group()
    """
)


def test_ranks_agree_on_the_training_choice_and_evaluation_on_one_rank_does_not_wait():
    if not torch.distributed.is_available():
        pytest.skip("torch built without distributed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(rank), str(port), str(GENERATED)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    import json

    zero, one = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    train0 = [line for line in zero if " train:" in line]
    train1 = [line for line in one if " train:" in line]
    assert len(train0) == 1 and train0 == train1  # the same kernel from the same summed times on both ranks
    assert train0[0].startswith("onednn ") and train0[0].endswith("train: conv2d 6.000 ms, onednn 4.000 ms")
    (eval0,) = [line for line in zero if " eval:" in line]
    assert eval0.endswith("eval: conv2d 5.000 ms, onednn 1.000 ms")  # rank 0's own clock decided it
    assert not [line for line in one if " eval:" in line]


def test_ranks_at_different_shapes_are_an_error_not_a_mismatch(tmp_path):
    code = WORKER.replace("model(torch.randn(2, 8, 5, 5))", "model(torch.randn(2 + rank, 8, 5, 5))")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(rank), str(port), str(GENERATED)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    assert all("ranks reached different convolution shapes at the same call" in err for _, err in outs)


def test_float16_falls_back_to_conv2d_where_onednn_cannot_run_it():
    """oneDNN's float16 convolution needs AVX512-FP16 or AVX-NE-CONVERT; elsewhere the trial drops it."""
    w, x = torch.randn(8, 16, 1, 1).half(), torch.randn(2, 16, 7, 7).half()
    for _ in range(CALLS):
        out = conv_choice.conv1x1(x, w, None)
    torch.testing.assert_close(out, F.conv2d(x, w))
    (line,) = conv_choice.conv1x1_choices()
    try:
        torch.mkldnn_convolution(x, w, None, [0, 0], [1, 1], [1, 1], 1)
    except RuntimeError:
        assert line.startswith("conv2d ") and line.endswith("onednn inf ms")

"""Setting pack_weights (-O2): in eval, a convolution whose chosen kernel is oneDNN's keeps its weight in oneDNN's
blocked layout between calls (torch reorders it on every call), and 3x3 convolutions choose their kernel as 1x1 ones
do. The runtime of a generated -O2 module, exercised on its own and in the module.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import time

import pytest
from conftest import compile_levels

torch = pytest.importorskip("torch", exc_type=ImportError)
F = torch.nn.functional

from dnc.ir.infer import state_dict_layout  # noqa: E402
from dnc.weights import seeded_state, to_torch  # noqa: E402

pytestmark = pytest.mark.skipif(not torch._C._has_mkldnn, reason="needs torch built with oneDNN")

TINY = """\
version: 1
name: tiny
input: {channels: 3, size: [32, 28]}
growth_rate: 8
bn_size: 2
blocks: [2, 3]
head: {classes: 5}
"""


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    out, graph = compile_levels(tmp_path_factory.mktemp("pack"), TINY, (0, 2), "tiny_pack")
    return out, to_torch(seeded_state(state_dict_layout(graph), seed=2))


@pytest.fixture
def rt(modules, monkeypatch):
    """The -O2 module's runtime, its kernel choices forgotten."""
    mod = modules[0][2]
    for kept in (mod._decided, mod._trials, mod._times):
        kept.clear()
    monkeypatch.setattr(mod, "_PACKING", [True])
    return mod


def channels_last(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).contiguous(
        memory_format=torch.channels_last
    )


def owner(rt, w):
    """A module owning `w`, as the runtime's convolutions do (the packed weight is one of its folds)."""
    conv = rt.ConvKxK(w.shape[1], w.shape[0], w.shape[2], padding=w.shape[2] // 2, bias=False)
    conv.weight = torch.nn.Parameter(w, requires_grad=False)
    return conv


@pytest.mark.parametrize("kernel, padding", [(1, 0), (3, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_weights_compute_onednns_convolution_bit_for_bit(rt, kernel, padding, bias):
    x = channels_last(2, 16, 9, 7)
    w = channels_last(8, 16, kernel, kernel, seed=1)
    b = torch.randn(8) if bias else None
    conv = owner(rt, w)
    with torch.no_grad():
        got = rt._packed(x, w, b, padding, conv)
        assert torch.equal(got, torch.mkldnn_convolution(x, w, b, [padding, padding], [1, 1], [1, 1], 1))
        torch.testing.assert_close(got, F.conv2d(x, w, b, 1, padding))
        plain = x.contiguous()  # another layout, the same numbers
        torch.testing.assert_close(rt._packed(plain, w, b, padding, conv), F.conv2d(plain, w, b, 1, padding))
    assert rt._PACKING == [True] and list(conv._fold_cache) == [("packed", (2, 16, 9, 7))]  # one layout per input shape


def test_a_weight_is_packed_once_and_again_when_changed_or_converted(rt, monkeypatch):
    reorders = []
    reorder = torch._C._nn.mkldnn_reorder_conv2d_weight
    monkeypatch.setattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", lambda *a: reorders.append(1) or reorder(*a))
    monkeypatch.setattr(rt, "CONV1X1_POLICY", "packed")  # every call the packed kernel, not a trial's alternation
    x = channels_last(1, 16, 5, 5)
    conv = owner(rt, channels_last(8, 16, 3, 3, seed=1))
    with torch.no_grad():
        for _ in range(3):
            conv(x)
        assert len(reorders) == 1
        conv.weight.mul_(2)  # in place: its version moves
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, None, 1, 1))
        assert len(reorders) == 2
        conv.weight = torch.nn.Parameter(conv.weight * 3, requires_grad=False)  # another tensor
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, None, 1, 1))
        assert len(reorders) == 3
        conv.double()  # converted: its folds go, and float64 is never packed (oneDNN cannot run it: measured)
        assert conv._fold_cache == {}
        monkeypatch.setattr(rt, "CONV1X1_POLICY", "measure")
        for _ in range(8):
            torch.testing.assert_close(conv(x.double()), F.conv2d(x.double(), conv.weight, None, 1, 1))
        assert len(reorders) == 3 and conv._fold_cache == {}


def test_training_and_other_dtypes_never_pack(rt, monkeypatch):
    packed = []
    monkeypatch.setattr(rt, "_packed", lambda *args: packed.append(1))
    x, w = channels_last(2, 16, 5, 5), channels_last(8, 16, 3, 3, seed=1).requires_grad_()
    conv = owner(rt, w.detach())
    out = rt._run("packed", x, w, None, 1, conv)  # autograd records it: the plain oneDNN call
    out.sum().backward()
    assert w.grad is not None and packed == []
    rt._run("packed", x.clone().requires_grad_(), w.detach(), None, 1, conv)  # an input that records: likewise
    assert packed == []
    with torch.no_grad(), contextlib.suppress(RuntimeError):  # a CPU without bfloat16 may refuse it: no matter
        rt._run("packed", x.to(torch.bfloat16), w.detach().to(torch.bfloat16), None, 1, conv)
    assert packed == []
    with torch.no_grad():
        rt._run("packed", x, w.detach(), None, 1, None)  # no module to keep it in
    assert packed == []
    with torch.no_grad():
        rt._run("onednn", x, w.detach(), None, 1, conv)  # the plain kernel: never packed
    assert packed == []
    with torch.no_grad():
        rt._run("packed", x, w.detach(), None, 1, conv)
    assert packed == [1]


def test_where_the_private_ops_fail_the_plain_call_runs_from_then_on(rt, monkeypatch):
    def gone(*args):
        raise RuntimeError("no such op here")

    real = torch._C._nn.mkldnn_reorder_conv2d_weight
    monkeypatch.setattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", gone)
    x, w = channels_last(1, 16, 5, 5), channels_last(8, 16, 3, 3, seed=1)
    conv = owner(rt, w)
    with torch.no_grad():
        torch.testing.assert_close(rt._run("packed", x, w, None, 1, conv), F.conv2d(x, w, None, 1, 1))
    assert rt._PACKING == [False]
    monkeypatch.setattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", real)  # back: still not tried again
    with torch.no_grad():
        rt._run("packed", x, w, None, 1, conv)
    assert conv._fold_cache == {}


def test_the_module_packs_where_onednn_runs_and_keeps_the_numbers(modules, rt, monkeypatch):
    mods, state = modules
    o0, o2 = mods[0].DenseNet().eval(), mods[2].DenseNet()
    o0.load_state_dict(state)
    o2.load_state_dict(state)
    assert type(o2.features.denseblock1.denselayer1.conv2).__name__ == "ConvKxK"  # the 3x3s choose their kernel too
    x = torch.randn(3, 3, 32, 28, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(rt, "CONV1X1_POLICY", "packed")  # pinned: every chosen conv runs the packed kernel
    with torch.no_grad():
        want = o0(x)
        for _ in range(2):
            got = o2(x)
            assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    convs = [m for m in o2.modules() if type(m).__name__ in ("ConvKxK", "FoldedConv1x1")]
    packs = [[k for k in m._fold_cache if k[0] == "packed"] for m in convs]
    assert len(convs) == 5 * 2 + 1 and all(len(k) == 1 for k in packs)  # each layer's two, a transition's
    monkeypatch.setattr(rt, "CONV1X1_POLICY", "measure")  # measured: each 3x3 shape decided apart from the 1x1s
    with torch.no_grad():
        for _ in range(8):
            assert float((o2(x) - want).abs().max() / want.abs().max()) <= 1e-5
    threes = [line for line in rt.conv1x1_choices() if ", 3, 3] padding 1 " in line]
    assert len(threes) == 2  # one input shape per block
    # each measured against the plain oneDNN call, and torch's own where torch does not run oneDNN itself
    assert all("onednn " in line and "packed " in line for line in rt.conv1x1_choices())
    # oneDNN's packed tensors cannot be copied or pickled: a copy and a pickle derive their own
    for other in (copy.deepcopy(o2), pickle.loads(pickle.dumps(o2))):
        assert all(m._fold_cache == {} for m in other.modules() if hasattr(m, "_fold_cache"))
        with torch.no_grad():
            assert float((other(x) - want).abs().max() / want.abs().max()) <= 1e-5


def test_the_trial_does_not_time_packing(rt, monkeypatch):
    """The modules that share a key (a block's 3x3 convolutions) each pack on their first packed call; packing is once
    per weight and shape, not per call, so a trial that timed it measured the packing, and the packed kernel lost."""
    pack = rt._pack

    def slow(*args):  # busy: on one thread the trial's clock is the thread's CPU time
        end = time.perf_counter() + 0.05
        while time.perf_counter() < end:
            pass
        return pack(*args)

    monkeypatch.setattr(rt, "_pack", slow)
    x = channels_last(1, 16, 6, 6)
    convs = [owner(rt, channels_last(8, 16, 3, 3, seed=s)) for s in range(12)]  # one key, a module per call
    with torch.no_grad():
        for conv in convs:
            torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, None, 1, 1))
    ((key, times),) = rt._times.items()
    assert key[1] == x.shape and key[-1] == 1 and len(times) == 3
    assert times[2] < 0.05  # packed: its time is the convolution's alone


def test_a_checked_call_runs_each_convolutions_kept_call(modules, rt, monkeypatch):
    """In a call of the DenseNet that found nothing changed, each convolution runs the call it kept for its input shape:
    no key, no lookup, no dispatch. A change anywhere drops them; a new policy or thread count is not served a stale
    one."""
    mods, state = modules
    o0, o2 = mods[0].DenseNet().eval(), mods[2].DenseNet()
    o0.load_state_dict(state)
    o2.load_state_dict(state)
    x = torch.randn(2, 3, 32, 28, generator=torch.Generator().manual_seed(5))
    run = rt._run
    runs = []
    monkeypatch.setattr(rt, "_run", lambda *args: runs.append(args[0]) or run(*args))

    def close(a, b):
        return float((a - b).abs().max() / b.abs().max()) <= 1e-5

    with torch.no_grad():
        want = o0(x)
        for _ in range(12):  # the trials, then a checked call that keeps each decided call
            assert close(o2(x), want)
        runs.clear()
        assert close(o2(x), want) and runs == []
        convs = [m for m in o2.modules() if type(m).__name__ in ("ConvKxK", "FoldedConv1x1")]
        assert all(("call", k[1]) in m._fold_cache for m in convs for k in m._fold_cache if k[0] == "packed")
        for model in (o0, o2):  # an in-place change: every kept call is dropped, and the new weight runs
            model.features.denseblock1.denselayer1.conv2.weight.mul_(1.5)
        want = o0(x)
        assert close(o2(x), want) and runs != []
        runs.clear()
        assert close(o2(x), want) and close(o2(x), want) and runs == []
        monkeypatch.setattr(rt, "CONV1X1_POLICY", "conv2d")  # pinned by hand: the kept calls are not the policy's
        conv2d, plain = [], F.conv2d
        monkeypatch.setattr(F, "conv2d", lambda *args: conv2d.append(1) or plain(*args))
        assert close(o2(x), want) and len(conv2d) == len(convs) + 1  # and the stem's
        kept = [v for m in convs for k, v in m._fold_cache.items() if k[0] == "call"]
        assert kept and all(setting[3] == "conv2d" for _, setting, _ in kept)

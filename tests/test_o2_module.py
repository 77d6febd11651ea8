"""The -O2 module's public API: each call works as on -O0 or is refused with the inference-only message.

The folded tensors are derived from torchvision's, never saved, and derived again whenever one of those is
another tensor, has changed in place, or has another dtype or device; what no hook can see (writing into
`p.data`) is what `fold()` is for. A tiny spec with dropout, compiled here at -O0 and -O2.
"""

from __future__ import annotations

import copy

import pytest
from conftest import compile_levels

torch = pytest.importorskip("torch", exc_type=ImportError)

from dnc.ir.infer import state_dict_layout  # noqa: E402
from dnc.weights import seeded_state, to_torch  # noqa: E402

TINY = """\
version: 1
name: tiny
input: {channels: 3, size: [24, 20]}
growth_rate: 8
bn_size: 2
drop_rate: 0.3
blocks: [2, 3]
head: {classes: 5}
"""
REFUSED = "compiled by dnc -O2 for inference only"


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    out, graph = compile_levels(tmp_path_factory.mktemp("o2"), TINY, (0, 2), "tiny_o2_api")
    LAYOUT.update(state_dict_layout(graph))
    return out, graph


LAYOUT = {}  # the state_dict layout of the tiny spec, filled in by the fixture


def weights(seed: int):
    return to_torch(seeded_state(LAYOUT, seed=seed))


X = torch.randn(3, 3, 24, 20, generator=torch.Generator().manual_seed(0))


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def pair(modules, seed: int = 1):
    mods, _ = modules
    o0, o2 = mods[0].DenseNet().eval(), mods[2].DenseNet()
    state = weights(seed)
    o0.load_state_dict(state)
    o2.load_state_dict(state)
    return o0, o2


def same(o0, o2, x=X, tol=1e-5) -> bool:
    with torch.no_grad():
        return rel_err(o2(x), o0(x)) <= tol


def test_loads_into_any_submodule_are_seen(modules):
    o0, o2 = pair(modules)
    assert same(o0, o2)
    other = weights(7)
    for prefix in ("classifier.", "features.", "features.denseblock2.denselayer1.", "features.norm0."):
        part = {k[len(prefix) :]: v for k, v in other.items() if k.startswith(prefix)}
        o0.get_submodule(prefix[:-1]).load_state_dict(part)
        o2.get_submodule(prefix[:-1]).load_state_dict(part)
        assert same(o0, o2), prefix
    o0.load_state_dict(weights(8), strict=False)
    o2.load_state_dict(weights(8), strict=False)
    assert same(o0, o2)


def test_a_second_call_derives_nothing(modules):
    """The folds are kept between calls: every module's derived tensors are the same objects after another forward
    (a scale and shift handed from one module to the next included: a fresh tensor there would make the receiver
    fold again on every call, which made -O2 slower than -O2 without its folds), and each convolution's kept call."""
    _, o2 = pair(modules)

    def kept() -> dict:
        return {  # a fold keeps a tuple of what it derives; a convolution's kept call is a function
            (name, what): [id(t) for t in (entry[2] if isinstance(entry[2], tuple) else [entry[2]])]
            for name, m in o2.named_modules()
            for what, entry in getattr(m, "_fold_cache", {}).items()
        }

    with torch.no_grad():
        for _ in range(10):  # the kernel trials done (each tries oneDNN's kernel, packing its weight, and torch's)
            o2(X)
        first = kept()
        o2(X)
    assert first and kept() == first
    assert any(what == "scale_shift" for _, what in first)  # the handed-on scale and shift are kept too
    assert any(what[0] == "call" for _, what in first if isinstance(what, tuple))


def test_a_call_that_found_nothing_changed_compares_no_fold_sources(modules, monkeypatch):
    """The model checks every parameter and buffer once per call; a second call with nothing changed takes every fold
    as kept, without one comparison of a fold's own sources (those were ~250 a densenet121 forward)."""
    mods, _ = modules
    o0, o2 = pair(modules)
    compared = []
    real = mods[2]._VERSION
    monkeypatch.setattr(mods[2], "_VERSION", lambda t: compared.append(t) or real(t))
    with torch.no_grad():
        first = o2(X)  # the first call after a load derives (and compares)
        assert compared
        compared.clear()
        second = o2(X)
    # the one check of the whole model reads each tensor's version once; no fold reads any
    assert len(compared) == len(list(o2.parameters())) + len(list(o2.buffers()))
    assert torch.equal(first, second) and same(o0, o2)


def test_the_checked_call_ends_with_the_call(modules):
    """Outside a model's call (after it returned, or raised) a module's folds compare their sources again: a change in
    place between calls is seen by a submodule called alone."""
    o0, o2 = pair(modules)
    block0, block2 = o0.features.denseblock2, o2.features.denseblock2
    x = torch.randn(2, block2.denselayer1.norm1.num_features, 6, 5, generator=torch.Generator().manual_seed(4))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        o2(X)
        o2(X)  # a call that found nothing changed
        for o in (o0, o2):
            o.features.denseblock2.denselayer1.norm1.running_mean.add_(0.5)
        assert rel_err(block2(x), block0(x)) <= 1e-5
        with pytest.raises(ValueError, match="expects a batch of images"):
            o2(X[0])  # refused before the call starts: and a call that raises ends too
        original = o2.features.forward
        o2.features.forward = lambda x: (_ for _ in ()).throw(KeyError("inside the call"))
        with pytest.raises(KeyError):
            o2(X)
        del o2.features.forward
        assert o2.features.forward == original
        for o in (o0, o2):
            o.features.denseblock2.denselayer1.conv1.weight.mul_(2)
        assert rel_err(block2(x), block0(x)) <= 1e-5


def test_a_fold_the_last_call_did_not_use_is_derived_again(modules):
    """forward_blocks uses no classifier: after a change it runs with, the next forward's classifier still folds
    the changed tensors (every fold is dropped when the model finds any tensor changed)."""
    o0, o2 = pair(modules)
    with torch.no_grad():
        assert same(o0, o2)
        for o in (o0, o2):
            o.features.norm5.weight.mul_(-1.5)
            o.classifier.bias.add_(1.0)
        o2.forward_blocks(X)
        assert same(o0, o2)


def test_assign_loads_and_the_meta_device(modules):
    mods, _ = modules
    o0, _ = pair(modules, seed=3)
    with torch.device("meta"):
        o2 = mods[2].DenseNet()
    o2.load_state_dict(weights(3), assign=True)
    assert same(o0, o2.eval())


def test_functional_call_uses_the_tensors_it_is_given(modules):
    o0, o2 = pair(modules)
    other = weights(5)
    with torch.no_grad():
        want = torch.func.functional_call(o0, other, (X,))
        got = torch.func.functional_call(o2, other, (X,))
        assert rel_err(got, want) <= 1e-5
        assert same(o0, o2)  # and its own tensors again afterwards


def test_other_dtypes_fold_in_float32_or_wider(modules):
    o0, o2 = pair(modules)
    o0d, o2d = o0.double(), o2.double()
    with torch.no_grad():
        assert rel_err(o2d(X.double()), o0d(X.double())) <= 1e-12
    o0f, o2f = o0.float(), o2.float()
    assert same(o0f, o2f)
    for dtype, tol in ((torch.bfloat16, 5e-2), (torch.float16, 5e-3)):
        with torch.no_grad():
            want = copy.deepcopy(o0f).to(dtype)(X.to(dtype)).float()
            got = copy.deepcopy(o2f).to(dtype)(X.to(dtype)).float()
        assert torch.isfinite(got).all() and rel_err(got, want) <= tol, dtype


@pytest.mark.parametrize("swap", [False, True], ids=["set data", "swap tensors"])
def test_another_dtype_after_a_call_drops_the_folds_of_each_module_it_reaches(modules, swap):
    """A conversion keeps each parameter object and its version (`_apply` sets `.data`, or with torch's
    swap_module_params_on_conversion swaps every tensor in place, buffers too): the folds kept by the float32 call must
    go all the same, also when the conversion is called on submodules one by one."""
    o0, o2 = pair(modules)
    assert same(o0, o2)  # float32 folds kept
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        for child in o2.children():
            child.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    with torch.no_grad():
        assert rel_err(o2(X.double()), o0.double()(X.double())) <= 1e-12
    # a fold from the conv's own parameters and fixed tensors: only the conversion says the kept one is stale
    conv = o2.features.conv0.float()
    post = (torch.ones(conv.out_channels), torch.zeros(conv.out_channels))
    with torch.no_grad():
        assert conv.folded(post=post)[0].dtype == torch.float32
        conv.half()
        assert conv.folded(post=post)[0].dtype == torch.float16


def test_training_is_refused_on_the_model_any_submodule_or_parameter(modules):
    o0, o2 = pair(modules)
    with pytest.raises(RuntimeError, match=REFUSED):
        o2.train()
    o2.features.train()  # a submodule: torch's own train(), then every forward refuses
    with pytest.raises(RuntimeError, match=REFUSED), torch.no_grad():
        o2(X)
    o2.eval()
    _, deepest = max(o2.named_modules(), key=lambda item: item[0].count("."))
    deepest.training = True  # one module deep in the tree alone
    with pytest.raises(RuntimeError, match=REFUSED), torch.no_grad():
        o2(X)
    o2.eval()
    with pytest.raises(RuntimeError, match=REFUSED):
        o2.apply(lambda m: m.train())  # the model's own train() refuses, after the submodules apply() reached first
    with pytest.raises(RuntimeError, match=REFUSED), torch.no_grad():
        o2(X)  # those are in train mode now: every forward refuses until eval()
    o2.eval()
    deepest.training = True
    with pytest.raises(RuntimeError, match=REFUSED), torch.no_grad():
        o2.forward_blocks(X)  # every entry point refuses
    with pytest.raises(RuntimeError, match=REFUSED), torch.no_grad():
        o2.forward_features(X)
    o2.eval()
    assert same(o0, o2)
    with torch.no_grad():  # dropout (rate 0.3 here) never fires: the same numbers twice
        assert torch.equal(o2(X), o2(X))


def test_gradients_are_refused(modules):
    _, o2 = pair(modules)
    o2.requires_grad_(True)
    with pytest.raises(RuntimeError, match=REFUSED):
        o2(X)
    o2.requires_grad_(False)
    o2.classifier.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match=REFUSED):
        o2(X)
    with torch.no_grad():  # nothing records: fine
        o2(X)
    o2.classifier.weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match=REFUSED):
        o2(X.clone().requires_grad_())


def test_a_tensor_that_is_not_a_batch_of_images_says_what_the_model_expects(modules):
    _, o2 = pair(modules)
    with pytest.raises(ValueError, match=r"tiny expects a batch of images \(B, 3, 24, 20\), got a tensor of shape"):
        o2(X[0])


def test_writes_into_data_are_what_fold_is_for(modules):
    o0, o2 = pair(modules)
    with torch.no_grad():
        o2(X)
        o0.features.conv0.weight.mul_(2)
        o2.features.conv0.weight.data.mul_(2)  # no version bump: not seen ...
    assert not same(o0, o2)
    o2.fold()  # ... until fold()
    assert same(o0, o2)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_the_scripted_module_saves_and_loads_torchvision_keys(modules, tmp_path):
    o0, o2 = pair(modules)
    scripted = torch.jit.script(o2)
    assert list(scripted.state_dict()) == list(o0.state_dict())  # nothing folded is saved
    other = weights(9)
    scripted.load_state_dict(other, strict=False)
    o0.load_state_dict(other)
    with torch.no_grad():
        assert rel_err(scripted(X), o0(X)) <= 1e-5

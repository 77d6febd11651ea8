"""The interpreter against the generated code: every zoo spec, in float64, eval and train mode, gradients.

The interpreter (dnc/ir/interpret.py) shares no code with the emitters, so agreement here is two
independent readings of the IR agreeing. In float64 they agree to rounding: errors are relative to
the largest value compared (as `dnc verify` measures), and must stay within 1e-12. Inputs are small.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
from conftest import ALL_SPECS, TORCHVISION_SPECS, spec_path

from dnc.ir.graph import Builder, DropoutAttrs, InputAttrs, OpKind, Unit, UnitKind, ordered
from dnc.ir.infer import infer, state_dict_layout
from dnc.ir.passes import select
from dnc.pipeline import build
from dnc.weights import seeded_state

torch = pytest.importorskip("torch", exc_type=ImportError)  # no torch: skip the module

import torch.nn.functional as F  # noqa: E402  (needs torch)

from dnc.errors import DncError  # noqa: E402
from dnc.ir.interpret import interpret, leaf_state  # noqa: E402  (needs torch)
from dnc.targets.torch.run import load_generated  # noqa: E402  (needs torch)
from dnc.weights import to_torch  # noqa: E402  (needs torch)

# Small inputs that leave 8 values or more per channel to the last batch norm at batch 2: with fewer,
# train mode normalises two or four values, so ill-conditioned that rounding alone moves outputs by 1e-10.
# ImageNet stems and transitions shrink 32 times, CIFAR ones 4 times.
SMALL = {"imagenet": ["input.size=[64,64]"], "cifar": ["input.size=[8,12]"]}
SLOW = {"densenet161", "densenet264", "densenet_bc190_k40", "densenet_bc250_k24"}
TOL = 1e-12
DOUBLE = torch.float64


def overrides(name: str) -> list[str]:
    return SMALL["imagenet" if name in TORCHVISION_SPECS else "cifar"]


def rel(a, b) -> float:
    """max |a - b| / max |b| over tensors or lists of tensors taken together."""
    a, b = ([a], [b]) if isinstance(a, torch.Tensor) else (a, b)
    err = max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True))
    return err / max(y.double().abs().max().item() for y in b)


def sample(graph, batch: int = 2, dtype=DOUBLE) -> torch.Tensor:
    shape = (batch, *ordered(graph)[0].shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=dtype)


def ir_and_state(name: str, *sets: str, level: int = 0, target: str = "torch"):
    """An IR of the spec at a small input and seeded weights for it (BN statistics random too)."""
    _, graph = build(spec_path(name), [*overrides(name), *sets], passes=select(target, level))
    return graph, to_torch(seeded_state(state_dict_layout(graph), seed=3))


def setup(name: str, *sets: str):
    """The -O0 IR, seeded weights and the generated -O0 module loaded with them."""
    graph, state = ir_and_state(name, *sets)
    model = load_generated(graph).DenseNet()
    model.load_state_dict(state, strict=True)
    return graph, state, model


@pytest.mark.parametrize(
    "name", [pytest.param(p.stem, marks=[pytest.mark.slow] if p.stem in SLOW else []) for p in ALL_SPECS]
)
def test_the_interpreter_computes_what_the_generated_O0_module_does(name):
    """Eval: the outputs. Train: one step's outputs, the gradient of every parameter and of the input, and the
    running statistics after it. All in float64."""
    graph, state, model = setup(name)
    model = model.to(DOUBLE)
    x = sample(graph)
    with torch.no_grad():
        assert rel(interpret(graph, state, x).output, model.eval()(x)) <= TOL
    leaves, xi, xm = leaf_state(graph, state), x.clone().requires_grad_(), x.clone().requires_grad_()
    run = interpret(graph, leaves, xi, train=True)
    out = model.train()(xm)
    assert rel(run.output, out) <= TOL
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=DOUBLE)
    (run.output * weights).sum().backward()
    (out * weights).sum().backward()
    params = dict(model.named_parameters())
    assert set(params) == {k for k, v in leaves.items() if v.requires_grad}
    assert rel([leaves[k].grad for k in params], [p.grad for p in params.values()]) <= TOL
    assert rel(xi.grad, xm.grad) <= TOL
    buffers = dict(model.named_buffers())
    assert rel([run.state[k] for k in buffers], list(buffers.values())) <= TOL
    assert all(run.state[k] is leaves[k] for k in params)  # parameters are the caller's to update


@pytest.mark.parametrize(
    "name", [pytest.param(p.stem, marks=[pytest.mark.slow] if p.stem in SLOW else []) for p in ALL_SPECS]
)
def test_every_level_interprets_to_the_O0_numbers(name):
    """The -O1 and -O2 IRs (folded batch norms, clamps, pools moved, buffers) mean the -O0 network, in eval."""
    graph0, state = ir_and_state(name)
    x = sample(graph0)
    with torch.no_grad():
        ref = interpret(graph0, state, x).output
        for target, level in (("torch", 1), ("torch", 2), ("onnx", 2)):
            graph, _ = ir_and_state(name, level=level, target=target)
            assert rel(interpret(graph, state, x).output, ref) <= TOL, (target, level)


def test_O1_trains_as_O0_in_the_interpreter():
    """pool_first holds in train mode too: the same step, gradients included."""
    graph0, state = ir_and_state("densenet121")
    graph1, _ = ir_and_state("densenet121", level=1)
    assert [n.scope for n in ordered(graph1)] != [n.scope for n in ordered(graph0)]
    x = sample(graph0)
    runs = []
    for graph in (graph0, graph1):
        leaves = leaf_state(graph, state)
        run = interpret(graph, leaves, x, train=True)
        run.output.square().sum().backward()
        runs.append((run, leaves))
    (run0, leaves0), (run1, leaves1) = runs
    assert rel(run1.output, run0.output) <= TOL
    trained = [k for k, v in leaves0.items() if v.requires_grad]
    assert rel([leaves1[k].grad for k in trained], [leaves0[k].grad for k in trained]) <= TOL
    assert rel(list(run1.state.values()), list(run0.state.values())) <= TOL


def test_dropout_draws_the_generated_models_masks():
    """With a drop rate, the same seed gives the same masks: the interpreter and the generated module agree in
    train mode (dropout after every conv, float64 and float32)."""
    graph, state, model = setup("densenet40_k12", "drop_rate=0.2", "dropout_at=every_conv")
    assert sum(n.op is OpKind.DROPOUT for n in ordered(graph)) == 3 * 12 + 2
    for dtype in (DOUBLE, torch.float32):
        x = sample(graph, dtype=dtype)
        torch.manual_seed(7)
        out = copy.deepcopy(model).to(dtype).train()(x)
        torch.manual_seed(7)
        run = interpret(graph, state, x, train=True)
        assert rel(run.output, out) <= (TOL if dtype is DOUBLE else 1e-5)
        torch.manual_seed(8)  # another seed, other masks
        assert rel(interpret(graph, state, x, train=True).output, out) > 0.01


def test_a_dropout_mask_is_bit_identical_to_F_dropout():
    b = Builder(name="drop")
    x = b.add(("input",), OpKind.INPUT, InputAttrs(5, 7, 9), Unit(UnitKind.INPUT), [])
    b.add(("drop",), OpKind.DROPOUT, DropoutAttrs(0.3), Unit(UnitKind.HEAD), [x])
    graph = infer(b.graph)
    for dtype in (DOUBLE, torch.float32):
        for layout in (torch.contiguous_format, torch.channels_last):
            x = (torch.randn(3, 5, 7, 9, dtype=dtype) + 3).contiguous(memory_format=layout)
            torch.manual_seed(1)
            want = F.dropout(x, p=0.3, training=True)
            torch.manual_seed(1)
            got = interpret(graph, {}, x, train=True).output
            assert torch.equal(got, want)
            assert 0.5 < (got != 0).double().mean() < 0.9
    assert torch.equal(interpret(graph, {}, x).output, x)  # eval: no dropout


def test_momentum_none_is_a_cumulative_average():
    """A batch norm with momentum None averages every batch so far, through num_batches_tracked, as torch's does."""
    graph, state, model = setup("densenet_bc100_k12")
    graph = graph.copy()
    for n in ordered(graph):
        if n.op is OpKind.BATCHNORM:
            graph.nodes[n.scope]["node"] = n.replace(attrs=dataclasses.replace(n.attrs, momentum=None))
    model = model.to(DOUBLE).train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    x = sample(graph)
    with torch.no_grad():
        model(x)
        run = interpret(graph, state, x, train=True)
    buffers = dict(model.named_buffers())
    assert rel([run.state[k] for k in buffers], list(buffers.values())) <= TOL
    key = "features.denseblock1.denselayer1.norm1.num_batches_tracked"
    assert run.state[key] == state[key] + 1
    mean = "features.denseblock1.denselayer1.norm1.running_mean"
    assert rel(run.state[mean], state[mean].double()) > 1e-4  # it moved, by 1 / (tracked + 1)


def test_eval_only_ops_are_refused_in_train_mode():
    graph, state = ir_and_state("densenet121", level=2)
    with pytest.raises(DncError, match=r"interpreter: features.conv0 is a conv_bn, which holds only in eval mode"):
        interpret(graph, state, sample(graph), train=True)
    with torch.no_grad():
        assert interpret(graph, state, sample(graph)).output.shape == (2, 1000)


def test_the_interpreter_runs_in_float32_and_names_a_missing_weight():
    graph, state, model = setup("densenet_bc100_k12")
    x = sample(graph, dtype=torch.float32)
    with torch.no_grad():
        out = interpret(graph, state, x).output
        assert out.dtype == torch.float32
        assert rel(out, model.eval()(x)) <= 1e-5
    del state["features.transition1.conv.weight"]
    with pytest.raises(DncError, match="interpreter: features.transition1.conv: the weights have no "):
        interpret(graph, state, x)
    with pytest.raises(DncError, match=r"expected a floating-point \(N, C, H, W\) batch"):
        interpret(graph, state, x[0])

"""Static inference against torchvision: parameters, state_dict layout, shapes and MACs.

dnc's inference imports no torch; these tests build torchvision's DenseNet of the same
configuration and check every number dnc predicts against the real thing.
"""

from __future__ import annotations

import pytest
from conftest import TORCHVISION_SPECS, spec_path

from dnc.ir.graph import OpKind, ordered
from dnc.ir.infer import state_dict_shapes
from dnc.pipeline import build
from dnc.reports.summary import summarize

torch = pytest.importorskip("torch", exc_type=ImportError)  # no torch: skip the module

from dnc.check.reference import torchvision_densenet  # noqa: E402  (needs torch)


@pytest.mark.parametrize("name", TORCHVISION_SPECS)
def test_params_and_state_dict_layout_equal_torchvision(name):
    spec, graph = build(spec_path(name))
    model = torchvision_densenet(spec)
    assert summarize(graph).params == sum(p.numel() for p in model.parameters())
    reference = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # same keys, same shapes, same order: checkpoints load unchanged
    assert list(state_dict_shapes(graph).items()) == list(reference.items())


def test_params_of_known_torchvision_models():
    # the counts torchvision publishes for its weights
    published = {
        "densenet121": 7_978_856,
        "densenet161": 28_681_000,
        "densenet169": 14_149_480,
        "densenet201": 20_013_928,
    }
    for name, count in published.items():
        assert summarize(build(spec_path(name))[1]).params == count


def _module_outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:])))
        for name, m in model.named_modules()
        if name
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return shapes


@pytest.mark.parametrize(
    ("name", "size"), [("densenet121", (224, 224)), ("densenet169", (192, 256)), ("densenet161", (97, 131))]
)
def test_shapes_through_every_stage_match_a_forward_pass(name, size):
    spec, graph = build(spec_path(name), [f"input.size=[{size[0]}, {size[1]}]"])
    model = torchvision_densenet(spec)
    actual = _module_outputs(model, torch.zeros(1, 3, *size))
    summary = summarize(graph)
    for row in summary.stages:
        module = {"stem": "features.pool0", "head": "classifier"}.get(row.stage, f"features.{row.stage}")
        assert row.output_shape == actual[module], row.stage
    # and every node that is a torchvision module: convs, norms, pools, each dense layer's conv
    nodes = {n.scope: n for n in ordered(graph)}
    checked = [scope for scope in actual if scope in nodes]
    assert len(checked) > 4 * sum(b.layers for b in spec.blocks)
    for scope in checked:
        assert nodes[scope].shape == actual[scope], scope


def test_macs_of_densenet121_equal_a_count_hooked_from_torchvision():
    spec, graph = build(spec_path("densenet121"))
    model = torchvision_densenet(spec).eval()
    macs = 0

    def count(module, inputs, out):
        nonlocal macs
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            macs += out[0].numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, torch.nn.Linear):
            macs += module.in_features * module.out_features

    for m in model.modules():
        m.register_forward_hook(count)
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    assert summarize(graph).macs == macs
    assert round(macs / 1e9, 2) == 2.83  # torchvision's published "GFLOPS" for densenet121


def test_every_parameter_node_has_torchvisions_module_path():
    spec, graph = build(spec_path("densenet121"))
    modules = dict(torchvision_densenet(spec).named_modules())
    kinds = {OpKind.CONV: torch.nn.Conv2d, OpKind.BATCHNORM: torch.nn.BatchNorm2d, OpKind.LINEAR: torch.nn.Linear}
    for n in ordered(graph):
        if n.op in kinds:
            assert isinstance(modules[n.scope], kinds[n.op]), n.scope

"""The limits' closed forms are the op table's formulas on lowering's chains: they equal the sums over the built IR.

No torch: the estimate (`dnc.ir.limits.estimate_network`) and the IR are both built from the spec alone.
"""

from __future__ import annotations

import time

import pytest
from conftest import ALL_SPECS, spec_path

from dnc.frontend.loader import load_spec
from dnc.ir.graph import ordered
from dnc.ir.limits import Limits, estimate_network
from dnc.pipeline import build
from dnc.reports.memory import training_memory

ODD = {  # the zoo's specs with every feature a spec can change, on small inputs
    "deep stem, per-block overrides, every_conv dropout": [
        "stem.kind=deep",
        "stem.mid_width=24",
        "blocks=[{layers: 3, growth_rate: 8, drop_rate: 0.1}, {layers: 2, bn_size: null, compression: 0.7}, 4]",
        "dropout_at=every_conv",
        "input.size=[37,53]",
    ],
    "plain cifar, compression 1": ["stem.kind=cifar", "bn_size=null", "compression=1.0", "input.size=[20,20]"],
    "one-channel input, odd sizes": ["input.channels=1", "input.size=[65,33]", "head.classes=3"],
}


def _check(path, overrides=()):
    spec, graph = build(path, overrides)
    estimate = estimate_network(spec)
    nodes = ordered(graph)
    assert estimate.params == sum(n.params for n in nodes)
    assert estimate.macs == sum(n.macs for n in nodes)
    assert estimate.activations == training_memory(graph, 1).activations
    assert estimate.layers == sum(b.layers for b in spec.resolved_blocks())


@pytest.mark.parametrize("path", ALL_SPECS, ids=[p.stem for p in ALL_SPECS])
def test_the_estimate_equals_the_built_ir_for_every_zoo_spec(path):
    _check(path)


@pytest.mark.parametrize("overrides", list(ODD.values()), ids=list(ODD))
def test_the_estimate_equals_the_built_ir_for_odd_specs(overrides):
    _check(spec_path("densenet121"), overrides)


def test_the_estimate_costs_the_same_for_any_number_of_layers():
    """Closed form: a block of 10^12 layers costs no more to estimate than one of 6 (the limits then refuse it)."""
    spec = load_spec(spec_path("densenet_bc100_k12"), ["blocks=[1000000000000, 2]", "growth_rate=1"])
    start = time.perf_counter()
    huge = estimate_network(spec, Limits(channels=10**15))
    assert time.perf_counter() - start < 1.0
    assert huge.layers == 10**12 + 2 and huge.params > 10**12


def test_the_activations_limit_passes_a_64_image_densenet264_batch_and_refuses_a_huge_input():
    from dnc.errors import LimitError
    from dnc.ir.limits import check_activations

    check_activations(load_spec(spec_path("densenet264")), 64, 8)  # in float64, with its backward: 33 GiB
    huge = load_spec(spec_path("densenet121"), ["input.size=[4096,4096]", "stem.width=512"])
    with pytest.raises(LimitError, match=r"a batch of 1 needs about .* GiB of activations \(verify\), over the "):
        check_activations(huge, 1, 4, what="verify")
    check_activations(huge, 1, 4, Limits(activations=10**15))
    with pytest.raises(LimitError, match=r"a batch of 10,000,000,000 needs"):
        check_activations(load_spec(spec_path("densenet121")), 10**10, 4)

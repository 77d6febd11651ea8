"""The spec language: loading, defaults, extends, --set overrides, resolve. No torch."""

from __future__ import annotations

import pytest
from conftest import ALL_SPECS, CIFAR_SPECS, spec_path

from dnc.errors import SpecError
from dnc.frontend.loader import load_spec, resolved_data
from dnc.pipeline import build
from dnc.reports.summary import summarize

MINIMAL = """\
version: 1
input: {size: [32, 32]}
growth_rate: 12
blocks: [2, 3]
"""


def test_defaults_and_name_from_file(write_spec):
    spec = load_spec(write_spec(MINIMAL, "tiny_net.yaml"))
    assert spec.name == "tiny_net"
    assert (spec.bn_size, spec.compression, spec.drop_rate, spec.dropout_at) == (4, 0.5, 0.0, "conv3x3")
    assert (spec.stem.kind, spec.stem.width, spec.head.classes, spec.input.channels) == ("imagenet", 64, 1000, 3)
    assert [b.layers for b in spec.blocks] == [2, 3]


def test_per_block_overrides_inherit_what_they_leave_out(write_spec):
    text = MINIMAL.replace("blocks: [2, 3]", "blocks:\n  - {layers: 2, growth_rate: 24, bn_size: null}\n  - 3\n")
    blocks = load_spec(write_spec(text)).resolved_blocks()
    assert (blocks[0].growth_rate, blocks[0].bn_size) == (24, None)
    assert (blocks[1].growth_rate, blocks[1].bn_size) == (12, 4)


def test_per_block_growth_rate_changes_channels(write_spec):
    text = MINIMAL.replace("blocks: [2, 3]", "blocks: [2, {layers: 3, growth_rate: 20}]")
    rows = summarize(build(write_spec(text))[1]).stages
    block1, transition1, block2 = rows[1:4]
    assert block1.output_shape[0] == 64 + 2 * 12
    assert transition1.output_shape[0] == (64 + 24) // 2
    assert block2.output_shape[0] == 44 + 3 * 20 and block2.growth_rate == 20


def test_extends_inherits_and_overrides_but_never_the_name(tmp_path):
    (tmp_path / "base.yaml").write_text(MINIMAL + "name: base\ndescription: the base\nhead: {classes: 7}\n")
    (tmp_path / "child.yaml").write_text("version: 1\nextends: base.yaml\ngrowth_rate: 16\nstem: {width: 32}\n")
    spec = load_spec(tmp_path / "child.yaml")
    assert (spec.name, spec.description) == ("child", "")
    assert (spec.growth_rate, spec.stem.width, spec.stem.kind, spec.head.classes) == (16, 32, "imagenet", 7)


def test_extends_chains_through_the_zoo():
    spec = load_spec(spec_path("densenet_bc250_k24"))  # -> densenet_bc100_k12 -> densenet40_k12
    assert (spec.stem.kind, spec.stem.width, spec.bn_size, spec.compression) == ("cifar", 48, 4, 0.5)
    assert [b.layers for b in spec.blocks] == [41, 41, 41] and spec.head.classes == 10


def test_set_overrides_scalars_lists_and_block_fields():
    spec = load_spec(
        spec_path("densenet121"),
        ["growth_rate=48", "blocks.2.layers=36", "blocks.3.growth_rate=16", "input.size=[256, 192]", "bn_size=null"],
    )
    assert spec.growth_rate == 48 and spec.bn_size is None and spec.input.size == [256, 192]
    assert [b.layers for b in spec.blocks] == [6, 12, 36, 16]
    assert spec.resolved_blocks()[3].growth_rate == 16
    assert load_spec(spec_path("densenet121"), ["blocks=[1, 2]"]).blocks[1].layers == 2


def test_resolved_data_is_equal_for_the_same_network_written_differently(write_spec):
    a = load_spec(write_spec(MINIMAL, "a.yaml"))
    b_text = (
        "blocks: [{layers: 2}, {layers: 3, growth_rate: 12}]\n"
        "growth_rate: 12\nbn_size: 4\ninput: {size: [32, 32], channels: 3}\nversion: 1\n"
    )
    b = load_spec(write_spec(b_text, "b.yaml"))
    strip = lambda d: {k: v for k, v in d.items() if k not in ("name", "description")}  # noqa: E731
    assert strip(resolved_data(a)) == strip(resolved_data(b))


def test_compression_is_floor_of_theta_times_m_computed_exactly(write_spec):
    # 0.29 * 100 is 28.999999999999996 in floating point; floor(θ·m) must still be 29
    text = (
        "version: 1\ninput: {size: [32, 32]}\nstem: {kind: cifar, width: 76}\n"
        "growth_rate: 12\nbn_size: null\ncompression: 0.29\nblocks: [2, 1]\n"
    )
    transition = summarize(build(write_spec(text))[1]).stages[2]
    assert transition.stage == "transition1" and transition.output_shape[0] == 29


@pytest.mark.parametrize(
    ("written", "sets", "channels"),
    [
        ("0.29999999999999999999", [], 29),  # 0.3 as a float: the decimal as written is just under it
        ("0.3", [], 30),
        ("0.3", ["compression=0.29999999999999999999"], 29),
        ("0.3", ["compression=2.9999999999999999999e-1"], 29),
        ("0.3", ["blocks=[{layers: 2, compression: 0.29999999999999999999}, 1]"], 29),
        ("0.5", ["blocks.0.compression=0.30000000000000000001"], 30),
    ],
)
def test_compression_uses_the_decimal_as_written_not_its_float(write_spec, written, sets, channels):
    text = (
        "version: 1\ninput: {size: [32, 32]}\nstem: {kind: cifar, width: 76}\n"
        f"growth_rate: 12\nbn_size: null\ncompression: {written}\nblocks: [2, 1]\n"
    )
    spec, graph = build(write_spec(text), sets)  # m = 76 + 2 * 12 = 100
    assert summarize(graph).stages[2].output_shape[0] == channels
    assert resolved_data(spec)["blocks"][0]["compression"] == 0.3  # JSON and resolve show the float


def test_dropout_placement(write_spec):
    from dnc.ir.graph import OpKind, ordered

    def dropouts(extra):
        graph = build(write_spec(MINIMAL + extra))[1]
        return [n.scope for n in ordered(graph) if n.op is OpKind.DROPOUT]

    assert dropouts("") == []
    after_3x3 = dropouts("drop_rate: 0.2\n")
    assert after_3x3 == [
        f"features.denseblock{b}.denselayer{i}.drop2" for b, n in ((1, 2), (2, 3)) for i in range(1, n + 1)
    ]
    every = dropouts("drop_rate: 0.2\ndropout_at: every_conv\n")
    assert "features.transition1.drop" in every and "features.denseblock1.denselayer1.drop1" in every
    assert len(every) == 2 * 5 + 1


def test_deep_stem(write_spec):
    graph = build(write_spec(MINIMAL + "stem: {kind: deep, width: 48, mid_width: 24}\n"))[1]
    stem = summarize(graph).stages[0]
    assert stem.output_shape == (48, 8, 8)  # 3x3/2 conv then 3x3/2 max pool: 32 -> 16 -> 8
    assert stem.params == 3 * 24 * 9 + 24 * 24 * 9 + 24 * 48 * 9 + 2 * (24 + 24 + 48)


@pytest.mark.parametrize("path", ALL_SPECS, ids=lambda p: p.stem)
def test_every_zoo_spec_builds(path):
    spec, graph = build(path)
    assert spec.name == path.stem
    assert summarize(graph).output_shape == (spec.head.classes,)


# the paper's Table 2, in millions, to its precision
PAPER_PARAMS = {
    "densenet40_k12": 1.0,
    "densenet100_k12": 7.0,
    "densenet100_k24": 27.2,
    "densenet_bc100_k12": 0.8,
    "densenet_bc250_k24": 15.3,
    "densenet_bc190_k40": 25.6,
}


def test_cifar_zoo_is_the_papers_table_2():
    assert sorted(PAPER_PARAMS) == sorted(CIFAR_SPECS)
    for name, millions in PAPER_PARAMS.items():
        graph = build(spec_path(name))[1]
        assert round(summarize(graph).params / 1e6, 1) == millions, name
        assert summarize(graph).output_shape == (10,)


def test_load_errors_are_spec_errors_with_locations(write_spec):
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(MINIMAL.replace("growth_rate: 12", "growth_rate: 0")))
    assert (info.value.location.line, info.value.location.col) == (3, 14)


def test_set_takes_the_block_shorthand_too():
    spec = load_spec(spec_path("densenet121"), ["blocks.1=5"])
    assert [b.layers for b in spec.blocks] == [6, 5, 24, 16]

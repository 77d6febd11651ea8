"""`dnc diff`: sameness of networks, each kind of change, checkpoint keys against torch, git revisions."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from conftest import dnc_cli, run_dnc

from dnc.frontend.loader import load_spec
from dnc.reports.diff import compare, load_side

# Small enough to build torchvision models in a blink; torchvision can express it.
BASE = """\
version: 1
name: tiny
input: {size: [64, 64]}
stem: {width: 16}
growth_rate: 8
blocks: [2, 2, 2]
head: {classes: 10}
"""

# The same network: other key order, defaults written out, blocks as mappings, other name.
SAME = """\
head:
  classes: 10
blocks:
  - layers: 2
  - {layers: 2, growth_rate: 8}
  - layers: 2
growth_rate: 8
compression: 0.5
bn_size: 4
drop_rate: 0.0
stem: {kind: imagenet, width: 16}
input: {channels: 3, size: [64, 64]}
name: tiny_spelled_out
description: written differently
version: 1
"""

# The same network again, through extends.
PARENT = BASE.replace("growth_rate: 8", "growth_rate: 12").replace("name: tiny", "name: parent")
CHILD = """\
version: 1
extends: parent.yaml
growth_rate: 8
"""


@pytest.fixture
def base(write_spec):
    return write_spec(BASE, "base.yaml")


def test_same_network_written_differently(write_spec, base):
    other = write_spec(SAME, "same.yaml")
    done = dnc_cli("diff", base, other)
    assert done.returncode == 0, done.stderr
    assert "same network" in done.stdout
    done = dnc_cli("diff", base, other, "--format", "json")
    assert json.loads(done.stdout)["same_network"] is True and json.loads(done.stdout)["fields"] == []


def test_same_network_through_extends(write_spec, base):
    write_spec(PARENT, "parent.yaml")
    child = write_spec(CHILD, "child.yaml")
    done = dnc_cli("diff", base, child, "--format", "markdown")
    assert done.returncode == 0, done.stderr
    assert "same network" in done.stdout


# override on B -> the resolved fields that change (field, A, B)
CHANGES = {
    "blocks.1.layers=3": [("blocks.1.layers", 2, 3)],
    # a spec-wide change shows once, not again in each block that inherits it
    "growth_rate=12": [("growth_rate", 8, 12)],
    "compression=0.25": [("compression", 0.5, 0.25)],
    "bn_size=2": [("bn_size", 4, 2)],
    # ... but a block that keeps its own value, or changes differently, does show
    "blocks.1.growth_rate=12": [("blocks.1.growth_rate", 8, 12)],
    "stem.width=32": [("stem.width", 16, 32)],
    "head.classes=100": [("head.classes", 10, 100)],
    "input.size=[96,96]": [("input.size", [64, 64], [96, 96])],
}


@pytest.mark.parametrize("override", CHANGES)
def test_each_kind_of_change(base, override):
    a, b = load_side(str(base)), load_side(str(base), [override])
    d = compare(a, b)
    assert not d.same
    assert [(c.field, c.a, c.b) for c in d.fields] == CHANGES[override]
    rows_a = {r.stage: r for r in a.summary.stages}
    rows_b = {r.stage: r for r in b.summary.stages}
    for s in d.stages:  # a stage is reported changed exactly where its summary row differs
        assert bool(s.changed) == (rows_a[s.stage] != rows_b[s.stage])
    data = dnc_cli("diff", base, base, "--set", override, "--format", "json")
    assert data.returncode == 1, data.stderr
    report = json.loads(data.stdout)
    assert report["totals"]["parameters"]["delta"] == b.summary.params - a.summary.params
    assert report["totals"]["macs"]["delta"] == b.summary.macs - a.summary.macs
    assert [f["field"] for f in report["fields"]] == [f for f, _, _ in CHANGES[override]]


def test_layer_change_reports_stage_and_deltas(base):
    done = dnc_cli("diff", base, base, "--set", "blocks.1.layers=3")
    assert done.returncode == 1
    out = done.stdout
    assert "blocks.1.layers" in out and "2 → 3" in out
    a, b = load_side(str(base)), load_side(str(base), ["blocks.1.layers=3"])
    assert f"{b.summary.params - a.summary.params:+,}" in out
    denseblock2 = next(s for s in compare(a, b).stages if s.stage == "denseblock2")
    assert {"layers", "output_shape", "params", "macs"} <= set(denseblock2.changed)
    assert denseblock2.b.output_shape[0] - denseblock2.a.output_shape[0] == 8  # one more layer of k=8


def test_input_size_keeps_checkpoint(base):
    d = compare(load_side(str(base)), load_side(str(base), ["input.size=[96,96]"]))
    assert d.checkpoint.loads  # weights do not depend on the input size
    assert d.a.summary.params == d.b.summary.params and d.b.summary.macs > d.a.summary.macs


# Checkpoint compatibility against torch itself: (overrides of A, overrides of B).
TORCH_CASES = [
    ([], ["blocks.1.layers=3"]),
    (["blocks.1.layers=3"], []),
    ([], ["growth_rate=12"]),
    ([], ["bn_size=2"]),
    ([], ["stem.width=32"]),
    ([], ["head.classes=100"]),
    ([], ["input.size=[96,96]"]),
    ([], ["blocks=[2,2,2,2]"]),
    ([], []),
]


@pytest.mark.parametrize(("over_a", "over_b"), TORCH_CASES, ids=lambda o: ",".join(o) or "base")
def test_checkpoint_matches_torch(base, over_a, over_b):
    torch = pytest.importorskip("torch", exc_type=ImportError)
    from dnc.check.reference import torchvision_densenet

    net_a = torchvision_densenet(load_spec(base, over_a))
    net_b = torchvision_densenet(load_spec(base, over_b))
    c = compare(load_side(str(base), over_a), load_side(str(base), over_b)).checkpoint
    state = net_a.state_dict()
    try:
        net_b.load_state_dict(state, strict=True)
        mismatched = set()
    except RuntimeError as err:
        assert not c.loads
        mismatched = set(re.findall(r"size mismatch for (\S+):", str(err)))
    else:
        assert c.loads
    assert mismatched == {k for k, _, _ in c.changed_shape}
    for key, shape_a, shape_b in c.changed_shape:
        assert tuple(state[key].shape) == shape_a and tuple(net_b.state_dict()[key].shape) == shape_b
    # with the mismatched tensors swapped for ones that fit, torch lists just the key differences
    fitting = {k: net_b.state_dict()[k] if k in mismatched else v for k, v in state.items()}
    result = net_b.load_state_dict(fitting, strict=False)
    assert sorted(result.missing_keys) == sorted(c.strict_missing)
    assert sorted(result.unexpected_keys) == sorted(c.missing_in_b)
    assert torch.is_tensor(next(iter(state.values())))


def git(cwd, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd, check=True, capture_output=True
    )


def test_git_revision_resolves_extends_in_that_revision(tmp_path):
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "parent.yaml").write_text(PARENT)
    (tmp_path / "specs" / "child.yaml").write_text(CHILD.replace("growth_rate: 8\n", "stem: {width: 24}\n"))
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "spec")
    done = run_dnc("diff", "HEAD:specs/child.yaml", "specs/child.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "same network" in done.stdout
    # change only the parent: the revision's child must still extend the revision's parent
    (tmp_path / "specs" / "parent.yaml").write_text(PARENT.replace("growth_rate: 12", "growth_rate: 16"))
    done = run_dnc("diff", "HEAD:specs/child.yaml", "specs/child.yaml", "--format", "json", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    fields = {f["field"]: (f["a"], f["b"]) for f in json.loads(done.stdout)["fields"]}
    assert fields["growth_rate"] == (12, 16)
    # a path relative to the current folder, as git reads REV:./path
    done = run_dnc("diff", "HEAD:./child.yaml", "HEAD:specs/child.yaml", cwd=tmp_path / "specs")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.yaml", "base.yaml"], r"^missing\.yaml: error: no such file$"),
        (["nope:base.yaml", "base.yaml"], r"^nope:base\.yaml: error: cannot read from git: "),
        (["HEAD:absent.yaml", "base.yaml"], r"^HEAD:absent\.yaml: error: cannot read from git: "),
        (["notes.txt", "base.yaml"], r"^notes\.txt:1:1: error: expected a mapping of spec fields"),
        (["base.yaml", "base.yaml", "--format", "xml"], r"Invalid value for '--format'"),
    ],
)
def test_bad_arguments(tmp_path, args, message):
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "notes.txt").write_text("just some notes\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "spec")
    done = dnc_cli("diff", *args, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    if "--format" not in args:
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert re.search(message, done.stderr.strip(), re.M), done.stderr


def test_bad_spec_in_revision_names_the_revision(tmp_path):
    (tmp_path / "net.yaml").write_text(BASE.replace("growth_rate: 8", "growth_rate: -1"))
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "bad")
    done = dnc_cli("diff", "HEAD:net.yaml", "net.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("HEAD:net.yaml:5:14: error: growth_rate:"), done.stderr


def test_markdown_report(base):
    done = dnc_cli("diff", base, base, "--set", "blocks=[2,2,2,2]", "--format", "markdown")
    assert done.returncode == 1
    out = done.stdout
    assert out.startswith("### ") and "different networks" in out
    assert "| `blocks.3.layers` | — | 2 |" in out
    assert "denseblock4" in out and "transition3" in out
    assert "❌" in out and "keys new in B" in out


def test_spec_wide_change_with_a_block_override(write_spec):
    a = write_spec(BASE.replace("blocks: [2, 2, 2]", "blocks: [2, {layers: 2, growth_rate: 4}, 2]"), "a.yaml")
    d = compare(load_side(str(a)), load_side(str(a), ["growth_rate=12"]))
    assert [(c.field, c.a, c.b) for c in d.fields] == [("growth_rate", 8, 12)]  # block 1 keeps its k=4
    d = compare(load_side(str(a)), load_side(str(a), ["growth_rate=12", "blocks.1.growth_rate=16"]))
    assert [(c.field, c.a, c.b) for c in d.fields] == [("growth_rate", 8, 12), ("blocks.1.growth_rate", 4, 16)]


@pytest.mark.parametrize(
    ("overrides", "status", "verdict"),
    [
        (["dropout_at=every_conv"], 0, "same network"),  # drop rate 0: no dropout anywhere, the same IR
        (["memory_efficient=true"], 4, "same network, different options"),
        (["input.size=[192,192]"], 1, "different networks"),  # same parameters, other shapes
        (["drop_rate=0.1"], 1, "different networks"),
    ],
)
def test_sameness_is_ir_equality_and_options_are_apart(overrides, status, verdict):
    from click.testing import CliRunner

    from dnc.cli import main

    result = CliRunner().invoke(
        main, ["diff", "specs/densenet121.yaml", "specs/densenet121.yaml", *sum((["--set", o] for o in overrides), [])]
    )
    assert result.exit_code == status, result.output
    assert verdict in result.output

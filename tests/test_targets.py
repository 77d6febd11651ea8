"""Every registered target, taken from the registry: compiled, recorded, verified, its options kept to itself."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from conftest import spec_path

from dnc.cli import main
from dnc.targets import TARGETS, all_options

SMALL = spec_path("densenet_bc100_k12")
SETS = ["--set", "blocks=[2,2]"]


@pytest.mark.parametrize("name", list(TARGETS))
def test_each_target_compiles_and_verifies(name, tmp_path):
    t = TARGETS[name]
    runner = CliRunner()
    result = runner.invoke(main, ["compile", str(SMALL), "--target", name, "-o", str(tmp_path), *SETS])
    assert result.exit_code == 0, result.output
    (out,) = tmp_path.iterdir()
    assert out.name == f"densenet_bc100_k12{t.suffix}"
    check = runner.invoke(main, ["compile", str(SMALL), "--target", name, "-o", str(tmp_path), "--check", *SETS])
    assert check.exit_code == 0, check.output
    pytest.importorskip("torch")
    if name == "onnx":
        pytest.importorskip("onnxruntime")
    verified = runner.invoke(main, ["verify", str(SMALL), "--target", name, "--batch", "1", *SETS])
    assert verified.exit_code == 0, verified.output
    assert verified.output.rstrip().endswith(": ok")


@pytest.mark.parametrize(("option", "value"), [("opset", "17"), ("seed", "3")])
def test_a_target_option_is_refused_for_other_targets(option, value, tmp_path):
    (_, owners) = all_options()[option]
    for name in TARGETS:
        if name in owners:
            continue
        result = CliRunner().invoke(main, ["compile", str(SMALL), "--target", name, f"--{option}", value])
        assert result.exit_code == 2
        assert f"--{option}: not an option of --target {name}" in result.output


def test_an_unknown_target_lists_the_registered_ones():
    result = CliRunner().invoke(main, ["compile", str(SMALL), "--target", "tflite"])
    assert result.exit_code == 2
    assert f"unknown target 'tflite': expected one of {', '.join(TARGETS)}" in result.output


def test_check_judges_a_file_by_the_options_recorded_in_it(tmp_path):
    runner = CliRunner()
    assert runner.invoke(main, ["compile", str(SMALL), "-o", str(tmp_path), "--set", "growth_rate=8"]).exit_code == 0
    fresh = runner.invoke(main, ["compile", str(SMALL), "-o", str(tmp_path), "--check"])
    assert fresh.exit_code == 0, fresh.output  # recompiled with --set growth_rate=8, as recorded
    path = tmp_path / "densenet_bc100_k12.py"
    path.write_text(path.read_text().replace('"growth_rate=8"', '"growth_rate=9"'))
    stale = runner.invoke(main, ["compile", str(SMALL), "-o", str(tmp_path), "--check"])
    assert stale.exit_code == 1 and "stale" in stale.output

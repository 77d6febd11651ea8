"""`dnc validate` reports every error of a spec at once: one line each, file:line:col, capped."""

from __future__ import annotations

from conftest import run_dnc

MANY = """\
version: 1
input:
  size: [64, 64]
  chanels: 3
growth_rat: 12
bn_size: -1
compression: 1.5
stem: {kind: imagnet}
blocks: [2, 0]
"""


def test_every_error_one_line_each_in_file_order(tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text(MANY)
    result = run_dnc("validate", path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}:4:3: error: unknown key 'chanels' in 'input'; did you mean 'channels'?",
        f"{path}:5:1: error: unknown key 'growth_rat'; did you mean 'growth_rate'?",
        f"{path}:6:10: error: bn_size: expected greater than 0, got -1",
        f"{path}:7:14: error: compression: expected less than or equal to 1, got 1.5",
        f"{path}:8:14: error: stem.kind: expected 'imagenet', 'cifar' or 'deep', got 'imagnet'; "
        "did you mean 'imagenet'?",
        f"{path}:9:13: error: blocks.1.layers: expected greater than 0, got 0",
    ]
    assert "more error" not in result.stderr


def test_a_misspelt_required_key_is_one_error_not_two(tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text("version: 1\ninput: {size: [64, 64]}\ngrowth_rat: 12\nblocks: [2]\n")
    result = run_dnc("validate", path)
    assert result.stderr.splitlines() == [f"{path}:3:1: error: unknown key 'growth_rat'; did you mean 'growth_rate'?"]


def test_a_missing_field_beside_other_errors(tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text("version: 1\ninput: {size: [64, 64]}\nblocks: [2, -1]\n")
    lines = run_dnc("validate", path).stderr.splitlines()
    assert lines == [
        f"{path}:1:1: error: missing required field 'growth_rate'",
        f"{path}:3:13: error: blocks.1.layers: expected greater than 0, got -1",
    ]


def test_errors_are_capped(tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text("version: 1\ninput: {size: [64, 64]}\ngrowth_rate: 12\nblocks:\n" + "  - 0\n" * 25)
    lines = run_dnc("validate", path).stderr.splitlines()
    assert len(lines) == 21
    assert lines[0] == f"{path}:5:5: error: blocks.0.layers: expected greater than 0, got 0"
    assert lines[19].startswith(f"{path}:24:5: error: blocks.19.layers")
    assert lines[20] == "… and 5 more errors"


def test_each_spec_gets_its_own_errors(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("version: 1\ninput: {size: [64, 64]}\ngrowth_rate: 0\nblocks: [0]\n")
    b.write_text("version: 1\ninput: {size: [64, 64]}\ngrowth_rate: 12\nblocks: [2]\n")
    result = run_dnc("validate", a, b)
    assert result.returncode == 2
    assert result.stdout.splitlines() == [f"{b}: ok (b)"]
    assert [line.split(": error")[0] for line in result.stderr.splitlines()] == [f"{a}:3:14", f"{a}:4:10"]


def test_other_commands_list_every_error_too(tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text(MANY)
    result = run_dnc("summary", path)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 6
    assert "Traceback" not in result.stderr

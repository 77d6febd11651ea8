"""The front-half CLI (validate, summary, resolve, schema), run as a user runs it.

Every bad input must give one line `file:line:col: error: ...` on stderr and exit 2.
"""

from __future__ import annotations

import json

import pytest
from conftest import ALL_SPECS, dnc_cli, run_dnc, spec_path

GOOD = """\
version: 1
input:
  size: [64, 64]
growth_rate: 12
blocks: [2, 3]
"""


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# (what is wrong, spec text, expected "line:col", expected message part)
BAD_SPECS = [
    (
        "unknown key",
        GOOD.replace("growth_rate", "growth_rat"),
        "4:1",
        "unknown key 'growth_rat'; did you mean 'growth_rate'?",
    ),
    (
        "unknown nested key",
        GOOD.replace("  size:", "  sise:"),
        "3:3",
        "unknown key 'sise' in 'input'; did you mean 'size'?",
    ),
    (
        "wrong type",
        GOOD.replace("growth_rate: 12", "growth_rate: twelve"),
        "4:14",
        "growth_rate: expected a valid integer, got 'twelve'",
    ),
    (
        "impossible value",
        GOOD.replace("growth_rate: 12", "growth_rate: -3"),
        "4:14",
        "growth_rate: expected greater than 0, got -3",
    ),
    ("bad block", GOOD.replace("[2, 3]", "[2, 0]"), "5:13", "blocks.1.layers: expected greater than 0, got 0"),
    ("misspelt choice", GOOD + "stem: {kind: imagnet}\n", "6:14", "did you mean 'imagenet'?"),
    (
        "compression out of range",
        GOOD + "compression: 1.5\n",
        "6:14",
        "compression: expected less than or equal to 1, got 1.5",
    ),
    ("duplicate key", GOOD + "growth_rate: 24\n", "6:1", 'duplicate key "growth_rate"'),
    ("YAML syntax", "version: 1\ninput: [\n", "3:1", "expected the node content"),
    ("not a mapping", "- 1\n- 2\n", "1:1", "expected a mapping of spec fields"),
    ("missing field", GOOD.replace("growth_rate: 12\n", ""), "1:1", "missing required field 'growth_rate'"),
    (
        "missing version",
        GOOD.replace("version: 1\n", ""),
        "1:1",
        "missing required field 'version' (expected version: 1)",
    ),
    ("wrong version", GOOD.replace("version: 1", "version: 2"), "1:10", "version: expected 1, got 2"),
    ("bad size", GOOD.replace("[64, 64]", "[64]"), "3:9", "input.size: expected at least 2 items, got 1"),
    (
        "cross-field rule",
        GOOD.replace("[2, 3]", "[2, {layers: 3, compression: 0.3}]"),
        "5:38",
        "blocks.1.compression: the last block has no transition after it",
    ),
    (
        "mid_width on another stem",
        GOOD + "stem: {kind: cifar, mid_width: 8}\n",
        "6:32",
        "mid_width applies only to the deep stem",
    ),
    (
        "input too small",
        GOOD.replace("[64, 64]", "[4, 4]"),
        "5:10",
        "stage transition1: features.transition1.pool (avgpool) would shrink 1 to nothing (2x2 window, stride 2) "
        "(input 44x1x1); network input 3x4x4",
    ),
    ("bad name", GOOD + "name: DenseNet-X\n", "6:7", "name: expected a lower-case identifier"),
]


@pytest.mark.parametrize(("what", "text", "position", "message"), BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_spec_gives_one_line_with_position_and_exit_2(tmp_path, what, text, position, message):
    path = tmp_path / "net.yaml"
    path.write_text(text)
    for command in ("validate", "summary"):
        line = one_error_line(dnc_cli(command, path))
        assert line.startswith(f"{path}:{position}: error: "), line
        assert message in line, line


def test_bad_name_from_file_name_says_so(tmp_path):
    path = tmp_path / "Dense-Net.yaml"
    path.write_text(GOOD)
    line = one_error_line(dnc_cli("validate", path))
    assert "the name defaults to the file name" in line


def test_extends_errors(tmp_path):
    (tmp_path / "loop_a.yaml").write_text("version: 1\nextends: loop_b.yaml\n")
    (tmp_path / "loop_b.yaml").write_text("version: 1\nextends: loop_a.yaml\n")
    line = one_error_line(dnc_cli("validate", tmp_path / "loop_a.yaml"))
    assert "loop_b.yaml:2:10: error: extends: cycle loop_a.yaml -> loop_b.yaml -> loop_a.yaml" in line
    (tmp_path / "orphan.yaml").write_text("version: 1\nextends: nowhere.yaml\n")
    line = one_error_line(dnc_cli("validate", tmp_path / "orphan.yaml"))
    assert "orphan.yaml:2:10: error: extends: no such file 'nowhere.yaml'" in line


def test_error_in_a_parent_points_into_the_parent(tmp_path):
    (tmp_path / "parent.yaml").write_text(GOOD.replace("growth_rate: 12", "growth_rate: 0"))
    (tmp_path / "child.yaml").write_text("version: 1\nextends: parent.yaml\n")
    line = one_error_line(dnc_cli("validate", tmp_path / "child.yaml"))
    assert line.startswith(f"{tmp_path / 'parent.yaml'}:4:14: error: growth_rate:")


def test_bad_overrides(tmp_path):
    spec = spec_path("densenet121")
    assert one_error_line(dnc_cli("summary", spec, "--set", "growth_rate=abc")) == (
        "--set growth_rate=abc: error: growth_rate: expected a valid integer, got 'abc'"
    )
    assert "no such field" in one_error_line(dnc_cli("summary", spec, "--set", "blocks.9=3"))
    assert "expected --set path.to.field=value" in one_error_line(dnc_cli("summary", spec, "--set", "growth_rate"))
    assert "unknown key 'growth'" in one_error_line(dnc_cli("summary", spec, "--set", "growth=3"))
    assert one_error_line(dnc_cli("summary", spec, "--set", "stem=cifar")) == (
        "--set stem=cifar: error: stem: expected a mapping of fields, got 'cifar'"
    )


def test_missing_file():
    assert one_error_line(run_dnc("validate", "no/such.yaml")) == "no/such.yaml: error: no such file"


def test_validate_reports_each_spec_and_fails_if_any_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("growth_rate: 12", "growth_rate: 0"))
    result = dnc_cli("validate", spec_path("densenet121"), bad, spec_path("densenet169"))
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        f"{spec_path('densenet121')}: ok (densenet121)",
        f"{spec_path('densenet169')}: ok (densenet169)",
    ]
    assert result.stderr.count("\n") == 1 and "bad.yaml:4:14" in result.stderr
    ok = dnc_cli("validate", *ALL_SPECS)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count(": ok (") == len(ALL_SPECS)


def test_summary_json_document():
    result = dnc_cli("summary", spec_path("densenet121"), "--format", "json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["name"] == "densenet121"
    assert (doc["params"], doc["macs"], doc["output_shape"]) == (7_978_856, 2_834_161_664, [1000])
    assert [s["stage"] for s in doc["stages"]] == [
        "stem",
        *[f"{kind}{i}" for i in (1, 2, 3) for kind in ("denseblock", "transition")],
        "denseblock4",
        "head",
    ]
    assert doc["stages"][1]["output_shape"] == [256, 56, 56] and doc["stages"][1]["layers"] == 6
    assert sum(s["params"] for s in doc["stages"]) == doc["params"]


def test_summary_table_has_every_stage_and_totals():
    result = dnc_cli("summary", spec_path("densenet264"))
    assert result.returncode == 0, result.stderr
    for text in ("stem", "denseblock3", "transition3", "denseblock4", "head", "33,337,704", "5,751,653,376", "(33.3M)"):
        assert text in result.stdout, text


def test_summary_notes_a_pool_that_drops_a_row():
    result = dnc_cli("summary", spec_path("densenet121"), "--set", "input.size=[200, 200]")
    assert result.returncode == 0
    assert "note: features.transition2.pool: 25x25 does not divide by its 2x2/2 window" in result.stdout


def test_validate_and_summary_import_no_torch():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from dnc.cli import main\n"
        "for args in (['validate', 'specs/densenet264.yaml'], ['summary', 'specs/densenet264.yaml'],"
        " ['summary', '--format', 'json', 'specs/densenet121.yaml'], ['resolve', 'specs/densenet169.yaml']):\n"
        "    assert CliRunner().invoke(main, args).exit_code == 0, args\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'onnx', 'onnxruntime')))\n"
    )
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_resolve_prints_a_spec_that_loads_to_the_same_network(tmp_path):
    result = dnc_cli("resolve", spec_path("densenet169"), "--set", "blocks.2.growth_rate=48")
    assert result.returncode == 0, result.stderr
    resolved = tmp_path / "densenet169.yaml"
    resolved.write_text(result.stdout)
    assert "extends" not in result.stdout and "growth_rate: 48" in result.stdout
    again = dnc_cli("resolve", resolved)
    assert again.stdout == result.stdout
    a = json.loads(dnc_cli("summary", resolved, "--format", "json").stdout)
    b = json.loads(
        dnc_cli("summary", spec_path("densenet169"), "--set", "blocks.2.growth_rate=48", "--format", "json").stdout
    )
    assert a == b


def test_schema_is_a_json_schema_of_the_format():
    result = dnc_cli("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["version"]  # the rest only without extends: tests/test_schema.py
    assert set(schema["then"]["required"]) == {"input", "growth_rate", "blocks"}
    assert "name" not in schema["required"]
    for key in ("extends", "stem", "bn_size", "compression", "drop_rate", "dropout_at", "head", "memory_efficient"):
        assert key in schema["properties"], key
    assert schema["$defs"]["Stem"]["properties"]["kind"]["enum"] == ["imagenet", "cifar", "deep"]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["summary"], "dnc summary: error: Missing argument 'SPEC'. (see dnc summary --help)"),
        (["frobnicate"], "dnc: error: No such command 'frobnicate'. (see dnc --help)"),
        (
            ["summary", "specs/densenet121.yaml", "--format", "xml"],
            "dnc summary: error: Invalid value for '--format': 'xml' is not one of 'table', 'json'. "
            "(see dnc summary --help)",
        ),
        (
            ["validate", "specs/densenet121.yaml", "--sett", "x=1"],
            "dnc validate: error: No such option '--sett'. Did you mean '--set'?",
        ),
    ],
)
def test_usage_errors_are_one_line_too(args, line):
    assert one_error_line(run_dnc(*args)).startswith(line)


def test_help_and_version_exit_0():
    assert run_dnc("--help").returncode == 0
    assert run_dnc("compile", "--help").returncode == 0
    version = run_dnc("--version")
    assert version.returncode == 0 and version.stdout == "dnc, version 0.2.0\n"


def test_a_pass_both_asked_for_and_refused_is_one_line():
    line = one_error_line(
        dnc_cli("summary", "specs/densenet121.yaml", "--pass", "pool_first", "--no-pass", "pool_first")
    )
    assert line == "dnc: error: --pass pool_first and --no-pass pool_first contradict each other: give one"


def test_echoed_text_is_cut_at_200_characters_a_word():
    name = "p" * 100_000
    line = one_error_line(dnc_cli("ir", "specs/densenet121.yaml", "--pass", name))
    assert line == (
        f"dnc: error: unknown pass '{'p' * 99}…(99,803 characters cut)…{'p' * 98}': "
        "expected one of pool_first, share_bn_stats, measure_1x1, fold_conv_bn, fuse_bn_relu, fold_preact_bn, "
        "block_buffer, batch_tile, pack_weights, channels_last"
    )
    spaced = one_error_line(dnc_cli("ir", "specs/densenet121.yaml", "--target", "x " * 50_000))
    assert len(spaced) <= 1000 and spaced.endswith("more characters)")


def test_summary_batch_is_bounded_before_any_figure():
    line = one_error_line(dnc_cli("summary", "specs/densenet121.yaml", "--batch", str(10**311)))
    assert line.startswith("dnc summary: error: Invalid value for '--batch': 1000")
    assert "is not in the range 1<=x<=1000000000" in line and "characters cut" in line


def test_summary_batch_names_the_pass_that_makes_a_network_inference_only():
    result = dnc_cli("summary", "specs/densenet121.yaml", "--pass", "fold_preact_bn", "--batch", "2")
    assert one_error_line(result) == (
        "dnc: error: --batch estimates training memory, but pass fold_preact_bn makes the network inference-only "
        "(it is exact in eval mode only): run only passes that keep training (-O0 or -O1, without --pass "
        "fold_preact_bn)"
    )
    assert "pass fold_conv_bn makes" in one_error_line(
        dnc_cli("summary", "specs/densenet121.yaml", "-O2", "--batch", "2")
    )


def test_summary_title_says_which_passes_ran():
    assert dnc_cli("summary", "specs/densenet121.yaml", "-O2").stdout.startswith("densenet121 -O2  (input 3x224x224)")
    both = dnc_cli("summary", "specs/densenet121.yaml", "-O1", "--no-pass", "pool_first")
    assert both.stdout.startswith("densenet121 -O1 --no-pass pool_first  (input")
    assert dnc_cli("summary", "specs/densenet121.yaml").stdout.startswith("densenet121  (input")


def test_bare_dnc_prints_clicks_usage_on_several_lines():
    result = run_dnc()
    assert result.returncode == 2  # as click does for a group without a command
    lines = result.stderr.splitlines()
    assert lines[0] == "Usage: dnc [OPTIONS] COMMAND [ARGS]..." and "\\n" not in result.stderr
    assert "Commands:" in lines and any(line.strip().startswith("compile ") for line in lines)

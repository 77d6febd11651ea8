"""Hostile input: every file in tests/hostile/ and every trick below is refused cleanly and quickly.

Each refusal is exit 2 with one line on stderr, no traceback, in well under two
seconds, and nothing written. Add a file to tests/hostile/ for each new class of attack.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_dnc, spec_path

from dnc.errors import DncError, SpecError
from dnc.frontend.loader import load_spec

HOSTILE = sorted((Path(__file__).parent / "hostile").glob("*.yaml"))
SMALL = "version: 1\ninput: {size: [32, 32]}\nstem: {kind: cifar, width: 16}\ngrowth_rate: 12\nblocks: [2, 2]\n"
EVIL_NAMES = ["a`b`<img src=x onerror=alert(1)>", "[bold]x[/bold]", "x\nok: fine", "\x1b]0;title\x07", "ab\u202ecd"]


def dnc(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """Run the CLI in this process (fast); return exit code, stdout, stderr."""
    from dnc.cli import run

    monkeypatch.setattr(sys, "argv", ["dnc", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        run()
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def assert_one_line_refusal(code: int, err: str) -> None:
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert not any(ch in err[:-1] for ch in "\x1b\x07\x00\r\u202e"), err


@pytest.mark.parametrize("path", HOSTILE, ids=lambda p: p.stem)
def test_hostile_corpus_is_refused_quickly_with_one_line(path, tmp_path, capsys, monkeypatch):
    spec = tmp_path / path.name  # its own folder: the spec root, with a symlink loop beside it
    shutil.copyfile(path, spec)
    (tmp_path / "loop.yaml").symlink_to("loop.yaml")
    (tmp_path / "README.md").write_text("# not a spec\n")
    out = tmp_path / "out"
    start = time.perf_counter()
    code, _, err = dnc(capsys, monkeypatch, "compile", spec, "-o", out)
    assert time.perf_counter() - start < 2
    assert_one_line_refusal(code, err)
    assert not out.exists()
    assert "root:" not in err and "localhost" not in err  # nothing of a file read by mistake


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "directory", "oversized"])
def test_spec_files_of_the_wrong_kind_or_size_are_refused_without_blocking(kind, tmp_path):
    path = {"dev_zero": Path("/dev/zero"), "directory": tmp_path}.get(kind, tmp_path / "spec.yaml")
    if kind == "fifo":
        os.mkfifo(path)
    if kind == "oversized":
        path.write_text(SMALL + "# " + "x" * (300 << 10) + "\n")
    done = run_dnc("validate", path)
    assert_one_line_refusal(done.returncode, done.stderr)
    assert {"dev_zero": "character device", "fifo": "FIFO", "directory": "directory", "oversized": "256 KiB"}[
        kind
    ] in done.stderr


def test_extends_stays_inside_the_spec_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (outside / "base.yaml").write_text(SMALL)
    (root / "secret.yaml").write_text("password: hunter2\n")
    (root / "link.yaml").symlink_to(outside / "base.yaml")
    cases = {
        "../outside/base.yaml": "outside the spec root",
        str(outside / "base.yaml"): "outside the spec root",
        "link.yaml": "symbolic link that leaves",
        "secret.yaml": "is not a dnc spec",
    }
    for target, message in cases.items():
        child = root / "child.yaml"
        child.write_text(f"version: 1\nextends: {target}\n")
        with pytest.raises(SpecError, match=message) as err:
            load_spec(child)
        assert "hunter2" not in str(err.value) and "password" not in str(err.value)
    child.write_text("version: 1\nextends: ../outside/base.yaml\n")
    assert load_spec(child, roots=[outside]).growth_rate == 12  # --spec-root widens it


def test_extends_finds_the_git_work_tree_as_the_root(tmp_path):
    (tmp_path / ".git").mkdir()
    (tmp_path / "base.yaml").write_text(SMALL)
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "child.yaml").write_text("version: 1\nextends: ../base.yaml\n")
    assert load_spec(tmp_path / "specs" / "child.yaml").growth_rate == 12


def test_set_indexes_are_ascii_digits_and_many_overrides_are_fast(tmp_path):
    spec = tmp_path / "net.yaml"
    spec.write_text(SMALL)
    with pytest.raises(SpecError, match="nothing at 'blocks.\u0663'|no such field"):
        load_spec(spec, ["blocks.\u0663.layers=4"])
    start = time.perf_counter()
    with pytest.raises(SpecError, match="unknown key"):
        load_spec(spec, [f"head.x{i}=1" for i in range(10_000)])
    assert time.perf_counter() - start < 5


def test_a_block_of_2000_layers_is_refused_at_once(tmp_path):
    spec = tmp_path / "net.yaml"
    spec.write_text(SMALL.replace("[2, 2]", "[2000]"))
    start = time.perf_counter()
    with pytest.raises(DncError, match="layers_per_block limit"):
        from dnc.pipeline import build

        build(spec)
    assert time.perf_counter() - start < 1


def test_bad_option_values_and_revisions_are_one_line(tmp_path, capsys, monkeypatch):
    code, _, err = dnc(capsys, monkeypatch, "compile", "--target", "onnx", "--seed", "-1", spec_path("densenet121"))
    assert_one_line_refusal(code, err)
    code, _, err = dnc(capsys, monkeypatch, "validate", spec_path("densenet121"), "--limit", "layers=lots")
    assert_one_line_refusal(code, err)
    victim = tmp_path / "written"
    code, _, err = dnc(capsys, monkeypatch, "diff", f"--output={victim}:x.yaml", spec_path("densenet121"))
    assert code == 2 and not victim.exists()
    code, _, err = dnc(capsys, monkeypatch, "diff", "--", f"--output={victim}:specs/densenet121.yaml", "specs/x.yaml")
    assert_one_line_refusal(code, err)
    assert "cannot start with '-'" in err and not victim.exists()


def test_a_closed_output_pipe_exits_quietly():
    done = subprocess.run(
        f"{sys.executable} -m dnc resolve specs/densenet121.yaml | head -c1",
        shell=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert done.stdout == "#" or len(done.stdout) == 1
    assert done.stderr == ""


# -- one test per output format, with hostile names ------------------------------------


@pytest.mark.parametrize("name", EVIL_NAMES)
def test_error_lines_show_hostile_file_names_visibly(name, tmp_path, capsys, monkeypatch):
    path = tmp_path / f"{name.replace('/', '_')}.yaml"  # a file name cannot hold a slash
    path.write_text(SMALL + "name: net\nbogus: 1\n")  # one error: the name is not the file's
    code, _, err = dnc(capsys, monkeypatch, "validate", path)
    assert_one_line_refusal(code, err)
    assert "unknown key 'bogus'" in err


def test_unknown_keys_with_escapes_cannot_forge_lines(tmp_path, capsys, monkeypatch):
    path = tmp_path / "net.yaml"
    path.write_text(SMALL + '"x\\nnet.yaml: ok (net)": 1\n')
    code, _, err = dnc(capsys, monkeypatch, "validate", path)
    assert_one_line_refusal(code, err)
    assert "x\\nnet.yaml: ok" in err


def side(source: str, tmp_path):
    from dnc.reports.diff import load_side

    spec = tmp_path / "net.yaml"
    spec.write_text(SMALL)
    s = load_side(str(spec))
    return dataclasses.replace(s, source=source)


@pytest.mark.parametrize("name", EVIL_NAMES)
def test_markdown_escapes_hostile_sources(name, tmp_path):
    from dnc.reports.diff import compare
    from dnc.reports.diff_report import to_markdown

    a = side(name, tmp_path)
    b = side(name + "2", tmp_path)
    text = to_markdown(compare(a, b))
    head = text.splitlines()[0]
    assert head.startswith("### <code>") and "<img" not in text and "`" not in head
    assert "\x1b" not in text and "\u202e" not in text and "[bold]" not in text.replace("\\[bold\\]", "")


@pytest.mark.parametrize("name", EVIL_NAMES)
def test_rich_output_escapes_hostile_sources(name, tmp_path):
    from rich.console import Console

    from dnc.reports.diff import compare
    from dnc.reports.render import diff_text

    a = side(name, tmp_path)
    spec = tmp_path / "net.yaml"
    from dnc.reports.diff import load_side

    b = load_side(str(spec), ["growth_rate=8"])
    console = Console(record=True, width=200, force_terminal=False)
    diff_text(compare(a, b), console)
    text = console.export_text()
    first = text.splitlines()[0]
    assert first.startswith("A: ") and "\x1b" not in text and "\u202e" not in text
    if "[bold]" in name:
        assert "[bold]x[/bold]" in first  # shown, not applied


@pytest.mark.parametrize("fmt", ["dot", "mermaid"])
@pytest.mark.parametrize("name", EVIL_NAMES)
def test_graph_labels_escape_hostile_names(fmt, name, tmp_path):
    from dnc.pipeline import build
    from dnc.reports.pictures import picture, render_text

    spec = tmp_path / "net.yaml"
    spec.write_text(SMALL)
    p = picture(build(spec)[1])
    p.units[1].lines.append(name)
    text = render_text(p.__class__(name, p.units, p.clusters, p.edges), fmt)
    assert "\x1b" not in text and "\u202e" not in text and "\nok: fine" not in text
    if fmt == "mermaid":
        assert "<img" not in text and "`" not in text and "[bold]" not in text


def test_the_named_spec_may_not_link_out_of_its_root(tmp_path, capsys, monkeypatch):
    """The root comes from where the named path stands; where a link leads must be inside it."""
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    (repo / "specs").mkdir(parents=True)
    (repo / ".git").mkdir()
    outside.mkdir()
    (outside / "secret.yaml").write_text("version: 1\npassword: hunter2\n")
    (repo / "specs" / "net.yaml").symlink_to(outside / "secret.yaml")
    (repo / "linked").symlink_to(outside)  # a folder on the way that leads out
    for named in (repo / "specs" / "net.yaml", repo / "linked" / "secret.yaml"):
        code, _, err = dnc(capsys, monkeypatch, "validate", named)
        assert_one_line_refusal(code, err)
        assert err == f"{named}: error: leaves the spec root {repo} through a symbolic link (see --spec-root)\n"
    code, _, err = dnc(capsys, monkeypatch, "validate", repo / "specs" / "net.yaml", "--spec-root", outside)
    assert code == 2 and "password" in err  # --spec-root lets it in: then it is read, and its error is its own
    (outside / "secret.yaml").write_text(SMALL)
    (repo / "specs" / "inside.yaml").symlink_to("../base.yaml")  # a link that stays inside keeps working
    (repo / "base.yaml").write_text(SMALL)
    code, out, err = dnc(capsys, monkeypatch, "validate", repo / "specs" / "inside.yaml")
    assert code == 0, err


def test_a_spec_file_name_that_is_not_utf8_compiles_to_onnx_under_lc_all_c(tmp_path):
    import onnx

    spec = tmp_path / os.fsdecode(b"n\xff.yaml")  # a byte no UTF-8 decoder accepts
    spec.write_text(SMALL + "name: n\n")
    done = run_dnc("compile", spec.name, "--target", "onnx", "-o", tmp_path / "out", cwd=tmp_path, env={"LC_ALL": "C"})
    assert done.returncode == 0, done.stderr
    model = onnx.load(str(tmp_path / "out" / "n.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["dnc.spec"] == "n\\udcff.yaml" and "n\\udcff.yaml" in model.doc_string


def test_an_input_side_beyond_int64_is_an_onnx_error_not_a_crash(capsys, monkeypatch, tmp_path):
    side = 2**63
    args = ["--set", f"input.size=[{side}, 32]", "--limit", f"input_size={side}", "--limit", f"macs={10**39}"]
    code, _, err = dnc(
        capsys, monkeypatch, "compile", spec_path("densenet40_k12"), "--target", "onnx", *args, "-o", tmp_path
    )
    assert_one_line_refusal(code, err)
    assert err == f"dnc: error: the input shape 3x{side}x32 does not fit ONNX's int64 dimensions\n"
    assert list(tmp_path.iterdir()) == []

"""Outputs are files dnc owns: kinds refused, writes all-or-nothing, temporaries cleaned, modes kept."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ROOT, dnc_cli, run_dnc, spec_path

from dnc.errors import EmitError
from dnc.targets.outputs import TMP_MARK, write_outputs


def test_devices_fifos_symlinks_and_directories_are_refused(tmp_path):
    fifo = tmp_path / "fifo.py"
    os.mkfifo(fifo)
    link = tmp_path / "zero.py"
    link.symlink_to("/dev/zero")
    folder = tmp_path / "folder.py"
    folder.mkdir()
    for path, kind in [
        (Path("/dev/null"), "character device"),
        (fifo, "FIFO"),
        (link, "symbolic link"),
        (folder, "directory"),
    ]:
        start = time.perf_counter()
        with pytest.raises(EmitError, match=kind):
            write_outputs({path: b"x"}, path.parent)
        assert time.perf_counter() - start < 1
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and folder.is_dir()


def test_graph_to_dev_null_leaves_the_device(tmp_path):
    done = run_dnc("graph", spec_path("densenet40_k12"), "-o", "/dev/null")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_all_or_nothing_and_the_mode_is_kept(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b" / "b.py"
    a.write_bytes(b"old")
    a.chmod(0o640)
    b.parent.mkdir()
    b.parent.chmod(0o500)  # b cannot be written
    try:
        if os.access(b.parent, os.W_OK):
            pytest.skip("running as root: a read-only folder is writable")
        with pytest.raises(EmitError):
            write_outputs({a: b"new", b: b"new"}, tmp_path, force=True)
        assert a.read_bytes() == b"old"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.py", "b"]
    finally:
        b.parent.chmod(0o700)
    write_outputs({a: b"new"}, tmp_path, force=True)
    assert a.read_bytes() == b"new" and stat.S_IMODE(a.stat().st_mode) == 0o640


def test_a_rename_failure_leaves_every_old_file(tmp_path, monkeypatch):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_bytes(b"old a")
    b.write_bytes(b"old b")
    real = os.replace
    calls = []

    def replace(src, dst, **folders):
        calls.append(dst)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        real(src, dst, **folders)

    monkeypatch.setattr("dnc.targets.outputs.os.replace", replace)
    with pytest.raises(EmitError, match="No space left"):
        write_outputs({a: b"new a", b: b"new b"}, tmp_path, force=True)
    assert a.read_bytes() == b"old a" and b.read_bytes() == b"old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.py", "b.py"]


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from dnc.targets.outputs import write_outputs
    path = Path(sys.argv[1])
    write_outputs({path: b"n" * (400 << 20)}, path.parent, force=True)
    """
)


def start_writer(path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=env)


def wait_for_temporary(folder: Path, timeout: float = 30) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        temps = [p for p in folder.iterdir() if TMP_MARK in p.name]
        if temps and temps[0].stat().st_size > (1 << 20):
            return temps
        time.sleep(0.01)
    pytest.fail("the writer made no temporary")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_mid_write_remove_the_temporary(tmp_path, sig):
    path = tmp_path / "big.onnx"
    path.write_bytes(b"old")
    writer = start_writer(path)
    wait_for_temporary(tmp_path)
    writer.send_signal(sig)
    writer.wait(timeout=30)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["big.onnx"]


def test_sigkill_mid_write_leaves_the_old_file_and_the_next_run_cleans_up(tmp_path):
    path = tmp_path / "big.onnx"
    path.write_bytes(b"old")
    writer = start_writer(path)
    (temp,) = wait_for_temporary(tmp_path)
    writer.kill()
    writer.wait(timeout=30)
    assert path.read_bytes() == b"old"
    assert temp.exists() and f"{TMP_MARK}{writer.pid}." in temp.name  # recognisable: name and pid
    write_outputs({path: b"new"}, tmp_path, force=True)
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["big.onnx"]


def test_concurrent_compiles_leave_a_whole_file(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "dnc", "compile", str(spec_path("densenet40_k12")), "-o", str(out)]
    runs = [
        subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(3)
    ]
    for run in runs:
        assert run.wait(timeout=120) == 0, run.stderr.read()
    check = subprocess.run([*args, "--check"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr  # whole, and what one compile writes
    assert [p.name for p in out.iterdir()] == ["densenet40_k12.py"]


# -- where outputs go, and whose files they replace ------------------------------------


def work_tree(tmp_path: Path) -> Path:
    """A git work tree (as dnc finds one: a `.git` entry) holding one spec."""
    repo = tmp_path / "repo"
    (repo / "specs").mkdir(parents=True)
    (repo / ".git").mkdir()
    (repo / "specs" / "net.yaml").write_text(spec_path("densenet40_k12").read_text())
    return repo


def test_a_default_folder_linked_out_of_the_work_tree_is_refused(tmp_path):
    repo, outside = work_tree(tmp_path), tmp_path / "outside"
    outside.mkdir()
    (repo / "generated").symlink_to(outside)  # committed as a link by a pull request
    done = dnc_cli("compile", cwd=repo)
    assert done.returncode == 2
    assert done.stderr == (
        f"generated/net.py: error: its folder leads out of {repo} through a symbolic link (to {outside}); "
        "dnc writes only inside it\n"
    )
    assert list(outside.iterdir()) == []
    deeper = dnc_cli("compile", "--target", "onnx", cwd=repo)  # build/onnx/, through a linked build/
    assert deeper.returncode == 0, deeper.stderr
    (repo / "build").rename(tmp_path / "build")
    (repo / "build").symlink_to(tmp_path / "build")
    deeper = dnc_cli("compile", "--target", "onnx", cwd=repo)
    assert deeper.returncode == 2 and "build/onnx/net.onnx: error: its folder leads out of" in deeper.stderr


def test_links_that_stay_inside_keep_working(tmp_path):
    repo = work_tree(tmp_path)
    (repo / "shared" / "gen").mkdir(parents=True)
    (repo / "generated").symlink_to("shared/gen")  # a monorepo folder inside the work tree
    assert dnc_cli("compile", cwd=repo).returncode == 0
    assert (repo / "shared" / "gen" / "net.py").is_file()
    (tmp_path / "real").mkdir()
    (tmp_path / "tmp").symlink_to(tmp_path / "real")  # a symlinked /tmp
    linked = dnc_cli("compile", "specs/net.yaml", "-o", tmp_path / "tmp" / "out", cwd=repo)
    assert linked.returncode == 0, linked.stderr
    assert (tmp_path / "real" / "out" / "net.py").is_file()
    (tmp_path / "checkout").symlink_to(repo)  # the work tree itself reached through a link
    also = dnc_cli("compile", "--target", "onnx", cwd=tmp_path / "checkout")
    assert also.returncode == 0, also.stderr
    assert (repo / "build" / "onnx" / "net.onnx").is_file()


def test_a_folder_swapped_for_a_link_after_the_check_is_caught(tmp_path, monkeypatch):
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    (inside / "gen").symlink_to(outside)
    monkeypatch.setattr("dnc.targets.outputs._check_inside", lambda *args: None)  # as if swapped after it
    with pytest.raises(EmitError, match="left .* while it was being written"):
        write_outputs({inside / "gen" / "a.py": b"x"}, inside)
    assert list(outside.iterdir()) == []


def test_a_file_dnc_did_not_write_is_replaced_only_with_force(tmp_path):
    setup = tmp_path / "setup.py"
    setup.write_text("from setuptools import setup\nsetup()\n")
    args = ("compile", spec_path("densenet40_k12"), "--set", "name=setup", "-o", tmp_path)
    refused = dnc_cli(*args)
    assert refused.returncode == 2
    assert refused.stderr == (
        f"{setup}: error: exists and dnc did not write it (it has no '@generated by dnc' mark): "
        "dnc replaces only files it generated; pass --force to replace it\n"
    )
    assert setup.read_text() == "from setuptools import setup\nsetup()\n"
    assert dnc_cli(*args, "--force").returncode == 0
    assert setup.read_text().startswith("# @generated by dnc")
    again = dnc_cli(*args, "--set", "growth_rate=6")  # its own file now: no --force needed
    assert again.returncode == 0, again.stderr
    assert "growth=6" in setup.read_text()


def test_graph_replaces_only_its_own_pictures(tmp_path):
    out = tmp_path / "net.dot"
    out.write_text("digraph mine { a -> b }\n")
    refused = dnc_cli("graph", spec_path("densenet40_k12"), "-o", out)
    assert refused.returncode == 2 and "exists and dnc did not write it" in refused.stderr
    assert dnc_cli("graph", spec_path("densenet40_k12"), "-o", out, "--force").returncode == 0
    assert dnc_cli("graph", spec_path("densenet40_k12"), "-o", out, "--detail", "layer").returncode == 0
    assert "denselayer12" in out.read_text()


def test_every_format_dnc_writes_carries_its_mark(tmp_path):
    from dnc.pipeline import build
    from dnc.reports.pictures import picture, render_image, render_text
    from dnc.targets import TARGETS
    from dnc.targets.provenance import made_by_dnc

    _, graph = build(spec_path("densenet40_k12"), ["blocks=[2, 2]"])
    made = {name: t.emit(graph, {}) for name, t in TARGETS.items()}
    made |= {fmt: render_text(picture(graph), fmt).encode() for fmt in ("dot", "mermaid")}
    if shutil.which("dot"):
        made |= {fmt: render_image(made["dot"].decode(), fmt) for fmt in ("svg", "png")}
    assert {name for name, data in made.items() if made_by_dnc(data[:4096])} == set(made)
    import onnx

    theirs = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []), producer_name="pytorch")
    for data in (
        b"",
        b"from setuptools import setup\n",
        b"\n" * 6 + b"# @generated by dnc\n",  # the mark below the first lines
        b"x = '# @generated by dnc'\n",
        theirs.SerializeToString(),
        made["png"][:33] if "png" in made else b"\x89PNG\r\n\x1a\n",
    ):
        assert not made_by_dnc(data), data[:40]


def test_o_naming_a_file_writes_that_file_and_its_header_regenerates_it(tmp_path):
    out = tmp_path / "d40.py"
    done = dnc_cli("compile", "specs/densenet40_k12.yaml", "-o", out)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{out}: written\n" and out.is_file()
    regenerate = out.read_text().splitlines()[3]
    command = shlex.split(regenerate.removeprefix("# Regenerate: ").removesuffix("  # noqa: E501"))
    assert command == ["dnc", "compile", "specs/densenet40_k12.yaml", "--target", "torch", "-o", str(out)]
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "generated").iterdir()}
    again = dnc_cli(*command[1:])
    assert again.returncode == 0 and again.stdout == f"{out}: unchanged\n"
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "generated").iterdir()} == before
    assert dnc_cli("compile", "specs/densenet40_k12.yaml", "-o", out, "--check").returncode == 0
    two = dnc_cli("compile", "specs/densenet40_k12.yaml", "specs/densenet121.yaml", "-o", tmp_path / "x.py")
    assert two.returncode == 2
    assert two.stderr == (
        f"dnc: error: -o {tmp_path / 'x.py'}: a .py file holds one network: give exactly one spec, or -o a folder\n"
    )


def test_check_judges_where_a_file_is_not_where_its_header_says(tmp_path):
    (tmp_path / "a").mkdir()
    assert dnc_cli("compile", "specs/densenet40_k12.yaml", "-o", tmp_path / "a").returncode == 0
    (tmp_path / "a").rename(tmp_path / "b")  # its Regenerate command would now write elsewhere
    moved = dnc_cli("compile", "specs/densenet40_k12.yaml", "-o", tmp_path / "b", "--check")
    assert moved.returncode == 1 and "densenet40_k12.py: stale" in moved.stderr

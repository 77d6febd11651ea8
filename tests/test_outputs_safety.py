"""Outputs are files dnc owns: kinds refused, writes all-or-nothing, temporaries cleaned, modes kept."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_dnc, spec_path

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
            write_outputs({path: b"x"})
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
            write_outputs({a: b"new", b: b"new"})
        assert a.read_bytes() == b"old"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.py", "b"]
    finally:
        b.parent.chmod(0o700)
    write_outputs({a: b"new"})
    assert a.read_bytes() == b"new" and stat.S_IMODE(a.stat().st_mode) == 0o640


def test_a_rename_failure_leaves_every_old_file(tmp_path, monkeypatch):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_bytes(b"old a")
    b.write_bytes(b"old b")
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr("dnc.targets.outputs.os.replace", replace)
    with pytest.raises(EmitError, match="No space left"):
        write_outputs({a: b"new a", b: b"new b"})
    assert a.read_bytes() == b"old a" and b.read_bytes() == b"old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.py", "b.py"]


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from dnc.targets.outputs import write_outputs
    write_outputs({Path(sys.argv[1]): b"n" * (400 << 20)})
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
    write_outputs({path: b"new"})
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
    expected = (ROOT / "generated" / "densenet40_k12.py").read_bytes()
    assert (out / "densenet40_k12.py").read_bytes() == expected
    assert [p.name for p in out.iterdir()] == ["densenet40_k12.py"]

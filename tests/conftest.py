"""Shared helpers: run the CLI (in a subprocess or in this process), find specs, import generated files."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

# NOTE: one intra-op thread for torch (read when torch starts). The networks under test are
# small; with two threads on two cores, any other load on the machine leaves OpenMP waiting
# at every op's barrier: measured here, a densenet121 forward took 1.6-2.2 s instead of 0.35 s.
# Set OMP_NUM_THREADS yourself to choose otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
ALL_SPECS = sorted(SPECS.glob("*.yaml"))
TORCHVISION_SPECS = ["densenet121", "densenet161", "densenet169", "densenet201", "densenet264"]
CIFAR_SPECS = [p.stem for p in ALL_SPECS if p.stem not in TORCHVISION_SPECS]


def run_dnc(
    *args: str | Path, cwd: Path | None = None, input: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the real `dnc` command line in a subprocess, as a user would; `env` adds variables."""
    path = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "dnc", *map(str, args)],
        cwd=cwd or ROOT,
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=600,
    )


def dnc_cli(
    *args: str | Path, cwd: Path | None = None, input: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the `dnc` command line in this process; the result is shaped like `run_dnc`'s.

    It calls the console entry point itself (`dnc.cli.run`, which turns click's usage
    errors into one line), with argv, stdin, stdout, stderr, the environment and the
    working folder swapped in for the call, so a test reads the same either way; it
    only saves starting an interpreter and importing dnc (and torch) again.
    """
    import gc

    from click.testing import CliRunner

    from dnc.cli import run

    argv = ["dnc", *map(str, args)]
    code: int | str | None = 0
    saved_argv = sys.argv
    with contextlib.chdir(cwd or ROOT), CliRunner().isolation(input=input, env=env) as (out, err, _):
        sys.argv = argv
        try:
            run()
        except SystemExit as stop:
            code = stop.code
        finally:
            sys.argv = saved_argv
            gc.unfreeze()  # the CLI freezes the GC for its own short life; this process goes on
            sys.stdout.flush()
            sys.stderr.flush()
    if not isinstance(code, int):  # sys.exit("message") or sys.exit(None), as the interpreter treats them
        code = 0 if code is None else 1
    return subprocess.CompletedProcess(argv, code, out.getvalue().decode(), err.getvalue().decode())


@pytest.fixture
def write_spec(tmp_path):
    """Write a YAML spec into a temporary folder and return its path."""

    def write(text: str, name: str = "net.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def spec_path(name: str) -> Path:
    return SPECS / f"{name}.yaml"


def import_file(path: Path, name: str | None = None):
    """Import a generated module from its file (kept on disk, so TorchScript can read its source)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name or f"generated_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def compile_levels(folder: Path, spec: str, levels: tuple[int, ...], tag: str):
    """The spec text `spec` compiled for torch at each -O level in `levels` into `folder`, each module imported (as
    `{tag}_{level}`): the modules by level, and the last level's graph."""
    from dnc.ir.passes import select
    from dnc.pipeline import build
    from dnc.targets.torch import emit

    (folder / "spec.yaml").write_text(spec)
    modules = {}
    for level in levels:
        _, graph = build(folder / "spec.yaml", passes=select("torch", level))
        (folder / f"o{level}.py").write_text(emit.emit(graph))
        modules[level] = import_file(folder / f"o{level}.py", f"{tag}_{level}")
    return modules, graph

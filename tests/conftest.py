"""Shared helpers: run the real CLI, find specs, build torchvision references."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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

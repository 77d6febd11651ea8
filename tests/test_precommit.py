"""The pre-commit hooks dnc ships (.pre-commit-hooks.yaml) work on the project's own specs.

Each hook's `entry` runs with its `args` and, unless `pass_filenames: false`, the tracked
files its `files` pattern selects, as pre-commit runs it; then the real thing through
`pre-commit try-repo` where pre-commit is installed, offline: pip installs the hook's environment from
wheels repacked from this environment's installed packages.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT
from ruamel.yaml import YAML

HOOKS = YAML(typ="safe", pure=True).load((ROOT / ".pre-commit-hooks.yaml").read_text())
BY_ID = {hook["id"]: hook for hook in HOOKS}


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def run_hook(hook: dict, cwd=ROOT, files: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run a hook as pre-commit does: entry + args (+ the selected files), in the repository root."""
    entry = shlex.split(hook["entry"])
    assert entry[0] == "dnc", "hooks run the dnc console script"
    selected = [f for f in (files or tracked_files()) if re.search(hook.get("files", ""), f)]
    command = [sys.executable, "-m", "dnc", *entry[1:], *hook.get("args", [])]
    if hook.get("pass_filenames", True):
        assert selected, f"{hook['id']}: its files pattern selects nothing"
        command += selected
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_hooks_are_the_two_documented_ones():
    assert set(BY_ID) == {"dnc-validate", "dnc-compile-check"}
    for hook in HOOKS:
        assert hook["language"] == "python" and hook["name"]
        assert f"id: {hook['id']}" in (ROOT / "README.md").read_text(), "the README shows the config entry"
    assert BY_ID["dnc-compile-check"]["pass_filenames"] is False


def test_validate_hook_on_the_project_specs():
    result = run_hook(BY_ID["dnc-validate"])
    assert result.returncode == 0, result.stderr
    specs = sorted(p.name for p in (ROOT / "specs").glob("*.yaml"))
    assert result.stdout.count(": ok (") == len(specs)


def test_validate_hook_fails_on_a_bad_spec(tmp_path):
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "bad.yaml").write_text("version: 1\ninput: {size: [8, 8]}\ngrowth_rate: 0\nblocks: [0]\n")
    result = run_hook(BY_ID["dnc-validate"], cwd=tmp_path, files=["specs/bad.yaml", "README.md"])
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "specs/bad.yaml:3:14: error: growth_rate: expected greater than 0, got 0",
        "specs/bad.yaml:4:10: error: blocks.0.layers: expected greater than 0, got 0",
    ]


def test_compile_check_hook_on_the_project():
    result = run_hook(BY_ID["dnc-compile-check"])
    assert result.returncode == 0, result.stderr
    assert "generated file(s) up to date" in result.stdout


def test_compile_check_hook_fails_on_a_stale_file(tmp_path):
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    shutil.copytree(ROOT / "generated", tmp_path / "generated")
    stale = tmp_path / "generated" / "densenet121.py"
    stale.write_text(stale.read_text() + "# edited by hand\n")
    result = run_hook(BY_ID["dnc-compile-check"], cwd=tmp_path)
    assert result.returncode == 1
    assert "generated/densenet121.py: stale" in result.stderr


def wheelhouse(folder: Path) -> Path:
    """Wheels of what installing dnc needs (its dependencies, and setuptools to build it), repacked from this
    environment's installed files: pip installs them offline with `--no-index --find-links`.

    A wheel is its files at the root of a zip plus its dist-info; scripts outside site-packages are left out
    (pip writes console scripts from entry_points.txt).
    """
    from importlib import metadata

    from packaging.requirements import Requirement  # pytest's own dependency

    folder.mkdir(parents=True, exist_ok=True)
    found: dict[str, metadata.Distribution] = {}
    todo = [*(Requirement(r).name for r in metadata.requires("dnc") or [] if "extra ==" not in r), "setuptools"]
    while todo:
        dist = metadata.distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in found:
            continue
        found[key] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    for dist in found.values():
        tags = [
            line.split(":", 1)[1].strip()
            for line in (dist.read_text("WHEEL") or "").splitlines()
            if line.startswith("Tag:")
        ]
        if not tags or dist.files is None:
            pytest.skip(f"{dist.metadata['Name']} was not installed from a wheel: no wheelhouse can be made offline")
        name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
        with zipfile.ZipFile(folder / f"{name}-{dist.version}-{tags[0]}.whl", "w", zipfile.ZIP_STORED) as wheel:
            for file in dist.files:
                path = Path(dist.locate_file(file))
                if not str(file).startswith("..") and path.is_file():
                    wheel.write(path, str(file))
    return folder


@pytest.mark.slow
def test_pre_commit_try_repo(tmp_path):
    """The hooks as pre-commit itself installs and runs them, offline: pip reads a wheelhouse of what is installed."""
    pre_commit = shutil.which("pre-commit") or shutil.which("pre-commit", path=os.path.dirname(sys.executable))
    if pre_commit is None:
        pytest.skip("pre-commit is not installed (pip install pre-commit; it is in the dev extra)")
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "specs", repo / "specs")
    shutil.copytree(ROOT / "generated", repo / "generated")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "specs"]):
        subprocess.run([*git, *args], cwd=repo, check=True, capture_output=True)
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse(tmp_path / "wheels")), "PIP_NO_COMPILE": "1"}
    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp_path / "cache"), **offline}
    result = subprocess.run(
        [pre_commit, "try-repo", str(ROOT), "--all-files"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert re.search(r"dnc validate\.+Passed", out), out
    assert re.search(r"dnc compile --check\.+Passed", out), out

"""Generated files: compile specs to their outputs, write them atomically, check them fresh.

Shared by every target. An emitter module has `SUFFIX` (".py", ".onnx") and
`emit(graph, **options) -> str | bytes`, deterministic for the same graph and options.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import networkx as nx

from dnc.errors import EmitError, Location
from dnc.pipeline import build
from dnc.provenance import RECORD_SCAN, read_record


def plan_outputs(
    specs: Sequence[Path],
    overrides: Sequence[str],
    emit: Callable[[nx.DiGraph, dict], bytes],
    options: dict,
    suffix: str,
    out_dir: Path,
    recorded: bool = False,
    passes: Callable[[dict], Sequence] = lambda options: (),
) -> dict[Path, bytes]:
    """Compile every spec in memory: output path -> content. Raises before anything is written.

    With `recorded`, a spec whose output already exists is compiled with the overrides and
    options recorded in that file's header (what `--check` judges it against). `passes`
    gives the optimisation passes for a set of options (see dnc/passes.py).
    """
    outputs: dict[Path, bytes] = {}
    sources: dict[Path, Path] = {}
    for spec_path in specs:
        _, graph = build(display_path(spec_path), overrides, passes(options))
        path = out_dir / f"{graph.graph['name']}{suffix}"
        rec = read_record(_head(path)) if recorded else None
        opts = options
        if rec is not None and (tuple(rec["set"]) != tuple(overrides) or _options(rec) != options):
            _, graph = build(display_path(spec_path), rec["set"], passes(_options(rec)))
            opts = _options(rec)
        if path in outputs:
            raise EmitError(f"{spec_path} and {sources[path]} both name the network '{graph.graph['name']}' ({path})")
        outputs[path] = emit(graph, opts)
        sources[path] = spec_path
    return outputs


def _options(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("spec", "target", "set")}


def _head(path: Path) -> str:
    """The start of an existing output, where its provenance record is; empty if there is none."""
    if not path.is_file():  # never open a FIFO or a device to look for a header
        return ""
    try:
        with open(path, "rb") as f:
            return f.read(RECORD_SCAN).decode("utf-8", errors="replace")
    except OSError:
        return ""


def display_path(path: Path) -> Path:
    """The spec path as generated headers name it: relative to the working directory when inside it.

    Headers must not depend on how a user spelled the path, or `--check` would call fresh files stale.
    """
    relative = os.path.relpath(path)
    return Path(relative) if not relative.startswith("..") else Path(os.path.abspath(path))


def write_outputs(outputs: dict[Path, bytes]) -> list[Path]:
    """Write each file whose content changed, via a temporary file renamed over it; return those written.

    A reader never sees half a file, and a failed write leaves the old file as it was.
    """
    changed = [path for path, content in outputs.items() if not _same(path, content)]
    mode = 0o666 & ~_umask()  # mkstemp makes files private; give the mode a new file gets
    for path in changed:
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(outputs[path])
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except OSError as err:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise EmitError(f"cannot write: {err.strerror or err}", Location(str(path))) from None
    return changed


def stale_outputs(outputs: dict[Path, bytes], out_dir: Path, suffix: str, every_spec: bool) -> list[str]:
    """One line per generated file that is missing or differs; with `every_spec`, also per orphan file."""
    problems = []
    for path, content in outputs.items():
        if not path.is_file():
            problems.append(f"{path}: missing (not generated yet)")
        elif not _same(path, content):
            problems.append(f"{path}: stale (differs from what dnc compile emits)")
    if every_spec and out_dir.is_dir():
        for path in sorted(out_dir.glob(f"*{suffix}")):
            if path not in outputs:
                problems.append(f"{path}: generated from no spec in specs/ (delete it)")
    return problems


def _same(path: Path, content: bytes) -> bool:
    try:
        return path.read_bytes() == content
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

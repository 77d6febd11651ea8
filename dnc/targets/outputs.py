"""Generated files: compile specs to their outputs, write them atomically, check them fresh.

Shared by every target. An emitter module has `SUFFIX` (".py", ".onnx") and
`emit(graph, **options) -> str | bytes`, deterministic for the same graph and options.

dnc writes only files it owns: an output path must be a regular file or not exist
yet. A device (`-o /dev/null`), a FIFO, a directory or a symbolic link is refused,
never replaced. Each file is written to a temporary beside it, named
`.<name>.dnc-tmp-<pid>.<random>`, and renamed over it; all temporaries of a run are
written before the first rename, so an error leaves every old file as it was. A
SIGINT or SIGTERM during the writes removes the temporaries; one that SIGKILL leaves
behind is removed by the next run that writes there (its pid is dead). An existing
file keeps its mode.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import networkx as nx

from dnc.errors import DncError, EmitError, Location
from dnc.files import kind, open_regular
from dnc.pipeline import build
from dnc.targets.provenance import RECORD_SCAN, read_record

TMP_MARK = ".dnc-tmp-"
_TMP = re.compile(r"^\.(?P<name>.+)\.dnc-tmp-(?P<pid>[0-9]+)\.[0-9a-f]+$")


def plan_outputs(
    specs: Sequence[Path],
    overrides: Sequence[str],
    emit: Callable[[nx.DiGraph, dict], bytes],
    options: dict,
    suffix: str,
    out_dir: Path,
    recorded: bool = False,
    policy: Mapping | None = None,
    passes: Callable[[dict], Sequence] = lambda options: (),
) -> dict[Path, bytes]:
    """Compile every spec in memory: output path -> content. Raises before anything is written.

    With `recorded`, a spec whose output already exists is compiled with the overrides and
    options recorded in that file's header (what `--check` judges it against). `policy`
    holds `build`'s limits and spec roots; `passes` gives the optimisation passes for a
    set of options (see dnc/passes.py).
    """
    outputs: dict[Path, bytes] = {}
    sources: dict[Path, Path] = {}
    for spec_path in specs:
        _, graph = build(display_path(spec_path), overrides, passes=passes(options), **(policy or {}))
        path = out_dir / f"{graph.graph['name']}{suffix}"
        rec = read_record(_head(path)) if recorded else None
        opts = options
        if rec is not None and (tuple(rec["set"]) != tuple(overrides) or _options(rec) != options):
            _, graph = build(display_path(spec_path), rec["set"], passes=passes(_options(rec)), **(policy or {}))
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
    try:  # never block on a FIFO or read a device to look for a header
        fd = open_regular(path, Location(str(path)), EmitError)
    except (DncError, OSError):
        return ""
    with os.fdopen(fd, "rb") as f:
        return f.read(RECORD_SCAN).decode("utf-8", errors="replace")


def display_path(path: Path) -> Path:
    """The spec path as generated headers name it: relative to the working directory when inside it.

    Headers must not depend on how a user spelled the path, or `--check` would call fresh files stale.
    """
    relative = os.path.relpath(path)
    return Path(relative) if not relative.startswith("..") else Path(os.path.abspath(path))


def write_outputs(outputs: dict[Path, bytes]) -> list[Path]:
    """Write each file whose content changed, all or none; return those written.

    A reader never sees half a file, and a failed write leaves every old file as it was.
    """
    modes = {path: _writable_mode(path) for path in outputs}
    changed = [path for path, content in outputs.items() if not _same(path, content)]
    temps: dict[Path, str] = {}
    current = None
    try:
        with _removed_on_signal(temps):
            for current in changed:
                _remove_stale_temporaries(current)
                temps[current] = _write_temporary(current, outputs[current], modes[current])
            for current in changed:  # every temporary is whole before the first rename
                os.replace(temps[current], current)
                del temps[current]
    except OSError as err:
        raise EmitError(f"cannot write: {err.strerror or err}", Location(str(current))) from None
    finally:
        for tmp in temps.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
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


def _writable_mode(path: Path) -> int:
    """The mode `path` gets: an existing regular file's own, else what a new file gets; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0o666 & ~_umask()
    except OSError as err:
        raise EmitError(f"cannot write: {err.strerror or err}", Location(str(path))) from None
    if not stat.S_ISREG(st.st_mode):
        raise EmitError(f"is {kind(st.st_mode)}; dnc writes only regular files or new paths", Location(str(path)))
    return stat.S_IMODE(st.st_mode)


def _same(path: Path, content: bytes) -> bool:
    """Whether `path` is a regular file holding exactly `content`; reads at most len(content) + 1 bytes."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError):
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != len(content):
            return False
        data = bytearray()
        while len(data) <= len(content):
            chunk = os.read(fd, min(1 << 20, len(content) + 1 - len(data)))
            if not chunk:
                break
            data += chunk
        return data == content
    except OSError:
        return False
    finally:
        os.close(fd)


def _write_temporary(path: Path, content: bytes, mode: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}{TMP_MARK}{os.getpid()}.{secrets.token_hex(4)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view[: 1 << 24]) :]
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def _remove_stale_temporaries(path: Path) -> None:
    """Remove what a killed run left beside `path`: temporaries whose process is gone."""
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        match = _TMP.match(name)
        if match and match["name"] == path.name and not _alive(int(match["pid"])):
            with contextlib.suppress(OSError):
                os.unlink(path.parent / name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2**22  # another user's process, or a pid no system has
    return True


@contextlib.contextmanager
def _removed_on_signal(temps: dict[Path, str]) -> Iterator[None]:
    """While writing, SIGINT and SIGTERM remove the temporaries before the process stops."""

    def handler(signum, frame):
        for tmp in list(temps.values()):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        temps.clear()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: no handlers, the finally clause still cleans up
        previous = {}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

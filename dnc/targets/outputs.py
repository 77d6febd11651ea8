"""Generated files: compile specs to their outputs, write them atomically, check them fresh.

Shared by every target. An emitter module has `SUFFIX` (".py", ".onnx") and
`emit(graph, **options) -> str | bytes`, deterministic for the same graph and options.

dnc writes only files it owns, and only where it was told to. Every output's real path
stays inside one folder (`-o`, or the work tree for a target's default folder): a folder
on the way that is a symbolic link leading out of it is refused, and the files are
written through a descriptor of their folder, opened once and checked to be inside.
An output path must be a new path or a regular file that dnc wrote (it carries
`provenance.MARK`); anything else is refused, never replaced: a device (`-o /dev/null`),
a FIFO, a directory, a symbolic link, and, unless `force`, a file someone else wrote.
Each file is written to a temporary beside it, named `.<name>.dnc-tmp-<pid>.<random>`,
and renamed over it; all temporaries of a run are written before the first rename, so
an error leaves every old file as it was. A SIGINT or SIGTERM during the writes
removes the temporaries; one that SIGKILL leaves behind is removed by the next run that
writes there (its pid is dead). An existing file keeps its mode.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from dnc.errors import DncError, EmitError, Location
from dnc.files import kind, spec_reference, work_tree
from dnc.pipeline import build, cycle_collector_paused
from dnc.targets.provenance import MARK, RECORD_SCAN, made_by_dnc, read_record

TMP_MARK = ".dnc-tmp-"
_TMP = re.compile(r"^\.(?P<name>.+)\.dnc-tmp-(?P<pid>[0-9]+)\.[0-9a-f]+$")
_READ = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NOCTTY", 0)
_NOT_RECORDED = ("spec", "target", "set", "out_dir")  # a record's keys that are not emitter options


@dataclass(frozen=True)
class Destination:
    """Where `dnc compile` writes: a folder (a file per spec) or, for one spec, the file itself.

    `option` is the `-o` a generated header records, so that its Regenerate command writes
    where the file is; None for the target's default folder.
    """

    path: Path
    file: bool = False
    option: str | None = None

    @classmethod
    def given(cls, out: Path | None, default: Path, suffix: str) -> Destination:
        """The destination of `-o out` (None: the target's default folder); a path ending in `suffix` is the file."""
        if out is None or os.path.abspath(out) == os.path.abspath(default):
            return cls(default)
        return cls(out, out.suffix == suffix and not out.is_dir(), spec_reference(out))

    def of(self, name: str, suffix: str) -> Path:
        return self.path if self.file else self.path / f"{name}{suffix}"

    @property
    def within(self) -> Path:
        """The folder every write stays inside: `-o`'s (the file's folder), or the work tree for the default."""
        if self.option is None:
            return work_tree(Path.cwd()) or Path.cwd()
        return self.path.parent if self.file else self.path

    @property
    def recorded(self) -> dict:
        return {"out_dir": self.option} if self.option else {}


def plan_outputs(
    specs: Sequence[Path],
    overrides: Sequence[str],
    emit: Callable[[nx.DiGraph, dict], bytes],
    options: dict,
    suffix: str,
    out: Destination,
    recorded: bool = False,
    policy: Mapping | None = None,
    passes: Callable[[dict], Sequence] = lambda options: (),
) -> dict[Path, bytes]:
    """Compile every spec in memory: output path -> content. Raises before anything is written.

    With `recorded`, a spec whose output already exists is compiled with the overrides and
    options recorded in that file's header (what `--check` judges it against); `-o` is
    always where the file is. `policy` holds `build`'s limits and spec roots; `passes`
    gives the optimisation passes for a set of options, refusing options no compile
    records (see dnc/ir/passes.py).
    """
    outputs: dict[Path, bytes] = {}
    sources: dict[Path, Path] = {}
    for spec_path in specs:
        _, graph = build(display_path(spec_path), overrides, passes=passes(options), **(policy or {}))
        path = out.of(graph.graph["name"], suffix)
        rec = read_record(_head(path).decode("utf-8", errors="replace")) if recorded else None
        opts = options
        if rec is not None and (tuple(rec["set"]) != tuple(overrides) or _options(rec) != options):
            opts = _options(rec)
            try:
                chosen = passes(opts)
            except DncError as err:
                raise EmitError(
                    f"the record in its header is not one dnc writes ({err.message}); regenerate the file",
                    Location(str(path)),
                ) from None
            _, graph = build(display_path(spec_path), rec["set"], passes=chosen, **(policy or {}))
        if path in outputs:
            raise EmitError(f"{spec_path} and {sources[path]} both name the network '{graph.graph['name']}' ({path})")
        with cycle_collector_paused():
            outputs[path] = emit(graph, opts | out.recorded)
        sources[path] = spec_path
    return outputs


def _options(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in _NOT_RECORDED}


def _head(path: Path) -> bytes:
    """The start of an existing regular file, where its mark and record are; empty if there is none."""
    try:  # never follow a link, block on a FIFO or read a device to look for a header
        fd = os.open(path, _READ)
    except (OSError, ValueError):
        return b""
    try:
        return os.read(fd, RECORD_SCAN) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError:
        return b""
    finally:
        os.close(fd)


def display_path(path: Path) -> Path:
    """The spec path as generated headers name it: relative to the working directory when inside it.

    Headers must not depend on how a user spelled the path, or `--check` would call fresh files stale.
    """
    relative = os.path.relpath(path)
    return Path(relative) if not relative.startswith("..") else Path(os.path.abspath(path))


def write_outputs(outputs: dict[Path, bytes], within: Path, force: bool = False) -> list[Path]:
    """Write each file whose content changed, all or none; return those written.

    Every file's real path stays inside `within`; an existing file is replaced only if dnc
    wrote it, or with `force`. A reader never sees half a file, and a failed write leaves
    every old file as it was.
    """
    inside = Path(os.path.realpath(within))
    for path in outputs:
        _check_inside(path, within, inside)
    modes = {path: _writable_mode(path) for path in outputs}
    changed = [path for path, content in outputs.items() if not _same(path, content)]
    if not force:
        for path in changed:
            if os.path.lexists(path) and not made_by_dnc(_head(path)):
                raise EmitError(
                    f"exists and dnc did not write it (it has no '{MARK}' mark): "
                    "dnc replaces only files it generated; pass --force to replace it",
                    Location(str(path)),
                )
    folders: dict[Path, int] = {}
    temps: dict[Path, tuple[int, str]] = {}
    current = None
    try:
        with _removed_on_signal(temps):
            for current in changed:
                if current.parent not in folders:
                    folders[current.parent] = _open_folder(current.parent, within, inside)
                folder = folders[current.parent]
                _remove_stale_temporaries(folder, current.name)
                temps[current] = (folder, _write_temporary(folder, current.name, outputs[current], modes[current]))
            for current in changed:  # every temporary is whole before the first rename
                folder, tmp = temps[current]
                os.replace(tmp, current.name, src_dir_fd=folder, dst_dir_fd=folder)
                del temps[current]
    except OSError as err:
        raise EmitError(f"cannot write: {err.strerror or err}", Location(str(current))) from None
    finally:
        for folder, tmp in temps.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=folder)
        for folder in folders.values():
            os.close(folder)
    return changed


def stale_outputs(outputs: dict[Path, bytes], out_dir: Path, suffix: str, every_spec: bool) -> list[str]:
    """One line per generated file that is missing or differs; with `every_spec`, also per orphan file.

    An orphan is a file dnc generated (it carries the mark) that no spec generates now; other
    files in the folder (a hand-written `__init__.py`) are not dnc's business.
    """
    problems = []
    for path, content in outputs.items():
        if not path.is_file():
            problems.append(f"{path}: missing (not generated yet)")
        elif not _same(path, content):
            problems.append(f"{path}: stale (differs from what dnc compile emits)")
    if every_spec and out_dir.is_dir():
        for path in sorted(out_dir.glob(f"*{suffix}")):
            if path not in outputs and made_by_dnc(_head(path)):
                problems.append(f"{path}: generated from no spec in specs/ (delete it)")
    return problems


def _check_inside(path: Path, within: Path, inside: Path) -> None:
    """Refuse an output whose folder's real path (symbolic links followed) is not inside `within`'s."""
    real = Path(os.path.realpath(path.parent))
    if real != inside and inside not in real.parents:
        raise EmitError(
            f"its folder leads out of {within} through a symbolic link (to {real}); dnc writes only inside it",
            Location(str(path)),
        )


def _open_folder(folder: Path, within: Path, inside: Path) -> int:
    """A descriptor of `folder` (made if missing) that is checked to be inside: every write goes through it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file, or a dangling link, where the folder should be
        raise EmitError("is not a folder", Location(str(folder))) from None
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    # NOTE: a folder on the way may have been swapped for a link since the check: check what was opened
    real = os.path.realpath(folder)
    opened, there = os.fstat(fd), os.stat(real)
    if (opened.st_dev, opened.st_ino) != (there.st_dev, there.st_ino) or not _is_inside(Path(real), inside):
        os.close(fd)
        raise EmitError(f"left {within} while it was being written; nothing written", Location(str(folder)))
    return fd


def _is_inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


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
    try:
        fd = os.open(path, _READ)
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


def _write_temporary(folder: int, name: str, content: bytes, mode: int) -> str:
    tmp = f".{name}{TMP_MARK}{os.getpid()}.{secrets.token_hex(4)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o600, dir_fd=folder)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view[: 1 << 24]) :]
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=folder)
        raise
    os.close(fd)
    return tmp


def _remove_stale_temporaries(folder: int, name: str) -> None:
    """Remove what a killed run left beside `name`: temporaries whose process is gone."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for entry in names:
        match = _TMP.match(entry)
        if match and match["name"] == name and not _alive(int(match["pid"])):
            with contextlib.suppress(OSError):
                os.unlink(entry, dir_fd=folder)


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
def _removed_on_signal(temps: dict[Path, tuple[int, str]]) -> Iterator[None]:
    """While writing, SIGINT and SIGTERM remove the temporaries before the process stops."""

    def handler(signum, frame):
        for folder, tmp in list(temps.values()):
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=folder)
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

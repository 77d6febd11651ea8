"""Reading files a user names, bounded: regular files only, never more than a limit.

A spec or a checkpoint path may name a device (`/dev/zero`), a FIFO that nobody
writes, a directory or a file of gigabytes. Each is refused by kind or by size
before a byte is parsed: files are opened non-blocking (a FIFO then opens at once)
and checked with `fstat`, and reads stop one byte past the limit.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from dnc.errors import DncError, Location, SpecError

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}


def work_tree(folder: Path) -> Path | None:
    """The git work tree enclosing `folder` (the nearest one with a `.git`), or None outside git."""
    for candidate in (folder, *folder.parents):
        if os.path.lexists(candidate / ".git"):
            return candidate
    return None


def spec_reference(path: str | Path) -> str:
    """The spec path relative to the enclosing git work tree, else relative to the working directory."""
    absolute = Path(os.path.abspath(path))
    root = work_tree(absolute.parent)
    if root is not None:
        return absolute.relative_to(root).as_posix()
    relative = os.path.relpath(absolute)
    return Path(relative).as_posix() if not relative.startswith("..") else absolute.as_posix()


def kind(mode: int) -> str:
    """'a directory', 'a FIFO (named pipe)', ... for an `st_mode`; 'a regular file' for one."""
    return "a regular file" if stat.S_ISREG(mode) else _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def size_text(n: int) -> str:
    """256 KiB, 2 GiB: sizes as limits are written."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n:,} bytes"


def open_regular(path: str | Path, where: Location, error: type[DncError] = SpecError) -> int:
    """A read-only descriptor of `path`, which must be a regular file; never blocks.

    The caller closes it. Anything else (missing, a directory, a device, a FIFO,
    a socket, unreadable) raises `error` with one line.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error("no such file", where) from None
    except IsADirectoryError:
        raise error("is a directory, not a file", where) from None
    except PermissionError:
        raise error("cannot read: permission denied", where) from None
    except OSError as err:
        raise error(f"cannot open: {err.strerror or type(err).__name__}", where) from None
    except ValueError:  # a NUL byte in the path
        raise error("cannot open: the path contains a NUL byte", where) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"is {kind(mode)}, not a regular file", where)
    return fd


def read_bounded(path: str | Path, limit: int, where: Location, what: str, error: type[DncError] = SpecError) -> bytes:
    """The whole of a regular file of at most `limit` bytes; a larger one is refused, not read."""
    fd = open_regular(path, where, error)
    try:
        if os.fstat(fd).st_size > limit:
            raise error(f"{what} is larger than the {size_text(limit)} limit", where)
        chunks, total = [], 0
        while total <= limit:  # the file may grow after fstat: stop one byte past the limit
            chunk = os.read(fd, min(1 << 16, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as err:
        raise error(f"cannot read: {err.strerror or type(err).__name__}", where) from None
    finally:
        os.close(fd)
    if total > limit:
        raise error(f"{what} is larger than the {size_text(limit)} limit", where)
    return b"".join(chunks)

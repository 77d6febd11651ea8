"""Specs as of a git revision (`REV:path`), copied out of git for the loader. I/O only.

Git is asked with nothing a revision could turn into an option: a revision that
starts with `-` is refused, objects are looked up by `git cat-file --batch-check`
reading `REV:path` on stdin, and only then read by their object id. A blob larger
than a spec may be, or an object that is not a file, is refused before it is read.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from dnc.errors import DncError, Location, SpecError
from dnc.files import size_text
from dnc.frontend.loader import MAX_EXTENDS_DEPTH, MAX_SPEC_BYTES, parse_yaml

_OBJECT = re.compile(r"^(?P<oid>[0-9a-f]{40,64}) (?P<type>\w+) (?P<size>[0-9]+)$")


def split_revision(arg: str) -> tuple[str, str] | None:
    """`REV:path` -> (REV, path); None when `arg` is not of that form."""
    rev, sep, rel = arg.partition(":")
    return (rev, rel) if rev and sep and rel else None


@contextlib.contextmanager
def materialised(rev: str, rel: str, cwd: Path) -> Iterator[tuple[Path, Path]]:
    """A temporary copy of `rev:rel` and the files its `extends:` chain names: (spec path, copy root).

    The copy root is the spec root to load it with; the copy is removed afterwards.
    """
    where = Location(f"{rev}:{rel}")
    if rev.startswith("-"):
        raise DncError("a revision cannot start with '-'", where)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in rev + rel):
        raise DncError("a revision or path cannot hold control characters", where)
    with tempfile.TemporaryDirectory(prefix="dnc-diff-") as tmp:
        yield _materialise(rev, rel, cwd, Path(tmp)), Path(tmp)


def relocate(err: DncError, tmp: Path, rev: str) -> DncError:
    """Name `REV:path` instead of the temporary copy in an error from a revision."""
    prefix = str(tmp) + "/"
    rev = f"{rev}:"
    message = err.message.replace(prefix, rev)
    loc = err.location
    if loc is not None and loc.source.startswith(prefix):
        loc = replace(loc, source=rev + loc.source[len(prefix) :])
    return type(err)(message, loc)


def _materialise(rev: str, rel: str, cwd: Path, tmp: Path) -> Path:
    """Write `rev:rel` and the files its `extends:` chain names, as of `rev`, under tmp."""
    where = Location(f"{rev}:{rel}")
    if rel.startswith(("./", "../")):  # git reads these relative to cwd; extends needs the repo path
        prefix = _git(["rev-parse", "--show-prefix"], cwd, where).decode().strip()
        rel = posixpath.join(prefix, rel)
    rel = posixpath.normpath(rel)
    if rel.startswith("../") or rel == ".." or posixpath.isabs(rel):
        raise DncError("path leaves the repository", where)
    first = tmp / rel
    for _ in range(MAX_EXTENDS_DEPTH + 1):
        local = tmp / rel
        if local.exists():  # a cycle: the loader names it
            break
        text = _blob(rev, rel, cwd)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(text)
        parent = _extends(text, f"{rev}:{rel}")
        if parent is None:
            break
        rel = posixpath.normpath(posixpath.join(posixpath.dirname(rel), parent))
        if rel.startswith("../") or rel == ".." or posixpath.isabs(rel):
            break  # outside the repository: the loader refuses it
        if _object(rev, rel, cwd) is None:
            break  # the loader reports `extends: no such file` at the right line
    return first


def _object(rev: str, rel: str, cwd: Path) -> tuple[str, str, int] | None:
    """(object id, type, size) of `rev:rel`, or None if git has no such object. REV reaches git on stdin only."""
    out = _git(["cat-file", "--batch-check"], cwd, Location(f"{rev}:{rel}"), stdin=f"{rev}:{rel}\n".encode())
    match = _OBJECT.match(out.decode(errors="replace").strip())
    return (match["oid"], match["type"], int(match["size"])) if match else None


def _blob(rev: str, rel: str, cwd: Path) -> bytes:
    where = Location(f"{rev}:{rel}")
    found = _object(rev, rel, cwd)
    if found is None:
        raise DncError("cannot read from git: no such revision or path", where)
    oid, kind, size = found
    if kind != "blob":
        raise SpecError(f"is a git {kind}, not a file", where)
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"the spec is larger than the {size_text(MAX_SPEC_BYTES)} limit", where)
    return _git(["cat-file", "blob", oid], cwd, where)


def _extends(text: bytes, source: str) -> str | None:
    try:
        data = parse_yaml(text.decode("utf-8"), source, typ="safe")
    except (DncError, UnicodeDecodeError):
        return None  # the loader reports it with a position
    parent = data.get("extends") if isinstance(data, dict) else None
    return parent if isinstance(parent, str) else None


def _git(args: list[str], cwd: Path, where: Location, stdin: bytes | None = None) -> bytes:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, input=stdin, capture_output=True, timeout=60)
    except FileNotFoundError:
        raise DncError("git not found; a REV:path argument needs git", where) from None
    except subprocess.TimeoutExpired:
        raise DncError("git did not answer within 60 s", where) from None
    if done.returncode:
        lines = done.stderr.decode(errors="replace").strip().splitlines() or [f"exit status {done.returncode}"]
        raise DncError(f"cannot read from git: {lines[0].removeprefix('fatal: ')}", where)
    return done.stdout

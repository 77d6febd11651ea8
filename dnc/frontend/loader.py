"""Load stage: YAML file(s) -> validated Spec.

ruamel.yaml keeps the position of every key and value and rejects duplicate keys.
The document is turned into plain data plus a map from field path to position, so
that `extends:` merging and `--set` overrides keep track of where each value came
from, and every pydantic error can be reported as `file:line:col: field: message`.

Specs come from other people (a pull request's spec is compiled in CI), so input is
bounded before it is parsed: a spec is a regular file of at most MAX_SPEC_BYTES,
UTF-8 without control characters, and its YAML is checked on ruamel's event stream
(which does not recurse) for nesting depth, node count after alias expansion and
tags outside the core schema, before ruamel composes it (which does recurse).
`extends:` reads only inside the spec root (see `spec_root`).
"""

from __future__ import annotations

import difflib
import os
import re
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML, events
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import RoundTripConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from dnc.errors import DncWarning, Location, SpecError, SpecErrors
from dnc.files import read_bounded, size_text, work_tree
from dnc.frontend.spec import Path, RuleError, Spec, WrittenFloat

MAX_EXTENDS_DEPTH = 16
MAX_SPEC_BYTES = 256 * 1024  # the zoo's largest spec is under 1 KiB
MAX_YAML_DEPTH = 32  # a spec nests 3 levels (blocks, a block, its fields)
MAX_YAML_NODES = 5_000  # scalars and collections after alias expansion; the zoo's specs have < 60
MAX_BRACKETS = 256  # unclosed [ and { in the raw text: ruamel's scanner is quadratic in them
MAX_NUMBER_DIGITS = 100  # a longer number would be over every limit anyway
# YAML's core schema; anything else (!!python/..., !!binary, !!timestamp, local tags) is refused
CORE_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq")}
# C0 controls but tab/LF/CR, DEL, C1 controls, line/paragraph separators, bidi overrides and isolates
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_INDEX = re.compile(r"[0-9]+")  # str.isdigit() accepts other scripts' digits ("\u0663")
SPEC_SUFFIXES = (".yaml", ".yml")


@dataclass
class Document:
    """Plain data of a (possibly merged) spec and where each value and key came from."""

    data: dict[str, Any]
    values: dict[Path, Location] = field(default_factory=dict)
    keys: dict[Path, Location] = field(default_factory=dict)


def load_spec(path: str | FsPath, overrides: typing.Sequence[str] = (), roots: Sequence[str | FsPath] = ()) -> Spec:
    """Read, merge (`extends`), override (`--set`) and validate one spec file.

    The file (where a symbolic link leads) and every file `extends:` reads must be inside
    `spec_root(path)` or inside one of `roots`.
    """
    path = FsPath(path)
    allowed = (spec_root(path), *(FsPath(os.path.realpath(r)) for r in roots))
    real = FsPath(os.path.realpath(path))
    if os.path.lexists(path) and not _inside(real, allowed):  # a missing file: the reader says so
        raise SpecError(
            f"leaves the spec root {_roots(allowed)} through a symbolic link (see --spec-root)", Location(str(path))
        )
    doc = load_document(path, roots=allowed)
    for text in overrides:
        _apply_override(doc, text)
    return validate(doc, path)


def spec_root(path: str | FsPath) -> FsPath:
    """Where a spec may read: the git work tree enclosing where `path` stands, else its folder (a real path).

    A spec in a pull request may name its parent by any path, and may itself be a symbolic
    link: only files of the same checkout can be read, never `/etc/passwd` or a file in the
    user's home. The root comes from where the named path stands, not from where a link
    leads, so that a link cannot choose its own root.
    """
    here = FsPath(os.path.abspath(FsPath(path).parent if str(path) else "."))
    return FsPath(os.path.realpath(work_tree(here) or here))


def load_document(path: FsPath, _chain: tuple[FsPath, ...] = (), roots: Sequence[FsPath] = ()) -> Document:
    """One file as a Document, with its `extends:` chain merged underneath it."""
    roots = tuple(roots) or (spec_root(path),)
    doc = _read_yaml(path, parent=bool(_chain))
    if _chain:  # a parent's name and description describe the parent, not its children
        for key in ("name", "description"):
            doc.data.pop(key, None)
            _forget(doc, (key,))
    parent = doc.data.pop("extends", None)
    where = doc.values.get(("extends",))
    if parent is None:
        return doc
    if not isinstance(parent, str):
        raise SpecError(f"extends: expected a file name, got {_show(parent)}", where)
    target = _extends_target(parent, path, roots, where)
    if target in _chain or target == FsPath(os.path.realpath(path)):
        cycle = " -> ".join(p.name for p in (*_chain, FsPath(os.path.realpath(path)), target))
        raise SpecError(f"extends: cycle {cycle}", where)
    if len(_chain) >= MAX_EXTENDS_DEPTH:
        raise SpecError(f"extends: more than {MAX_EXTENDS_DEPTH} levels", where)
    try:
        base = load_document(target, (*_chain, FsPath(os.path.realpath(path))), roots)
    except _NotASpec as err:
        raise SpecError(f"extends: {_show(parent)} is not a dnc spec ({err})", where) from None
    return _merge(base, doc)


def _extends_target(parent: str, path: FsPath, roots: Sequence[FsPath], where: Location | None) -> FsPath:
    """The real path of the file `extends: parent` names, refused unless it is a spec file inside a root."""
    shown = _show(parent)
    if "\x00" in parent or not parent.strip():
        raise SpecError(f"extends: {shown} is not a file name", where)
    if not parent.endswith(SPEC_SUFFIXES):
        raise SpecError(f"extends: {shown} is not a spec file (expected a name ending in .yaml or .yml)", where)
    lexical = FsPath(os.path.normpath(FsPath(os.path.abspath(path.parent)) / parent))
    inside = _inside(lexical, roots) or _inside(lexical, [FsPath(os.path.abspath(r)) for r in roots])
    if not inside:
        raise SpecError(f"extends: {shown} is outside the spec root {_roots(roots)} (see --spec-root)", where)
    try:
        real = lexical.resolve(strict=True)
    except FileNotFoundError:
        raise SpecError(f"extends: no such file {shown} (looked in {lexical.parent})", where) from None
    except (OSError, RuntimeError) as err:  # ELOOP and friends
        reason = "a symbolic link loop" if "loop" in str(err).lower() else (getattr(err, "strerror", None) or "")
        raise SpecError(f"extends: cannot resolve {shown}: {reason or type(err).__name__}", where) from None
    if not _inside(real, roots):
        raise SpecError(f"extends: {shown} is a symbolic link that leaves the spec root {_roots(roots)}", where)
    return real


def _inside(path: FsPath, roots: Sequence[FsPath]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _roots(roots: Sequence[FsPath]) -> str:
    return " or ".join(str(r) for r in roots)


class _NotASpec(Exception):
    """A file named by `extends:` is not a spec; the message says so without quoting the file."""


def validate(doc: Document, path: FsPath) -> Spec:
    """Validate merged plain data as a Spec; its errors become a SpecError (SpecErrors if several)."""
    data = dict(doc.data)
    if "name" not in data:
        data["name"] = path.stem  # the default name is the file's
    try:
        spec = Spec.model_validate(data)
    except ValidationError as err:
        raise _spec_error(err, doc, path) from None
    spec._locations.update(doc.values)
    return spec


def resolved_data(spec: Spec) -> dict[str, Any]:
    """The spec with every default written out and per-block settings filled in.

    Two specs that build the same network have equal resolved data (the name and
    description aside), which is what `dnc resolve` prints and `dnc diff` compares.
    """
    data = spec.model_dump(mode="json")
    data["blocks"] = [b.model_dump(mode="json") for b in spec.resolved_blocks()]
    del data["blocks"][-1]["compression"]  # no transition follows the last block
    return data


# -- YAML -> Document --------------------------------------------------------------


def _read_yaml(path: FsPath, parent: bool = False) -> Document:
    """A spec file as a Document; `parent`: it was named by `extends:` and must look like a spec."""
    where = Location(str(path))
    raw = read_bounded(path, MAX_SPEC_BYTES, where, "the spec")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if parent:
            raise _NotASpec("not UTF-8 text") from None
        line, col = _position(raw[: err.start].decode("utf-8", errors="replace"), err.start)
        raise SpecError("not UTF-8 text", Location(str(path), line, col)) from None
    root = parse_yaml(text.removeprefix("\ufeff"), str(path), not_a_spec=_NotASpec if parent else None)
    if not isinstance(root, CommentedMap):
        if parent:
            raise _NotASpec("not a YAML mapping")
        raise SpecError("expected a mapping of spec fields at the top level", Location(str(path), 1, 1))
    if parent and "version" not in root:
        raise _NotASpec("no version: field")
    doc = Document(data={})
    doc.data = _plain(root, (), str(path), doc)
    doc.values[()] = Location(str(path), 1, 1)
    return doc


def parse_yaml(text: str, source: str, typ: str = "rt", not_a_spec: type[Exception] | None = None) -> Any:
    """YAML text -> ruamel's document, after checking it is small, plain and bounded.

    Raises SpecError with `source:line:col` for control characters, deep nesting,
    too many nodes (alias bombs), non-core tags, merge keys, several documents and
    malformed YAML; a reused anchor name is a DncWarning. With `not_a_spec`, malformed
    YAML raises that instead, without the parser's words (which may quote the file).
    """
    bad = _CONTROL.search(text)
    if bad:
        line, col = _position(text[: bad.start()], bad.start())
        raise SpecError(f"control character U+{ord(bad.group()):04X} is not allowed", Location(source, line, col))
    _check_brackets(text, source)
    yaml = YAML(typ=typ, pure=True)
    if typ == "rt":
        yaml.Constructor = _Constructor
    yaml.allow_duplicate_keys = False
    try:
        with warnings.catch_warnings(record=True) as caught:  # ruamel warns of reused anchors its own way
            warnings.simplefilter("always")
            _check_events(yaml.parse(text), source)
            root = yaml.load(text)
    except MarkedYAMLError as err:
        if not_a_spec is not None:
            raise not_a_spec("not valid YAML") from None
        mark = err.problem_mark or err.context_mark
        problem = (err.problem or err.context or "invalid YAML").strip().removeprefix("found ")
        loc = Location(source, mark.line + 1, mark.column + 1) if mark else Location(source)
        raise SpecError(problem, loc) from None
    except (YAMLError, ValueError, OverflowError, RecursionError) as err:
        if not_a_spec is not None:
            raise not_a_spec("not valid YAML") from None
        raise SpecError(f"not valid YAML ({type(err).__name__})", Location(source)) from None
    for warning in caught:
        if isinstance(warning.message, DncWarning):
            warnings.warn(warning.message, stacklevel=2)
    return root


class _Constructor(RoundTripConstructor):
    """ruamel's round-trip constructor, but a plain decimal keeps the text it was written as (`WrittenFloat`)."""

    def construct_yaml_float(self, node: Any) -> Any:
        return WrittenFloat.parse(node.value) or super().construct_yaml_float(node)


_Constructor.add_constructor("tag:yaml.org,2002:float", _Constructor.construct_yaml_float)


def _position(before: str, offset: int) -> tuple[int, int]:
    """1-based line and column of the character after `before`."""
    line = before.count("\n") + 1
    return line, len(before) - (before.rfind("\n") + 1) + 1


def _check_brackets(text: str, source: str) -> None:
    # NOTE: ruamel's scanner slows quadratically with open flow collections (10,000 `[` take
    # seconds before the first event), so count them on the raw text first. Brackets inside
    # quotes and comments count too: a real spec has nowhere near this many open at once.
    depth = 0
    for match in re.finditer(r"[\[\]{}]", text):
        depth = depth + 1 if match.group() in "[{" else max(0, depth - 1)
        if depth > MAX_BRACKETS:
            line, col = _position(text[: match.start()], match.start())
            raise SpecError(f"more than {MAX_BRACKETS} nested brackets", Location(source, line, col))


def _check_events(stream: typing.Iterable[Any], source: str) -> None:
    """Walk ruamel's event stream (no recursion, no construction) and refuse what a spec never needs."""
    open_: list[list[Any]] = []  # per open collection: [nodes counted before it, is mapping, children, anchor]
    sizes: dict[str, int] = {}  # anchor -> how many nodes an alias of it expands to
    warned: set[str] = set()
    total = documents = 0

    def where(event: Any) -> Location:
        mark = event.start_mark
        return Location(source, mark.line + 1, mark.column + 1)

    for event in stream:
        if isinstance(event, events.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise SpecError("expected one YAML document, found another", where(event))
        elif isinstance(event, events.CollectionEndEvent):
            start, _, _, anchor = open_.pop()
            if anchor:
                sizes[anchor] = total - start
        elif isinstance(event, events.NodeEvent):
            is_key = bool(open_) and open_[-1][1] and open_[-1][2] % 2 == 0
            if open_:
                open_[-1][2] += 1
            if isinstance(event, events.AliasEvent):
                if any(entry[3] == event.anchor for entry in open_):
                    raise SpecError(f"alias *{event.anchor} refers to a collection that contains it", where(event))
                total += sizes.get(event.anchor, 1)  # an undefined alias: ruamel reports it
            else:
                total += 1
                _check_node(event, is_key, where)
                anchor = event.anchor
                if anchor and (anchor in sizes or any(e[3] == anchor for e in open_)) and anchor not in warned:
                    warned.add(anchor)
                    message = f"anchor &{anchor} is defined again; each alias refers to the latest definition"
                    warnings.warn(DncWarning(message, where(event)), stacklevel=1)
                if isinstance(event, events.CollectionStartEvent):
                    if len(open_) >= MAX_YAML_DEPTH:
                        raise SpecError(f"nested deeper than {MAX_YAML_DEPTH} levels", where(event))
                    open_.append([total - 1, isinstance(event, events.MappingStartEvent), 0, anchor])
                elif anchor:
                    sizes[anchor] = 1
            if total > MAX_YAML_NODES:
                raise SpecError(f"more than {MAX_YAML_NODES:,} YAML nodes (aliases expanded)", where(event))


def _check_node(event: Any, is_key: bool, where: typing.Callable[[Any], Location]) -> None:
    tag = event.tag
    tag = None if tag is None else str(getattr(tag, "value", tag))
    if tag is not None and tag not in CORE_TAGS and tag != "!":
        raise SpecError(f"tag {_show(tag)} is not allowed (a spec holds plain YAML values)", where(event))
    if not isinstance(event, events.ScalarEvent):
        return
    bad = _CONTROL.search(event.value)  # from an escape in a double-quoted scalar ("\e", "\0")
    if bad:
        raise SpecError(f"control character U+{ord(bad.group()):04X} in a value is not allowed", where(event))
    if event.style:  # quoted scalars are strings
        return
    if is_key and event.value == "<<":
        raise SpecError("merge keys (<<) are not supported; use extends: or repeat the fields", where(event))
    value = event.value.lstrip("+-.")
    if len(event.value) > MAX_NUMBER_DIGITS and value[:1].isascii() and value[:1].isdigit():
        raise SpecError(f"a number of more than {MAX_NUMBER_DIGITS} characters", where(event))


def _plain(node: Any, path: Path, source: str, doc: Document) -> Any:
    """ruamel nodes -> plain Python data, recording positions into doc."""
    if isinstance(node, CommentedMap):
        out = {}
        for key in node:
            if not isinstance(key, str):
                line, col = node.lc.key(key)
                raise SpecError(f"keys must be strings, got {_show(key)}", Location(source, line + 1, col + 1))
            kline, kcol = node.lc.key(key)
            vline, vcol = node.lc.value(key)
            doc.keys[(*path, key)] = Location(source, kline + 1, kcol + 1)
            doc.values[(*path, key)] = Location(source, vline + 1, vcol + 1)
            out[key] = _plain(node[key], (*path, key), source, doc)
        return _normalise_blocks(out, path, doc)
    if isinstance(node, CommentedSeq):
        out = []
        for i, item in enumerate(node):
            line, col = node.lc.item(i)
            doc.values[(*path, i)] = Location(source, line + 1, col + 1)
            out.append(_plain(item, (*path, i), source, doc))
        return out
    return _scalar(node)


def _scalar(value: Any) -> Any:
    # ruamel's round-trip scalars subclass the builtins; hand pydantic the builtins (and decimals as written)
    if isinstance(value, WrittenFloat):
        return value
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value


def _normalise_blocks(mapping: dict[str, Any], path: Path, doc: Document) -> dict[str, Any]:
    """`blocks: [6, 12]` is shorthand for `blocks: [{layers: 6}, {layers: 12}]`."""
    if path == () and isinstance(mapping.get("blocks"), list):
        for i, item in enumerate(mapping["blocks"]):
            mapping["blocks"][i] = _block_shorthand(item)
            if mapping["blocks"][i] is not item:
                doc.values[("blocks", i, "layers")] = doc.values[("blocks", i)]
    return mapping


# -- extends and --set -------------------------------------------------------------


def _merge(base: Document, over: Document) -> Document:
    """Deep-merge `over` onto `base`: mappings merge, anything else is replaced."""
    out = Document(data={}, values=dict(base.values), keys=dict(base.keys))

    def merge(b: Any, o: Any, path: Path) -> Any:
        if isinstance(b, dict) and isinstance(o, dict):
            merged = dict(b)
            for key, value in o.items():
                merged[key] = merge(b.get(key), value, (*path, key)) if key in b else value
                if key not in b or not (isinstance(b[key], dict) and isinstance(value, dict)):
                    _forget(out, (*path, key), container=isinstance(b.get(key), dict | list))
            return merged
        return o

    out.data = merge(base.data, over.data, ())
    out.values.update(over.values)
    out.keys.update(over.keys)
    return out


def _forget(doc: Document, prefix: Path, container: bool = True) -> None:
    """Drop the positions recorded at `prefix` and, if it held a mapping or list, under it.

    Only a replaced container has positions under it; skipping the scan otherwise keeps
    many `--set` overrides and deep merges linear.
    """
    for table in (doc.values, doc.keys):
        table.pop(prefix, None)
        if container:
            for path in [p for p in table if len(p) > len(prefix) and p[: len(prefix)] == prefix]:
                del table[path]


def parse_override(text: str) -> tuple[Path, Any]:
    """`blocks.2.growth_rate=48` -> (("blocks", 2, "growth_rate"), 48); values are YAML."""
    where = Location(f"--set {text}")
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpecError("expected --set path.to.field=value", where)
    path = tuple(int(p) if _INDEX.fullmatch(p) else p for p in key.strip().split("."))
    if any(p == "" for p in path):
        raise SpecError(f"empty segment in field path '{key}'", where)
    if len(raw.encode("utf-8", errors="replace")) > MAX_SPEC_BYTES:
        raise SpecError(f"value is larger than the {size_text(MAX_SPEC_BYTES)} limit", where)
    try:
        value = _simple_scalar(raw.strip()) if raw.strip() else None
        if value is _NOT_SIMPLE:
            value = _plain_value(parse_yaml(raw, where.source))  # round-trip: decimals keep their text
    except SpecError as err:
        raise SpecError(f"value is not valid YAML: {err.message}", where) from None
    if isinstance(value, list) and path == ("blocks",):
        value = [_block_shorthand(v) for v in value]
    elif len(path) == 2 and path[0] == "blocks":
        value = _block_shorthand(value)
    return path, value


_NOT_SIMPLE = object()
_INT = re.compile(r"[-+]?[0-9]{1,18}")
_FLOAT = re.compile(r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]{1,3})?")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _simple_scalar(raw: str) -> Any:
    """The YAML core-schema value of a plain number, boolean, null or word, without ruamel.

    NOTE: ruamel takes milliseconds per document; ten thousand `--set` values of `48`
    must not take a minute. Anything else returns _NOT_SIMPLE and goes to ruamel.
    """
    if _INT.fullmatch(raw):
        return int(raw)
    if _FLOAT.fullmatch(raw):
        return WrittenFloat(raw)
    if raw in ("true", "True", "TRUE", "false", "False", "FALSE"):
        return raw.lower() == "true"
    if raw in ("null", "Null", "NULL", "~"):
        return None
    if _WORD.fullmatch(raw) and raw.lower() not in ("nan", "inf"):
        return raw
    return _NOT_SIMPLE


def _plain_value(value: Any) -> Any:
    """A `--set` value as the builtins a spec holds; anything else (a date) stays as it is for pydantic to refuse."""
    if isinstance(value, dict):
        return {k: _plain_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_value(v) for v in value]
    return _scalar(value)


def _block_shorthand(value: Any) -> Any:
    return {"layers": value} if isinstance(value, int) and not isinstance(value, bool) else value


def _apply_override(doc: Document, text: str) -> None:
    path, value = parse_override(text)
    where = Location(f"--set {text}")
    target: Any = doc.data
    for depth, part in enumerate(path[:-1]):
        here = ".".join(map(str, path[: depth + 1]))
        if isinstance(target, dict) and isinstance(part, str):
            target = target.setdefault(part, {})
        elif isinstance(target, list) and isinstance(part, int) and part < len(target):
            target = target[part]
        else:
            raise SpecError(f"cannot set '{text.partition('=')[0]}': nothing at '{here}'", where)
    last = path[-1]
    settable = (isinstance(target, dict) and isinstance(last, str)) or (
        isinstance(target, list) and isinstance(last, int) and last < len(target)
    )
    if not settable:
        raise SpecError(f"cannot set '{text.partition('=')[0]}': no such field", where)
    old = target.get(last) if isinstance(target, dict) else target[last]
    target[last] = value
    _forget(doc, path, container=isinstance(old, dict | list))
    doc.values[path] = where
    doc.keys[path] = where


# -- pydantic errors -> one line -----------------------------------------------------


def _spec_error(err: ValidationError, doc: Document, path: FsPath) -> SpecError:
    """Every pydantic error as a SpecError, in file order; one error alone, several as SpecErrors."""
    errors = err.errors(include_url=False)
    # a misspelt key is reported once: "unknown key 'growth_rat'; did you mean 'growth_rate'?"
    # explains the "missing required field 'growth_rate'" that comes with it
    explained = {(tuple(e["loc"][:-1]), _suggestion(e)) for e in errors if e["type"] == "extra_forbidden"}
    found: list[SpecError] = []
    seen: set[str] = set()
    for e in errors:
        if e["type"] == "missing" and (tuple(e["loc"][:-1]), e["loc"][-1]) in explained:
            continue
        one = _one_error(e, doc, path)
        if str(one) not in seen:
            seen.add(str(one))
            found.append(one)
    found.sort(key=_position_key(found))
    return found[0] if len(found) == 1 else SpecErrors(found)


def _position_key(found: list[SpecError]):
    """Sort by file (in order of first appearance), then line and column; positionless errors first."""
    sources: dict[str, int] = {}
    for e in found:
        if e.location is not None:
            sources.setdefault(e.location.source, len(sources))

    def key(e: SpecError) -> tuple:
        loc = e.location
        if loc is None or loc.line is None:
            return (0, sources.get(loc.source, -1) if loc else -1, 0, 0)
        return (1, sources[loc.source], loc.line, loc.col or 0)

    return key


def _suggestion(e: dict) -> str | None:
    """The field a misspelt key most likely meant, or None."""
    loc = tuple(e["loc"])
    close = difflib.get_close_matches(str(loc[-1]), sorted(_fields_at(Spec, loc[:-1])), n=1)
    return close[0] if close else None


def _one_error(first: dict, doc: Document, path: FsPath) -> SpecError:
    """One pydantic error as a SpecError at the position of the key or value it is about."""
    loc: Path = tuple(first["loc"])
    kind = first["type"]
    rule = (first.get("ctx") or {}).get("error")
    if isinstance(rule, RuleError):
        loc = loc + rule.path
    dotted = _dotted(loc)

    if kind == "extra_forbidden":
        parent, key = loc[:-1], loc[-1]
        known = sorted(_fields_at(Spec, parent))
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of: {', '.join(known)}"
        where = f" in '{_dotted(parent)}'" if parent else ""
        return SpecError(f"unknown key {_show(key)}{where}{hint}", _nearest(doc.keys, loc) or _nearest(doc.values, loc))
    if kind == "missing":
        if loc == ("version",):
            return SpecError("missing required field 'version' (expected version: 1)", _nearest(doc.values, loc))
        return SpecError(f"missing required field '{dotted}'", _nearest(doc.values, loc))

    message = first["msg"]
    if kind == "model_type":  # pydantic says "a valid dictionary or instance of Stem"
        message = "expected a mapping of fields"
    if kind in ("too_short", "too_long"):
        ctx = first["ctx"]
        bound = "at least" if kind == "too_short" else "at most"
        limit = ctx.get("min_length", ctx.get("max_length"))
        message = f"expected {bound} {limit} item{'s' if limit != 1 else ''}, got {ctx['actual_length']}"
    for prefix in ("Value error, ", "Input should be "):
        if message.startswith(prefix):
            message = ("expected " if prefix == "Input should be " else "") + message[len(prefix) :]
    if kind == "string_pattern_mismatch" and loc == ("name",):
        message = "expected a lower-case identifier (letters, digits, _; starting with a letter)"
    got = "" if isinstance(rule, RuleError) or kind.startswith("too_") else f", got {_show(first['input'])}"
    hint = ""
    if kind == "literal_error" and isinstance(first["input"], str):
        choices = [c.strip(" '") for c in first["ctx"]["expected"].replace(" or ", ",").split(",")]
        close = difflib.get_close_matches(first["input"], choices, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
    where = _nearest(doc.values, loc)
    if loc == ("name",) and ("name",) not in doc.values:
        message += " (the name defaults to the file name; set name: explicitly)"
    return SpecError(f"{dotted}: {message}{got}{hint}", where or Location(str(path), 1, 1))


def _nearest(table: dict[Path, Location], loc: Path) -> Location | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in table:
            return table[loc[:end]]
    return None


def _dotted(loc: Path) -> str:
    return ".".join(str(p) for p in loc)


def _show(value: Any) -> str:
    """A value for a one-line message, cut short; the CLI makes control characters visible."""
    text = f"'{value}'" if isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _fields_at(model: type[BaseModel], loc: Path) -> set[str]:
    """The field names of the model found at `loc` inside `model` (for "did you mean")."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return set()
        current = _model_in(current.model_fields[part].annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return set(current.model_fields)
    return set()


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None

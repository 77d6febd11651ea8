"""Load stage: YAML file(s) -> validated Spec.

ruamel.yaml keeps the position of every key and value and rejects duplicate keys.
The document is turned into plain data plus a map from field path to position, so
that `extends:` merging and `--set` overrides keep track of where each value came
from, and every pydantic error can be reported as `file:line:col: field: message`.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from dnc.errors import Location, SpecError, SpecErrors
from dnc.spec import Path, RuleError, Spec

MAX_EXTENDS_DEPTH = 16


@dataclass
class Document:
    """Plain data of a (possibly merged) spec and where each value and key came from."""

    data: dict[str, Any]
    values: dict[Path, Location] = field(default_factory=dict)
    keys: dict[Path, Location] = field(default_factory=dict)


def load_spec(path: str | FsPath, overrides: typing.Sequence[str] = ()) -> Spec:
    """Read, merge (`extends`), override (`--set`) and validate one spec file."""
    doc = load_document(FsPath(path))
    for text in overrides:
        _apply_override(doc, text)
    return validate(doc, FsPath(path))


def load_document(path: FsPath, _chain: tuple[FsPath, ...] = ()) -> Document:
    """One file as a Document, with its `extends:` chain merged underneath it."""
    doc = _read_yaml(path)
    if _chain:  # a parent's name and description describe the parent, not its children
        for key in ("name", "description"):
            doc.data.pop(key, None)
            _forget(doc, (key,))
    parent = doc.data.pop("extends", None)
    where = doc.values.get(("extends",))
    if parent is None:
        return doc
    if not isinstance(parent, str):
        raise SpecError(f"extends: expected a file name, got {parent!r}", where)
    target = (path.parent / parent).resolve()
    if target in _chain or target == path.resolve():
        cycle = " -> ".join(p.name for p in (*_chain, path.resolve(), target))
        raise SpecError(f"extends: cycle {cycle}", where)
    if len(_chain) >= MAX_EXTENDS_DEPTH:
        raise SpecError(f"extends: more than {MAX_EXTENDS_DEPTH} levels", where)
    if not target.is_file():
        raise SpecError(f"extends: no such file '{parent}' (looked in {target.parent})", where)
    base = load_document(target, (*_chain, path.resolve()))
    return _merge(base, doc)


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


def _read_yaml(path: FsPath) -> Document:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("no such file", Location(str(path))) from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"cannot read: {err}", Location(str(path))) from None
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        root = yaml.load(text)
    except MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = (err.problem or err.context or "invalid YAML").strip().removeprefix("found ")
        loc = Location(str(path), mark.line + 1, mark.column + 1) if mark else Location(str(path))
        raise SpecError(problem, loc) from None
    if not isinstance(root, CommentedMap):
        raise SpecError("expected a mapping of spec fields at the top level", Location(str(path), 1, 1))
    doc = Document(data={})
    doc.data = _plain(root, (), str(path), doc)
    doc.values[()] = Location(str(path), 1, 1)
    return doc


def _plain(node: Any, path: Path, source: str, doc: Document) -> Any:
    """ruamel nodes -> plain Python data, recording positions into doc."""
    if isinstance(node, CommentedMap):
        out = {}
        for key in node:
            if not isinstance(key, str):
                line, col = node.lc.key(key)
                raise SpecError(f"keys must be strings, got {key!r}", Location(source, line + 1, col + 1))
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
    # ruamel's round-trip scalars subclass the builtins; hand pydantic the builtins
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
                    _forget(out, (*path, key))
            return merged
        return o

    out.data = merge(base.data, over.data, ())
    out.values.update(over.values)
    out.keys.update(over.keys)
    return out


def _forget(doc: Document, prefix: Path) -> None:
    for table in (doc.values, doc.keys):
        for path in [p for p in table if p[: len(prefix)] == prefix]:
            del table[path]


def parse_override(text: str) -> tuple[Path, Any]:
    """`blocks.2.growth_rate=48` -> (("blocks", 2, "growth_rate"), 48); values are YAML."""
    where = Location(f"--set {text}")
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpecError("expected --set path.to.field=value", where)
    path = tuple(int(p) if p.isdigit() else p for p in key.strip().split("."))
    if any(p == "" for p in path):
        raise SpecError(f"empty segment in field path '{key}'", where)
    try:
        value = YAML(typ="safe").load(raw) if raw.strip() else None
    except MarkedYAMLError as err:
        raise SpecError(f"value is not valid YAML: {err.problem}", where) from None
    if isinstance(value, list) and path == ("blocks",):
        value = [_block_shorthand(v) for v in value]
    elif len(path) == 2 and path[0] == "blocks":
        value = _block_shorthand(value)
    return path, value


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
    if settable:
        target[last] = value
    else:
        raise SpecError(f"cannot set '{text.partition('=')[0]}': no such field", where)
    _forget(doc, path)
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
    for e in errors:
        if e["type"] == "missing" and (tuple(e["loc"][:-1]), e["loc"][-1]) in explained:
            continue
        one = _one_error(e, doc, path)
        if all(str(one) != str(seen) for seen in found):
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
        return SpecError(f"unknown key '{key}'{where}{hint}", _nearest(doc.keys, loc) or _nearest(doc.values, loc))
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
    text = repr(value)
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

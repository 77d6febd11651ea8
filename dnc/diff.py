"""`dnc diff`: compare the networks two specs build, not their text.

A side is a spec file or a git revision of one (`REV:path`). Two sides are the same
network when their inferred IRs are equal: the same ops with the same attributes and
units, the same wiring (operand order included) and the same inferred shapes; the
network's name and where nodes came from do not count. Options that change how the
code runs but not what it computes (`memory_efficient`) are compared on their own.
Per-stage rows come from `summarize`, checkpoint keys from the nodes' tensors.
The result is plain data; `to_json` and `to_markdown` render it here, the terminal
table lives in render.py.
"""

from __future__ import annotations

import json
import posixpath
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import networkx as nx
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from dnc.errors import DncError, Location
from dnc.ir import Node, UnitKind, inputs, ordered
from dnc.loader import MAX_EXTENDS_DEPTH, resolved_data
from dnc.pipeline import build
from dnc.summary import StageRow, Summary, summarize

ABSENT = object()  # a field one side does not have (a block the other side lacks)
STAGE_FIELDS = ("layers", "growth_rate", "input_shape", "output_shape", "params", "macs")
SHOWN_KEY_GROUPS = 12  # key groups listed per kind in text and markdown (JSON lists every key)


@dataclass(frozen=True)
class Side:
    """One side of a diff: where it came from and what it builds."""

    source: str  # the argument as given: a path or REV:path
    data: dict[str, Any]  # resolved spec data
    summary: Summary
    state: dict[str, tuple[int, ...]]  # state_dict key -> shape
    owners: dict[str, tuple[Node, str]]  # state_dict key -> (its node, the tensor's name)
    network: tuple  # the IR in canonical form: what decides "same network"
    options: dict[str, Any]  # how the code runs, not what it computes


@dataclass(frozen=True)
class FieldChange:
    field: str  # dotted path into the resolved spec, e.g. blocks.2.layers
    a: Any  # ABSENT where side A lacks the field
    b: Any


@dataclass(frozen=True)
class StageChange:
    stage: str
    a: StageRow | None  # None where side A has no such stage
    b: StageRow | None
    changed: tuple[str, ...]  # which of STAGE_FIELDS differ (all, if a side lacks the stage)


@dataclass(frozen=True)
class Checkpoint:
    """Loading a state_dict of A into B: torch's unexpected keys, missing keys and size mismatches."""

    missing_in_b: list[str]  # keys of A that B does not have (torch: unexpected_keys)
    new_in_b: list[str]  # keys of B that A does not have (torch: missing_keys)
    changed_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    @property
    def strict_missing(self) -> list[str]:
        """The keys torch's strict load reports missing.

        NOTE: BatchNorm fills in an absent `num_batches_tracked` itself (old checkpoints
        lack it), so torch never reports that key missing.
        """
        return [k for k in self.new_in_b if not k.endswith(".num_batches_tracked")]

    @property
    def loads(self) -> bool:
        return not (self.missing_in_b or self.strict_missing or self.changed_shape)


@dataclass(frozen=True)
class Diff:
    a: Side
    b: Side
    fields: list[FieldChange]
    stages: list[StageChange]
    checkpoint: Checkpoint
    options: list[FieldChange]  # option changes (memory_efficient), whatever the networks

    @property
    def same(self) -> bool:
        """The same network: equal IRs."""
        return self.a.network == self.b.network


# -- loading a side ----------------------------------------------------------------


def load_side(arg: str, overrides: Sequence[str] = (), cwd: Path | None = None) -> Side:
    """A spec file, or `REV:path` read from git in `cwd`, built to an inferred IR."""
    path = Path(arg) if cwd is None else cwd / arg
    rev, sep, rel = arg.partition(":")
    if path.exists() or not (rev and sep and rel):  # a file, or the loader's "no such file"
        spec, graph = build(path, overrides)
        return _side(arg, spec, graph)
    cwd = Path.cwd() if cwd is None else cwd
    with tempfile.TemporaryDirectory(prefix="dnc-diff-") as tmp:
        local = _materialise(rev, rel, cwd, Path(tmp))
        try:
            spec, graph = build(local, overrides)
        except DncError as err:
            raise _relocate(err, tmp, f"{rev}:") from None
    return _side(arg, spec, graph)


OPTIONS = ("memory_efficient",)  # graph attributes that change how code runs, not what it computes


def _side(source: str, spec, graph: nx.DiGraph) -> Side:
    owners = {n.key(t): (n, t.name) for n in ordered(graph) for t in n.tensors}
    state = {n.key(t): t.shape for n in ordered(graph) for t in n.tensors}
    options = {k: graph.graph.get(k) for k in OPTIONS}
    return Side(source, resolved_data(spec), summarize(graph), state, owners, network(graph), options)


def network(graph: nx.DiGraph) -> tuple:
    """The IR as comparable data: per node its path, op, attributes, unit, inputs in port order and shape."""
    return tuple((n.path, n.op, n.attrs, n.unit, tuple(inputs(graph, n.scope)), n.shape) for n in ordered(graph))


def _materialise(rev: str, rel: str, cwd: Path, tmp: Path) -> Path:
    """Write `rev:rel` and the files its `extends:` chain names, as of `rev`, under tmp."""
    where = Location(f"{rev}:{rel}")
    if rel.startswith(("./", "../")):  # git reads these relative to cwd; extends needs the repo path
        prefix = _git(["rev-parse", "--show-prefix"], cwd, where).decode().strip()
        rel = posixpath.normpath(posixpath.join(prefix, rel))
    rel = posixpath.normpath(rel)
    if rel.startswith("../"):
        raise DncError("path leaves the repository", where)
    first = tmp / rel
    for _ in range(MAX_EXTENDS_DEPTH + 1):
        text = _git(["show", f"{rev}:{rel}"], cwd, Location(f"{rev}:{rel}"))
        local = tmp / rel
        if local.exists():  # a cycle: the loader names it
            break
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(text)
        parent = _extends(text)
        if parent is None:
            break
        rel = posixpath.normpath(posixpath.join(posixpath.dirname(rel), parent))
        if rel.startswith("../") or posixpath.isabs(rel):
            break  # outside the repository: the loader reports the missing file
        try:
            _git(["cat-file", "-e", f"{rev}:{rel}"], cwd, where)
        except DncError:
            break  # the loader reports `extends: no such file` at the right line
    return first


def _extends(text: bytes) -> str | None:
    try:
        data = YAML(typ="safe", pure=True).load(text)
    except YAMLError:
        return None  # the loader reports it with a position
    parent = data.get("extends") if isinstance(data, dict) else None
    return parent if isinstance(parent, str) else None


def _git(args: list[str], cwd: Path, where: Location) -> bytes:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=60)
    except FileNotFoundError:
        raise DncError("git not found; a REV:path argument needs git", where) from None
    if done.returncode:
        lines = done.stderr.decode(errors="replace").strip().splitlines() or [f"exit status {done.returncode}"]
        raise DncError(f"cannot read from git: {lines[0].removeprefix('fatal: ')}", where)
    return done.stdout


def _relocate(err: DncError, tmp: str, rev: str) -> DncError:
    """Name `REV:path` instead of the temporary copy in an error from a revision."""
    prefix = str(Path(tmp)) + "/"
    message = err.message.replace(prefix, rev)
    loc = err.location
    if loc is not None and loc.source.startswith(prefix):
        loc = replace(loc, source=rev + loc.source[len(prefix) :])
    return type(err)(message, loc)


# -- comparing ---------------------------------------------------------------------


def compare(a: Side, b: Side) -> Diff:
    """What differs between two networks: spec fields, stages, totals, checkpoint keys."""
    options = [FieldChange(k, a.options[k], b.options[k]) for k in OPTIONS if a.options[k] != b.options[k]]
    fields = [c for c in _field_changes(a.data, b.data) if c.field not in OPTIONS]
    return Diff(a, b, fields, _stage_changes(a.summary, b.summary), _checkpoint(a, b), options)


def _flatten(value: Any, path: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{path}.{key}" if path else key, out)
    elif isinstance(value, list) and path == "blocks":
        for i, item in enumerate(value):
            _flatten(item, f"{path}.{i}", out)
    else:
        out[path] = value
    return out


def _field_changes(a: dict[str, Any], b: dict[str, Any]) -> list[FieldChange]:
    strip = {"name", "description"}  # they name a network, they do not change it
    fa = _flatten({k: v for k, v in a.items() if k not in strip}, "", {})
    fb = _flatten({k: v for k, v in b.items() if k not in strip}, "", {})
    keys = list(fa) + [k for k in fb if k not in fa]
    changes = [
        FieldChange(k, fa.get(k, ABSENT), fb.get(k, ABSENT)) for k in keys if fa.get(k, ABSENT) != fb.get(k, ABSENT)
    ]
    # A spec-wide change shows once, not again in every block that inherits it (x -> y alike).
    spec_wide = {c.field: (c.a, c.b) for c in changes if "." not in c.field}
    return [c for c in changes if not _inherited(c, spec_wide)]


def _inherited(c: FieldChange, spec_wide: dict[str, tuple[Any, Any]]) -> bool:
    parts = c.field.split(".")
    return len(parts) == 3 and parts[0] == "blocks" and spec_wide.get(parts[2]) == (c.a, c.b)


def _stage_changes(a: Summary, b: Summary) -> list[StageChange]:
    rows_a = {r.stage: r for r in a.stages}
    rows_b = {r.stage: r for r in b.stages}
    names = list(rows_a) + [s for s in rows_b if s not in rows_a]
    out = []
    for stage in names:
        ra, rb = rows_a.get(stage), rows_b.get(stage)
        if ra is None or rb is None:
            changed = STAGE_FIELDS
        else:
            changed = tuple(f for f in STAGE_FIELDS if getattr(ra, f) != getattr(rb, f))
        out.append(StageChange(stage, ra, rb, changed))
    return out


def _checkpoint(a: Side, b: Side) -> Checkpoint:
    return Checkpoint(
        missing_in_b=[k for k in a.state if k not in b.state],
        new_in_b=[k for k in b.state if k not in a.state],
        changed_shape=[(k, s, b.state[k]) for k, s in a.state.items() if k in b.state and b.state[k] != s],
    )


# -- shared formatting -------------------------------------------------------------


def show_value(value: Any) -> str:
    if value is ABSENT:
        return "—"
    return json.dumps(value)


def show_shape(shape) -> str:
    return "—" if shape is None else "x".join(map(str, shape))


def count(n: int) -> str:
    return f"{n:,}"


def delta(a: int, b: int) -> str:
    """`+6,170,624 (+77.3%)`; `±0` when equal."""
    if a == b:
        return "±0"
    pct = ""
    if a:
        ratio = (b - a) / a * 100
        pct = f" ({ratio:+.2g}%)" if abs(ratio) < 0.1 else f" ({ratio:+.1f}%)"
    return f"{b - a:+,}{pct}"


def cell(a: Any, b: Any, fmt=str) -> str:
    """One value if both sides agree, else `a → b`; a missing side shows as —."""
    sa = "—" if a is None else fmt(a)
    sb = "—" if b is None else fmt(b)
    return sa if sa == sb else f"{sa} → {sb}"


def stage_cells(c: StageChange) -> list[str]:
    """stage, layers, k, output (CxHxW), params, MACs: each `a → b` where it changed."""

    def get(row, attr):
        return None if row is None else getattr(row, attr)

    def block_only(row, attr):
        return None if row is None else (getattr(row, attr) or "")

    return [
        c.stage,
        cell(block_only(c.a, "layers"), block_only(c.b, "layers")),
        cell(block_only(c.a, "growth_rate"), block_only(c.b, "growth_rate")),
        cell(get(c.a, "output_shape"), get(c.b, "output_shape"), show_shape),
        cell(get(c.a, "params"), get(c.b, "params"), count),
        cell(get(c.a, "macs"), get(c.b, "macs"), count),
    ]


STAGE_HEADER = ["stage", "layers", "k", "output (CxHxW)", "params", "MACs"]


def totals(d: Diff) -> list[tuple[str, int, int]]:
    return [("parameters", d.a.summary.params, d.b.summary.params), ("MACs", d.a.summary.macs, d.b.summary.macs)]


def key_groups(keys: list[str], side: Side) -> list[str]:
    """Keys folded for people: whole dense layers as ranges, other keys by module.

    ['features.denseblock3.denselayer25.norm1.weight', ..., '...denselayer32.conv2.weight']
    -> ['features.denseblock3.denselayer25..32 (96 keys)']
    """
    groups: list[list] = []  # [first node, last node, key count, by layer?]
    for key in keys:
        n, _ = side.owners[key]
        last = groups[-1] if groups else None
        if n.unit.kind is UnitKind.DENSE_LAYER:
            if last and last[3] and last[1].unit.block == n.unit.block and n.unit.layer - last[1].unit.layer in (0, 1):
                last[1] = n
                last[2] += 1
            else:
                groups.append([n, n, 1, True])
        elif last and not last[3] and last[0].scope == n.scope:
            last[2] += 1
        else:
            groups.append([n, n, 1, False])
    out = []
    for first, end, count, layered in groups:
        label = first.scope
        if layered:
            layer = ".".join(first.path[:-1])  # the dense layer's module
            label = layer if first.unit.layer == end.unit.layer else f"{layer}..{end.unit.layer}"
        out.append(f"{label} ({count} key{'s' if count != 1 else ''})")
    return out


def reshaped_groups(changed: list[tuple[str, tuple[int, ...], tuple[int, ...]]], side: Side) -> list[str]:
    """Shape changes by module: `features.transition3.norm.{weight,bias,...}: 1024 → 1280`."""
    groups: dict[tuple[str, tuple, tuple], list[str]] = {}
    for key, sa, sb in changed:
        n, leaf = side.owners[key]
        groups.setdefault((n.scope, sa, sb), []).append(leaf)
    out = []
    for (module, sa, sb), leaves in groups.items():
        leaf = leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}"
        out.append(f"{module}.{leaf}: {show_shape(sa)} → {show_shape(sb)}")
    return out


def checkpoint_line(c: Checkpoint) -> str:
    if c.loads:
        return "a checkpoint of A loads into B (strict): same keys, same shapes"
    return (
        "a checkpoint of A does not load into B (strict): "
        f"{len(c.missing_in_b)} keys missing in B, {len(c.new_in_b)} new in B, {len(c.changed_shape)} change shape"
    )


def verdict(d: Diff) -> str:
    if not d.same:
        return "different networks"
    return "same network, different options" if d.options else "same network"


def exit_status(d: Diff) -> int:
    """0 same network and options, 1 different networks, 4 the same network run with other options."""
    if not d.same:
        return 1
    return 4 if d.options else 0


# -- JSON and Markdown -------------------------------------------------------------


def to_json(d: Diff) -> dict[str, Any]:
    def side(s: Side) -> dict[str, Any]:
        return {"source": s.source, "name": s.data["name"], "description": s.data["description"]}

    def field(c: FieldChange) -> dict[str, Any]:
        out: dict[str, Any] = {"field": c.field}
        for key, value in (("a", c.a), ("b", c.b)):
            if value is not ABSENT:  # a side without the field has no key
                out[key] = value
        return out

    def row(r: StageRow | None):
        if r is None:
            return None
        return {f: list(v) if isinstance(v, tuple) else v for f, v in ((f, getattr(r, f)) for f in STAGE_FIELDS)}

    c = d.checkpoint
    return {
        "a": side(d.a),
        "b": side(d.b),
        "same_network": d.same,
        "options": [field(f) for f in d.options],
        "fields": [field(f) for f in d.fields],
        "stages": [{"stage": s.stage, "changed": list(s.changed), "a": row(s.a), "b": row(s.b)} for s in d.stages],
        "totals": {name.lower(): {"a": a, "b": b, "delta": b - a} for name, a, b in totals(d)},
        "checkpoint": {
            "loads_strict": c.loads,
            "missing_in_b": c.missing_in_b,
            "new_in_b": c.new_in_b,
            "changed_shape": [{"key": k, "a": list(sa), "b": list(sb)} for k, sa, sb in c.changed_shape],
        },
    }


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]
    return lines + [""]


def _md_keys(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    shown = items[:SHOWN_KEY_GROUPS]
    more = [f"- … and {len(items) - len(shown)} more"] if len(items) > len(shown) else []
    return [f"<details><summary>{title}</summary>", "", *[f"- `{i}`" for i in shown], *more, "", "</details>", ""]


def to_markdown(d: Diff) -> str:
    """A pull-request comment: one section per compared pair."""
    a, b = d.a, d.b
    head = f"### `{a.source}` → `{b.source}`: {verdict(d)}"
    lines = [head, ""]
    if a.data["name"] != b.data["name"]:
        lines += [f"Name: `{a.data['name']}` → `{b.data['name']}`", ""]
    if d.options:
        lines += ["**Options** (how the code runs, not what it computes)", ""]
        lines += _md_table(
            ["option", "A", "B"], [[f"`{c.field}`", show_value(c.a), show_value(c.b)] for c in d.options]
        )
    if d.same:
        lines += ["The two specs build the same network: equal IRs, so equal checkpoint keys and shapes.", ""]
        return "\n".join(lines)
    lines += ["**Spec fields** (resolved: defaults and per-block values filled in)", ""]
    lines += _md_table(["field", "A", "B"], [[f"`{c.field}`", show_value(c.a), show_value(c.b)] for c in d.fields])
    changed = [stage_cells(s) for s in d.stages if s.changed]
    if changed:
        lines += ["**Stages that changed**", ""]
        lines += _md_table(STAGE_HEADER, changed)
    lines += ["**Totals**", ""]
    lines += _md_table(["", "A", "B", "delta"], [[n, count(x), count(y), delta(x, y)] for n, x, y in totals(d)])
    c = d.checkpoint
    mark = "✅" if c.loads else "❌"
    lines += [f"**Checkpoint**: {mark} {checkpoint_line(c)}", ""]
    lines += _md_keys(f"{len(c.missing_in_b)} keys of A missing in B", key_groups(c.missing_in_b, a))
    lines += _md_keys(f"{len(c.new_in_b)} keys new in B", key_groups(c.new_in_b, b))
    lines += _md_keys(f"{len(c.changed_shape)} keys that change shape", reshaped_groups(c.changed_shape, a))
    return "\n".join(lines)

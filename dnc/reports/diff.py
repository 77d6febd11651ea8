"""`dnc diff`: compare the networks two specs build, not their text.

A side is a spec file or a git revision of one (`REV:path`, read by revisions.py).
Two sides are the same network when their inferred IRs are equal: the same ops with
the same attributes and units, the same wiring (operand order included) and the same
inferred shapes; the network's name and where nodes came from do not count. Options
that change how the code runs but not what it computes (`memory_efficient`) are
compared on their own. Per-stage rows come from `summarize`, checkpoint keys from the
nodes' tensors. The result is plain data: diff_report.py renders it as JSON and
Markdown, render.py as a terminal table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from dnc.errors import DncError
from dnc.frontend.loader import resolved_data
from dnc.frontend.revisions import materialised, relocate, split_revision
from dnc.ir.graph import Node, inputs, ordered
from dnc.ir.infer import state_dict_shapes
from dnc.pipeline import build
from dnc.reports.summary import StageRow, Summary, summarize

ABSENT = object()  # a field one side does not have (a block the other side lacks)
STAGE_FIELDS = ("layers", "growth_rate", "input_shape", "output_shape", "params", "macs")


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


def load_side(arg: str, overrides: Sequence[str] = (), cwd: Path | None = None, policy: Mapping | None = None) -> Side:
    """A spec file, or `REV:path` read from git in `cwd`, built to an inferred IR.

    `policy` holds `build`'s limits and spec roots; a revision's copy is its own spec root.
    """
    policy = dict(policy or {})
    path = Path(arg) if cwd is None else cwd / arg
    revision = split_revision(arg)
    if os.path.lexists(path) or revision is None:  # a file, or the loader's "no such file"
        spec, graph = build(path, overrides, **policy)
        return _side(arg, spec, graph)
    rev, rel = revision
    with materialised(rev, rel, Path.cwd() if cwd is None else cwd) as (local, tmp):
        try:
            spec, graph = build(local, overrides, **{**policy, "roots": (tmp,)})
        except DncError as err:
            raise relocate(err, tmp, rev) from None
    return _side(arg, spec, graph)


OPTIONS = ("memory_efficient",)  # graph attributes that change how code runs, not what it computes


def _side(source: str, spec, graph: nx.DiGraph) -> Side:
    owners = {n.key(t): (n, t.name) for n in ordered(graph) for t in n.tensors}
    state = state_dict_shapes(graph)
    options = {k: graph.graph.get(k) for k in OPTIONS}
    return Side(source, resolved_data(spec), summarize(graph), state, owners, network(graph), options)


def network(graph: nx.DiGraph) -> tuple:
    """The IR as comparable data: per node its path, op, attributes, unit, inputs in port order and shape."""
    return tuple((n.path, n.op, n.attrs, n.unit, tuple(inputs(graph, n.scope)), n.shape) for n in ordered(graph))


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


def verdict(d: Diff) -> str:
    if not d.same:
        return "different networks"
    return "same network, different options" if d.options else "same network"


def exit_status(d: Diff) -> int:
    """0 same network and options, 1 different networks, 4 the same network run with other options."""
    if not d.same:
        return 1
    return 4 if d.options else 0

"""Reports of a `dnc diff`: the formatting every renderer shares, JSON and Markdown.

Pure functions of a `diff.Diff`; no I/O. Outside text (sources, names) reaching
Markdown goes through `text.markdown_code`. The terminal table lives in render.py.
"""

from __future__ import annotations

import json
from typing import Any

from dnc.ir.graph import UnitKind
from dnc.reports.diff import ABSENT, STAGE_FIELDS, Checkpoint, Diff, FieldChange, Side, StageChange, verdict
from dnc.reports.summary import StageRow
from dnc.text import markdown_code, markdown_text

SHOWN_KEY_GROUPS = 12  # key groups listed per kind in text and markdown (JSON lists every key)


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


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; cells are plain text (escaped here) unless a code span of dnc's own names."""

    def cell(text: str) -> str:
        code = text.startswith("`") and text.endswith("`") and "`" not in text[1:-1]
        return text if code else markdown_text(text)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return lines + [""]


def _md_keys(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    shown = items[:SHOWN_KEY_GROUPS]
    more = [f"- … and {len(items) - len(shown)} more"] if len(items) > len(shown) else []
    return [
        f"<details><summary>{title}</summary>",
        "",
        *[f"- {markdown_code(i)}" for i in shown],
        *more,
        "",
        "</details>",
        "",
    ]


def to_markdown(d: Diff) -> str:
    """A pull-request comment: one section per compared pair."""
    a, b = d.a, d.b
    head = f"### {markdown_code(a.source)} → {markdown_code(b.source)}: {verdict(d)}"
    lines = [head, ""]
    if a.data["name"] != b.data["name"]:
        lines += [f"Name: {markdown_code(a.data['name'])} → {markdown_code(b.data['name'])}", ""]
    if d.options:
        lines += ["**Options** (how the code runs, not what it computes)", ""]
        lines += _md_table(
            ["option", "A", "B"], [[f"`{c.field}`", show_value(c.a), show_value(c.b)] for c in d.options]
        )
    if d.same:
        lines += ["The two specs build the same network: equal IRs, so equal checkpoint keys and shapes.", ""]
        return "\n".join(lines)
    lines += ["**Spec fields** (resolved: defaults and per-block values filled in)", ""]
    # field paths are the spec model's own names; values are plain text, escaped by _md_table
    fields = [[f"`{c.field}`", show_value(c.a), show_value(c.b)] for c in d.fields]
    lines += _md_table(["field", "A", "B"], fields)
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

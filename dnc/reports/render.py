"""Terminal rendering of summaries with rich (imported only when a table is printed)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dnc.reports.diff import Diff, verdict
from dnc.reports.diff_report import (
    SHOWN_KEY_GROUPS,
    STAGE_HEADER,
    checkpoint_line,
    delta,
    key_groups,
    reshaped_groups,
    show_value,
    stage_cells,
    totals,
)
from dnc.reports.memory import OPTIMIZERS, TrainingMemory
from dnc.reports.summary import Summary
from dnc.text import visible


def safe(text: object) -> str:
    """Outside text for rich: one line (controls shown escaped), and no markup (`[bold]` stays text)."""
    return escape(visible(str(text)))


def fmt_shape(shape) -> str:
    return "x".join(map(str, shape))


def fmt_count(n: int) -> str:
    """1234567 -> '1.23M': three significant digits, as people quote network sizes."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def summary_table(s: Summary, passes: str = "", console: Console | None = None) -> None:
    """The per-stage table; `passes` (`-O2`) says which optimisation passes the title's network ran."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # rich assumes 80 columns for a pipe; the table needs more
            console.width = 120
    name = f"{s.name} {passes}" if passes else s.name
    table = Table(title=f"{safe(name)}  (input {fmt_shape(s.input_shape)})", title_justify="left")
    for col in ("stage", "layers", "k", "output (CxHxW)", "channels", "params", "MACs"):
        table.add_column(col, justify="left" if col in ("stage", "output (CxHxW)") else "right")
    for r in s.stages:
        table.add_row(
            safe(r.stage),
            str(r.layers) if r.layers else "",
            str(r.growth_rate) if r.layers else "",
            fmt_shape(r.output_shape),
            str(r.output_shape[0]),
            f"{r.params:,}",
            f"{r.macs:,}",
        )
    table.add_section()
    table.add_row("total", "", "", fmt_shape(s.output_shape), "", f"{s.params:,}", f"{s.macs:,}", style="bold")
    console.print(table)
    console.print(f"{s.params:,} parameters ({fmt_count(s.params)}), {s.macs:,} MACs ({fmt_count(s.macs)})")
    for note in s.notes:
        console.print(f"note: {safe(note)}", style="yellow")


def fmt_bytes(n: int) -> str:
    """Bytes in binary units, three significant digits: 1.23 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def memory_table(m: TrainingMemory, console: Console | None = None) -> None:
    """`dnc summary --batch N`: the estimated memory of a float32 training step, per stage and in total."""
    if console is None:
        console = Console(highlight=False)
        if not console.is_terminal:
            console.width = 120
    table = Table(title=f"training memory, batch {m.batch}, float32 (estimate)", title_justify="left")
    for col in ("stage", "activations", "memory_efficient", "weights"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in m.stages:
        table.add_row(
            s.stage, fmt_bytes(s.activations), fmt_bytes(s.activations_memory_efficient), fmt_bytes(s.weights)
        )
    table.add_section()
    table.add_row(
        "total", fmt_bytes(m.activations), fmt_bytes(m.activations_memory_efficient), fmt_bytes(m.weights), style="bold"
    )
    console.print(table)
    console.print(f"gradients: {fmt_bytes(m.gradients)}")
    for key, (name, _) in OPTIMIZERS.items():
        console.print(f"optimizer state, {name}: {fmt_bytes(m.optimizer_state[key])}")
    for key, (name, _) in OPTIMIZERS.items():
        console.print(
            f"total with {name}: {fmt_bytes(m.total(key, False))}, "
            f"{fmt_bytes(m.total(key, True))} with memory_efficient"
        )


def diff_text(d: Diff, console: Console | None = None) -> None:
    """`dnc diff` for a terminal: fields, changed stages, totals, checkpoint keys."""
    if console is None:
        console = Console(highlight=False)
        if not console.is_terminal:
            console.width = 120
    a, b = d.a, d.b
    console.print(f"A: {safe(a.source)} ({safe(a.data['name'])})\nB: {safe(b.source)} ({safe(b.data['name'])})")
    for c in d.options:
        console.print(f"option {c.field}: {show_value(c.a)} → {show_value(c.b)}", markup=False)
    if d.same:
        console.print(verdict(d), style="bold green")
        return
    console.print("different networks", style="bold red")
    fields = Table(title="spec fields (resolved)", title_justify="left")
    for col in ("field", "A", "B"):
        fields.add_column(col)
    for c in d.fields:
        fields.add_row(safe(c.field), safe(show_value(c.a)), safe(show_value(c.b)))
    console.print(fields)
    changed = [s for s in d.stages if s.changed]
    if changed:
        stages = Table(title="stages that changed", title_justify="left")
        for col in STAGE_HEADER:
            stages.add_column(col, justify="left" if col in ("stage", "output (CxHxW)") else "right")
        for s in changed:
            stages.add_row(*map(safe, stage_cells(s)))
        console.print(stages)
    for name, x, y in totals(d):
        console.print(f"{name}: {x:,} ({fmt_count(x)}) → {y:,} ({fmt_count(y)}), {delta(x, y)}")
    c = d.checkpoint
    console.print(f"checkpoint: {checkpoint_line(c)}", style="green" if c.loads else "yellow")
    for title, items in (
        ("missing in B", key_groups(c.missing_in_b, a)),
        ("new in B", key_groups(c.new_in_b, b)),
        ("change shape", reshaped_groups(c.changed_shape, a)),
    ):
        for item in items[:SHOWN_KEY_GROUPS]:
            console.print(f"  {title}: {visible(item)}", markup=False)
        if len(items) > SHOWN_KEY_GROUPS:
            console.print(f"  {title}: … and {len(items) - SHOWN_KEY_GROUPS} more (--format json lists every key)")

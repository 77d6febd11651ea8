"""Terminal rendering of summaries with rich (imported only when a table is printed)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from dnc.summary import Summary


def fmt_shape(shape) -> str:
    return "x".join(map(str, shape))


def fmt_count(n: int) -> str:
    """1234567 -> '1.23M': three significant digits, as people quote network sizes."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def summary_table(s: Summary, console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:  # rich assumes 80 columns for a pipe; the table needs more
            console.width = 120
    table = Table(title=f"{s.name}  (input {fmt_shape(s.input_shape)})", title_justify="left")
    for col in ("stage", "layers", "k", "output (CxHxW)", "channels", "params", "MACs"):
        table.add_column(col, justify="left" if col in ("stage", "output (CxHxW)") else "right")
    for r in s.stages:
        table.add_row(
            r.stage,
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
        console.print(f"note: {note}", style="yellow")

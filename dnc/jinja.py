"""The Jinja2 templates of every target: one environment, strict and logic-free.

Templates live in `templates/` at the top of a checkout; an installed wheel carries
them as `dnc/templates/` (pyproject maps the one onto the other).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jinja2

_HERE = Path(__file__).resolve().parent
ROOT = next((p for p in (_HERE.parent / "templates", _HERE / "templates") if p.is_dir()), _HERE.parent / "templates")


@functools.cache
def environment() -> jinja2.Environment:
    """Templates by path below `templates/` (`torch/model.py.j2`); undefined names are errors."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(ROOT),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # code and diagrams, not HTML: each emitter makes its values safe itself
    )

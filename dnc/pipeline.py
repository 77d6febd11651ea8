"""The pipeline as a straight list: load -> lower -> infer. Glue only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import networkx as nx

from dnc.infer import infer
from dnc.loader import load_spec
from dnc.lower import lower
from dnc.spec import Spec


def build(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Spec, nx.DiGraph]:
    """Load a spec file and return it with its inferred IR."""
    spec = load_spec(path, overrides)
    graph = lower(spec, source=Path(path).as_posix())
    return spec, infer(graph)

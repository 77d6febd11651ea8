"""The pipeline as a straight list: load -> check limits -> lower -> infer. Glue only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import networkx as nx

from dnc.infer import infer
from dnc.limits import Limits, check_limits
from dnc.loader import load_spec
from dnc.lower import lower
from dnc.spec import Spec


def build(
    path: str | Path,
    overrides: Sequence[str] = (),
    limits: Limits | None = None,
    roots: Sequence[str | Path] = (),
) -> tuple[Spec, nx.DiGraph]:
    """Load a spec file and return it with its inferred IR.

    The spec is checked against `limits` before it is lowered; `roots` widen where
    `extends:` may read (see `loader.spec_root`).
    """
    spec = load_spec(path, overrides, roots)
    check_limits(spec, limits or Limits())
    graph = lower(spec, source=Path(path).as_posix())
    return spec, infer(graph)

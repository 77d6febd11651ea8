"""The pipeline as a straight list: load -> check limits -> lower -> infer -> *passes, the IR verified after every step.

A pass is a function IR -> IR (an inferred `networkx.DiGraph` in, a new one out)
with a name; adding one is appending it to the list a caller passes in.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence
from pathlib import Path

import networkx as nx

from dnc.files import spec_reference
from dnc.frontend.loader import load_spec
from dnc.frontend.spec import Spec
from dnc.ir.graph import IRError, inference_only
from dnc.ir.infer import infer_in_place
from dnc.ir.limits import Limits, check_limits
from dnc.ir.lower import lower
from dnc.ir.passes import NamedPass, Rewrite, Setting
from dnc.ir.settings import Settings
from dnc.ir.verifier import verify


@contextlib.contextmanager
def cycle_collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector, as it was before afterwards.

    Lowering, inferring and rewriting a maximal spec's IR allocate about a million dicts and records and make no
    reference cycles, yet each full sweep of the collector walks them all: 10-15% of `dnc compile` on such a spec.
    Reference counting frees everything as usual; the pause is process-wide (other threads' cycles wait for it).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@cycle_collector_paused()
def compile_spec(spec: Spec, source: str = "", passes: Sequence[NamedPass] = ()) -> nx.DiGraph:
    """Spec -> inferred IR, then each pass in order; `verify` runs after every rewrite.

    A setting (passes.Setting) changes no node: it changes the settings the graph gets at the end. The graph
    is this function's own from lowering on, and no step keeps the one before: inference and every rewrite
    (passes.Rewrite) work on it in place instead of copying it.
    """
    graph = lower(spec, source)
    _verified("lower", graph, inferred=False)
    graph = _verified("infer", infer_in_place(graph, every_node=True), inferred=True)
    chosen, made_by = Settings(), ""
    for name, step in passes:
        if isinstance(step, Setting):
            chosen = step(chosen)
        else:
            graph = _verified(name, step.in_place(graph) if isinstance(step, Rewrite) else step(graph), inferred=True)
        if not made_by and (chosen.eval_only or inference_only(graph)):
            made_by = name  # the pass that made the network inference-only, for messages
    if chosen != Settings():
        graph.graph["settings"] = chosen
    if made_by:
        graph.graph["inference_only_by"] = made_by
    return graph


def build(
    path: str | Path,
    overrides: Sequence[str] = (),
    limits: Limits | None = None,
    roots: Sequence[str | Path] = (),
    passes: Sequence[NamedPass] = (),
) -> tuple[Spec, nx.DiGraph]:
    """Load a spec file and return it with its inferred (and passed) IR.

    The spec is checked against `limits` before it is lowered; `roots` widen where
    `extends:` may read (see `loader.spec_root`).
    """
    spec = load_spec(path, overrides, roots)
    check_limits(spec, limits or Limits())
    graph = compile_spec(spec, spec_reference(path), passes)
    graph.graph["overrides"] = tuple(overrides)  # for the provenance of generated files
    return spec, graph


def _verified(step: str, graph: nx.DiGraph, *, inferred: bool) -> nx.DiGraph:
    try:
        verify(graph, inferred=inferred)
    except IRError as err:
        raise IRError(f"after {step}: {err}") from None
    return graph

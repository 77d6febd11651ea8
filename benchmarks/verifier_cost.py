"""What the verifier costs on the largest network the default limits allow, and on the largest zoo spec.

Four dense blocks of 512 layers (the `layers_per_block` and `layers` limits) make an IR of
14,355 nodes and 539,666 edges, since a block's concatenations grow with the square of its
layers. Prints the best of --runs CPU times (`time.process_time`, steadier than wall time on
a shared machine) of lowering, inference, the structural checks alone, the full check
with every node re-derived from the op table, and a check again of the same unchanged
graph (what a pass that changes nothing costs); then the full check of one spec at -O2.

    python benchmarks/verifier_cost.py [--runs N] [--spec specs/densenet264.yaml]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dnc.frontend.loader import load_spec  # noqa: E402
from dnc.ir.infer import infer  # noqa: E402
from dnc.ir.lower import lower  # noqa: E402
from dnc.ir.passes import select  # noqa: E402
from dnc.ir.verifier import check_structure, verify  # noqa: E402
from dnc.pipeline import build  # noqa: E402

MAXIMAL = """\
version: 1
name: maximal
input: {channels: 3, size: [32, 32]}
stem: {kind: cifar, width: 16}
growth_rate: 12
bn_size: 4
blocks: [512, 512, 512, 512]
head: {classes: 10}
"""


def best(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        start = time.process_time()
        out = fn()
        times.append(time.process_time() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--spec", default="specs/densenet264.yaml")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "maximal.yaml"
        path.write_text(MAXIMAL)
        spec = load_spec(path)
    t_lower, lowered = best(lambda: lower(spec), args.runs)
    t_infer, graph = best(lambda: infer(lowered), args.runs)
    t_structure, _ = best(lambda: check_structure(graph), args.runs)
    t_verify, _ = best(lambda: verify(graph, inferred=True, full=True), args.runs)
    t_again, _ = best(lambda: verify(graph, inferred=True), args.runs)
    size = f"{graph.number_of_nodes():,} nodes, {graph.number_of_edges():,} edges"
    print(f"maximal spec (4 blocks of 512 layers: {size}), CPU seconds, best of {args.runs}:")
    print(f"  lower {t_lower:.2f}  infer {t_infer:.2f}  check_structure {t_structure:.2f}  verify {t_verify:.2f}")
    print(f"  verify again, nothing changed: {t_again:.2f} (each node's fields and edges compared with the last check)")
    _, graph = build(ROOT / args.spec, passes=select("torch", 2))
    t_verify, _ = best(lambda: verify(graph, inferred=True, full=True), max(args.runs, 10))
    size = f"{graph.number_of_nodes():,} nodes, {graph.number_of_edges():,} edges"
    print(f"{args.spec} at -O2 ({size}): verify {1000 * t_verify:.1f} ms CPU")


if __name__ == "__main__":
    main()

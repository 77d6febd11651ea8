"""How long `dnc compile` takes for the largest spec, wall time, as a user runs it.

Runs the real command in a fresh subprocess several times (interpreter start and
imports included) and prints min / median / max, next to the bare interpreter start
and `import torch` for scale, then the emit stage alone, in process.

With --against-validate: `dnc validate SPEC` and `dnc compile -O2 SPEC` interleaved, run by
run, their medians and the ratio (the hostile-input bound: at most 2x). --maximal compiles
the largest network the default limits allow (4 blocks of 512 layers, as
benchmarks/verifier_cost.py) instead of SPEC.

    python benchmarks/compile_speed.py [SPEC] [--runs N]
    python benchmarks/compile_speed.py --maximal --against-validate [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wall(cmd: list[str], runs: int) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's dnc, whatever is installed
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def show(label: str, times: list[float]) -> None:
    ms = [t * 1000 for t in times]
    print(f"{label:<42} min {min(ms):7.1f} ms   median {statistics.median(ms):7.1f} ms   max {max(ms):7.1f} ms")


def against_validate(py: str, spec: str, out: Path, runs: int) -> None:
    commands = {
        "dnc validate": [py, "-m", "dnc", "validate", spec],
        "dnc compile -O2": [py, "-m", "dnc", "compile", "-O2", "--target", "torch", spec, "-o", str(out)],
    }
    times: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(runs):  # interleaved: the machine's drift falls on both alike
        for label, cmd in commands.items():
            times[label] += wall(cmd, 1)
    print(f"{spec}, {runs} runs each, interleaved, {py}")
    for label, ts in times.items():
        show(label, ts)
    validate, compile_ = (statistics.median(ts) for ts in times.values())
    print(f"compile -O2 / validate: {compile_ / validate:.2f}x (medians)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default="specs/densenet264.yaml")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--maximal", action="store_true", help="compile the maximal spec instead of SPEC")
    parser.add_argument("--against-validate", action="store_true", help="compile -O2 against validate, interleaved")
    args = parser.parse_args()
    py = sys.executable
    if args.maximal or args.against_validate:
        with tempfile.TemporaryDirectory() as tmp:
            spec = args.spec
            if args.maximal:
                from verifier_cost import MAXIMAL

                spec = str(Path(tmp) / "maximal.yaml")
                Path(spec).write_text(MAXIMAL)
            against_validate(py, spec, Path(tmp) / "out", args.runs)
        return
    with tempfile.TemporaryDirectory() as out:
        print(f"{args.runs} runs each, {py}")
        show("python -c pass", wall([py, "-c", "pass"], args.runs))
        show("python -c 'import torch'", wall([py, "-c", "import torch"], min(args.runs, 3)))
        show(f"dnc compile {args.spec}", wall([py, "-m", "dnc", "compile", args.spec, "-o", out], args.runs))

    sys.path.insert(0, str(ROOT))
    from dnc.pipeline import build
    from dnc.targets.torch.emit import emit

    start = time.perf_counter()
    _, graph = build(ROOT / args.spec)
    built = time.perf_counter()
    text = emit(graph)
    emitted = time.perf_counter()
    print(f"in process: load+lower+infer {1000 * (built - start):.1f} ms, emit {1000 * (emitted - built):.1f} ms")
    print(f"{len(text.splitlines())} lines, {len(text)} bytes; torch imported: {'torch' in sys.modules}")


if __name__ == "__main__":
    main()

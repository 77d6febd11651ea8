"""A generated torch module from another revision against this checkout's, eval, in one process.

Compiles the spec at the -O level with the given git revision's own dnc (checked out into a temporary
git worktree, run with that tree on PYTHONPATH) and with this checkout's, loads both modules and
torchvision's DenseNet with the same seeded weights (BN running statistics randomised too), and
times them under no_grad, interleaved round by round (each round starting with the next model), each
keeping its best median of `--calls` calls. Prints each model's time, after/before (>1: this checkout
is faster) and each one's speed-up over torchvision, with the host; and the same ratio taken within each
round (before's median over after's, the two timed back to back), as the median and quartiles over the
rounds: on a shared machine whose speed drifts between rounds, that one is the steadier. For bisecting a speed change
between revisions (e.g. `python benchmarks/before_after.py 0cd2716^ --batch 1 --threads 2`); the
revision must emit a module whose builder takes no arguments and loads torchvision's keys (every
revision since -O levels exist does).

    python benchmarks/before_after.py REV [--spec specs/densenet121.yaml] [-O 2] [--batch 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMPILE = "import sys; from dnc.cli import main; main(sys.argv[1:])"


def compile_with(tree: Path, spec: str, level: int, out: Path) -> Path:
    """The module file `tree`'s dnc writes for `spec` at -O`level` into `out`."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-c", COMPILE, "compile", spec, "--target", "torch", f"-O{level}", "-o", str(out)]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{tree}: dnc compile failed:\n{done.stdout}{done.stderr}")
    (path,) = out.glob("*.py")
    return path


def load(path: Path, tag: str):
    loader = importlib.util.spec_from_file_location(tag, path)
    module = importlib.util.module_from_spec(loader)
    sys.modules[tag] = module
    loader.loader.exec_module(module)
    builder = getattr(module, path.stem, None)
    if not callable(builder):
        raise SystemExit(f"{path}: no builder function named {path.stem}")
    return builder()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the git revision to compare against (before)")
    parser.add_argument("--spec", default="specs/densenet121.yaml")
    parser.add_argument("-O", "--opt-level", type=int, default=2, dest="level")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--calls", type=int, default=7, help="calls per round; a round keeps their median")
    args = parser.parse_args()

    import torch

    from benchmarks.opt_levels import host
    from dnc.check.reference import torchvision_densenet
    from dnc.errors import DncError
    from dnc.ir.graph import graph_input
    from dnc.ir.infer import state_dict_layout
    from dnc.pipeline import build
    from dnc.weights import seeded_state, to_torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), args.rev], cwd=ROOT, check=True)
        try:
            before = compile_with(tree, args.spec, args.level, Path(tmp) / "before")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)
        after = compile_with(ROOT, args.spec, args.level, Path(tmp) / "after")
        models = {"before": load(before, "before_module"), "after": load(after, "after_module")}
        spec, graph = build(args.spec)
        with contextlib.suppress(DncError):  # a spec torchvision cannot express: the two modules only
            models = {"torchvision": torchvision_densenet(spec), **models}
        state = to_torch(seeded_state(state_dict_layout(graph)))  # BN running statistics randomised too
        for model in models.values():
            model.load_state_dict(state)
            model.eval()
        x = torch.randn(args.batch, *graph_input(graph).shape, generator=torch.Generator().manual_seed(2))
        names = list(models)
        best = dict.fromkeys(names, float("inf"))
        paired = []  # per round: before's median / after's
        with torch.no_grad():
            first = {name: model(x) for name, model in models.items()}
            for _ in range(8):  # warm-up, and the 1x1-convolution trials of modules that measure
                for model in models.values():
                    model(x)
            for r in range(args.rounds):
                median = {}
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    times = []
                    for _ in range(args.calls):
                        start = time.perf_counter()
                        models[name](x)
                        times.append(time.perf_counter() - start)
                    median[name] = statistics.median(times)
                    best[name] = min(best[name], median[name])
                paired.append(median["before"] / median["after"])
    ref = first[names[0]]
    print(f"{args.spec} -O{args.level}, batch {args.batch}, {args.threads} threads, torch {torch.__version__}")
    print(f"host: {host('cpu')}; before = {args.rev}, after = this checkout")
    for name in names:
        err = ((first[name] - ref).abs().max() / ref.abs().max()).item()
        line = f"{name:<12} {best[name] * 1e3:8.1f} ms  max rel diff vs {names[0]} {err:.1e}"
        if "torchvision" in best:
            line += f"  torchvision/this {best['torchvision'] / best[name]:.2f}x"
        print(line)
    print(f"after/before speed: {best['before'] / best['after']:.3f} (>1: this checkout is faster)")
    low, mid, high = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
    print(f"after/before within each round: median {mid:.3f}, quartiles {low:.3f}-{high:.3f} ({len(paired)} rounds)")


if __name__ == "__main__":
    main()

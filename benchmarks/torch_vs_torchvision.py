"""The generated PyTorch model against torchvision's DenseNet: speed and peak memory.

Both models get the same seeded weights and input. Each (model, memory format, mode)
runs in a fresh subprocess so that its peak resident memory is its own: eval is a
forward pass under no_grad, train is forward + backward. Memory is the growth of peak
RSS over the RSS before the first pass (the weights and torch itself excluded).
Ratios are against torchvision eager (NCHW) in the same run. The configurations run
round-robin `--rounds` times and each keeps its best median, so that a slow spell of
a shared machine does not land on one of them alone.

The generated model's ReLUs are not in place (so full backward hooks work), which
costs activation memory in training; this measures how much.

    python benchmarks/torch_vs_torchvision.py [--spec SPEC] [--batch 4] [--runs 7] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
from dnc.ir.infer import state_dict_layout, state_dict_shapes
from dnc.ir.graph import graph_input
from dnc.pipeline import build
from dnc.check.reference import torchvision_densenet
from dnc.weights import to_torch
from dnc.targets.torch.run import load_generated
from dnc.weights import seeded_state

spec_path, which, fmt, mode, batch, runs = sys.argv[1:7]
batch, runs = int(batch), int(runs)
torch.set_num_threads(int(sys.argv[7]))
spec, graph = build(spec_path)
state = to_torch(seeded_state(state_dict_layout(graph)))
model = torchvision_densenet(spec) if which == "torchvision" else load_generated(graph).DenseNet()
model.load_state_dict(state)
memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
model = model.to(memory_format=memory_format).train(mode == "train")
x = torch.randn(batch, *graph_input(graph).shape, generator=torch.Generator().manual_seed(0))
x = x.contiguous(memory_format=memory_format)


def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def step():
    if mode == "train":
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    else:
        with torch.no_grad():
            model(x)


before = rss_kib()
step()  # warm-up; its peak counts too
times = []
for _ in range(runs):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"times": times, "peak_mib": (peak - before) / 1024}))
"""

CONFIGS = [
    ("torchvision", "nchw"),
    ("torchvision", "channels_last"),
    ("dnc", "nchw"),
    ("dnc", "channels_last"),
]


def run(spec: str, which: str, fmt: str, mode: str, batch: int, runs: int, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-c", CHILD, spec, which, fmt, mode, str(batch), str(runs), str(threads)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="specs/densenet121.yaml")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--runs", type=int, default=7, help="timed passes per configuration (median)")
    # NOTE: one thread by default: on a shared 2-core VM, two threads made repeated runs differ by 40%
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="round-robin repeats of every configuration")
    args = parser.parse_args()
    import torch

    print(
        f"{args.spec}, batch {args.batch}, torch {torch.__version__}, {args.threads} threads, CPU, "
        f"best of {args.rounds} rounds of the median of {args.runs}"
    )
    print(f"{'mode':<6} {'model':<12} {'format':<14} {'ms':>9} {'vs tv':>7} {'peak MiB':>9} {'vs tv':>7}")
    for mode in ("eval", "train"):
        best: dict[tuple[str, str], tuple[float, float]] = {}
        for _ in range(args.rounds):
            for config in CONFIGS:
                result = run(args.spec, *config, mode, args.batch, args.runs, args.threads)
                ms, mib = statistics.median(result["times"]) * 1000, result["peak_mib"]
                old = best.get(config, (float("inf"), float("inf")))
                best[config] = (min(old[0], ms), min(old[1], mib))
        base = best[CONFIGS[0]]
        for (which, fmt), (ms, mib) in best.items():
            print(f"{mode:<6} {which:<12} {fmt:<14} {ms:9.1f} {ms / base[0]:6.2f}x {mib:9.0f} {mib / base[1]:6.2f}x")


if __name__ == "__main__":
    main()

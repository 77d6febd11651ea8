"""How long `dnc summary` takes, against getting the same numbers from torchvision.

Each command runs in a fresh subprocess (imports included), as a user runs it:
  - dnc:         `dnc summary specs/densenet264.yaml` (static inference, no torch)
  - torchvision: import torchvision, build DenseNet-264, count parameters and run one
                 224x224 forward pass with hooks for the per-stage shapes.
Prints the median and best wall time of each and their ratio.

    python benchmarks/summary_speed.py [--runs N] [--spec specs/densenet264.yaml]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TORCHVISION = """
import torch
from torchvision.models.densenet import DenseNet
torch.set_num_threads(1)
m = DenseNet(32, (6, 12, 64, 48), 64).eval()
shapes = {}
for name, mod in m.features.named_children():
    mod.register_forward_hook(lambda _m, _i, o, n=name: shapes.__setitem__(n, tuple(o.shape)))
with torch.no_grad():
    m(torch.zeros(1, 3, 224, 224))
print(sum(p.numel() for p in m.parameters()), len(shapes))
"""


def timed(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--spec", default="specs/densenet264.yaml")
    args = parser.parse_args()
    dnc = timed([sys.executable, "-m", "dnc", "summary", args.spec], args.runs)
    json_ = timed([sys.executable, "-m", "dnc", "summary", "--format", "json", args.spec], args.runs)
    tv = timed([sys.executable, "-c", TORCHVISION], max(3, args.runs // 3))
    rows = [("dnc summary", dnc), ("dnc summary --format json", json_), ("torchvision build + forward", tv)]
    print(f"{'command':<30} {'median s':>9} {'best s':>8} {'vs dnc':>8}   ({args.spec}, {args.runs} runs)")
    for label, times in rows:
        ratio = statistics.median(times) / statistics.median(dnc)
        print(f"{label:<30} {statistics.median(times):9.3f} {min(times):8.3f} {ratio:7.1f}x")


if __name__ == "__main__":
    main()

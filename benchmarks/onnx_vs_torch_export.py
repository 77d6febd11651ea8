"""dnc's ONNX emission vs torch.onnx.export of the torchvision model, in one run.

For each network: emission wall time (a fresh subprocess each, imports included,
median of --repeats), file size, node count, and onnxruntime CPU latency of both
graphs at each batch size (warmups, then the best of --rounds medians of --runs), plus the largest
relative difference between their outputs. Both sides get the same weights: a
seeded checkpoint written once to a .safetensors file, which each side reads inside
its timed subprocess.

    python benchmarks/onnx_vs_torch_export.py [--specs densenet121 densenet264] [--rounds 5] [--runs 10] [--level 2]
    python benchmarks/onnx_vs_torch_export.py --ort-profile [--batches 16]

`--ort-profile` shows what onnxruntime makes of both graphs instead: node counts by op
type after its optimisations, and where its kernel time goes (its own profiler).

torch's side uses the TorchScript exporter (dynamo=False): the torch.export-based one
needs onnxscript, which dnc does not depend on.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# torchvision.models.densenet.DenseNet(growth_rate, block_config, num_init_features): no dnc import on torch's side
CONFIGS = {
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
    "densenet264": (32, (6, 12, 64, 48), 64),
}

TORCH_EXPORT = """
import sys, torch
from safetensors.torch import load_file
from torchvision.models.densenet import DenseNet
k, blocks, width, ckpt, out, opset = sys.argv[1], eval(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
net = DenseNet(growth_rate=int(k), block_config=blocks, num_init_features=int(width)).eval()
net.load_state_dict(load_file(ckpt))
torch.onnx.export(net, (torch.zeros(1, 3, 224, 224),), out, dynamo=False, opset_version=int(opset),
                  input_names=["input"], output_names=["logits"],
                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
"""


def timed(cmd: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
    return time.perf_counter() - start


def latencies(
    paths: list[Path], batch: int, threads: int, warmup: int, runs: int, rounds: int
) -> list[tuple[float, np.ndarray]]:
    """Latency and output of each model: `rounds` rounds of `runs` runs that alternate between the models
    (load from other processes on a shared machine falls on both alike), each model keeping the best of
    its per-round medians (a slow spell of the machine does not land on one model alone)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths]
    x = {"input": np.random.default_rng(batch).standard_normal((batch, 3, 224, 224), dtype=np.float32)}
    outputs = [None] * len(sessions)
    for _ in range(warmup):
        for i, session in enumerate(sessions):
            outputs[i] = session.run(None, x)[0]
    best = [float("inf")] * len(sessions)
    for _ in range(rounds):
        times = [[] for _ in sessions]
        for _ in range(runs):
            for i, session in enumerate(sessions):
                start = time.perf_counter()
                session.run(None, x)
                times[i].append(time.perf_counter() - start)
        best = [min(b, statistics.median(t)) for b, t in zip(best, times, strict=True)]
    return list(zip(best, outputs, strict=True))


def bench(name: str, args, work: Path) -> list[tuple[str, str, str, str]]:
    import onnx
    from safetensors.numpy import save_file

    from dnc.ir.infer import state_dict_layout
    from dnc.pipeline import build
    from dnc.weights import seeded_state

    spec = ROOT / "specs" / f"{name}.yaml"
    _, graph = build(spec)
    ckpt = work / f"{name}.safetensors"
    save_file(seeded_state(state_dict_layout(graph), seed=0), str(ckpt))
    ours, theirs = work / "dnc" / f"{name}.onnx", work / f"{name}.torch.onnx"
    dnc_cmd = [sys.executable, "-m", "dnc", "compile", str(spec), "--target", "onnx", "-o", str(ours.parent)]
    dnc_cmd += ["--weights", str(ckpt), "--opset", str(args.opset), "-O", str(args.level)]
    k, blocks, width = CONFIGS[name]
    torch_cmd = [sys.executable, "-c", TORCH_EXPORT, str(k), repr(blocks), str(width), str(ckpt), str(theirs)]
    torch_cmd.append(str(args.opset))

    emit = {"dnc": [], "torch": []}
    for _ in range(args.repeats):  # alternating, as the latencies below
        ours.unlink(missing_ok=True)  # else dnc skips the unchanged write
        emit["dnc"].append(timed(dnc_cmd))
        emit["torch"].append(timed(torch_cmd))
    rows = [("emit wall time (s)", *_pair(statistics.median(emit["dnc"]), statistics.median(emit["torch"]), "{:.2f}"))]
    rows.append(("file size (MB)", *_pair(ours.stat().st_size / 1e6, theirs.stat().st_size / 1e6, "{:.1f}")))
    nodes = [len(onnx.load(p, load_external_data=False).graph.node) for p in (ours, theirs)]
    rows.append(("nodes", *_pair(*nodes, "{}")))
    if args.ort_profile:
        for batch in args.batches:
            ort_profile({"dnc": ours, "torch.onnx.export": theirs}, batch, args.threads, args.runs)
        return []
    for batch in args.batches:
        (a, ya), (b, yb) = latencies([ours, theirs], batch, args.threads, args.warmup, args.runs, args.rounds)
        rows.append((f"ORT latency, batch {batch} (ms)", *_pair(a * 1e3, b * 1e3, "{:.1f}")))
        rows.append((f"speed-up, batch {batch} (torch.onnx.export's latency / dnc's)", "", "", f"{b / a:.2f}x"))
        diff = float(np.abs(ya - yb).max() / np.abs(yb).max())
        rows.append((f"max rel. diff of outputs, batch {batch}", f"{diff:.1e}", "", ""))
    return rows


def ort_profile(paths: dict[str, Path], batch: int, threads: int, runs: int) -> None:
    """Per model: the optimised graph's ops, and each op type's share of kernel time (Conv split by kernel)."""
    import collections
    import json

    import onnx
    import onnxruntime as ort

    x = {"input": np.random.default_rng(batch).standard_normal((batch, 3, 224, 224), dtype=np.float32)}
    for name, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
        options.enable_profiling = True
        options.profile_file_prefix = str(path.with_suffix(""))
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, x)
        events = json.loads(Path(session.end_profiling()).read_text())
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node
        ops = collections.Counter(n.op_type for n in optimized)
        print(f"\n{name}: {len(optimized)} nodes after onnxruntime's optimisations: {dict(sorted(ops.items()))}")
        spent = collections.Counter()
        for e in events:
            if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
                continue
            kind = e["args"]["op_name"]
            shapes = e["args"].get("input_type_shape", [])
            if kind == "Conv" and len(shapes) > 1:
                weight = next(iter(shapes[1].values()))
                kind = "Conv (batch norm, depthwise)" if weight[1] == 1 else f"Conv {weight[2]}x{weight[3]}"
            spent[kind] += e["dur"]
        total = sum(spent.values())
        shares = ", ".join(f"{k} {v / total:.1%}" for k, v in spent.most_common())
        print(f"  kernel time, batch {batch}, {total / runs / 1e3:.0f} ms per run: {shares}")


def _pair(a: float, b: float, fmt: str) -> tuple[str, str, str]:
    return fmt.format(a), fmt.format(b), f"{a / b:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", nargs="+", default=["densenet121"], choices=sorted(CONFIGS))
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--level", type=int, default=2, help="dnc's -O level (ONNX default: 2)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model in a round (median)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds per batch size (best median)")
    parser.add_argument("--repeats", type=int, default=3, help="emission subprocesses per side (median)")
    parser.add_argument("--ort-profile", action="store_true", help="onnxruntime's view of both graphs instead")
    args = parser.parse_args()

    import onnxruntime
    import torch

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, opset {args.opset}, ", end="")
    print(f"{args.threads} ORT threads, {os.cpu_count()} CPUs, ", end="")
    print(f"best of {args.rounds} rounds' medians of {args.runs} runs, after {args.warmup} warmups")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.specs:
            print(f"\n### {name}\n")
            if not args.ort_profile:
                print("| | dnc `--target onnx` | `torch.onnx.export` | dnc / torch |")
                print("| --- | ---: | ---: | ---: |")
            for row in bench(name, args, Path(tmp)):
                print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

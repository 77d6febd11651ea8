"""Torch -O levels against torchvision, eval mode: time ratios in one process, peak memory in fresh ones.

All models get the same seeded weights and input and run under no_grad; torchvision
runs eager NCHW and channels_last (its input converted inside the timed call, as the
-O2 module converts its own). Configurations run interleaved, `--rounds` rounds of
`--runs` calls each, each round starting with the next model, and each keeps its best
median, so that a slow spell of a shared machine does not land on one of them alone.
`--memory` also measures the peak RSS growth of one inference pass, each model in a
fresh process (the high-water mark reset after the models are built, through
/proc/self/clear_refs, where Linux allows it; glibc's mmap threshold fixed at 128 KiB, so
that RSS follows what is live). `--profile` prints where each model's time goes
(torch.profiler, by category). `--compile` times torch.compile (compilation from a cold
cache, then runs). Each model's line gives its speed-up over the baselines in the run
(torchvision, torchvision_cl, O2: `O2-<pass>` is -O2 without that pass).

`--dtype` casts every model after its weights are loaded (so -O2's folds are computed in float32,
then cast), on the CPU as on the GPU; `NAME@DTYPE` keeps one model in another dtype in the same
run (`O2@float32` beside bfloat16 models). When a model is not in float32, each line also gives
its error against torchvision in float32 on the same input (max |y - ref| / max |ref|). The header
names the host: on the CPU its model and whether it computes bfloat16 and float16 natively
(AVX512-BF16 or AMX; AVX512-FP16 or AMX-FP16) or not (then oneDNN, or torch's reference
kernels, convert through float32: slower than float32, not faster).

    python benchmarks/opt_levels.py [--spec specs/densenet121.yaml] [--batch 1] [--threads 0] [--memory]
    python benchmarks/opt_levels.py --dtype bfloat16 --batch 16 --models torchvision torchvision_cl O2 O2@float32
    python benchmarks/opt_levels.py --device cuda [--dtype float16] --batch 64   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def import_emitted(graph, path: Path):
    """The torch module the emitter writes for `graph`, written to `path` (kept: tracebacks and torch.compile read
    it) and imported under the file's name."""
    import importlib.util

    from dnc.targets.torch import emit as emit_torch

    path.write_text(emit_torch.emit(graph))
    loader = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(loader)
    sys.modules[loader.name] = module
    loader.loader.exec_module(module)
    return module


def models(spec_path: str, names: list[str]):
    """name -> model (float32, eval) for torchvision, torchvision_cl and each -O level; `NAME@DTYPE` builds NAME."""

    import torch

    from dnc.check.reference import torchvision_densenet
    from dnc.ir.infer import state_dict_layout
    from dnc.ir.passes import select
    from dnc.pipeline import build
    from dnc.weights import seeded_state, to_torch

    spec, graph = build(spec_path)
    state = to_torch(seeded_state(state_dict_layout(graph)))
    out = {}
    tmp = Path(tempfile.mkdtemp(prefix="dnc-bench-"))
    for name in names:
        base = name.partition("@")[0]
        if base.startswith("torchvision"):
            model = torchvision_densenet(spec)
            model.load_state_dict(state)
            if base == "torchvision_cl":
                model = model.to(memory_format=torch.channels_last)
        else:  # O0, O1, O2, or O2-<pass> (-O2 without that pass)
            level, _, off = base[1:].partition("-")
            _, g = build(spec_path, passes=select("torch", int(level), disable=[off] if off else []))
            module = import_emitted(g, tmp / f"{name.replace('-', '_').replace('@', '_at_')}.py")
            model = module.DenseNet()
            model.load_state_dict(state, strict=True)
        out[name] = model.eval()
    return out, graph


def rotated(models: dict, r: int) -> list:
    """The models' (name, model) pairs, starting at the r-th: each round starts with another model, since the
    one that runs after another inherits the allocator's state (glibc's adaptive mmap threshold), which moved
    a model's time by up to 15% here depending on what ran before it."""
    items = list(models.items())
    return items[r % len(items) :] + items[: r % len(items)]


def dtype_of(name: str, default: str) -> str:
    """The dtype a model runs in: `NAME@DTYPE`'s, else --dtype."""
    return name.partition("@")[2] or default


def model_input(name: str, x):
    """The input as the model takes it: torchvision_cl gets channels_last (converted inside the timed call)."""
    import torch

    return x.contiguous(memory_format=torch.channels_last) if name.startswith("torchvision_cl") else x


def timing(args) -> tuple[dict[str, float], dict[str, float]]:
    """Each model's best median time, and its error against float32 torchvision (when a model is not float32)."""
    import torch

    from dnc.ir.graph import graph_input

    if args.threads:
        torch.set_num_threads(args.threads)
    found, graph = models(args.spec, args.models)
    # NOTE: cast after load_state_dict, as a user would: -O2 derives its folded tensors in float32 first
    found = {name: model.to(args.device, getattr(torch, dtype_of(name, args.dtype))) for name, model in found.items()}
    x = torch.randn(args.batch, *graph_input(graph).shape, generator=torch.Generator().manual_seed(0))
    x = x.to(args.device)
    inputs = {name: x.to(getattr(torch, dtype_of(name, args.dtype))) for name in found}
    cuda = args.device.startswith("cuda")

    def call(name, model):
        out = model(model_input(name, inputs[name]))
        if cuda:  # the GPU runs asynchronously: time the work, not its launch
            torch.cuda.synchronize()
        return out

    errors = {}
    best = {name: float("inf") for name in found}
    with torch.no_grad():
        low = any(dtype_of(name, args.dtype) != "float32" for name in found)
        if low:  # the reference: torchvision in float32, same weights and input
            reference = models(args.spec, ["torchvision"])[0]["torchvision"].to(args.device)(x).float()
        for name, model in found.items():
            out = call(name, model)  # warm-up
            if low:
                errors[name] = ((out.float() - reference).abs().max() / reference.abs().max()).item()
        for r in range(args.rounds):
            for name, model in rotated(found, r):
                times = []
                for _ in range(args.runs):
                    start = time.perf_counter()
                    call(name, model)
                    times.append(time.perf_counter() - start)
                best[name] = min(best[name], statistics.median(times))
    return best, errors


def host(device: str) -> str:
    """The machine the numbers come from: the GPU's name, or the CPU's model and its low-precision arithmetic."""
    import platform

    import torch

    if device != "cpu":
        return torch.cuda.get_device_name(device)
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: the model from platform, the arithmetic unknown
        return f"{name}, {torch.backends.cpu.get_cpu_capability()}"
    native = {
        "bfloat16": [f for f in ("amx_bf16", "avx512_bf16") if f in flags] or ["none (emulated)"],
        "float16": [f for f in ("amx_fp16", "avx512_fp16") if f in flags] or ["none (emulated)"],
    }
    arithmetic = "; ".join(f"{dtype}: {', '.join(found)}" for dtype, found in native.items())
    return f"{name}, {torch.backends.cpu.get_cpu_capability()} ({arithmetic})"


MEMORY_CHILD = r"""
import gc, json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
from benchmarks.opt_levels import models
from dnc.ir.graph import graph_input


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))  # KiB


found, graph = models(sys.argv[2], [sys.argv[3]])
dtype = getattr(torch, sys.argv[6])
model = found[sys.argv[3]].to(dtype)
torch.set_num_threads(int(sys.argv[5]) or torch.get_num_threads())
x = torch.randn(int(sys.argv[4]), *graph_input(graph).shape).to(dtype)
gc.collect()
try:  # start the high-water mark here: building the models may have peaked higher than inference
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
before = status("VmRSS")
with torch.no_grad():
    model(x.contiguous(memory_format=torch.channels_last) if sys.argv[3].startswith("torchvision_cl") else x)
peak = status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mib": (peak - before) / 1024, "reset": reset}))
"""


def memory(args, name: str) -> float:
    """The median peak RSS growth of `--memory-runs` fresh processes (the allocator's reuse varies run to run)."""
    cmd = [sys.executable, "-c", MEMORY_CHILD, str(ROOT), args.spec, name, str(args.batch), str(args.threads)]
    cmd.append(dtype_of(name, args.dtype))
    # NOTE: a fixed mmap threshold makes RSS follow what is live: with glibc's adaptive one, the same model's
    # peak RSS growth measured 213 or 313-383 MiB from one fresh process to the next, as frees went one way
    # or the other; set MALLOC_MMAP_THRESHOLD_ yourself to measure otherwise.
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ, "PYTHONPATH": str(ROOT)}
    peaks = []
    for _ in range(args.memory_runs):
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        peaks.append(json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"])
    return statistics.median(peaks)


# torch.profiler op names -> what they are; the rest (dispatch, views, allocation) is "other"
CATEGORIES = {
    "convolutions": ("convolution", "conv2d", "addmm", "mm"),
    "batch norm + ReLU": ("batch_norm", "addcmul", "clamp_min", "relu", "mul", "add"),
    "copies and concatenation": ("cat", "copy_", "contiguous", "clone"),
    "pooling": ("pool",),
}


def category(op: str, categories: dict[str, tuple[str, ...]] = CATEGORIES) -> str:
    """The category of a profiled op: the first whose words appear in its name, else "other"."""
    name = op.removeprefix("aten::")
    for what, words in categories.items():
        if any(w in name for w in words):
            return what
    return "other"


def profile(args) -> None:
    """Self CPU time by category (convolutions, batch norm + ReLU, copies, pooling) for each model."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from dnc.ir.graph import graph_input

    if args.threads:
        torch.set_num_threads(args.threads)
    found, graph = models(args.spec, args.models)
    x = torch.randn(args.batch, *graph_input(graph).shape)
    rows = {}
    for name, model in found.items():
        dtype = getattr(torch, dtype_of(name, args.dtype))
        model = model.to(dtype)
        xx = model_input(name, x.to(dtype))
        with torch.no_grad():
            model(xx)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.runs):
                    model(xx)
        totals = dict.fromkeys([*CATEGORIES, "other"], 0.0)
        for event in prof.key_averages():
            totals[category(event.key)] += event.self_cpu_time_total / 1e3 / args.runs
        rows[name] = totals
    what = f"ms per call (self CPU time, torch.profiler, mean of {args.runs})"
    print(f"{args.spec}, batch {args.batch}, {args.dtype}, {what}")
    print("| | " + " | ".join(rows) + " |")
    print("| --- |" + " ---: |" * len(rows))
    for what in [*CATEGORIES, "other"]:
        print(f"| {what} | " + " | ".join(f"{r[what]:.1f}" for r in rows.values()) + " |")
    print("| total | " + " | ".join(f"{sum(r.values()):.1f}" for r in rows.values()) + " |")


def compiled(args) -> None:
    """torch.compile each model: the first call's time (compilation), then run times interleaved as in timing()."""
    import torch

    from dnc.ir.graph import graph_input

    if args.threads:
        torch.set_num_threads(args.threads)
    # a cold start: Inductor's caches, kept from an earlier run, would make compilation look nearly free
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="dnc-inductor-"))
    found, graph = models(args.spec, args.models)
    x = torch.randn(args.batch, *graph_input(graph).shape)
    found = {name: model.to(getattr(torch, dtype_of(name, args.dtype))) for name, model in found.items()}
    inputs = {name: model_input(name, x.to(getattr(torch, dtype_of(name, args.dtype)))) for name in found}
    functions, first = {}, {}
    with torch.no_grad():
        for name, model in found.items():
            functions[name] = torch.compile(model)
            start = time.perf_counter()
            functions[name](inputs[name])
            first[name] = time.perf_counter() - start
        best = dict.fromkeys(found, float("inf"))
        for r in range(args.rounds):
            for name, fn in rotated(functions, r):
                times = []
                for _ in range(args.runs):
                    start = time.perf_counter()
                    fn(inputs[name])
                    times.append(time.perf_counter() - start)
                best[name] = min(best[name], statistics.median(times))
    print(
        f"torch.compile, {args.spec}, batch {args.batch}, {torch.get_num_threads()} threads, {args.dtype}, "
        f"best of {args.rounds}"
    )
    for name in found:
        print(f"{name:<16} first call (compiles) {first[name]:6.1f} s, then {best[name] * 1000:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="specs/densenet121.yaml")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU (timing only)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="every model's, unless NAME@DTYPE")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--models",
        nargs="+",
        default=["torchvision", "torchvision_cl", "O0", "O1", "O2"],
        help="torchvision, torchvision_cl, O0, O1, O2, O2-<pass> (-O2 without it); NAME@DTYPE runs NAME in DTYPE",
    )
    parser.add_argument("--memory", action="store_true", help="also peak RSS growth, fresh process per model")
    parser.add_argument("--memory-runs", type=int, default=3, help="fresh processes per model (median)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    import torch

    if args.device != "cpu" and (args.memory or args.profile or args.compile):
        parser.error("--memory, --profile and --compile measure the CPU; --device is for timing")
    for name in args.models:
        if dtype_of(name, args.dtype) not in DTYPES:
            parser.error(f"{name}: the dtype after @ must be one of {', '.join(DTYPES)}")
    if args.profile:
        return profile(args)
    if args.compile:
        return compiled(args)
    best, errors = timing(args)
    threads = args.threads or torch.get_num_threads()
    where = f"{threads} threads" if args.device == "cpu" else args.device
    print(f"{args.spec}, batch {args.batch}, {where}, {args.dtype}, torch {torch.__version__}, best of {args.rounds}")
    print(f"host: {host(args.device)}")
    # speed-up of each model over the baselines in the run: torchvision's two, and -O2 (to read what a pass is worth)
    bases = {short: best[name] for name, short in BASES.items() if name in best}
    peaks = {}
    width = max(16, *map(len, best))
    for name, t in best.items():
        line = f"{name:<{width}} {t * 1000:9.1f} ms" + "".join(f"  {b}/this {bt / t:5.2f}x" for b, bt in bases.items())
        if errors:
            line += f"  error {errors[name]:.1e}"
        if args.memory:
            peaks[name] = memory(args, name)
            first = next(iter(peaks))
            line += f"  peak RSS growth {peaks[name]:7.0f} MiB ({peaks[name] / peaks[first]:.2f}x {first}'s)"
        print(line)


BASES = {"torchvision": "tv", "torchvision_cl": "tv_cl", "O2": "O2", "O2@float32": "O2_f32"}
DTYPES = ["float32", "float16", "bfloat16"]


if __name__ == "__main__":
    main()

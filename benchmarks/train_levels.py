"""Torch -O levels against torchvision, training: step time in one process, peak memory in fresh ones.

A step is what a training loop does per batch: `opt.zero_grad(set_to_none=True)`, forward, cross-entropy on
random labels, backward, `SGD(lr=0.01, momentum=0.9).step()`. Every model starts from the same weights (the
-O0 module's seeded initialisation, loaded into each with strict=True) and gets the same input and labels.

Models (`--models`): torchvision (eager, NCHW), torchvision_cl (model and input channels_last, the input
converted inside the step), O0 and O1 (the modules `dnc compile SPEC --target torch -O0|-O1` writes, built
here from the same pipeline). `NAME_me` builds NAME with memory_efficient=True (torchvision's flag on every
dense layer; dnc's `DenseNet(memory_efficient=True)`): each bottleneck recomputed in backward. `NAME_bf16` runs
the step's forward and loss under torch.autocast("cpu", dtype=torch.bfloat16); `NAME_me_bf16` both. torchvision
ships densenet121/161/169/201; for other specs its DenseNet class is built with the spec's configuration
(dnc.check.reference), and a spec it cannot express drops its models, saying why.

`time`: every model takes two warm-up steps (more while a dnc module is still trying its two 1x1-convolution
kernels on first calls, at most eight; pin them with DNC_CONV1X1=onednn|conv2d to skip that), then the models
run interleaved, one step each per round, each round starting with the next model (whoever runs after whom
inherits the allocator's and the caches' state), `--rounds` rounds; a model's time is the median of its steps,
its speed-up a baseline's median over its own (>1 is faster). Quote numbers from at least 5 rounds. A probe
before and after says whether other processes held the cores (a parallel op then waits a time slice for its
threads, and every model's step stretches: measure on a quiet machine, or with --threads 1). glibc's malloc
(`--malloc`): by default (`fixed`) the process runs with mmap off and trimming off, for every model alike, so
that after the warm-up no step faults a page in and the models compare on their computation. With glibc's
defaults (`--malloc glibc`), blocks above its adaptive mmap threshold (at most 32 MiB) are mapped afresh and
faulted in on every step: at batch 32 most of a step's large tensors (here 0.5-1.7 million faults per step,
seconds of a step on this VM, the model that allocates less faulting less), and at batch 8 whichever model the
threshold happened to settle against, which changed from run to run in one process (on an AMD EPYC: 6,300
faults and ~40 ms of system time per step for one model, none for the others; each model alone in its own
process: torchvision channels_last 18,700 per step, -O1 one). Each model's median minor page faults per step
are printed beside its time.
`memory`: the peak RSS growth of one step (the first, after building model and optimizer and a no_grad warm-up
forward of 2 samples) in a fresh process per model, glibc's mmap threshold fixed at 128 KiB and trimming
at every free, so that RSS follows what is live; the high-water mark reset through /proc/self/clear_refs after
the warm-up; file-backed pages the step brings back (torch's libraries, evicted under memory pressure) not
counted; median of `--runs` processes. Beside it, dnc's static estimate (`dnc summary --batch N -O<level>`)
of the first step's peak: the gradients plus what autograd keeps (at the end of backward) or the momentum
buffers SGD creates (in its step, once backward has freed what autograd kept), whichever is larger.
`depth`: `memory` for densenet121/169/201/264 (`--specs`), then a least-squares fit of the growth against the
number of dense layers L, a + b*L + c*L^2, and per model the quadratic share c*L^2 / (a + b*L + c*L^2) at the
deepest net (torchvision keeps every layer's concatenation: quadratic in L within a block); fitted again less
the gradients (which grow quadratically too: a layer's 1x1 conv reads every map before it), and for dnc's
estimate of what autograd keeps. `profile`: self CPU time per step by category (torch.profiler), mean over
`--runs` steps after the warm-up.

    python benchmarks/train_levels.py time [--spec specs/densenet121.yaml] [--batch 8] [--rounds 5] [--threads 2]
    python benchmarks/train_levels.py time --models torchvision torchvision_cl O0 O1 O1_bf16 torchvision_bf16
    python benchmarks/train_levels.py memory [--batch 16] [--runs 3] [--models torchvision O0 O1 O1_me]
    python benchmarks/train_levels.py depth [--batch 16] [--runs 3] [--models torchvision O0 O1]
    python benchmarks/train_levels.py profile [--batch 8] [--runs 3] [--models torchvision_cl O1]
    python benchmarks/train_levels.py time --compile --models torchvision O0 O1   # under torch.compile

`--size N` feeds N x N inputs (the spec's own by default; DenseNet takes any size its stages do not shrink to
nothing), `--json FILE` also writes the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASES = ("torchvision", "torchvision_cl", "O0", "O1")
BASELINES = ("torchvision", "torchvision_cl")  # what speed-ups and memory ratios are against
DEPTH_SPECS = ["specs/densenet121.yaml", "specs/densenet169.yaml", "specs/densenet201.yaml", "specs/densenet264.yaml"]
DEFAULTS = {  # mode -> (batch, models)
    "time": (8, ["torchvision", "torchvision_cl", "torchvision_me", "O0", "O1", "O1_me"]),
    "memory": (16, ["torchvision", "torchvision_cl", "torchvision_me", "O0", "O1", "O1_me"]),
    "depth": (16, ["torchvision", "O0", "O1"]),
    "profile": (8, ["torchvision_cl", "O1"]),
}
TRIAL_STEPS = 8  # the generated 1x1 convolution decides after 1 + 3 calls of each of its two kernels
MIB = 2**20


def parse(name: str) -> tuple[str, bool, bool]:
    """NAME -> (base model, memory_efficient, bfloat16 autocast): `O1_me_bf16` -> ("O1", True, True)."""
    rest = name.removesuffix("_bf16")
    base = rest.removesuffix("_me")
    if base not in BASES:
        raise ValueError(f"{name}: expected one of {', '.join(BASES)}, optionally followed by _me and/or _bf16")
    return base, base != rest, rest != name


def size_overrides(size: int | None) -> list[str]:
    """The spec overrides (`dnc --set`) that make the input size x size; none for the spec's own."""
    return [f"input.size=[{size}, {size}]"] if size else []


def torchvision_lacks(spec_path: str, overrides: list[str]) -> str | None:
    """Why torchvision's DenseNet cannot express the spec, or None when it can."""
    from dnc.check.reference import torchvision_densenet
    from dnc.errors import DncError
    from dnc.frontend.loader import load_spec

    try:
        torchvision_densenet(load_spec(spec_path, overrides))
    except DncError as err:
        return str(err)
    return None


def runnable(spec_path: str, overrides: list[str], names: list[str]) -> list[str]:
    """`names` less torchvision's models where torchvision cannot express the spec (said on stderr)."""
    lacks = torchvision_lacks(spec_path, overrides) if any(n.startswith("torchvision") for n in names) else None
    if lacks is None:
        return names
    print(f"skipping the torchvision models: {lacks}", file=sys.stderr)
    return [n for n in names if not n.startswith("torchvision")]


def generated(spec_path: str, overrides: list[str], level: int, where: Path):
    """The module `dnc compile SPEC --target torch -O<level>` writes, emitted into `where` and imported."""
    from benchmarks.opt_levels import import_emitted
    from dnc.ir.passes import select
    from dnc.pipeline import build

    _, graph = build(spec_path, overrides, passes=select("torch", level))
    return import_emitted(graph, where / f"dnc_train_{Path(spec_path).stem}_O{level}.py")


def build_models(spec_path: str, names: list[str], overrides: list[str]):
    """name -> model in train mode (see the docstring), the spec and its IR; all with the -O0 module's seed-0
    weights."""
    import torch
    from torchvision.models.densenet import _DenseLayer

    from dnc.check.reference import torchvision_densenet
    from dnc.pipeline import build

    spec, graph = build(spec_path, overrides)
    where = Path(tempfile.mkdtemp(prefix="dnc-train-"))
    modules = {}

    def module(level: int):
        if level not in modules:
            modules[level] = generated(spec_path, overrides, level, where)
        return modules[level]

    torch.manual_seed(0)
    state = module(0).DenseNet().state_dict()
    out = {}
    for name in names:
        base, memory_efficient, _ = parse(name)
        if base.startswith("torchvision"):
            model = torchvision_densenet(spec)
            for layer in model.modules():
                if isinstance(layer, _DenseLayer):
                    layer.memory_efficient = memory_efficient  # what DenseNet(memory_efficient=...) sets
        else:
            model = module(int(base[1:])).DenseNet(memory_efficient=memory_efficient)
        model.load_state_dict(state, strict=True)
        if base == "torchvision_cl":
            model = model.to(memory_format=torch.channels_last)
        out[name] = model.train()
    return out, spec, graph


class Step:
    """One training step of a model on a fixed batch: zero_grad(set_to_none=True), forward, cross-entropy,
    backward, SGD with momentum."""

    def __init__(self, name: str, model, shape: tuple[int, ...], classes: int, batch: int) -> None:
        import torch

        base, _, self.bf16 = parse(name)
        self.model, self.channels_last = model, base == "torchvision_cl"
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, *shape, generator=g)
        self.y = torch.randint(0, classes, (batch,), generator=g)
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.first_loss = None  # the same weights and batch: every float32 model's should agree

    def forward(self, x):
        import torch

        if self.channels_last:  # converted in the step, as the dnc modules convert their own
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def __call__(self) -> None:
        import torch
        import torch.nn.functional as F

        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = F.cross_entropy(self.forward(self.x), self.y)
        loss.backward()
        self.opt.step()
        if self.first_loss is None:
            self.first_loss = loss.item()

    def warm_up(self) -> None:
        """A no_grad forward of 2 samples: thread pools and kernels started, nothing kept for backward."""
        import torch

        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            self.forward(self.x[:2])


def steps_for(args, names: list[str]) -> tuple[dict[str, Step], object]:
    """name -> its Step, and the IR (for the input shape)."""
    from dnc.ir.graph import graph_input

    found, spec, graph = build_models(args.spec, names, size_overrides(args.size))
    shape = graph_input(graph).shape
    return {name: Step(name, model, shape, spec.head.classes, args.batch) for name, model in found.items()}, graph


def trying(step: Step) -> bool:
    """Whether the step's dnc module is still trying its 1x1-convolution kernels (timed steps would mix them)."""
    return bool(getattr(sys.modules.get(type(step.model).__module__), "_trials", None))


def warm(steps: dict[str, Step]) -> int:
    """Two steps per model, then rounds over all until no dnc module tries kernels any more; the extra rounds."""
    for step in steps.values():
        step()
        step()
    extra = 0
    while extra < TRIAL_STEPS and any(trying(s) for s in steps.values()):
        for step in steps.values():
            step()
        extra += 1
    return extra


def header(args, graph, what: str) -> str:
    import torch

    from benchmarks.opt_levels import host
    from dnc.ir.graph import graph_input

    shape = "x".join(map(str, graph_input(graph).shape))
    threads, load = torch.get_num_threads(), os.getloadavg()[0]
    return (
        f"{args.spec}, batch {args.batch}, input {shape}, {threads} threads, torch {torch.__version__}, {what}; "
        f"load {load:.1f}\nhost: {host('cpu')}"
    )


def contention() -> float:
    """How much longer a small parallel op takes on 2 threads (or the --threads, if more) than on one, fastest of
    25: about 0.5 on a quiet 2-core machine, far above 1 when other processes hold the cores (every OpenMP region
    then waits for its threads; measure with --threads 1 there)."""
    import torch

    y = torch.randn(8, 128, 56, 56)
    threads = torch.get_num_threads()
    best = {}
    for n in (1, max(2, threads)):
        torch.set_num_threads(n)
        times = []
        for _ in range(25):
            start = time.perf_counter()
            torch.relu(y)
            times.append(time.perf_counter() - start)
        best[n] = min(times)
    torch.set_num_threads(threads)
    return best[max(2, threads)] / best[1]


MALLOC_FIXED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}  # no mmap, no trim


def malloc_setting() -> str:
    """glibc's malloc settings from the environment (any MALLOC_*, set by --malloc fixed or by hand)."""
    chosen = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    return chosen or "glibc's defaults (adaptive mmap threshold)"


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timing(args) -> dict:
    import torch

    from benchmarks.opt_levels import rotated

    torch.set_num_threads(args.threads)
    steps, graph = steps_for(args, runnable(args.spec, size_overrides(args.size), args.models))
    probes = [contention()]
    compiled = {}
    if args.compile:  # torch.compile of each model; its first step compiles forward and backward (cold cache)
        for name, step in steps.items():
            step.model = torch.compile(step.model)
            start = time.perf_counter()
            step()
            compiled[name] = time.perf_counter() - start
    extra = warm(steps)
    times = {name: [] for name in steps}
    faulted = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in rotated(steps, r):
            before, start = faults(), time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
            faulted[name].append(faults() - before)
    probes.append(contention())
    median = {name: statistics.median(t) for name, t in times.items()}
    what = f"training step (SGD momentum), median of {args.rounds} interleaved rounds"
    if args.compile:
        what = "torch.compile'd " + what
    print(header(args, graph, what))
    print(f"malloc: {malloc_setting()}")
    n = max(2, args.threads)
    print(f"contention probe, a {n}-thread relu's time over a 1-thread one's (quiet: 1/{n}; busy: >1): ", end="")
    print(f"{probes[0]:.2f} before, {probes[1]:.2f} after")
    print("first step's loss: " + ", ".join(f"{name} {step.first_loss:.6f}" for name, step in steps.items()))
    if extra:
        print(f"warm-up: 2 steps per model and {extra} more rounds while dnc's 1x1 kernels were tried")
    if compiled:
        print("first step, compiling included: " + ", ".join(f"{n} {t:.1f} s" for n, t in compiled.items()))
    if args.rounds < 5:
        print(f"NOTE: {args.rounds} rounds: at least 5 for numbers to quote")
    bases = [b for b in BASELINES if b in median]
    print("| model | median ms | [min-max] | page faults/step |" + "".join(f" {b}/this |" for b in bases))
    print("| --- | ---: | ---: | ---: |" + " ---: |" * len(bases))
    for name, t in median.items():
        spread = f"[{min(times[name]) * 1e3:.0f}-{max(times[name]) * 1e3:.0f}]"
        ratios = "".join(f" {median[b] / t:.2f}x |" for b in bases)
        print(f"| {name} | {t * 1e3:.0f} | {spread} | {statistics.median(faulted[name]):.0f} |{ratios}")
    return {
        "malloc": malloc_setting(),
        "minor_faults": faulted,
        "times_s": times,
        "median_s": median,
        "warm_up_extra_rounds": extra,
        "first_loss": {name: step.first_loss for name, step in steps.items()},
        "contention": probes,
        "first_step_compiling_s": compiled,
    }


MEMORY_CHILD = r"""
import gc, json, resource, sys
sys.path.insert(0, sys.argv[1])
import torch
from benchmarks.train_levels import steps_for


class Args:
    spec, batch, size = sys.argv[2], int(sys.argv[4]), int(sys.argv[6]) or None


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))  # KiB


name = sys.argv[3]
torch.set_num_threads(int(sys.argv[5]))
step = steps_for(Args, [name])[0][name]
step.warm_up()
gc.collect()
try:  # the high-water mark from here: building the models and the warm-up may have peaked higher
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
before, before_file = status("VmRSS"), status("RssFile")
step()
peak = status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# file-backed pages (torch's libraries) that the kernel evicted and the step paged in again are no growth
peak -= max(0, status("RssFile") - before_file)
print(json.dumps({"peak_mib": (peak - before) / 1024, "reset": reset}))
"""


def memory_env() -> dict[str, str]:
    # NOTE: a fixed mmap threshold makes RSS follow what is live: with glibc's adaptive one, the same model's peak
    # RSS growth moved by half from one fresh process to the next (benchmarks/opt_levels.py); set them yourself to
    # measure otherwise
    return {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0", **os.environ, "PYTHONPATH": str(ROOT)}


def measure(args, spec_path: str, name: str) -> list[float]:
    """The peak RSS growth (MiB) of one step of `name`, in each of `--runs` fresh processes."""
    cmd = [sys.executable, "-c", MEMORY_CHILD, str(ROOT), spec_path, name, str(args.batch), str(args.threads)]
    cmd.append(str(args.size or 0))
    peaks = []
    for _ in range(args.runs):
        done = subprocess.run(cmd, cwd=ROOT, env=memory_env(), capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{name} ({spec_path}): the measuring process failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if not result["reset"]:
            print(f"{name}: /proc/self/clear_refs not writable: the peak counts the build too", file=sys.stderr)
        peaks.append(result["peak_mib"])
    return peaks


def estimate(spec_path: str, overrides: list[str], name: str, batch: int):
    """dnc's static training memory of a float32 dnc model (`dnc summary --batch N -O<level>`), else None: the
    bytes kept for backward (with the model's memory_efficient setting), the gradients and SGD's momentum."""
    from dnc.ir.passes import select
    from dnc.pipeline import build
    from dnc.reports.memory import training_memory

    base, memory_efficient, bf16 = parse(name)
    if base.startswith("torchvision") or bf16:
        return None
    _, graph = build(spec_path, overrides, passes=select("torch", int(base[1:])))
    m = training_memory(graph, batch)
    kept = m.activations_memory_efficient if memory_efficient else m.activations
    return kept, m.gradients, m.optimizer_state["sgd_momentum"]


def memory(args) -> dict:
    import torch

    from dnc.pipeline import build

    overrides = size_overrides(args.size)
    names = runnable(args.spec, overrides, args.models)
    env = memory_env()
    what = (
        f"peak RSS growth of one training step, fresh process per model, median of {args.runs}, "
        f"MALLOC_MMAP_THRESHOLD_={env['MALLOC_MMAP_THRESHOLD_']} MALLOC_TRIM_THRESHOLD_={env['MALLOC_TRIM_THRESHOLD_']}"
    )
    torch.set_num_threads(args.threads)
    print(header(args, build(args.spec, overrides)[1], what), flush=True)
    # the first step's peak: at the end of backward (what autograd keeps, the gradients), or in the optimizer step
    # (the gradients and the momentum buffers it creates, what autograd kept already freed)
    estimated = "dnc estimate MiB: gradients + max(kept, momentum)"
    print(f"| model | MiB | runs | this/torchvision | {estimated} | measured/estimate |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    runs, median = {}, {}
    for name in names:
        runs[name] = measure(args, args.spec, name)
        median[name] = statistics.median(runs[name])
        ratio = f"{median[name] / median['torchvision']:.2f}x" if "torchvision" in median else "-"
        est = estimate(args.spec, overrides, name, args.batch)
        if est:
            kept, grads, momentum = (b / MIB for b in est)
            peak = grads + max(kept, momentum)
            guess = f"{peak:.0f} = {grads:.0f} + max({kept:.0f}, {momentum:.0f})"
            versus = f"{median[name] / peak:.2f}"
        else:
            guess = versus = "-"
        spread = " ".join(f"{p:.0f}" for p in runs[name])
        print(f"| {name} | {median[name]:.0f} | {spread} | {ratio} | {guess} | {versus} |", flush=True)
    return {"peak_mib_runs": runs, "peak_mib": median}


def quadratic_share(layers: list[int], mib: list[float]) -> tuple[list[float], float]:
    """Least squares of mib against a + b*L + c*L^2: (a, b, c), and c*L^2's share of the fit at the largest L."""
    import torch

    L = torch.tensor(layers, dtype=torch.float64)
    A = torch.stack([torch.ones_like(L), L, L * L], dim=1)
    coef = torch.linalg.lstsq(A, torch.tensor(mib, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1).tolist()
    deepest = max(layers)
    return coef, coef[2] * deepest**2 / (coef[0] + coef[1] * deepest + coef[2] * deepest**2)


def depth(args) -> dict:
    from dnc.frontend.loader import load_spec
    from dnc.pipeline import build
    from dnc.reports.memory import training_memory

    overrides = size_overrides(args.size)
    env = memory_env()
    size = f"{args.size}x{args.size}" if args.size else "each spec's"
    print(
        f"memory against depth: peak RSS growth of one training step, batch {args.batch}, input {size}, "
        f"{args.threads} threads, fresh process per model, median of {args.runs}, "
        f"MALLOC_MMAP_THRESHOLD_={env['MALLOC_MMAP_THRESHOLD_']}; load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    # NOTE: the gradients (and momentum) grow quadratically with L too (a layer's 1x1 conv reads every map before
    # it): the fit of growth minus gradients is the activations' alone, where they outweigh the momentum
    layers, gradients, measured, estimated = {}, {}, {name: {} for name in args.models}, {}
    print("| spec | dense layers L | gradients MiB | " + " | ".join(f"{n} MiB" for n in args.models) + " |")
    print("| --- | ---: | ---: |" + " ---: |" * len(args.models))
    for spec_path in args.specs:
        layers[spec_path] = sum(b.layers for b in load_spec(spec_path, overrides).resolved_blocks())
        gradients[spec_path] = training_memory(build(spec_path, overrides)[1], args.batch).gradients / MIB
        names = runnable(spec_path, overrides, args.models)
        cells = []
        for name in args.models:
            if name not in names:
                cells.append("-")
                continue
            measured[name][spec_path] = statistics.median(measure(args, spec_path, name))
            cells.append(f"{measured[name][spec_path]:.0f}")
            est = estimate(spec_path, overrides, name, args.batch)
            if est:
                estimated.setdefault(f"{name}: dnc estimate of what autograd keeps", {})[spec_path] = est[0] / MIB
        row = f"| {Path(spec_path).stem} | {layers[spec_path]} | {gradients[spec_path]:.0f} | "
        print(row + " | ".join(cells) + " |", flush=True)
    series = {}
    for name, points in measured.items():
        series[f"{name}: growth"] = points
        series[f"{name}: growth - gradients"] = {s: mib - gradients[s] for s, mib in points.items()}
    print("\nleast squares: MiB = a + b*L + c*L^2; quadratic share = c*L^2 / (a + b*L + c*L^2) at the deepest net")
    print("| what | a MiB | b MiB/layer | c MiB/layer^2 | quadratic share |")
    print("| --- | ---: | ---: | ---: | ---: |")
    fits = {}
    for name, points in {**series, **estimated}.items():
        if len(points) < 3:
            print(f"| {name} | fewer than 3 depths: no fit | | | |")
            continue
        (a, b, c), share = quadratic_share([layers[s] for s in points], list(points.values()))
        fits[name] = {"a": a, "b": b, "c": c, "quadratic_share": share}
        print(f"| {name} | {a:.1f} | {b:.2f} | {c:.4f} | {share:.0%} |")
    return {"layers": layers, "gradients_mib": gradients, "peak_mib": measured, "estimate_mib": estimated, "fits": fits}


# torch.profiler op names -> what they are, first match wins; the rest (autograd's engine, Python, views) is "other"
CATEGORIES = {
    "optimizer": ("_foreach_", "sgd", "Optimizer"),
    "gradient accumulation": ("AccumulateGrad",),  # before the elementwise ops: its name holds "mul"
    "convolutions": ("convolution", "conv2d", "addmm", "mm", "linear"),
    "batch norm, ReLU, elementwise": (
        "batch_norm",
        "relu",
        "threshold",
        "addcmul",
        "mul",
        "add",
        "sub",
        "div",
        "sum",
        "mean",
        "var",
        "rsqrt",
        "clamp",
        "where",
        "fill",
        "zero",
    ),
    "copies and concatenation": ("cat", "copy_", "contiguous", "clone", "_to_copy", "split", "narrow"),
    "pooling": ("pool",),
    "loss": ("cross_entropy", "nll_loss", "log_softmax"),
}


def profile(args) -> dict:
    """Self CPU time per step by category, and wall time per step, for each model."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from benchmarks.opt_levels import category

    torch.set_num_threads(args.threads)
    steps, graph = steps_for(args, runnable(args.spec, size_overrides(args.size), args.models))
    warm(steps)
    rows, walls, others = {}, {}, {}
    for name, step in steps.items():
        start = time.perf_counter()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.runs):
                step()
        walls[name] = (time.perf_counter() - start) / args.runs * 1e3
        totals = dict.fromkeys([*CATEGORIES, "other"], 0.0)
        other = []
        for event in prof.key_averages():
            ms = event.self_cpu_time_total / 1e3 / args.runs
            what = category(event.key, CATEGORIES)
            totals[what] += ms
            if what == "other":
                other.append((ms, event.key))
        rows[name], others[name] = totals, sorted(other, reverse=True)[:5]
    print(header(args, graph, f"self CPU ms per training step (torch.profiler, mean of {args.runs})"))
    print("| | " + " | ".join(rows) + " |")
    print("| --- |" + " ---: |" * len(rows))
    for what in [*CATEGORIES, "other"]:
        print(f"| {what} | " + " | ".join(f"{r[what]:.1f}" for r in rows.values()) + " |")
    print("| total (self) | " + " | ".join(f"{sum(r.values()):.1f}" for r in rows.values()) + " |")
    print("| wall per step (profiled) | " + " | ".join(f"{w:.1f}" for w in walls.values()) + " |")
    for name, top in others.items():
        print(f"{name}, most of 'other': " + ", ".join(f"{key} {ms:.1f}" for ms, key in top))
    return {"self_cpu_ms": rows, "wall_ms": walls, "other_ms": {n: {k: ms for ms, k in t} for n, t in others.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="time", choices=list(DEFAULTS))
    parser.add_argument("--spec", default="specs/densenet121.yaml")
    parser.add_argument("--specs", nargs="+", default=DEPTH_SPECS, help="depth: the nets, shallow to deep")
    parser.add_argument("--batch", type=int, default=None, help="time and profile 8, memory and depth 16")
    parser.add_argument("--size", type=int, default=None, help="N x N inputs [default: the spec's]")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--rounds", type=int, default=5, help="time: interleaved rounds, one step per model each")
    parser.add_argument("--runs", type=int, default=3, help="memory, depth: fresh processes; profile: steps")
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help=f"{', '.join(BASES)}; NAME_me: memory_efficient; NAME_bf16: bfloat16 autocast",
    )
    parser.add_argument("--compile", action="store_true", help="time: each model under torch.compile")
    parser.add_argument(
        "--malloc",
        choices=["fixed", "glibc"],
        default="fixed",
        help="time: no mmap and no trimming for all models (default), or glibc's defaults",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    batch, models = DEFAULTS[args.mode]
    args.batch = args.batch or batch
    args.models = args.models or models
    for name in args.models:
        try:
            parse(name)
        except ValueError as err:
            parser.error(str(err))
    if min(args.batch, args.threads, args.rounds, args.runs) < 1:
        parser.error("--batch, --threads, --rounds and --runs must be at least 1")
    if args.mode == "time" and args.malloc == "fixed" and not any(k in os.environ for k in MALLOC_FIXED):
        # glibc reads these at start-up only: run again with them set (set either yourself to choose other values)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_FIXED})
    results = {"time": timing, "memory": memory, "depth": depth, "profile": profile}[args.mode](args)
    if args.json:
        import torch

        from benchmarks.opt_levels import host

        meta = {k: v for k, v in vars(args).items() if k != "json"}
        meta |= {"host": host("cpu"), "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({**meta, **results}, indent=1) + "\n")


if __name__ == "__main__":
    main()

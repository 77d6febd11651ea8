"""`dnc verify`: run what `dnc compile` emits and compare it with the IR interpreter, and with torchvision.

The reference for every spec is the interpreter (dnc/ir/interpret.py) run in float64 on
the spec's -O0 IR: it evaluates the IR from the op table alone, sharing no code with the
emitters, and on the -O0 IR, since a wrong pass would agree with itself on the IR it
rewrote. The target runs at the level asked for (its runner in dnc/targets/*/run.py),
with the same weights (a checkpoint or seeded ones) and the same seeded input, in eval
mode. Where torchvision's DenseNet can express the spec it runs too, as a second,
outside reference. A spec passes when its output is finite and within `TOLERANCE` of
each reference, relative to that reference's largest output. Imports torch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np
import torch

from dnc.check.reference import torchvision_densenet
from dnc.errors import DncError
from dnc.frontend.spec import Spec
from dnc.ir.graph import OpKind, graph_input, ordered, output
from dnc.ir.infer import state_dict_layout
from dnc.ir.interpret import interpret
from dnc.ir.limits import Limits, check_activations
from dnc.pipeline import compile_spec
from dnc.targets import Target
from dnc.weights import network_state, to_torch

TOLERANCE = 1e-5


@dataclass(frozen=True)
class Outcome:
    ok: bool
    line: str


def check_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise DncError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    return torch.device(device)


def verify(
    spec: Spec,
    graph: nx.DiGraph,
    label: str,
    *,
    target: Target,
    weights: Path | None = None,
    device: str = "cpu",
    seed: int = 0,
    batch: int = 2,
    tolerance: float = TOLERANCE,
    limits: Limits | None = None,
    dtype: str = "float32",
) -> Outcome:
    """Verify `graph`, the spec compiled for `target` (torch or onnx) at some level; `label` names it in the line.

    The interpreter runs the spec's -O0 IR in float64; torchvision's DenseNet runs too where it
    can express the spec. In a lower `dtype` (bfloat16, float16) the bar is the rounding that dtype
    costs anyway: see `_verify_low`.
    """
    dev = check_device(device)
    check_activations(spec, batch, 8, limits or Limits(), what="dnc verify runs its reference in float64")
    reference_ir = compile_spec(spec, graph.graph.get("source", ""))
    state = network_state(state_dict_layout(reference_ir), weights, seed)
    how = f"seeded weights (seed {seed})" if weights is None else f"weights {weights}"
    tensors = to_torch(state)
    shape = (batch, *graph_input(graph).shape)
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)).to(dev)
    if dtype not in LOW_DTYPES and dtype != "float32":
        raise DncError(f"--dtype {dtype}: expected float32, {', '.join(LOW_DTYPES)}")
    if dtype != "float32":
        return _verify_low(spec, graph, reference_ir, state, x, label, target, dtype, f"{how}, input {tuple(shape)}")
    try:
        torchvision, why = torchvision_densenet(spec), ""
        torchvision.load_state_dict(tensors, strict=True)
        torchvision.to(dev).eval()
    except DncError as err:
        torchvision, why = None, err.message
    with _full_float32(), torch.no_grad():
        out = torch.from_numpy(np.asarray(target.run(graph, state, x, device))).to(dev)
        references = [("the interpreter (float64, -O0 IR)", interpret(reference_ir, tensors, x.double()).output)]
        if torchvision is not None:
            references.append(("torchvision", torchvision(x)))
    parts, ok = [], bool(torch.isfinite(out).all())
    for name, ref in references:
        if out.shape != ref.shape:
            ok = False
            parts.append(f"vs {name}: output {tuple(out.shape)}, expected {tuple(ref.shape)}")
            continue
        abs_err, rel_err = _errors(out, ref)
        ok = ok and rel_err <= tolerance
        parts.append(f"vs {name}: max abs error {abs_err:.3g}, max rel error {rel_err:.3g}")
    if torchvision is None:
        parts.append(f"no torchvision reference ({why})")
    if target.name == "torch" and any(n.op is OpKind.SHARED_BATCHNORM for n in ordered(graph)):
        two = x if len(x) > 1 else torch.cat([x, -x])  # batch statistics need more than one value per channel
        train_ok, train_part = _verify_training(graph, reference_ir, state, two.double(), seed)
        ok = ok and train_ok
        parts.append(train_part)
    verdict = "ok" if ok else f"MISMATCH (tolerance {tolerance:g})"
    if target.name == "onnx":
        label = f"{label} (onnx, onnxruntime)"
    line = f"{label}: {how}, input {tuple(shape)} on {dev.type}: {'; '.join(parts)}: {verdict}"
    return Outcome(ok, line)


# A training step in float64 (gradients of all parameters together, the input's gradient, the running statistics
# after it) against the interpreter's: what the training passes (-O1) must keep. The two spell batch norm
# differently, so they differ by float64 rounding over a whole network's backward: about 1e-14 here.
TRAIN_TOLERANCE = 1e-10


def _verify_training(graph, reference_ir, state, x: torch.Tensor, seed: int) -> tuple[bool, str]:
    """One training step of the generated module (train mode, float64) against the interpreter's on the -O0 IR,
    the same dropout masks drawn from the same seed."""
    from dnc.ir.interpret import leaf_state
    from dnc.targets.torch.run import load_generated

    model = load_generated(graph).DenseNet()
    model.load_state_dict(to_torch(state), strict=True)
    model = model.to(x.device, torch.float64).train()
    weights = torch.randn(x.shape[0], *output(graph).shape, dtype=torch.float64, device=x.device)
    leaves = leaf_state(reference_ir, state)
    results = []
    for run in ("model", "interpreter"):
        xi = x.detach().clone().requires_grad_()
        torch.manual_seed(seed)
        if run == "model":
            why = model.features.fused_reason(xi) if hasattr(model.features, "fused_reason") else "no fused path"
            out, after = model(xi), model.state_dict()
            params = dict(model.named_parameters())
        else:
            done = interpret(reference_ir, {k: v.to(x.device) for k, v in leaves.items()}, xi, train=True)
            out, after = done.output, done.state
            params = {k: v for k, v in leaves.items() if v.requires_grad}
        grads = torch.autograd.grad((out * weights).sum(), [xi, *params.values()])
        running = {k: v for k, v in after.items() if "running" in k}
        results.append((grads[0], dict(zip(params, grads[1:], strict=True)), running))
    (gx, gp, run_stats), (rx, rp, ref_stats) = results
    names = list(rp)
    grads_err = _errors(torch.cat([gp[k].flatten() for k in names]), torch.cat([rp[k].flatten() for k in names]))[1]
    input_err = _errors(gx, rx)[1]
    stats_err = max(_errors(run_stats[k], ref_stats[k])[1] for k in ref_stats)
    ok = max(grads_err, input_err, stats_err) <= TRAIN_TOLERANCE
    how = "fused" if why is None else f"modules in turn: {why}"
    return ok, (
        f"a training step ({how}) in float64 vs the interpreter: gradients {grads_err:.3g}, input gradient "
        f"{input_err:.3g}, running statistics {stats_err:.3g}"
    )


LOW_DTYPES = ("bfloat16", "float16")


def _verify_low(spec, graph, reference_ir, state, x, label: str, target: Target, dtype: str, where: str) -> Outcome:
    """The target in `dtype` against the float64 interpreter, beside what that dtype costs -O0 itself.

    -O0 in a dtype is torchvision's computation in that dtype (bit-identical where torchvision can express the spec),
    so its error is the rounding the dtype costs anyway; the target passes when its error is at most twice that
    (and finite). The top-1 agreement with the reference is printed, not judged: random weights give near-ties.
    """
    from dnc.targets.torch.run import run_torch

    with _full_float32(), torch.no_grad():
        ref = interpret(reference_ir, to_torch(state), x.double()).output
        out = torch.from_numpy(np.asarray(target.run(graph, state, x, x.device.type, dtype))).to(ref.device)
        base = torch.from_numpy(np.asarray(run_torch(reference_ir, state, x, x.device.type, dtype))).to(ref.device)
    err, base_err = _errors(out, ref)[1], _errors(base, ref)[1]
    ok = bool(torch.isfinite(out).all()) and out.shape == ref.shape and err <= 2 * base_err
    agree = int((out.argmax(1) == ref.argmax(1)).sum())
    verdict = "ok" if ok else "MISMATCH (over twice -O0's own error in this dtype)"
    if target.name == "onnx":
        label = f"{label} (onnx, onnxruntime)"
    return Outcome(
        ok,
        f"{label}: {where} on {x.device.type}, in {dtype}: vs the interpreter (float64, -O0 IR): max rel error "
        f"{err:.3g}; -O0 in {dtype} (torchvision's computation): {base_err:.3g}; top-1 agreement {agree} of "
        f"{len(ref)}: {verdict}",
    )


def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """The largest absolute error, and that error relative to the largest reference output; in float64."""
    abs_err = (out.double() - ref.double()).abs().max().item()
    return abs_err, abs_err / max(ref.double().abs().max().item(), torch.finfo(torch.float32).tiny)


@contextlib.contextmanager
def _full_float32():
    # Compare in full float32: TF32 convolutions would differ by far more than the tolerance.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = tf32

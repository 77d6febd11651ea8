"""`dnc verify`: run what `dnc compile` emits and compare it with torchvision.

The generated source is imported from a temporary file, exactly as compiled, given
the same weights as torchvision's DenseNet of the same configuration (a checkpoint
or seeded ones), and both run in eval mode on the same seeded input. Where
torchvision cannot express the spec, the generated model still runs, and its output
shape and parameter count are checked against static inference. `--target onnx`
runs the emitted ONNX model on onnxruntime instead. Imports torch.
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
from dnc.ir.graph import graph_input, ordered, output
from dnc.ir.infer import state_dict_layout
from dnc.targets import Target
from dnc.targets.torch.run import generated_model
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
) -> Outcome:
    """Verify one compiled spec for `target` (torch or onnx); `label` names it in the result line.

    The reference is torchvision's DenseNet. Where torchvision cannot express the
    spec, an ONNX model is compared with the generated PyTorch model (itself checked
    against inference), and a PyTorch model is checked against inference alone.
    """
    dev = check_device(device)
    state = network_state(state_dict_layout(graph), weights, seed)
    how = f"seeded weights (seed {seed})" if weights is None else f"weights {weights}"
    tensors = to_torch(state)
    generated = generated_model(graph, tensors, dev)
    shape = (batch, *graph_input(graph).shape)
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)).to(dev)
    try:
        reference, against = torchvision_densenet(spec), "torchvision"
        reference.load_state_dict(tensors, strict=True)
        reference.to(dev).eval()
    except DncError as err:
        reference, why = None, err.message
        if target.name != "torch":
            reference, against = generated, f"the generated PyTorch model ({why})"
    with _full_float32(), torch.no_grad():
        out = torch.from_numpy(np.asarray(target.run(graph, state, x, device))).to(dev)
        ref = reference(x) if reference is not None else None
    where = f"{how}, input {tuple(shape)} on {dev.type}"
    if target.name == "onnx":
        label = f"{label} (onnx, onnxruntime)"
    if ref is None:
        return _check_inference(generated, out, graph, batch, f"{label}: no torchvision reference ({why}); {where}")
    abs_err = (out - ref).abs().max().item()
    rel_err = abs_err / max(ref.abs().max().item(), torch.finfo(torch.float32).tiny)
    ok = rel_err <= tolerance and bool(torch.isfinite(out).all())
    verdict = "ok" if ok else f"MISMATCH (tolerance {tolerance:g})"
    line = f"{label}: vs {against}, {where}: max abs error {abs_err:.3g}, max rel error {rel_err:.3g}: {verdict}"
    return Outcome(ok, line)


@contextlib.contextmanager
def _full_float32():
    # Compare in full float32: TF32 convolutions would differ by far more than the tolerance.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _check_inference(model: torch.nn.Module, out: torch.Tensor, graph: nx.DiGraph, batch: int, head: str) -> Outcome:
    want_shape = (batch, *output(graph).shape)
    want_params = sum(n.params for n in ordered(graph))
    params = sum(p.numel() for p in model.parameters())
    problems = []
    if tuple(out.shape) != want_shape:
        problems.append(f"output {tuple(out.shape)}, inference says {want_shape}")
    if params != want_params:
        problems.append(f"{params:,} parameters, inference says {want_params:,}")
    if not torch.isfinite(out).all():
        problems.append("non-finite outputs")
    if problems:
        return Outcome(False, f"{head}: " + "; ".join(problems) + ": MISMATCH")
    return Outcome(True, f"{head}: output {want_shape} and {params:,} parameters as inferred: ok")

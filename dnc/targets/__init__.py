"""The target registry: each target registered once with its emitter, options and runner.

The CLI takes its `--target` choices and target-only options from here, `dnc verify`
runs a target through its `run`, and the tests iterate over `TARGETS`. Every emitter
has the same signature, `emit(graph, options) -> str | bytes`, an inferred IR in.
Modules are named, not imported, so that a command pays only for the target it uses.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dnc.errors import DncError


@dataclass(frozen=True)
class Option:
    """A target-only option of `dnc compile`: its name (`--name`), type, default and help."""

    name: str
    type: Any
    default: Any
    help: str
    metavar: str | None = None
    minimum: int | None = None  # the least value an integer option takes


@dataclass(frozen=True)
class Target:
    name: str
    module: str  # the emitter: SUFFIX and emit(graph, options)
    suffix: str
    default_out: Path
    options: tuple[Option, ...] = field(default_factory=tuple)
    runner: str = ""  # "module:function" that runs the emitted artifact: (graph, state, x, device) -> numpy
    inference_only: bool = False
    default_level: int = 0  # the -O level when none is given (dnc/passes.py)

    def emitter(self):
        return importlib.import_module(self.module)

    def emit(self, graph, options: dict) -> bytes:
        out = self.emitter().emit(graph, options)
        return out.encode() if isinstance(out, str) else out

    def run(self, *args):
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)(*args)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("torch", "dnc.targets.torch.emit", ".py", Path("generated"), runner="dnc.targets.torch.run:run_torch"),
        Target(
            "onnx",
            "dnc.targets.onnx.emit",
            ".onnx",
            Path("build/onnx"),
            # NOTE: the opset range and default and the dtypes are emit_onnx's (not imported here: onnx is slow to
            # load); a test checks
            options=(
                Option(
                    "weights",
                    Path,
                    None,
                    "A torchvision-format checkpoint (.safetensors, .pth) to embed; one spec only.",
                ),
                Option("opset", int, None, "ONNX opset, 13 to 28 [default: 17].", "N"),
                Option("seed", int, None, "Seed of the random weights when no --weights [default: 0].", minimum=0),
                Option(
                    "dtype",
                    str,
                    None,
                    "Weights, input and output: float32 or float16 (for GPU providers) [default: float32].",
                    "DTYPE",
                ),
            ),
            runner="dnc.targets.onnx.run:run_onnx",
            inference_only=True,
            default_level=2,  # inference-only anyway: every ONNX pass holds
        ),
    )
}


def target(name: str) -> Target:
    """The registered target `name`, or a one-line error listing the choices."""
    if name not in TARGETS:
        raise DncError(f"unknown target '{name}': expected one of {', '.join(TARGETS)}")
    return TARGETS[name]


def all_options() -> dict[str, tuple[Option, list[str]]]:
    """Every target-only option by name, with the targets that take it."""
    out: dict[str, tuple[Option, list[str]]] = {}
    for t in TARGETS.values():
        for opt in t.options:
            out.setdefault(opt.name, (opt, []))[1].append(t.name)
    return out

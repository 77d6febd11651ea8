"""The torch target's runner: import what `dnc compile --target torch` emits and run it. Imports torch."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import networkx as nx
import numpy as np
import torch

from dnc.targets.torch import emit as emit_torch
from dnc.weights import to_torch


def load_generated(graph: nx.DiGraph) -> ModuleType:
    """Emit the torch source of `graph`, write it to a temporary file and import it as a module."""
    name = graph.graph["name"]
    with tempfile.TemporaryDirectory(prefix="dnc-verify-") as tmp:
        path = Path(tmp) / f"{name}.py"
        path.write_text(emit_torch.emit(graph))
        spec = importlib.util.spec_from_file_location(f"dnc_generated_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # as a normal import would, while it runs
        try:
            spec.loader.exec_module(module)
        finally:
            sys.modules.pop(spec.name, None)
    return module


def generated_model(graph: nx.DiGraph, tensors: dict, dev: torch.device) -> torch.nn.Module:
    model = load_generated(graph).DenseNet()
    model.load_state_dict(tensors, strict=True)
    return model.to(dev).eval()


def run_torch(graph: nx.DiGraph, state: dict, x: torch.Tensor, device: str, dtype: str = "float32") -> np.ndarray:
    """The torch target's runner: what `dnc compile --target torch` emits, with these weights, in eval mode; cast
    to `dtype` after loading (as a user casts a float32 checkpoint), the output returned in float32."""
    kind = getattr(torch, dtype)
    with torch.no_grad():
        model = generated_model(graph, to_torch(state), x.device).to(kind)
        return model(x.to(kind)).float().cpu().numpy()

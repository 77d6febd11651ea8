"""The ONNX target's runner: what `dnc compile --target onnx` emits, run on onnxruntime."""

from __future__ import annotations

import networkx as nx
import numpy as np
import torch

from dnc.errors import DncError

QUIET = 3  # onnxruntime's severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal


def run_onnx(graph: nx.DiGraph, state: dict, x: torch.Tensor, device: str) -> np.ndarray:
    """What `dnc compile --target onnx` emits for these weights, run on onnxruntime."""
    import onnxruntime as ort

    from dnc.targets.onnx.emit import INPUT_NAME, emit_onnx

    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        raise DncError(f"--device {device}: onnxruntime here has no {provider}")
    # errors only: onnxruntime's warnings are coloured multi-line logs on stderr, not the user's business;
    # the session's own logger and the process-wide one (the arena, threads) both
    ort.set_default_logger_severity(QUIET)
    options = ort.SessionOptions()
    options.log_severity_level = QUIET
    session = ort.InferenceSession(emit_onnx(graph, state).SerializeToString(), options, providers=[provider])
    return session.run(None, {INPUT_NAME: x.cpu().numpy()})[0]

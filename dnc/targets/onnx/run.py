"""The ONNX target's runner: what `dnc compile --target onnx` emits, run on onnxruntime."""

from __future__ import annotations

import networkx as nx
import numpy as np
import torch

from dnc.errors import DncError

QUIET = 3  # onnxruntime's severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal


def run_onnx(graph: nx.DiGraph, state: dict, x: torch.Tensor, device: str, dtype: str = "float32") -> np.ndarray:
    """What `dnc compile --target onnx --dtype DTYPE` emits for these weights, run on onnxruntime; float32 out."""
    import onnxruntime as ort

    from dnc.targets.onnx.emit import DTYPES, INPUT_NAME, emit_onnx

    if dtype not in DTYPES:
        raise DncError(f"--dtype {dtype}: the ONNX target takes {' or '.join(DTYPES)}")

    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        raise DncError(f"--device {device}: onnxruntime here has no {provider}")
    # errors only: onnxruntime's warnings are coloured multi-line logs on stderr, not the user's business;
    # the session's own logger and the process-wide one (the arena, threads) both
    ort.set_default_logger_severity(QUIET)
    options = ort.SessionOptions()
    options.log_severity_level = QUIET
    model = emit_onnx(graph, state, dtype=dtype).SerializeToString()
    session = ort.InferenceSession(model, options, providers=[provider])
    return session.run(None, {INPUT_NAME: x.cpu().numpy().astype(dtype)})[0].astype(np.float32)

"""Weights: read torchvision-format checkpoints, check them against the IR, or make seeded ones.

Arrays are numpy here, so that `.safetensors` files and seeded weights need no torch.
`.pth`/`.pt` files are read with `torch.load(..., weights_only=True)` only: a
checkpoint is data, never code to unpickle.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np

from dnc.errors import Location, WeightsError
from dnc.ops import OLD_KEY_PATTERN, Init, Tensor

_OLD_KEY = re.compile(OLD_KEY_PATTERN)
_WRAPPERS = ("state_dict", "model", "model_state_dict")


def upgrade_key(key: str) -> str:
    """`features.denseblock1.denselayer1.norm.1.weight` -> `...denselayer1.norm1.weight`."""
    match = _OLD_KEY.match(key)
    return match.group(1) + match.group(2) if match else key


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """A state dict from `.safetensors` or `.pth`/`.pt`, keys upgraded to the current format.

    Accepts a bare state dict or one wrapped under `state_dict`/`model`, and strips
    the `module.` prefix that DataParallel adds.
    """
    path = Path(path)
    where = Location(str(path))
    if not path.is_file():
        raise WeightsError("no such checkpoint file", where)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            raw = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"not a readable safetensors file: {err}", where) from None
    elif path.suffix in (".pth", ".pt", ".bin"):
        raw = _read_torch(path, where)
    else:
        raise WeightsError(f"unknown checkpoint format '{path.suffix}': expected .safetensors, .pth or .pt", where)
    out = {}
    for key, value in raw.items():
        key = upgrade_key(key.removeprefix("module."))
        out[key] = value
    return out


def _read_torch(path: Path, where: Location) -> dict[str, np.ndarray]:
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise WeightsError(f"not a weights-only torch checkpoint: {_torch_load_reason(err)}", where) from None
    for wrapper in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError("expected a state dict (a mapping of names to tensors)", where)
    return {k: v.detach().cpu().numpy() for k, v in obj.items()}


def _torch_load_reason(err: Exception) -> str:
    """The cause inside torch.load's message, without its advice to load with weights_only=False."""
    text = str(err).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        return " ".join(text.split()) + " (dnc loads weights only, never code)"
    return text.splitlines()[0] if text else type(err).__name__


def check_state(state: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise WeightsError unless `state` has exactly the expected keys and shapes."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    if wrong:
        k = wrong[0]
        problems.append(
            f"{len(wrong)} of another shape (first: {k} is {tuple(state[k].shape)}, expected {expected[k]})"
        )
    if problems:
        raise WeightsError("checkpoint does not fit the network: " + "; ".join(problems), Location(source))


def seeded_state(layout: dict[str, Tensor], seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic random weights for every key of a state_dict layout, BN running statistics randomised too.

    Each tensor draws from its own generator, seeded by (seed, key), so a tensor's
    values do not depend on which other tensors the network has. The op table says
    how each tensor is filled; the scales keep activations of a deep DenseNet finite:
    He-normal convs, BN gamma near 1, running variance in [0.5, 1.5].
    """
    out = {}
    for key, t in layout.items():
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        shape = t.shape
        if t.init is Init.COUNT:
            out[key] = np.array(rng.integers(0, 1000), dtype=np.int64)
        elif t.init is Init.RUNNING_VAR:
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif t.init is Init.RUNNING_MEAN:
            out[key] = rng.normal(0.0, 0.1, shape).astype(np.float32)
        elif t.init is Init.GAMMA:
            out[key] = rng.uniform(0.8, 1.2, shape).astype(np.float32)
        elif t.init is Init.SMALL:
            out[key] = rng.normal(0.0, 0.05, shape).astype(np.float32)
        else:  # He-normal conv or linear weight
            fan_in = int(np.prod(shape[1:]))
            out[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return out


def network_state(layout: dict[str, Tensor], weights: str | Path | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """The weights of a network: a checkpoint checked against `expected`, or seeded ones.

    Checkpoints saved before PyTorch 0.4 (torchvision's own DenseNet downloads among
    them) have no BN `num_batches_tracked`; like torch's BatchNorm, take it as 0.
    """
    if weights is None:
        return seeded_state(layout, seed)
    expected = {key: t.shape for key, t in layout.items()}
    state = read_checkpoint(weights)
    for key, t in layout.items():
        if t.init is Init.COUNT and key not in state:
            state[key] = np.array(0, dtype=np.int64)
    check_state(state, expected, str(weights))
    return state

"""Weights: read torchvision-format checkpoints, check them against the IR, or make seeded ones.

Arrays are numpy here, so that `.safetensors` files and seeded weights need no torch.
`.pth`/`.pt` files are read with `torch.load(..., weights_only=True)` only: a
checkpoint is data, never code to unpickle.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dnc.errors import DncWarning, Location, WeightsError
from dnc.files import open_regular, size_text
from dnc.ir.ops import OLD_KEY_PATTERN, Init, Tensor

if TYPE_CHECKING:
    import torch

CHECKPOINT_OVERHEAD = 16 << 20  # pickle, zip and JSON headers beside the values
MAX_CHECKPOINT_BYTES = 16 << 30  # without a network to fit
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on its JSON header

_OLD_KEY = re.compile(OLD_KEY_PATTERN)
_WRAPPERS = ("state_dict", "model", "model_state_dict")


def upgrade_key(key: str) -> str:
    """`features.denseblock1.denselayer1.norm.1.weight` -> `...denselayer1.norm1.weight`."""
    match = _OLD_KEY.match(key)
    return match.group(1) + match.group(2) if match else key


def read_checkpoint(path: str | Path, expected: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """A state dict from `.safetensors` or `.pth`/`.pt`, keys upgraded to the current format.

    Accepts a bare state dict or one wrapped under `state_dict`/`model`, and strips
    the `module.` prefix that DataParallel adds. The file must be a regular file whose
    size fits `expected` (the network's state_dict shapes). Weights come back as
    float32 or float64 arrays (16-bit ones converted, with a note), BN's
    `num_batches_tracked` as integers; anything else is refused, naming the key.
    """
    path = Path(path)
    where = Location(str(path))
    fd = open_regular(path, where, WeightsError)
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    _check_size(size, expected, where)
    if path.suffix == ".safetensors":
        raw = _read_safetensors(path, size, where)
    elif path.suffix in (".pth", ".pt", ".bin"):
        raw = _read_torch(path, where)
    else:
        raise WeightsError(f"unknown checkpoint format '{path.suffix}': expected .safetensors, .pth or .pt", where)
    out, converted = {}, set()
    for key, (dtype, value) in raw.items():
        if _accept(key, dtype, where) == "convert":
            converted.add(dtype)
            value = value.astype(np.float32)
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise WeightsError(f"{key}: holds NaN or infinite values", where)
        out[upgrade_key(key.removeprefix("module."))] = value
    if converted:
        warnings.warn(
            DncWarning(f"{' and '.join(sorted(converted))} weights converted to float32", where), stacklevel=2
        )
    return out


def _check_size(size: int, expected: Mapping[str, tuple[int, ...]] | None, where: Location) -> None:
    """A checkpoint holds each value in 2 to 8 bytes, plus headers: refuse a file that cannot fit."""
    if expected is None:
        if size > MAX_CHECKPOINT_BYTES:
            raise WeightsError(f"larger than the {size_text(MAX_CHECKPOINT_BYTES)} limit of a checkpoint", where)
        return
    values = sum(math.prod(shape) for shape in expected.values())
    largest = 8 * values + CHECKPOINT_OVERHEAD + 1024 * len(expected)
    if size > largest:
        raise WeightsError(f"{size:,} bytes is too large for this network's {values:,} values", where)
    if size < 2 * values:
        raise WeightsError(f"{size:,} bytes is too small for this network's {values:,} values", where)


def _accept(key: str, dtype: str, where: Location) -> str:
    """'keep' or 'convert' (16-bit floats) for a tensor of `dtype`; WeightsError for any other dtype."""
    if dtype in ("float32", "float64"):
        return "keep"
    if dtype in ("float16", "bfloat16"):
        return "convert"
    if dtype.startswith("float8"):
        raise WeightsError(
            f"{key}: {dtype} weights are refused: 8-bit floats are too lossy to compare or convert", where
        )
    if dtype.startswith(("int", "uint")) and key.endswith(".num_batches_tracked"):
        return "keep"
    raise WeightsError(f"{key}: dtype {dtype} is not accepted (expected float16, bfloat16, float32 or float64)", where)


# safetensors dtype -> (dnc's name, numpy dtype to read it as); BF16 is read as its 16 bits
_SAFETENSORS = {
    "F64": ("float64", "<f8"),
    "F32": ("float32", "<f4"),
    "F16": ("float16", "<f2"),
    "BF16": ("bfloat16", "<u2"),
    "I64": ("int64", "<i8"),
    "I32": ("int32", "<i4"),
    "I16": ("int16", "<i2"),
    "I8": ("int8", "i1"),
    "U8": ("uint8", "u1"),
    "F8_E4M3": ("float8_e4m3", None),
    "F8_E5M2": ("float8_e5m2", None),
    "BOOL": ("bool", None),
    "C64": ("complex64", None),
}


def _read_safetensors(path: Path, size: int, where: Location) -> dict[str, tuple[str, np.ndarray]]:
    """Parse the format (8-byte header length, JSON header, data) here, checking every offset against the file."""
    with os.fdopen(open_regular(path, where, WeightsError), "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError("not a safetensors file: shorter than its 8-byte header length", where)
        length = int.from_bytes(head, "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise WeightsError(f"not a safetensors file: header length {length:,} does not fit the file", where)
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise WeightsError("not a safetensors file: its header is not JSON", where) from None
        if not isinstance(header, dict):
            raise WeightsError("not a safetensors file: its header is not a JSON object", where)
        data_size = size - 8 - length
        out = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            name, numpy_dtype, shape, (begin, end) = _entry(key, info, data_size, where)
            _accept(key, name, where)
            f.seek(8 + length + begin)
            array = np.frombuffer(f.read(end - begin), dtype=numpy_dtype).reshape(shape)
            if name == "bfloat16":  # the upper half of a float32
                array = (array.astype(np.uint32) << 16).view(np.float32)
            out[key] = (name, array.astype(array.dtype.newbyteorder("=")))
    return out


def _entry(key: str, info: object, data_size: int, where: Location) -> tuple[str, str, tuple[int, ...], list[int]]:
    """One header entry checked: dtype known, shape of naturals, offsets inside the data and of the right length."""
    bad = WeightsError(f"not a safetensors file: the header entry of {key} is malformed", where)
    if not isinstance(info, dict) or info.get("dtype") not in _SAFETENSORS:
        if isinstance(info, dict) and isinstance(info.get("dtype"), str):
            raise WeightsError(f"{key}: dtype {info['dtype']} is not accepted (expected F16, BF16, F32 or F64)", where)
        raise bad
    shape, offsets = info.get("shape"), info.get("data_offsets")
    naturals = isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**40 for d in shape) and len(shape) <= 8
    if not naturals or not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise bad
    name, numpy_dtype = _SAFETENSORS[info["dtype"]]
    if numpy_dtype is None:
        _accept(key, name, where)  # raises
    begin, end = offsets
    if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * np.dtype(numpy_dtype).itemsize:
        raise WeightsError(f"not a safetensors file: the data offsets of {key} do not fit the file", where)
    return name, numpy_dtype, tuple(shape), offsets


def _read_torch(path: Path, where: Location) -> dict[str, tuple[str, np.ndarray]]:
    import pickle

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(f"refused: {_torch_load_reason(err)}", where) from None
    except Exception as err:  # torch.load raises many kinds for a file that is not a checkpoint
        raise WeightsError(f"not a readable torch checkpoint ({type(err).__name__})", where) from None
    for wrapper in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError("expected a state dict (a mapping of names to tensors)", where)
    out = {}
    for key, tensor in obj.items():
        key = str(key)
        if tensor.layout != torch.strided:
            raise WeightsError(f"{key}: a sparse tensor ({tensor.layout}); expected a dense one", where)
        if tensor.is_quantized:
            raise WeightsError(f"{key}: a quantized tensor; expected float weights", where)
        if tensor.is_meta or tensor.device.type != "cpu":
            raise WeightsError(f"{key}: a tensor without data (device {tensor.device.type})", where)
        name = str(tensor.dtype).removeprefix("torch.")
        if _accept(key, name, where) == "convert":
            tensor = tensor.float()
        out[key] = (name, tensor.detach().numpy())
    return out


def _torch_load_reason(err: Exception) -> str:
    """Why torch's weights-only unpickler refused the file, in dnc's words (never advice to unpickle it)."""
    text = str(err)
    if "WeightsUnpickler error:" in text or "weights_only" in text:
        return "the file holds pickled objects other than tensors, and dnc loads tensors only, never code"
    return "not a torch checkpoint (the pickle is malformed)"


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
        else:  # conv or linear weight
            fan_in = max(1, int(np.prod(shape[1:])))  # a tensor with no inputs must not divide by zero
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
    state = read_checkpoint(weights, expected)
    for key, t in layout.items():
        if t.init is Init.COUNT and key not in state:
            state[key] = np.array(0, dtype=np.int64)
    check_state(state, expected, str(weights))
    return state


def to_torch(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """numpy state dict -> torch state dict (copies, so the arrays stay untouched). Imports torch."""
    import torch

    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}

"""Weights: read torchvision-format checkpoints, check them against the IR, or make seeded ones.

Arrays are numpy here, so that `.safetensors` files and seeded weights need no torch.
`.pth`/`.pt` files are read with `torch.load(..., weights_only=True)` only: a
checkpoint is data, never code to unpickle.

A checkpoint may cost at most what the network's weights cost: reading one peaks at no
more than twice the network's float32 weights (a float64 checkpoint is that) plus
64 MiB. So what could make it cost more is refused before it is paid for: a file larger
than the network's values, safetensors entries whose data overlap, a pickle larger than
its keys need, compressed zip members (a small file that inflates), and tensors that are
views whose logical size exceeds their storage (stride 0, overlapping views). Views of one
storage that do not overlap (flat-parameter checkpoints, slices, transposes) are legal. The
zip format is memory-mapped, so a value costs memory only once it is read; values are
checked in chunks, so no check allocates a tensor's size again.
"""

from __future__ import annotations

import json
import math
import os
import pickletools
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping
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
# torch.save's pickle takes about 170 bytes a key (densenet121, 201); its objects take a few times that
PICKLE_BYTES_PER_KEY = 512
PICKLE_BASE = 64 << 10
CHUNK = 1 << 20  # values checked at a time: a check allocates at most this many more
FLOAT32_MAX = float(np.finfo(np.float32).max)

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
        pickle_budget = MAX_HEADER_BYTES if expected is None else PICKLE_BASE + PICKLE_BYTES_PER_KEY * len(expected)
        raw = _read_torch(path, pickle_budget, where)
    else:
        raise WeightsError(f"unknown checkpoint format '{path.suffix}': expected .safetensors, .pth or .pt", where)
    out, converted = {}, set()
    for key, (dtype, value) in raw.items():
        if _accept(key, dtype, where) == "convert":
            converted.add(dtype)
            value = value.astype(np.float32, copy=False)  # a .pth tensor was converted already
        if value.dtype.kind == "f":
            _check_values(key, value, where)
        out[upgrade_key(key.removeprefix("module."))] = value
    if converted:
        warnings.warn(
            DncWarning(f"{' and '.join(sorted(converted))} weights converted to float32", where), stacklevel=2
        )
    return out


def _check_values(key: str, value: np.ndarray, where: Location) -> None:
    """Refuse NaN, infinities and values that float32 (what the targets compute in) cannot hold; chunk by chunk."""
    for chunk in _chunks(value):
        if not np.isfinite(chunk).all():
            raise WeightsError(f"{key}: holds NaN or infinite values", where)
        if chunk.dtype.itemsize > 4 and (np.abs(chunk) > FLOAT32_MAX).any():
            raise WeightsError(f"{key}: holds values beyond float32's range (largest {FLOAT32_MAX:.4g})", where)


def _chunks(value: np.ndarray) -> Iterator[np.ndarray]:
    """`value` in views of at most CHUNK elements, whatever its strides: a check of one allocates no more."""
    if value.ndim == 0 or value.size <= CHUNK:
        yield value
    elif value[0].size > CHUNK:
        for row in value:
            yield from _chunks(row)
    else:
        rows = CHUNK // max(1, value[0].size)
        for start in range(0, len(value), rows):
            yield value[start : start + rows]


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
            header = json.loads(f.read(length), object_pairs_hook=_unique_keys)
        except _DuplicateKey as err:
            raise WeightsError(f"not a safetensors file: its header names {err.args[0]} twice", where) from None
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise WeightsError("not a safetensors file: its header is not JSON", where) from None
        if not isinstance(header, dict):
            raise WeightsError("not a safetensors file: its header is not a JSON object", where)
        data_size = size - 8 - length
        entries = {key: _entry(key, info, data_size, where) for key, info in header.items() if key != "__metadata__"}
        _check_disjoint({key: entry[3] for key, entry in entries.items()}, where)
        out = {}
        for key, (name, numpy_dtype, shape, (begin, end)) in entries.items():
            _accept(key, name, where)
            f.seek(8 + length + begin)
            data = bytearray(end - begin)  # read into place: no copy of the file's bytes
            if f.readinto(data) != len(data):
                raise WeightsError(f"not a safetensors file: the data of {key} ends early", where)
            array = np.frombuffer(data, dtype=numpy_dtype).reshape(shape)
            if name == "bfloat16":  # the upper half of a float32
                array = (array.astype(np.uint32) << 16).view(np.float32)
            out[key] = (name, array.astype(array.dtype.newbyteorder("="), copy=False))
    return out


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object that names no key twice (json keeps the last, so one entry could hide another)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _check_disjoint(spans: Mapping[str, tuple[int, int]], where: Location) -> None:
    """Refuse byte ranges that overlap: each value is stored once, so reading them costs what the file holds."""
    previous = None
    for key, (begin, end) in sorted(spans.items(), key=lambda item: item[1]):
        if begin == end:
            continue
        if previous is not None and begin < spans[previous][1]:
            raise WeightsError(f"the data of {key} overlaps the data of {previous}: each value is stored once", where)
        previous = key


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


def _read_torch(path: Path, pickle_budget: int, where: Location) -> dict[str, tuple[str, np.ndarray]]:
    """A `.pth` file's tensors, each checked to be a dense view before any of its values is read."""
    import pickle

    import torch

    zipped = zipfile.is_zipfile(path)
    _check_torch_file(path, zipped, pickle_budget, where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as err:
        raise WeightsError(f"refused: {_torch_load_reason(err)}", where) from None
    except Exception as err:  # torch.load raises many kinds for a file that is not a checkpoint
        raise WeightsError(f"not a readable torch checkpoint ({type(err).__name__})", where) from None
    for wrapper in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError("expected a state dict (a mapping of names to tensors)", where)
    spans: dict[str, tuple[int, int]] = {}
    for key, tensor in obj.items():
        key = str(key)
        if tensor.layout != torch.strided:
            raise WeightsError(f"{key}: a sparse tensor ({tensor.layout}); expected a dense one", where)
        if tensor.is_quantized:
            raise WeightsError(f"{key}: a quantized tensor; expected float weights", where)
        if tensor.is_meta or tensor.device.type != "cpu":
            raise WeightsError(f"{key}: a tensor without data (device {tensor.device.type})", where)
        spans[key] = _storage_span(key, tensor, where)
    _check_disjoint(spans, where)  # storages are apart in memory: their spans never meet
    out = {}
    for key, tensor in obj.items():
        key = str(key)
        name = str(tensor.dtype).removeprefix("torch.")
        if _accept(key, name, where) == "convert":
            tensor = tensor.float()
        out[key] = (name, tensor.detach().numpy())
    return out


def _check_torch_file(path: Path, zipped: bool, pickle_budget: int, where: Location) -> None:
    """Before torch reads it: every zip member stored (none inflates), and a pickle no larger than its keys need."""
    if zipped:
        try:
            with zipfile.ZipFile(path) as archive:
                members = archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise WeightsError(f"not a readable torch checkpoint ({type(err).__name__})", where) from None
        for m in members:
            if m.compress_type != zipfile.ZIP_STORED or m.file_size != m.compress_size:
                raise WeightsError(f"{m.filename}: a compressed member; torch.save writes them stored", where)
        pickles = [m.file_size for m in members if m.filename.endswith("/data.pkl") or m.filename == "data.pkl"]
    else:  # the format before torch 1.6: pickles (magic, version, system, the state dict, storage keys), then data
        pickles = [_pickle_length(path, where)]
    if sum(pickles) > pickle_budget:
        raise WeightsError(f"its pickle takes {sum(pickles):,} bytes, more than its network's keys need", where)


def _pickle_length(path: Path, where: Location) -> int:
    """How many bytes the legacy format's leading pickles take, read opcode by opcode (nothing is built)."""
    with os.fdopen(open_regular(path, where, WeightsError), "rb") as f:
        try:
            for _ in range(5):
                for _ in pickletools.genops(f):
                    pass
        except Exception:  # not a pickle at all: torch says what it is
            pass
        return f.tell()


def _storage_span(key: str, tensor: torch.Tensor, where: Location) -> tuple[int, int]:
    """Where a tensor's bytes lie in memory, refusing a view that reads an element twice or leaves its storage."""
    size, stride, item = tuple(tensor.shape), tuple(tensor.stride()), tensor.element_size()
    if tensor.numel() == 0:
        return (0, 0)
    extent = _extent(size, stride)
    if extent is None:
        raise WeightsError(
            f"{key}: a view of shape {size} with strides {stride} reads some of its storage's elements more than "
            "once (an expanded or overlapping tensor); save it with .contiguous()",
            where,
        )
    offset = tensor.storage_offset() * item
    if offset + (extent + 1) * item > tensor.untyped_storage().nbytes():
        raise WeightsError(f"{key}: a view that reaches past its storage", where)
    begin = tensor.untyped_storage().data_ptr() + offset
    return (begin, begin + (extent + 1) * item)


def _extent(shape: tuple[int, ...], strides: tuple[int, ...]) -> int | None:
    """The offset of a view's last element from its first, or None if two of its elements are one in storage.

    Axes taken by increasing stride: each stride must pass everything the smaller axes reach, so
    that no element is reached twice (contiguous layouts, transposes and slices pass; stride 0 does not).
    """
    extent = 0
    for stride, size in sorted((stride, size) for size, stride in zip(shape, strides, strict=True) if size > 1):
        if stride <= extent:
            return None
        extent += stride * (size - 1)
    return extent


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

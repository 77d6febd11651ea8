"""Checkpoints are checked, not coerced: dtypes, non-finite values, odd tensors, bad headers, pickles."""

from __future__ import annotations

import json
import struct
import warnings

import numpy as np
import pytest

from dnc.errors import DncWarning, WeightsError
from dnc.ir.ops import Init, Tensor
from dnc.weights import read_checkpoint, seeded_state

torch = pytest.importorskip("torch", exc_type=ImportError)  # no torch: skip the module

LAYOUT = {
    "a.weight": Tensor("weight", (4, 3), Init.HE_NORMAL, True),
    "a.bias": Tensor("bias", (4,), Init.SMALL, True),
    "bn.num_batches_tracked": Tensor("num_batches_tracked", (), Init.COUNT, False, onnx=False, integer=True),
}
EXPECTED = {key: t.shape for key, t in LAYOUT.items()}


def state(dtype=None) -> dict:
    out = {k: torch.from_numpy(v) for k, v in seeded_state(LAYOUT).items()}
    if dtype is not None:
        out["a.weight"] = out["a.weight"].to(dtype)
    return out


def save(tmp_path, obj, name="w.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64_are_read_as_they_are(tmp_path, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = read_checkpoint(save(tmp_path, state(dtype)), EXPECTED)
    assert out["a.weight"].dtype == np.dtype(str(dtype).removeprefix("torch."))
    assert out["bn.num_batches_tracked"].dtype == np.int64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_floats_are_converted_with_a_note(tmp_path, dtype):
    with pytest.warns(DncWarning, match="converted to float32"):
        out = read_checkpoint(save(tmp_path, state(dtype)), EXPECTED)
    assert out["a.weight"].dtype == np.float32


@pytest.mark.parametrize(
    ("dtype", "message"),
    [
        (torch.float8_e4m3fn, "too lossy"),
        (torch.int32, "dtype int32 is not accepted"),
        (torch.bool, "dtype bool is not accepted"),
        (torch.complex64, "dtype complex64 is not accepted"),
    ],
)
def test_other_dtypes_are_one_line_errors(tmp_path, dtype, message):
    with pytest.raises(WeightsError, match=message) as err:
        read_checkpoint(save(tmp_path, state(dtype)), EXPECTED)
    assert "a.weight" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_refused_naming_the_key(tmp_path, bad):
    obj = state()
    obj["a.bias"][1] = bad
    with pytest.raises(WeightsError, match=r"a\.bias: holds NaN or infinite"):
        read_checkpoint(save(tmp_path, obj), EXPECTED)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: t.to_sparse(), "sparse"),
        (lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8), "quantized"),
        (lambda t: torch.empty(t.shape, device="meta"), "without data|not a readable"),
    ],
)
@pytest.mark.filterwarnings("ignore:.*quantized tensor creation")
def test_sparse_quantized_and_meta_tensors_are_refused(tmp_path, make, message):
    obj = state()
    obj["a.weight"] = make(obj["a.weight"])
    with pytest.raises(WeightsError, match=message):
        read_checkpoint(save(tmp_path, obj), EXPECTED)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_pickle_with_code_is_refused_in_dncs_words(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"a.weight": Evil()}, path)
    with pytest.raises(WeightsError) as err:
        read_checkpoint(path, EXPECTED)
    text = str(err.value)
    assert "never code" in text and "weights_only" not in text and "\n" not in text


def test_a_weights_file_must_be_a_regular_file_that_fits(tmp_path):
    with pytest.raises(WeightsError, match="directory"):
        read_checkpoint(tmp_path, EXPECTED)
    big = tmp_path / "big.pth"
    big.write_bytes(b"\0" * (17 << 20))
    with pytest.raises(WeightsError, match="too large for this network"):
        read_checkpoint(big, EXPECTED)


def safetensors_file(tmp_path, header: dict, data: bytes, length: int | None = None):
    raw = json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_safetensors_written_by_the_library_are_read(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(state(torch.bfloat16), str(path))
    with pytest.warns(DncWarning, match="bfloat16"):
        out = read_checkpoint(path, EXPECTED)
    expected = state(torch.bfloat16)["a.weight"].float().numpy()
    assert np.array_equal(out["a.weight"], expected)


@pytest.mark.parametrize(
    ("header", "length", "message"),
    [
        ({"a.bias": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 1 << 40, "header length"),
        ({"a.bias": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}}, None, "offsets"),
        ({"a.bias": {"dtype": "F32", "shape": [400], "data_offsets": [0, 16]}}, None, "offsets"),
        ({"a.bias": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, None, "too lossy"),
        ({"a.bias": {"dtype": "X9", "shape": [4], "data_offsets": [0, 4]}}, None, "not accepted"),
        ({"a.bias": "nope"}, None, "malformed"),
    ],
)
def test_safetensors_headers_that_do_not_fit_are_refused(tmp_path, header, length, message):
    path = safetensors_file(tmp_path, header, b"\0" * 64, length)
    with pytest.raises(WeightsError, match=message):
        read_checkpoint(path, None)

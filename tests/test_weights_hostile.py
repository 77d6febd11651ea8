"""Checkpoints are checked, not coerced: dtypes, non-finite values, odd tensors, bad headers, pickles."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, dnc_cli, spec_path

from dnc.errors import DncWarning, WeightsError
from dnc.ir.infer import state_dict_layout
from dnc.ir.ops import Init, Tensor
from dnc.pipeline import build
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


# -- checkpoints may cost at most what the network's weights cost ----------------------

BIG = {"a.weight": (256, 1024), "a.bias": (256,)}  # 262,400 values: 1 MiB in float32


def test_safetensors_entries_that_share_their_data_are_refused(tmp_path):
    """Every entry pointing at one region would make dnc copy it once per entry."""
    header = {f"k{i}": {"dtype": "F32", "shape": [256, 1024], "data_offsets": [0, 1 << 20]} for i in range(2000)}
    path = safetensors_file(tmp_path, header, b"\0" * (1 << 20))
    with pytest.raises(WeightsError, match=r"the data of k\d+ overlaps the data of k\d+: each value is stored once"):
        read_checkpoint(path, BIG)
    shifted = {
        "a.weight": {"dtype": "F32", "shape": [256, 1024], "data_offsets": [1024, 1024 + (1 << 20)]},
        "a.bias": {"dtype": "F32", "shape": [256], "data_offsets": [0, 1024]},
        "tail": {"dtype": "F32", "shape": [1], "data_offsets": [1 << 20, (1 << 20) + 4]},  # inside a.weight's
    }
    with pytest.raises(WeightsError, match="the data of tail overlaps the data of a.weight"):
        read_checkpoint(safetensors_file(tmp_path, shifted, b"\0" * ((1 << 20) + 1024)), None)


def test_a_safetensors_header_naming_a_key_twice_is_refused(tmp_path):
    entry = '{"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}'
    raw = f'{{"a.bias": {entry}, "a.bias": {entry}}}'.encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    with pytest.raises(WeightsError, match="its header names a.bias twice"):
        read_checkpoint(path, None)


def test_an_expanded_tensor_is_refused_before_its_values_are_read(tmp_path):
    obj = {"a.weight": torch.zeros(1).expand(256, 1024), "a.bias": torch.zeros(256), "pad": torch.zeros(1 << 18)}
    with pytest.raises(WeightsError, match=r"a\.weight: a view of shape \(256, 1024\) with strides \(0, 0\)"):
        read_checkpoint(save(tmp_path, obj), BIG)


def test_views_of_one_storage_are_legal_apart_and_refused_overlapping(tmp_path):
    flat = torch.arange(256 * 1024 + 256, dtype=torch.float32)
    apart = {"a.weight": flat[: 256 * 1024].view(256, 1024), "a.bias": flat[256 * 1024 :]}  # flat parameters
    out = read_checkpoint(save(tmp_path, apart), BIG)
    assert out["a.bias"][0] == 256 * 1024 and out["a.weight"][1, 0] == 1024
    transposed = {"a.weight": flat[: 256 * 1024].view(1024, 256).t(), "a.bias": flat[256 * 1024 :]}
    assert read_checkpoint(save(tmp_path, transposed), BIG)["a.weight"][0, 1] == 256  # dense, axes swapped
    wide = torch.arange(256 * 2048, dtype=torch.float32).view(256, 2048)
    sliced = {"a.weight": wide[:, ::2], "a.bias": torch.zeros(256)}  # every other column: no element twice
    assert read_checkpoint(save(tmp_path, sliced), BIG)["a.weight"][1, 1] == 2048 + 2
    overlapping = {"a.weight": flat[: 256 * 1024].view(256, 1024), "a.bias": flat[1000:1256]}
    with pytest.raises(WeightsError, match="the data of a.bias overlaps the data of a.weight"):
        read_checkpoint(save(tmp_path, overlapping), BIG)


def test_compressed_members_and_oversized_pickles_are_refused(tmp_path):
    import zipfile

    path = save(tmp_path, {"a.weight": torch.zeros(4096, 1024), "a.bias": torch.zeros(256)})  # 16 MiB
    deflated = tmp_path / "deflated.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert deflated.stat().st_size < 32 << 10  # small enough to pass for a small network's checkpoint
    with pytest.raises(WeightsError, match=r"w/data.pkl: a compressed member; torch\.save writes them stored"):
        read_checkpoint(deflated, {"a.weight": (64, 64), "a.bias": (256,)})
    padded = {"a.weight": torch.zeros(256, 1024), "a.bias": torch.zeros(256), "junk": [[]] * 100_000}
    torch.save(padded, path)
    with pytest.raises(WeightsError, match="its pickle takes .* bytes, more than its network's keys need"):
        read_checkpoint(path, BIG)


def test_the_format_before_torch_1_6_is_read(tmp_path):
    path = tmp_path / "old.pth"
    torch.save(state(), path, _use_new_zipfile_serialization=False)
    out = read_checkpoint(path, EXPECTED)
    assert np.array_equal(out["a.weight"], state()["a.weight"].numpy())


def test_a_float64_value_beyond_float32_is_refused_naming_the_key(tmp_path):
    obj = state(torch.float64)
    obj["a.weight"][2, 1] = 1e300
    with pytest.raises(WeightsError, match=r"a\.weight: holds values beyond float32's range \(largest 3\.403e\+38\)"):
        read_checkpoint(save(tmp_path, obj), EXPECTED)


PEAK = textwrap.dedent(
    """
    import sys, warnings
    import numpy as np, torch
    from dnc.weights import read_checkpoint
    from dnc.errors import WeightsError
    expected = {"features.conv%d.weight" % i: (512, 512, 3, 3) for i in range(4)}  # 9.4M values, 36 MiB in float32
    expected["classifier.weight"] = (1000, 1024)
    def rss(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) << 10
    before = rss("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from now
    warnings.simplefilter("ignore")
    try:
        read_checkpoint(sys.argv[1], expected)
        outcome = "read"
    except WeightsError as err:
        outcome = "refused: " + err.message
    print(outcome, rss("VmHWM:") - before)
    """
)


def craft(kind: str, path: Path) -> Path:
    """A checkpoint for PEAK's network: as torch or safetensors saves it, or a hostile layout of the same size."""
    shapes = {f"features.conv{i}.weight": (512, 512, 3, 3) for i in range(4)} | {"classifier.weight": (1000, 1024)}
    dtype = torch.float64 if kind.endswith("64") else torch.float16 if kind.endswith("16") else torch.float32
    obj = {k: torch.ones(s, dtype=dtype) for k, s in shapes.items()}
    if kind.startswith("safetensors"):
        from safetensors.torch import save_file

        save_file(obj, str(path.with_suffix(".safetensors")))
        return path.with_suffix(".safetensors")
    if kind == "expanded":
        obj["features.conv0.weight"] = torch.ones(1).expand(512, 512, 3, 3)
    torch.save(obj, path, _use_new_zipfile_serialization=kind != "legacy32")
    return path


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc to measure a peak")
@pytest.mark.parametrize(
    "kind", ["pth32", "pth64", "pth16", "legacy32", "safetensors32", "safetensors64", "safetensors16", "expanded"]
)
def test_reading_a_checkpoint_peaks_below_twice_its_float32_weights(tmp_path, kind):
    """The bound: 2 x the network's float32 weights + 64 MiB, measured as the growth of peak RSS while reading."""
    path = craft(kind, tmp_path / "w.pth")
    done = subprocess.run(
        [sys.executable, "-c", PEAK, str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    outcome, peak = done.stdout.rsplit(" ", 1)
    weights = 4 * (4 * 512 * 512 * 9 + 1000 * 1024)
    assert outcome.startswith("refused: features.conv0.weight: a view" if kind == "expanded" else "read")
    print(f"{kind}: peak grew by {int(peak) / (1 << 20):.1f} MiB; the bound is {(2 * weights + (64 << 20)) >> 20} MiB")
    assert int(peak) <= 2 * weights + (64 << 20), f"{kind}: peak grew by {int(peak) >> 20} MiB"


def test_compile_refuses_a_float64_checkpoint_that_would_be_inf_in_onnx(tmp_path):
    sets = ("--set", "blocks=[1, 1]")
    _, graph = build(spec_path("densenet40_k12"), sets[1:])
    obj = {
        k: torch.from_numpy(v).double() if v.dtype == np.float32 else torch.from_numpy(v)
        for k, v in seeded_state(state_dict_layout(graph)).items()
    }
    obj["features.conv0.weight"][0, 0, 0, 0] = 1e300
    path = save(tmp_path, obj)
    done = dnc_cli("compile", spec_path("densenet40_k12"), *sets, "--target", "onnx", "--weights", path, "-o", tmp_path)
    assert done.returncode == 2
    assert done.stderr == (
        f"{path}: error: features.conv0.weight: holds values beyond float32's range (largest 3.403e+38)\n"
    )
    assert not (tmp_path / "densenet40_k12.onnx").exists()

"""`--dtype float16` on the ONNX target: float16 weights, input and output, for GPU execution providers.

Tolerance. float16 keeps 11 significant bits: its unit roundoff is u = 2**-11 = 4.9e-4. On
onnxruntime's CPU provider most ops have no float16 kernel, so onnxruntime casts around
them and computes in float32: the error is the rounding of the weights and the input (and
of the activations between the inserted casts). Measured, relative to the float32 model,
batches 1 and 3, seeded weights with randomised BN statistics: densenet121 1.1e-3 at -O0 and
8.4e-4 at -O2, densenet_bc100_k12 1.9e-3 (-O0) and 7.8e-4 (-O2), densenet40_k12 6.6e-4.
Eager torch with every activation rounded to float16 (what a GPU provider does) measured
1.0e-3 (densenet121) and 1.7e-3 (densenet_bc100_k12) on the same weights. So 5e-3 (about
10u) leaves 2.5x over the worst case seen; on CUDA, where cuDNN may pick Winograd or FFT
algorithms in float16, 1e-2.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import dnc_cli, spec_path

from dnc.errors import EmitError
from dnc.ir.graph import OpKind, ordered
from dnc.ir.infer import state_dict_layout
from dnc.ir.passes import select
from dnc.pipeline import build
from dnc.targets.onnx.emit import DTYPES, FLOAT16_MAX, MAX_OPSET, MIN_OPSET, emit_onnx
from dnc.weights import seeded_state

SMALL = "densenet_bc100_k12"
TOLERANCE = 5e-3
CUDA_TOLERANCE = 1e-2


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b).max() / np.abs(b).max())


def _case(name: str, level: int, seed: int = 0):
    _, graph = build(spec_path(name), passes=select("onnx", level))
    return graph, seeded_state(state_dict_layout(graph), seed=seed)


def _inputs(graph, batch: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, *ordered(graph)[0].shape), dtype=np.float32)


@pytest.mark.parametrize("opset", [MIN_OPSET, MAX_OPSET])
@pytest.mark.parametrize("level", [0, 2])
def test_float16_model_is_checker_valid_and_float16_throughout(level, opset):
    graph, state = _case(SMALL, level)
    model = emit_onnx(graph, state, opset, dtype="float16")
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)  # every node's types agree
    f16 = onnx.TensorProto.FLOAT16
    assert [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)] == [f16, f16]
    assert {t.data_type for t in model.graph.initializer} == {f16}
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in emit_onnx(graph, state, opset).graph.node]


def test_weights_are_cast_once_from_float32_and_folds_from_float64():
    graph, state = _case(SMALL, 2)
    model = emit_onnx(graph, state, dtype="float16")
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    conv_bn = [n for n in ordered(graph) if n.op is OpKind.CONV_BN]
    assert conv_bn
    for n in conv_bn:  # the fold, in float64 from the checkpoint's values, then one rounding to float16
        bn = {t.name: np.float64(state[n.key(t)]) for t in n.tensors if t.module}
        scale = bn["weight"] / np.sqrt(bn["running_var"] + n.attrs.bn.eps)
        folded = np.float64(state[f"{n.scope}.weight"]) * scale[:, None, None, None]
        np.testing.assert_array_equal(weights[f"{n.scope}.folded_weight"], folded.astype(np.float16))
    for key, value in weights.items():
        if ".folded_" not in key:
            np.testing.assert_array_equal(value, state[key].astype(np.float16))


def test_float32_is_the_default_and_is_not_recorded(tmp_path):
    graph, state = _case(SMALL, 2)
    assert emit_onnx(graph, state).SerializeToString() == emit_onnx(graph, state, dtype="float32").SerializeToString()
    written = {}
    for dtype in (None, "float32", "float16"):  # into one folder, which the file records
        extra = ["--dtype", dtype] if dtype else []
        result = dnc_cli("compile", spec_path(SMALL), "--target", "onnx", "-o", tmp_path, *extra)
        assert result.returncode == 0, result.stderr
        written[dtype] = (tmp_path / f"{SMALL}.onnx").read_bytes()
    plain, f32, f16 = written.values()
    assert plain == f32
    props = {p.key: p.value for p in onnx.load_from_string(f16).metadata_props}
    assert "--dtype float16" in props["dnc.regenerate"]


@pytest.mark.parametrize(("name", "level"), [("densenet121", 2), (SMALL, 0), (SMALL, 2)])
def test_float16_on_the_cpu_provider_matches_float32_within_float16_tolerance(name, level):
    ort = pytest.importorskip("onnxruntime")
    graph, state = _case(name, level)
    sessions = {
        dtype: ort.InferenceSession(
            emit_onnx(graph, state, dtype=dtype).SerializeToString(), providers=["CPUExecutionProvider"]
        )
        for dtype in DTYPES
    }
    for batch in (1, 3):
        x = _inputs(graph, batch)
        expected = sessions["float32"].run(None, {"input": x})[0]
        got = sessions["float16"].run(None, {"input": x.astype(np.float16)})[0]
        assert got.dtype == np.float16 and got.shape == expected.shape
        assert rel_error(got, expected) <= TOLERANCE


def test_float16_matches_torchvision_in_float32():
    torch = pytest.importorskip("torch", exc_type=ImportError)
    ort = pytest.importorskip("onnxruntime")
    from dnc.check.reference import torchvision_densenet
    from dnc.weights import to_torch

    graph, state = _case("densenet121", 2)
    net = torchvision_densenet(build(spec_path("densenet121"))[0]).eval()
    net.load_state_dict(to_torch(state))
    session = ort.InferenceSession(
        emit_onnx(graph, state, dtype="float16").SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = _inputs(graph, 2)
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    assert rel_error(session.run(None, {"input": x.astype(np.float16)})[0], expected) <= TOLERANCE


def test_a_weight_beyond_float16_range_is_refused_by_key():
    graph, state = _case(SMALL, 0)
    key = "features.denseblock2.denselayer3.conv1.weight"
    state[key] = state[key].copy()
    state[key].flat[5] = -1e5
    emit_onnx(graph, state)  # float32 holds it
    with pytest.raises(EmitError, match=rf"^--dtype float16: weight {key} holds 100000, beyond float16's largest"):
        emit_onnx(graph, state, dtype="float16")
    state[key].flat[5] = -FLOAT16_MAX  # the largest float16 itself is kept
    emit_onnx(graph, state, dtype="float16")


def test_a_fold_beyond_float16_range_is_refused_by_its_initializer_name():
    graph, state = _case(SMALL, 2)
    layer = "features.denseblock1.denselayer1"  # conv1 + norm2 fold: weight * gamma / sqrt(var + eps)
    state[f"{layer}.norm2.weight"] = np.full_like(state[f"{layer}.norm2.weight"], 1e4)
    state[f"{layer}.norm2.running_var"] = np.zeros_like(state[f"{layer}.norm2.running_var"])
    assert all(np.abs(v).max() <= FLOAT16_MAX for v in state.values())  # every stored weight fits; the fold does not
    with pytest.raises(EmitError, match=rf"^--dtype float16: weight {layer}\.conv1\.folded_weight \(a conv's"):
        emit_onnx(graph, state, dtype="float16")


def test_cli_refuses_an_out_of_range_checkpoint_in_one_line(tmp_path):
    from safetensors.numpy import save_file

    graph, state = _case(SMALL, 0)
    state["classifier.weight"] = state["classifier.weight"].copy()
    state["classifier.weight"][0, 0] = 1e5
    weights = tmp_path / "big.safetensors"
    save_file(state, str(weights))
    out = tmp_path / "out"
    args = ("compile", spec_path(SMALL), "--target", "onnx", "-o", out, "--weights", weights)
    assert dnc_cli(*args).returncode == 0
    result = dnc_cli(*args, "--dtype", "float16")
    assert result.returncode == 2
    assert result.stderr == (
        "dnc: error: --dtype float16: weight classifier.weight holds 100000, beyond float16's largest value 65504; "
        "keep --dtype float32 for these weights\n"
    )


def test_unknown_dtype_is_one_line_and_exit_2(tmp_path):
    result = dnc_cli("compile", spec_path(SMALL), "--target", "onnx", "-o", tmp_path, "--dtype", "bfloat16")
    assert result.returncode == 2
    assert result.stderr == "dnc: error: --dtype bfloat16 is not supported: choose float32 or float16\n"
    assert not list(tmp_path.iterdir())


def test_help_states_the_dtypes():
    result = dnc_cli("compile", "--help")
    assert f"onnx: Weights, input and output: {' or '.join(DTYPES)} " in " ".join(result.stdout.split())


def test_dtype_is_an_onnx_option_only(tmp_path):
    result = dnc_cli("compile", spec_path(SMALL), "-o", tmp_path, "--dtype", "float16")
    assert result.returncode == 2 and "--dtype: not an option of --target torch" in result.stderr


@pytest.mark.cuda
@pytest.mark.parametrize("level", [0, 2])
def test_float16_on_the_cuda_execution_provider(level):
    """What --dtype float16 is for: onnxruntime's CUDA provider, float16 arithmetic, against the float32 model."""
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here")
    graph, state = _case("densenet121", level)
    cuda = ort.InferenceSession(
        emit_onnx(graph, state, dtype="float16").SerializeToString(), providers=["CUDAExecutionProvider"]
    )
    if cuda.get_providers()[0] != "CUDAExecutionProvider":
        pytest.skip("onnxruntime could not start the CUDAExecutionProvider")
    cpu = ort.InferenceSession(emit_onnx(graph, state).SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = _inputs(graph, batch)
        got = cuda.run(None, {"input": x.astype(np.float16)})[0]
        assert got.dtype == np.float16
        assert rel_error(got, cpu.run(None, {"input": x})[0]) <= CUDA_TOLERANCE

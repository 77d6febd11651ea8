"""The ONNX target: checker-valid models whose shapes, names and weights match the IR.

Numbers against torch are in test_onnx_parity.py. Each model is emitted once per
module (a module-scoped fixture per spec), so only one is alive at a time.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from conftest import ALL_SPECS, dnc_cli, spec_path

from dnc.errors import EmitError
from dnc.ir.graph import OpKind, ordered, output
from dnc.ir.infer import state_dict_layout, state_dict_shapes
from dnc.pipeline import build
from dnc.targets.onnx.emit import (
    BATCH,
    DEFAULT_OPSET,
    MAX_OPSET,
    MIN_OPSET,
    OUTPUT_NAME,
    emit_onnx,
    initializer_keys,
)
from dnc.targets.outputs import write_outputs
from dnc.weights import seeded_state

SMALL = "densenet_bc100_k12"  # a real DenseNet-BC that builds and runs in well under a second
ONE_LINE_ERROR = re.compile(r"^(dnc: error|[^\n]+: error): [^\n]+\n$")


@pytest.fixture(scope="module", params=[p.stem for p in ALL_SPECS])
def emitted(request):
    _, graph = build(spec_path(request.param))
    state = seeded_state(state_dict_layout(graph), seed=0)
    return graph, state, emit_onnx(graph, state)


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_checker_full_check(emitted):
    _, _, model = emitted
    onnx.checker.check_model(model, full_check=True)


def test_shape_inference_agrees_with_the_ir_at_every_node(emitted):
    graph, _, model = emitted
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    seen = {vi.name: _dims(vi) for vi in [*inferred.graph.value_info, *inferred.graph.output]}
    last = output(graph).scope
    checked = 0
    for n in ordered(graph):
        if n.op in (OpKind.INPUT, OpKind.DROPOUT):  # the graph input; dropout is not emitted
            continue
        name = OUTPUT_NAME if n.scope == last else n.scope
        assert seen.get(name) == [BATCH, *n.shape], n.scope
        checked += 1
    assert checked == len(model.graph.node)


def test_batch_axis_is_dynamic(emitted):
    graph, _, model = emitted
    (x,) = model.graph.input
    (y,) = model.graph.output
    first = ordered(graph)[0]
    assert _dims(x) == [BATCH, *first.shape]
    assert _dims(y) == [BATCH, *output(graph).shape]


def test_initializers_are_the_state_dict_keys_and_values(emitted):
    graph, state, model = emitted
    expected = state_dict_shapes(graph)
    names = [t.name for t in model.graph.initializer]
    assert names == initializer_keys(graph)
    assert set(expected) - set(names) == {k for k in expected if k.endswith(".num_batches_tracked")}
    for t in model.graph.initializer:
        array = onnx.numpy_helper.to_array(t)
        assert array.shape == expected[t.name]
        np.testing.assert_array_equal(array, state[t.name])


def test_node_names_are_ir_scopes(emitted):
    graph, _, model = emitted
    emitted_ops = [n.scope for n in ordered(graph) if n.op not in (OpKind.INPUT, OpKind.DROPOUT)]
    assert [n.name for n in model.graph.node] == emitted_ops


def test_dropout_is_left_out_of_the_inference_graph():
    _, graph = build(spec_path("densenet40_k12"), ["drop_rate=0.2", "dropout_at=every_conv"])
    assert any(n.op is OpKind.DROPOUT for n in ordered(graph))
    model = emit_onnx(graph, seeded_state(state_dict_layout(graph)))
    onnx.checker.check_model(model, full_check=True)
    assert {n.op_type for n in model.graph.node}.isdisjoint({"Dropout", "Identity"})


def test_emission_is_deterministic():
    _, graph = build(spec_path(SMALL))
    state = seeded_state(state_dict_layout(graph), seed=3)
    a = emit_onnx(graph, state).SerializeToString(deterministic=True)
    b = emit_onnx(graph, dict(state)).SerializeToString(deterministic=True)
    assert a == b


@pytest.mark.parametrize("opset", [MIN_OPSET, 17, MAX_OPSET])
def test_opset_range_runs_on_onnxruntime(opset):
    ort = pytest.importorskip("onnxruntime")
    _, graph = build(spec_path(SMALL))
    model = emit_onnx(graph, seeded_state(state_dict_layout(graph)), opset)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", opset)]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    (y,) = session.run(None, {"input": x})
    assert y.shape == (2, 10) and np.isfinite(y).all()


def test_max_opset_is_the_newest_both_onnx_and_onnxruntime_support():
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    def relu_model(opset):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()

    ort.InferenceSession(relu_model(MAX_OPSET), providers=["CPUExecutionProvider"])
    if onnx.defs.onnx_opset_version() == MAX_OPSET:  # the limit is onnxruntime's only if onnx knows more
        return
    with pytest.raises(Exception, match="opset"):
        ort.InferenceSession(relu_model(MAX_OPSET + 1), providers=["CPUExecutionProvider"])


# --- the command line ---------------------------------------------------------------------------------------


def test_compile_onnx_writes_a_loadable_model_and_says_unchanged_the_second_time(tmp_path):
    first = dnc_cli("compile", spec_path(SMALL), "--target", "onnx", "-o", tmp_path, "--opset", MAX_OPSET)
    assert first.returncode == 0, first.stderr
    path = tmp_path / f"{SMALL}.onnx"
    assert first.stdout == f"{path}: written\n"
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == MAX_OPSET
    again = dnc_cli("compile", spec_path(SMALL), "--target", "onnx", "-o", tmp_path, "--opset", MAX_OPSET)
    assert again.returncode == 0 and again.stdout == f"{path}: unchanged\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_seed_changes_the_weights(tmp_path):
    for seed in ("1", "2"):
        out = tmp_path / seed
        assert dnc_cli("compile", spec_path(SMALL), "--target", "onnx", "-o", out, "--seed", seed).returncode == 0
    a, b = (onnx.load(tmp_path / s / f"{SMALL}.onnx") for s in ("1", "2"))
    assert a.graph.node == b.graph.node and a.graph.initializer != b.graph.initializer


def test_help_states_the_opset_range_and_default():
    result = dnc_cli("compile", "--help")
    assert f"onnx: ONNX opset, {MIN_OPSET} to {MAX_OPSET} [default: {DEFAULT_OPSET}]" in " ".join(result.stdout.split())


@pytest.mark.parametrize("opset", ["12", str(MAX_OPSET + 1)])
def test_bad_opset_is_one_line_and_exit_2(tmp_path, opset):
    result = dnc_cli("compile", spec_path(SMALL), "--target", "onnx", "-o", tmp_path, "--opset", opset)
    assert result.returncode == 2
    assert result.stderr == f"dnc: error: --opset {opset} is not supported: choose {MIN_OPSET} to {MAX_OPSET}\n"
    assert not list(tmp_path.iterdir())


# --- weights files ----------------------------------------------------------------------------------------


def _old_key(key: str) -> str:
    """torchvision's old checkpoint format: `denselayerN.norm1.weight` was `denselayerN.norm.1.weight`."""
    return re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key)


@pytest.fixture(scope="module")
def small_state():
    _, graph = build(spec_path(SMALL))
    return seeded_state(state_dict_layout(graph), seed=7)


def _save(state, path, fmt):
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file(dict(state), str(path))
        return
    torch = pytest.importorskip("torch", exc_type=ImportError)
    from dnc.weights import to_torch

    tensors = to_torch(state)
    if fmt == "pth-old":  # as torchvision's own files: old keys, and from before `num_batches_tracked`
        tensors = {_old_key(k): v for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
        assert any(".norm.1." in k for k in tensors)
    if fmt == "pth-wrapped":
        tensors = {"state_dict": {f"module.{k}": v for k, v in tensors.items()}}
    torch.save(tensors, path)


@pytest.mark.parametrize(
    ("fmt", "suffix"),
    [("safetensors", "safetensors"), ("pth", "pth"), ("pth-old", "pth"), ("pth-wrapped", "pt")],
)
def test_weights_from_a_checkpoint_file(tmp_path, small_state, fmt, suffix):
    ckpt = tmp_path / f"weights.{suffix}"
    _save(small_state, ckpt, fmt)
    out = tmp_path / "out"
    # -O0: initializers named by state_dict keys, as given (the default -O2 folds some)
    result = dnc_cli("compile", spec_path(SMALL), "--target", "onnx", "-O0", "-o", out, "--weights", ckpt)
    assert result.returncode == 0, result.stderr
    model = onnx.load(out / f"{SMALL}.onnx")
    assert [t.name for t in model.graph.initializer] == initializer_keys(build(spec_path(SMALL))[1])
    for t in model.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), small_state[t.name])


def test_weights_of_another_network_are_one_line_and_exit_2(tmp_path, small_state):
    ckpt = tmp_path / "bc100.safetensors"
    _save(small_state, ckpt, "safetensors")
    out = tmp_path / "out"
    result = dnc_cli("compile", spec_path("densenet40_k12"), "--target", "onnx", "-o", out, "--weights", ckpt)
    assert result.returncode == 2
    assert ONE_LINE_ERROR.match(result.stderr), result.stderr
    assert result.stderr.startswith(f"{ckpt}: error: checkpoint does not fit the network: ")
    assert not out.exists() or not list(out.iterdir())


def test_unreadable_weights_are_one_line_and_exit_2(tmp_path):
    ckpt = tmp_path / "junk.safetensors"
    ckpt.write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    result = dnc_cli("compile", spec_path(SMALL), "--target", "onnx", "-o", out, "--weights", ckpt)
    assert result.returncode == 2
    assert ONE_LINE_ERROR.match(result.stderr), result.stderr
    assert not out.exists() or not list(out.iterdir())


def test_weights_need_exactly_one_spec(tmp_path, small_state):
    ckpt = tmp_path / "w.safetensors"
    _save(small_state, ckpt, "safetensors")
    result = dnc_cli(
        "compile", spec_path(SMALL), spec_path("densenet121"), "--target", "onnx", "-o", tmp_path, "--weights", ckpt
    )
    assert result.returncode == 2
    assert result.stderr == "dnc: error: --weights fits one network: give exactly one spec, not 2\n"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    _, graph = build(spec_path(SMALL))
    model = emit_onnx(graph, seeded_state(state_dict_layout(graph)))
    path = tmp_path / "net.onnx"
    path.write_bytes(b"old")

    def broken_replace(src, dst, **folders):
        raise OSError("disk full")

    monkeypatch.setattr("dnc.targets.outputs.os.replace", broken_replace)
    with pytest.raises(EmitError, match="cannot write: disk full"):
        write_outputs({path: model.SerializeToString()}, tmp_path, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["net.onnx"]
    assert path.read_bytes() == b"old"

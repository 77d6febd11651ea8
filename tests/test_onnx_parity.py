"""The emitted ONNX model on onnxruntime computes what torch computes, with the same weights.

Reference for the torchvision specs: torchvision's DenseNet of the same configuration.
torchvision cannot express the CIFAR specs, so for them the reference is the generated
PyTorch model (itself checked against torchvision in test_torch_parity.py).

Weights are seeded with BN running statistics randomised (identity BN hides bugs).
Error is relative: max|a - b| / max|b|.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import CIFAR_SPECS, ROOT, TORCHVISION_SPECS, spec_path

from dnc.ir.graph import ordered
from dnc.ir.infer import state_dict_layout
from dnc.ir.passes import select
from dnc.pipeline import build
from dnc.targets.onnx.emit import emit_onnx
from dnc.weights import seeded_state

torch = pytest.importorskip("torch", exc_type=ImportError)  # no torch: skip the module
ort = pytest.importorskip("onnxruntime")

from dnc.check.reference import torchvision_densenet  # noqa: E402  (needs torch)
from dnc.targets.torch.run import load_generated  # noqa: E402
from dnc.weights import to_torch  # noqa: E402  (needs torch)

TOLERANCE = 1e-5
CUDA_TOLERANCE = 1e-4  # cuDNN picks its own convolution algorithms (Winograd, FFT): looser rounding
BATCHES = [1, 3]  # 3 goes through the dynamic batch axis
LARGE = {"densenet161", "densenet201", "densenet264", "densenet100_k24", "densenet_bc190_k40", "densenet_bc250_k24"}


def _param(name):
    return pytest.param(name, marks=pytest.mark.slow) if name in LARGE else name


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


class Case:
    """One spec built once: IR, seeded weights, the emitted model and an onnxruntime session."""

    def __init__(self, name: str, overrides=()):
        self.spec, self.graph = build(spec_path(name), overrides)
        self.state = seeded_state(state_dict_layout(self.graph), seed=0)
        self.model = emit_onnx(self.graph, self.state).SerializeToString()
        self.session = ort.InferenceSession(self.model, providers=["CPUExecutionProvider"])
        self.input_shape = ordered(self.graph)[0].shape

    def inputs(self, batch: int) -> np.ndarray:
        return np.random.default_rng(batch).standard_normal((batch, *self.input_shape), dtype=np.float32)

    def run(self, x: np.ndarray, session=None) -> np.ndarray:
        return (session or self.session).run(None, {"input": x})[0]


@pytest.fixture(scope="module", params=[_param(s) for s in TORCHVISION_SPECS])
def torchvision_case(request):
    case = Case(request.param)
    net = torchvision_densenet(case.spec)
    net.load_state_dict(to_torch(case.state))
    case.reference = net.eval()
    return case


@pytest.fixture(scope="module", params=[_param(s) for s in CIFAR_SPECS])
def cifar_case(request):
    return with_generated_reference(Case(request.param))


def with_generated_reference(case: Case) -> Case:
    net = load_generated(case.graph).DenseNet()
    net.load_state_dict(to_torch(case.state))
    case.reference = net.eval()
    return case


def torch_output(case: Case, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return case.reference(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("batch", BATCHES)
def test_torchvision_specs_match_torchvision(torchvision_case, batch):
    case = torchvision_case
    x = case.inputs(batch)
    with torch.inference_mode():
        expected = case.reference(torch.from_numpy(x)).numpy()
    got = case.run(x)
    assert got.shape == expected.shape == (batch, case.spec.head.classes)
    assert rel_error(got, expected) <= TOLERANCE


@pytest.mark.parametrize("batch", BATCHES)
def test_cifar_specs_match_the_generated_torch_model(cifar_case, batch):
    case = cifar_case
    x = case.inputs(batch)
    expected = torch_output(case, x)
    got = case.run(x)
    assert got.shape == expected.shape == (batch, case.spec.head.classes)
    assert rel_error(got, expected) <= TOLERANCE


def test_dropout_is_the_identity_at_inference():
    case = with_generated_reference(Case("densenet40_k12", ["drop_rate=0.2", "dropout_at=every_conv"]))
    x = case.inputs(2)
    assert rel_error(case.run(x), torch_output(case, x)) <= TOLERANCE


@pytest.mark.cuda
@pytest.mark.parametrize("level", [0, 2])
@pytest.mark.parametrize("name", ["densenet121", "densenet_bc100_k12"])
def test_parity_on_cuda_execution_provider(name, level):
    """One node per IR op (-O0) and the default -O2 (folded weights) on onnxruntime's CUDA provider."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here")
    case = with_generated_reference(Case(name))  # -O0 torch: the reference, with the weights
    model = emit_onnx(build(spec_path(name), passes=select("onnx", level))[1], case.state).SerializeToString()
    cuda = ort.InferenceSession(model, providers=["CUDAExecutionProvider"])
    if cuda.get_providers()[0] != "CUDAExecutionProvider":
        pytest.skip("onnxruntime could not start the CUDAExecutionProvider")
    for batch in BATCHES:
        x = case.inputs(batch)
        assert rel_error(case.run(x, cuda), torch_output(case, x)) <= CUDA_TOLERANCE


QUIET_RUN = """
import onnxruntime as ort
import torch
from dnc.ir.infer import state_dict_layout
from dnc.pipeline import build
from dnc.targets.onnx.run import run_onnx
from dnc.weights import seeded_state
ort.set_default_logger_severity(0)  # as noisy as onnxruntime gets: every log line to stderr
_, graph = build("specs/densenet40_k12.yaml", ["blocks=[1]"])
run_onnx(graph, seeded_state(state_dict_layout(graph)), torch.zeros(1, 3, 32, 32), "cpu")
"""


def test_onnxruntime_logs_nothing_while_dnc_runs_a_model():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", QUIET_RUN], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr[:500]

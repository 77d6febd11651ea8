"""The emitted ONNX model on onnxruntime computes what torch computes, with the same weights.

Reference for the torchvision specs: torchvision's DenseNet of the same configuration.
torchvision cannot express the CIFAR specs, so for them the reference is `torch_walk`,
an independent functional forward over the IR in torch (itself checked against
torchvision below). NOTE: once the torch target is merged, the CIFAR reference
becomes the generated PyTorch model.

Weights are seeded with BN running statistics randomised (identity BN hides bugs).
Error is relative: max|a - b| / max|b|.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CIFAR_SPECS, TORCHVISION_SPECS, spec_path

from dnc.emit_onnx import emit_onnx
from dnc.infer import state_dict_shapes
from dnc.ir import OpKind, inputs, ordered
from dnc.pipeline import build
from dnc.weights import seeded_state

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
F = torch.nn.functional

from dnc.reference import to_torch, torchvision_densenet  # noqa: E402  (needs torch)

TOLERANCE = 1e-5
CUDA_TOLERANCE = 1e-4  # cuDNN picks its own convolution algorithms (Winograd, FFT): looser rounding
BATCHES = [1, 3]  # 3 goes through the dynamic batch axis
LARGE = {"densenet161", "densenet201", "densenet264", "densenet_bc190_k40", "densenet_bc250_k24"}


def _param(name):
    return pytest.param(name, marks=pytest.mark.slow) if name in LARGE else name


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def torch_walk(graph, state: dict, x):
    """The IR's forward pass, op by op, in torch.nn.functional (eval mode)."""
    values = {}
    for n in ordered(graph):
        ins = [values[s] for s in inputs(graph, n.scope)]
        a = n.attrs

        def p(key, scope=n.scope):
            return state.get(f"{scope}.{key}")

        match n.op:
            case OpKind.INPUT:
                y = x
            case OpKind.CONV:
                y = F.conv2d(ins[0], p("weight"), p("bias"), a.stride, a.padding)
            case OpKind.BATCHNORM:
                y = F.batch_norm(ins[0], p("running_mean"), p("running_var"), p("weight"), p("bias"), False, 0.0, a.eps)
            case OpKind.RELU:
                y = F.relu(ins[0])
            case OpKind.MAXPOOL:
                y = F.max_pool2d(ins[0], a.kernel, a.stride, a.padding)
            case OpKind.AVGPOOL:
                y = F.avg_pool2d(ins[0], a.kernel, a.stride, a.padding)
            case OpKind.CONCAT:
                y = torch.cat(ins, 1)
            case OpKind.DROPOUT:
                y = ins[0]
            case OpKind.GLOBAL_AVGPOOL:
                y = F.adaptive_avg_pool2d(ins[0], 1)
            case OpKind.FLATTEN:
                y = torch.flatten(ins[0], 1)
            case OpKind.LINEAR:
                y = F.linear(ins[0], p("weight"), p("bias"))
        values[n.scope] = y
    return y


class Case:
    """One spec built once: IR, seeded weights, the emitted model and an onnxruntime session."""

    def __init__(self, name: str, overrides=()):
        self.spec, self.graph = build(spec_path(name), overrides)
        self.state = seeded_state(state_dict_shapes(self.graph), seed=0)
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
    case = Case(request.param)
    case.torch_state = to_torch(case.state)
    return case


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
def test_cifar_specs_match_the_torch_walk(cifar_case, batch):
    case = cifar_case
    x = case.inputs(batch)
    with torch.inference_mode():
        expected = torch_walk(case.graph, case.torch_state, torch.from_numpy(x)).numpy()
    got = case.run(x)
    assert got.shape == expected.shape == (batch, case.spec.head.classes)
    assert rel_error(got, expected) <= TOLERANCE


def test_the_torch_walk_is_torchvision():
    """The CIFAR reference is only as good as the walk: check it where torchvision exists."""
    spec, graph = build(spec_path("densenet121"))
    state = seeded_state(state_dict_shapes(graph), seed=1)
    net = torchvision_densenet(spec)
    net.load_state_dict(to_torch(state))
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32))
    with torch.inference_mode():
        assert rel_error(torch_walk(graph, to_torch(state), x).numpy(), net.eval()(x).numpy()) <= 1e-6


def test_dropout_is_the_identity_at_inference():
    case = Case("densenet40_k12", ["drop_rate=0.2", "dropout_at=every_conv"])
    x = case.inputs(2)
    with torch.inference_mode():
        expected = torch_walk(case.graph, to_torch(case.state), torch.from_numpy(x)).numpy()
    assert rel_error(case.run(x), expected) <= TOLERANCE


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["densenet121", "densenet_bc100_k12"])
def test_parity_on_cuda_execution_provider(name):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here")
    case = Case(name)
    cuda = ort.InferenceSession(case.model, providers=["CUDAExecutionProvider"])
    if cuda.get_providers()[0] != "CUDAExecutionProvider":
        pytest.skip("onnxruntime could not start the CUDAExecutionProvider")
    for batch in BATCHES:
        x = case.inputs(batch)
        with torch.inference_mode():
            expected = torch_walk(case.graph, to_torch(case.state), torch.from_numpy(x)).numpy()
        assert rel_error(case.run(x, cuda), expected) <= CUDA_TOLERANCE

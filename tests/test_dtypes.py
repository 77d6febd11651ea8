"""bfloat16 and float16: every level of the torch target after `.to(dtype)`, and `dnc verify --dtype`.

The bar is what the dtype costs -O0 itself (torchvision's computation in that dtype, bit-identical to it): a target
in a lower dtype passes when its error against the float64 interpreter is at most twice -O0's.
"""

from __future__ import annotations

import re

import pytest
from conftest import dnc_cli, spec_path

torch = pytest.importorskip("torch", exc_type=ImportError)

from dnc.check.reference import torchvision_densenet  # noqa: E402  (needs torch)
from dnc.frontend.loader import load_spec  # noqa: E402
from dnc.ir.infer import state_dict_layout  # noqa: E402
from dnc.pipeline import build  # noqa: E402
from dnc.targets.torch.run import load_generated  # noqa: E402
from dnc.weights import seeded_state, to_torch  # noqa: E402

SMALL = ["input.size=[64,64]"]
LINE = re.compile(
    r"in (\w+): vs the interpreter \(float64, -O0 IR\): max rel error ([\d.e-]+); -O0 in \w+ \(torchvision's "
    r"computation\): ([\d.e-]+); top-1 agreement (\d+) of (\d+): (ok|MISMATCH.*)$"
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_O0_in_a_lower_dtype_is_torchvision_in_that_dtype_bit_for_bit(dtype):
    _, graph = build(spec_path("densenet121"), SMALL)
    state = to_torch(seeded_state(state_dict_layout(graph), seed=1))
    ours, theirs = load_generated(graph).DenseNet(), torchvision_densenet(load_spec(spec_path("densenet121"), SMALL))
    ours.load_state_dict(state)
    theirs.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        assert torch.equal(ours.eval().to(dtype)(x), theirs.eval().to(dtype)(x))


@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_verify_dtype_judges_every_level_against_what_the_dtype_costs_O0(level, dtype):
    sets = [a for s in SMALL for a in ("--set", s)]
    result = dnc_cli("verify", spec_path("densenet121"), *sets, f"-O{level}", "--dtype", dtype)
    assert result.returncode == 0, result.stdout + result.stderr
    found = LINE.search(result.stdout.strip())
    assert found and found[1] == dtype and found[6] == "ok", result.stdout
    err, base = float(found[2]), float(found[3])
    assert 0 < err <= 2 * base and base < (1e-2 if dtype == "bfloat16" else 2e-3)
    if level == 0:
        assert err == base  # the same computation


def test_verify_dtype_fails_a_target_that_loses_more_than_the_dtype_costs(monkeypatch):
    import dnc.targets.torch.run as run

    real = run.generated_model

    def off(graph, tensors, dev):
        model = real(graph, tensors, dev)
        model.classifier.weight.data *= 1.03  # 3% off: more than twice what bfloat16 costs -O0 here (0.85%)
        return model

    _, graph = build(spec_path("densenet_bc100_k12"))
    monkeypatch.setattr(run, "generated_model", lambda g, t, d: off(g, t, d) if g is graph else real(g, t, d))
    from dnc.check.verify import verify
    from dnc.targets import TARGETS

    spec = load_spec(spec_path("densenet_bc100_k12"))
    outcome = verify(spec, graph, "bc100", target=TARGETS["torch"], dtype="bfloat16")
    assert not outcome.ok and outcome.line.endswith("MISMATCH (over twice -O0's own error in this dtype)")


def test_onnx_in_float16_and_not_bfloat16():
    pytest.importorskip("onnxruntime")
    ok = dnc_cli("verify", spec_path("densenet_bc100_k12"), "--target", "onnx", "--dtype", "float16")
    assert ok.returncode == 0 and LINE.search(ok.stdout.strip())[6] == "ok", ok.stdout + ok.stderr
    refused = dnc_cli("verify", spec_path("densenet_bc100_k12"), "--target", "onnx", "--dtype", "bfloat16")
    assert refused.returncode == 2
    assert refused.stderr.strip() == "dnc: error: --dtype bfloat16: the ONNX target takes float32 or float16"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_verify_dtype_on_cuda(dtype):
    sets = [a for s in SMALL for a in ("--set", s)]
    for level in (0, 1, 2):
        result = dnc_cli("verify", spec_path("densenet121"), *sets, f"-O{level}", "--dtype", dtype, "--device", "cuda")
        assert result.returncode == 0, result.stdout + result.stderr

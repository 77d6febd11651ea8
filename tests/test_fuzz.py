"""Property-based fuzzing: any spec, valid or broken, gives a network or a DncError, nothing else.

Specs are generated valid and broken (keys deleted or added, types swapped,
numbers out of range or huge, random YAML structure, random bytes), written to
files and run through the loader, inference and both emitters in this process.
For some small valid ones the generated PyTorch module is imported and run at the
spec's input size: its output shape and parameter count must equal inference's.

The short profile runs with the suite; DNC_FUZZ_LONG=1 runs the long one (10,000
examples, no forward passes). The long profile's last figures are in the README.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import dnc_cli, import_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from dnc.errors import DncError, WeightsError
from dnc.ir.limits import Limits
from dnc.ir.passes import PASSES
from dnc.pipeline import build
from dnc.reports.summary import summarize
from dnc.targets.onnx import emit as emit_onnx
from dnc.targets.torch import emit as emit_torch
from dnc.weights import read_checkpoint

LONG = os.environ.get("DNC_FUZZ_LONG") == "1"
EXAMPLES = 10_000 if LONG else 60
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not LONG,  # the normal suite is repeatable; the long profile explores
    suppress_health_check=list(HealthCheck),
    database=None,
)
_DIR = Path(tempfile.mkdtemp(prefix="dnc-fuzz-"))

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
yaml_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def valid_specs(draw) -> dict:
    kind = draw(st.sampled_from(["cifar", "imagenet", "deep"]))
    side = draw(st.integers(8, 24) if kind == "cifar" else st.integers(32, 64))
    spec = {
        "version": 1,
        "name": "fuzz",
        "input": {"channels": draw(st.integers(1, 4)), "size": [side, draw(st.integers(side // 2 + 1, side))]},
        "stem": {"kind": kind, "width": draw(st.integers(1, 12))},
        "growth_rate": draw(st.integers(1, 8)),
        "bn_size": draw(st.one_of(st.none(), st.integers(1, 4))),
        "compression": draw(st.sampled_from([0.25, 0.5, 0.75, 1.0])),
        "drop_rate": draw(st.sampled_from([0.0, 0.2])),
        "dropout_at": draw(st.sampled_from(["conv3x3", "every_conv"])),
        "blocks": draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)),
        "head": {"classes": draw(st.integers(1, 10))},
    }
    if kind == "deep" and draw(st.booleans()):
        spec["stem"]["mid_width"] = draw(st.integers(1, 8))
    if draw(st.booleans()):  # a per-block override
        spec["blocks"][0] = {"layers": spec["blocks"][0], "growth_rate": draw(st.integers(1, 6))}
    return spec


def paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, (*prefix, i))


@st.composite
def broken_specs(draw) -> dict:
    spec = draw(valid_specs())
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from([p for p in paths(spec) if p]))
        parent = spec
        for part in where[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["delete", "swap", "huge", "range", "extra"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[where[-1]]
        elif action == "swap":
            parent[where[-1]] = draw(yaml_values)
        elif action == "huge":
            parent[where[-1]] = draw(st.sampled_from([10**20, 10**6, 2**63, -(10**9), 1e300, 100000]))
        elif action == "range":
            parent[where[-1]] = draw(st.sampled_from([0, -1, 1.5, 0.0, 2.0, True, False, ""]))
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = draw(yaml_values)
    return spec


def dump(data) -> str:
    import io

    out = io.StringIO()
    yaml = YAML(typ="safe", pure=True)
    yaml.dump(data, out)
    return out.getvalue()


def run_pipeline(content: str | bytes):
    """Everything a spec goes through in-process; returns the graph, or None for a DncError."""
    path = _DIR / "fuzz.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    try:
        spec, graph = build(path)
        emit_torch.emit(graph)
        emit_onnx.emit(graph)
    except DncError:
        return None
    return spec, graph


@FUZZ
@given(st.one_of(valid_specs(), broken_specs()))
def test_any_spec_builds_or_is_a_dnc_error(data):
    run_pipeline(dump(data))


@FUZZ
@given(yaml_values)
def test_random_yaml_structure_is_a_dnc_error(data):
    assert run_pipeline(dump(data)) is None or isinstance(data, dict)


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_random_bytes_and_text_are_dnc_errors(content):
    assert run_pipeline(content) is None


@pytest.mark.skipif(LONG, reason="the long profile runs no forward passes")
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
@given(valid_specs())
def test_small_valid_specs_run_as_inferred(data):
    torch = pytest.importorskip("torch")
    built = run_pipeline(dump(data))
    if built is None:  # a valid spec whose map shrinks to nothing: inference said so
        return
    spec, graph = built
    path = _DIR / f"fuzz_{abs(hash(dump(data)))}.py"
    path.write_text(emit_torch.emit(graph))
    module = import_file(path)
    model = getattr(module, spec.name)().eval()
    summary = summarize(graph)
    x = torch.zeros(1, spec.input.channels, *spec.input.size)
    with torch.no_grad():
        y = model(x)
    assert tuple(y.shape) == (1, *summary.output_shape)
    assert sum(p.numel() for p in model.parameters()) == summary.params
    assert math.isfinite(float(y.abs().sum()))


# -- the command line's flags, tampered records and crafted checkpoints --------------------

SMALL_SPEC = "version: 1\ninput: {size: [16, 16]}\nstem: {kind: cifar, width: 8}\ngrowth_rate: 4\nblocks: [1, 1]\n"
names = st.one_of(st.sampled_from(list(PASSES)), st.text(max_size=12), st.text(min_size=300, max_size=400))
flags = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["--pass", "--no-pass"]), st.lists(names, min_size=1, max_size=3).map(",".join)),
        st.tuples(st.just("-O"), st.integers(-2, 4).map(str)),
        st.tuples(
            st.just("--limit"),
            st.tuples(
                st.one_of(st.sampled_from([f.name for f in dataclasses.fields(Limits)]), st.text(max_size=10)),
                st.one_of(st.integers(-(10**45), 10**45).map(str), st.text(max_size=10)),
            ).map("=".join),
        ),
        st.tuples(st.just("--batch"), st.one_of(st.integers(-5, 10**320), st.text(max_size=5)).map(str)),
    ),
    max_size=4,
)


def one_line_or_success(result, ok=(0,)) -> None:
    assert result.returncode in (*ok, 2), result.stderr
    if result.returncode == 2:
        assert result.stderr.count("\n") == 1 and len(result.stderr) <= 1001, result.stderr[:300]
        assert "internal error" not in result.stderr and "Traceback" not in result.stderr


@FUZZ
@given(flags)
def test_pass_limit_and_batch_flags_run_or_are_one_line(flag_pairs):
    spec = _DIR / "flags.yaml"
    spec.write_text(SMALL_SPEC)
    args = [word for pair in flag_pairs for word in pair]
    one_line_or_success(dnc_cli("summary", spec, *args))


record_values = st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(), names)


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["opt_level", "pass", "no_pass", "seed", "opset", "weights", "x"]), record_values)
)
def test_a_tampered_record_is_fresh_stale_or_one_line(record):
    out = _DIR / "records"
    spec = _DIR / "recorded.yaml"
    spec.write_text(SMALL_SPEC)
    assert dnc_cli("compile", spec, "-o", out).returncode == 0
    path = out / "recorded.py"
    text = path.read_text()
    start = text.index("# dnc-record: ") + len("# dnc-record: ")
    end = text.index("\n", start)
    data = json.loads(text[start:end].removesuffix("  # noqa: E501")) | record
    path.write_text(text[:start] + json.dumps(data) + text[end:])
    one_line_or_success(dnc_cli("compile", spec, "-o", out, "--check"), ok=(0, 1))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_crafted_checkpoint_layouts_are_read_exactly_or_refused(data):
    """Any views of any storages: each value read is the tensor's own, or the file is refused; never a crash."""
    torch = pytest.importorskip("torch")
    storages = [torch.randn(data.draw(st.integers(1, 64))) for _ in range(data.draw(st.integers(1, 2)))]
    views = {}
    for key in ("a.weight", "a.bias"):
        storage = data.draw(st.sampled_from(storages))
        shape = data.draw(st.lists(st.integers(0, 5), max_size=3))
        strides = data.draw(st.lists(st.integers(0, 7), min_size=len(shape), max_size=len(shape)))
        try:
            views[key] = storage.as_strided(shape, strides, data.draw(st.integers(0, 8)))
        except RuntimeError:  # reaches past the storage: torch itself refuses to make it
            return
    path = _DIR / "crafted.pth"
    torch.save(views, path)
    expected = {key: tuple(view.shape) for key, view in views.items()}
    try:
        state = read_checkpoint(path, expected)
    except WeightsError:
        return
    for key, view in views.items():
        assert np.array_equal(state[key], view.numpy())
    cells = [
        (v.untyped_storage().data_ptr(), v.storage_offset() + sum(i * s for i, s in zip(ix, v.stride(), strict=True)))
        for v in views.values()
        for ix in np.ndindex(*v.shape)
    ]
    assert len(cells) == len(set(cells)), "a checkpoint read no value twice"


@FUZZ
@given(st.data())
def test_crafted_safetensors_headers_are_read_or_refused(data):
    dtypes = st.sampled_from(["F32", "F64", "F16", "BF16", "I64", "F8_E4M3", "BOOL", "X"])
    entry = st.fixed_dictionaries(
        {
            "dtype": dtypes,
            "shape": st.lists(st.integers(0, 6), max_size=3),
            "data_offsets": st.lists(st.integers(0, 300), min_size=2, max_size=2),
        }
    )
    header = data.draw(st.dictionaries(st.sampled_from(["a.weight", "a.bias", "__metadata__", "b"]), entry, max_size=4))
    raw = json.dumps(header).encode()
    if data.draw(st.booleans()) and header:  # a key named twice
        first = next(iter(header))
        raw = raw[:-1] + b", " + json.dumps({first: header[first]}).encode()[1:]
    path = _DIR / "crafted.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data.draw(st.binary(max_size=300)))
    expected = data.draw(st.one_of(st.none(), st.just({"a.weight": (2, 3), "a.bias": (2,)})))
    with warnings.catch_warnings(), contextlib.suppress(WeightsError):
        warnings.simplefilter("ignore")  # 16-bit values converted: a note, not a failure
        read_checkpoint(path, expected)

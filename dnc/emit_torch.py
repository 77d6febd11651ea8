"""Emit stage, torch target: inferred IR -> the source of one standalone PyTorch module.

Reads only the IR. `view` walks the nodes in order and groups them by scope into
plain data (stem modules, each block's layers with literal channel counts, the
transitions, the head); the Jinja templates in templates/torch/ only loop over it
and substitute. Every value that reaches the source is an int, a float or a name
checked here, written with `repr`-like formatting, so nothing from a spec is
pasted in raw. No torch here: compiling stays fast and works without it.
"""

from __future__ import annotations

import builtins
import functools
import keyword
import math
from dataclasses import dataclass
from pathlib import Path

import jinja2
import networkx as nx

import dnc
from dnc.errors import EmitError
from dnc.ir import BatchNormAttrs, ConvAttrs, Node, OpKind, PoolAttrs, ordered

SUFFIX = ".py"
TEMPLATES = Path(dnc.__file__).resolve().parents[1] / "templates"
TEMPLATE = "torch/model.py.j2"

# Names the generated module defines or imports: a network may not be called one of these.
_TAKEN = {"re", "torch", "nn", "F", "Tensor", "OrderedDict", "DenseNet", "DenseBlock", "DenseLayer"}
_TAKEN |= {"PlainDenseLayer", "Transition", "upgrade_state_dict", "any_requires_grad", "build"}


def emit(graph: nx.DiGraph) -> str:
    """The PyTorch source of the inferred IR `graph`."""
    return _environment().get_template(TEMPLATE).render(**view(graph))


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # Python source, not HTML: values are made safe in `view` instead
    )


@dataclass(frozen=True)
class Entry:
    """One line of generated code: a named module (or call) and the shape it outputs."""

    name: str
    module: str
    shape: str


@dataclass(frozen=True)
class Line:
    """One generated line: its code, and its shape comment after it or, where that is too long, above it."""

    code: str
    above: list[str]
    after: str


@dataclass(frozen=True)
class Block:
    name: str
    summary: str
    layers: list[Line]


LINE_LENGTH = 120  # the project's ruff line-length: generated files must pass `ruff check`
# NOTE: how deep the template indents each kind of line; keep in step with model.py.j2.
LAYER_INDENT, FEATURE_INDENT, STEP_INDENT = 16, 12, 8


def _line(indent: int, code: str, shape: str) -> Line:
    comment = f"  # {shape}"
    if indent + len(code) + len(comment) <= LINE_LENGTH:
        return Line(code, [], comment)
    return Line(code, [f"# {shape}"], "")


def _entry_line(indent: int, e: Entry) -> Line:
    return _line(indent, f'("{e.name}", {e.module}),', e.shape)


def view(graph: nx.DiGraph) -> dict:
    """The template's data: plain strings and lists, every literal already formatted."""
    name = _network_name(graph.graph.get("name"))
    nodes = ordered(graph)
    by_stage: dict[str, list[Node]] = {}
    for n in nodes:
        by_stage.setdefault(n.stage, []).append(n)
    (source_node,) = by_stage.pop("input")
    head = {n.scope: n for n in by_stage.pop("head", [])}
    features: list[Entry] = []
    steps: list[Line] = []
    blocks: list[Block] = []
    kinds: set[str] = set()
    previous = "x"
    for stage, members in by_stage.items():
        _ident(stage)
        if stage == "stem":
            for n in members:
                entry = Entry(_leaf(n), _stem_module(n, graph), _shape(n))
                features.append(entry)
                steps.append(_line(STEP_INDENT, f"x = self.features.{entry.name}(x)", entry.shape))
        elif stage.startswith("denseblock"):
            block = _block(stage, members, kinds)
            blocks.append(block)
            out = _only(members, f"features.{stage}.cat")
            features.append(Entry(stage, stage, _shape(out)))
            previous = f"block{len(blocks)}"
            steps.append(_line(STEP_INDENT, f"{previous} = self.features.{stage}(x)", _shape(out)))
        elif stage.startswith("transition"):
            kinds.add("transition")
            entry = Entry(stage, _transition(stage, members), _shape(members[-1]))
            features.append(entry)
            steps.append(_line(STEP_INDENT, f"x = self.features.{stage}({previous})", entry.shape))
        else:
            raise EmitError(f"torch target: no rule for stage '{stage}'")
    for scope in ("features.norm5", "features.relu5"):
        n = _need(head, scope)
        features.append(Entry(_leaf(n), _stem_module(n, graph), _shape(n)))
    pool, flat, classifier = _need(head, "avgpool"), _need(head, "flatten"), _need(head, "classifier")
    if pool.op is not OpKind.GLOBAL_AVGPOOL or flat.op is not OpKind.FLATTEN or classifier.op is not OpKind.LINEAR:
        raise EmitError("torch target: the head must be global average pool, flatten, linear")
    features_shape = _shape(_need(head, "features.relu5"))
    source = _printable(graph.graph.get("source") or "<unknown spec>")
    header = [
        f"# @generated by dnc from {source} via templates/{TEMPLATE} — do not edit.",
        f"# Regenerate with `dnc compile {source} --target torch` (or `make generate`).",
    ]
    parts = [f"torch/{p}.py.j2" for p in ("dense_layer", "plain_layer", "transition") if p in kinds]
    return {
        "name": name,
        "header": [line if len(line) <= LINE_LENGTH else f"{line}  # noqa: E501" for line in header],
        "params": f"{sum(n.params for n in nodes):,}",
        "macs": f"{sum(n.macs for n in nodes):,}",
        "input_shape": _shape(source_node),
        "memory_efficient": repr(bool(graph.graph.get("memory_efficient", False))),
        "parts": parts,
        "blocks": blocks,
        "features": [_entry_line(FEATURE_INDENT, e) for e in features],
        "steps": steps,
        "block_outputs": ", ".join(f"block{i}" for i in range(1, len(blocks) + 1)),
        "features_shape": features_shape,
        "pooled_shape": _shape(pool),
        "flat_shape": _shape(flat),
        "output_shape": _shape(classifier),
        "classifier": f"nn.Linear({_int(flat.shape[0])}, {_int(classifier.attrs.out_features)}, "
        f"bias={classifier.attrs.bias!r})",
    }


def _network_name(name) -> str:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise EmitError(f"torch target: network name {name!r} is not a Python identifier")
    if name in _TAKEN or name.startswith("_") or hasattr(builtins, name):
        raise EmitError(f"torch target: network name '{name}' would shadow a name the generated module uses")
    return name


def _block(stage: str, members: list[Node], kinds: set[str]) -> Block:
    layers: dict[str, dict[str, Node]] = {}
    for n in members:
        parts = n.scope.split(".")
        if len(parts) == 4 and parts[2].startswith("denselayer"):
            layers.setdefault(parts[2], {})[parts[3]] = n
        elif n.scope != f"features.{stage}.cat":
            raise EmitError(f"torch target: unexpected node {n.scope}")
    entries, growths = [], set()
    for layer, ops in layers.items():
        _ident(layer)
        module, kind = _layer_module(f"features.{stage}.{layer}", ops)
        kinds.add(kind)
        last = max(ops.values(), key=lambda n: n.order)
        growths.add(last.shape[0])
        entries.append(_entry_line(LAYER_INDENT, Entry(layer, module, _shape(last))))
    first = _int(next(iter(layers.values()))["norm1"].shape[0])  # each layer was checked to have norm1
    out = _int(_only(members, f"features.{stage}.cat").shape[0])
    growth = " and ".join(_int(g) for g in sorted(growths))
    return Block(stage, f"{len(entries)} layers of growth {growth}, {first} -> {out} channels", entries)


_BOTTLENECK = {"norm1", "relu1", "conv1", "norm2", "relu2", "conv2"}
_PLAIN = {"norm1", "relu1", "conv1"}


def _layer_module(scope: str, ops: dict[str, Node]) -> tuple[str, str]:
    """The constructor call of one dense layer, and which helper class it needs."""
    names = set(ops) - {"cat", "drop1", "drop2"}
    drops = "".join(f", {d}={_rate(ops[d].attrs.rate)}" for d in ("drop1", "drop2") if d in ops)
    for bn in ("norm1", "norm2"):
        if bn in ops:
            _check_bn(ops[bn])
    if names == _BOTTLENECK:
        width, growth = ops["conv1"].attrs.out_channels, ops["conv2"].attrs.out_channels
        _check(ops["conv1"], ConvAttrs(width, 1))
        _check(ops["conv2"], ConvAttrs(growth, 3, 1, 1))
        return (
            f"DenseLayer({_int(ops['norm1'].shape[0])}, {_int(width)}, {_int(growth)}, memory_efficient{drops})",
            "dense_layer",
        )
    if names == _PLAIN and "drop2" not in ops:
        growth = ops["conv1"].attrs.out_channels
        _check(ops["conv1"], ConvAttrs(growth, 3, 1, 1))
        return f"PlainDenseLayer({_int(ops['norm1'].shape[0])}, {_int(growth)}{drops})", "plain_layer"
    raise EmitError(f"torch target: {scope} has ops {sorted(ops)}, which no layer template implements")


def _transition(stage: str, members: list[Node]) -> str:
    ops = {n.scope.rsplit(".", 1)[-1]: n for n in members}
    if set(ops) - {"drop"} != {"norm", "relu", "conv", "pool"}:
        raise EmitError(f"torch target: {stage} has ops {sorted(ops)}, which the transition template does not")
    _check_bn(ops["norm"])
    out = ops["conv"].attrs.out_channels
    _check(ops["conv"], ConvAttrs(out, 1))
    _check(ops["pool"], PoolAttrs(2, 2))
    if ops["pool"].op is not OpKind.AVGPOOL:
        raise EmitError(f"torch target: {stage}.pool must be an average pool")
    drop = f", drop={_rate(ops['drop'].attrs.rate)}" if "drop" in ops else ""
    return f"Transition({_int(ops['norm'].shape[0])}, {_int(out)}{drop})"


def _stem_module(n: Node, graph: nx.DiGraph) -> str:
    """The constructor call of a stem (or norm5/relu5) module."""
    a = n.attrs
    if n.op is OpKind.CONV:
        (src,) = graph.predecessors(n.scope)
        c = graph.nodes[src]["node"].shape[0]
        pad = f", padding={_int(a.padding)}" if a.padding else ""
        return (
            f"nn.Conv2d({_int(c)}, {_int(a.out_channels)}, kernel_size={_int(a.kernel)}, "
            f"stride={_int(a.stride)}{pad}, bias={bool(a.bias)!r})"
        )
    if n.op is OpKind.BATCHNORM:
        _check_bn(n)
        return f"nn.BatchNorm2d({_int(n.shape[0])})"
    if n.op is OpKind.RELU:
        return "nn.ReLU()"
    if n.op is OpKind.MAXPOOL:
        return f"nn.MaxPool2d(kernel_size={_int(a.kernel)}, stride={_int(a.stride)}, padding={_int(a.padding)})"
    raise EmitError(f"torch target: no module for {n.scope} ({n.op.value})")


def _check(n: Node, expected) -> None:
    if n.attrs != expected:
        raise EmitError(f"torch target: {n.scope} is {n.attrs}, the template implements {expected}")


def _check_bn(n: Node) -> None:
    _check(n, BatchNormAttrs())  # nn.BatchNorm2d's defaults, which the templates rely on


def _only(members: list[Node], scope: str) -> Node:
    return _need({n.scope: n for n in members}, scope)


def _need(nodes: dict[str, Node], scope: str) -> Node:
    if scope not in nodes:
        raise EmitError(f"torch target: the IR has no {scope}")
    return nodes[scope]


def _leaf(n: Node) -> str:
    return _ident(n.scope.rsplit(".", 1)[-1])


def _ident(name: str) -> str:
    """A module name that goes into the source as an attribute and a string: an identifier, nothing else."""
    if not name.isidentifier() or keyword.iskeyword(name) or not name.isascii():
        raise EmitError(f"torch target: module name {name!r} is not a plain identifier")
    return name


def _int(v) -> str:
    if type(v) is not int or v < 0:
        raise EmitError(f"torch target: expected a non-negative integer, got {v!r}")
    return str(v)


def _rate(v) -> str:
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or not 0 <= v < 1:
        raise EmitError(f"torch target: expected a rate in [0, 1), got {v!r}")
    return repr(float(v))


def _shape(n: Node) -> str:
    return "(" + ", ".join(["B", *map(_int, n.shape)]) + ")"


def _printable(text: str) -> str:
    """A path for a comment: as is when printable, else its escaped repr (no line breaks in a comment)."""
    return text if text.isprintable() else ascii(text)

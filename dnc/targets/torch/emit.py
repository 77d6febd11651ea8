"""Emit stage, torch target: inferred IR -> the source of one standalone PyTorch module.

The emitter follows the wiring. It walks the IR unit by unit (ir.units) and matches
each unit's subgraph along its edges:

- the stem and the head are chains of modules, emitted in chain order;
- a dense layer is a chain behind the concatenation of its block's features, a
  transition a chain behind its block's output; each becomes an instance of a class
  generated from that chain, one class per distinct chain (ops, their order and
  attributes, channels as constructor arguments);
- every concatenation must take exactly the block's features in order, which is
  what the generated `DenseBlock` computes.

What a chain computes is what the class's `forward` does, line for line, so a pass
that rewires a unit changes the code. A subgraph this target cannot express is an
EmitError naming the node, never silently different code. Module names come from the
nodes' paths (decided by lowering). The templates in templates/torch/ only place the
prepared text. Every value that reaches the source is an int, a float or a checked
identifier. No torch here: compiling stays fast and works without it.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import keyword
import math
import textwrap
from dataclasses import dataclass, field

import networkx as nx

from dnc.errors import EmitError
from dnc.files import size_text
from dnc.ir.graph import (
    BatchNormAttrs,
    ConvAttrs,
    Node,
    OpKind,
    Unit,
    UnitKind,
    conv_attrs,
    input_nodes,
    inputs,
    node,
    ordered,
    unit_output,
    units,
)
from dnc.ir.ops import OLD_KEY_PATTERN
from dnc.jinja import environment
from dnc.targets.provenance import header_lines

SUFFIX = ".py"
TEMPLATE = "torch/model.py.j2"
LINE_LENGTH = 120  # the project's ruff line-length: generated files must pass `ruff check`

# Names the generated module defines or imports: a network may not be called one of these.
_TAKEN = {"re", "torch", "nn", "F", "Tensor", "OrderedDict", "DenseNet", "DenseBlock", "DenseLayer"}
_TAKEN |= {"PlainDenseLayer", "Transition", "upgrade_state_dict", "any_requires_grad", "build", "checkpoint"}
_TAKEN |= {"ReLU", "BNReLU", "FoldedConv2d", "FoldedBatchNorm2d", "BufferedDenseBlock", "TILE_BYTES"}
_TAKEN |= {"Conv1x1", "FoldedConv1x1", "conv1x1", "BNClamp", "FoldedLinear"}
_MODULE_OPS = {
    OpKind.CONV,
    OpKind.BATCHNORM,
    OpKind.RELU,
    OpKind.MAXPOOL,
    OpKind.AVGPOOL,
    OpKind.CONV_BN,
    OpKind.BN_RELU,
    OpKind.BN_CLAMP,
}
_CONVS = (OpKind.CONV, OpKind.CONV_BN)
# ops that return a tensor of their own: a ReLU after one (its only reader) may work in place
_FRESH = {OpKind.CONV, OpKind.CONV_BN, OpKind.BATCHNORM, OpKind.BN_RELU, OpKind.BN_CLAMP, OpKind.LINEAR}
_FRESH |= {OpKind.AVGPOOL, OpKind.MAXPOOL}
_HEAD_OPS = _MODULE_OPS | {OpKind.GLOBAL_AVGPOOL, OpKind.FLATTEN, OpKind.LINEAR}


def emit(graph: nx.DiGraph, options: dict | None = None) -> str:
    """The PyTorch source of the inferred IR `graph`."""
    return environment().get_template(TEMPLATE).render(**view(graph, options or {}))


# -- code lines with shape comments ------------------------------------------------


@dataclass
class Code:
    """Lines of Python at one indentation; shape comments go after a line, or above it where too long."""

    indent: int
    lines: list[str] = field(default_factory=list)

    def add(self, code: str, shape: str = "") -> None:
        comment = f"  # {shape}" if shape else ""
        if self.indent + len(code) + len(comment) <= LINE_LENGTH:
            self.lines.append(code + comment)
        else:
            self.lines += [f"# {shape}", code] if shape else [code]

    def comment(self, text: str) -> None:
        self.lines.append(f"# {text}")

    def text(self) -> str:
        pad = " " * self.indent
        return "\n".join(pad + line if line else "" for line in self.lines)


# -- chains: what a unit computes ----------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One op of a chain, with its channel counts abstracted to argument names."""

    node: Node
    out_arg: str | None = None  # the constructor argument holding a conv's output channels
    fresh: bool = False  # a ReLU whose input is a tensor only it reads


def _fresh_input(graph: nx.DiGraph, n: Node) -> bool:
    (src,) = input_nodes(graph, n)
    return n.op is OpKind.RELU and src.op in _FRESH and graph.out_degree(src.scope) == 1


def _chain(graph: nx.DiGraph, members: list[Node], entry: str) -> list[Node]:
    """The unit's nodes as a chain starting from `entry` (a node outside the unit); refuse anything else."""
    chain, previous = [], entry
    for n in members:
        srcs = inputs(graph, n.scope)
        if srcs != [previous]:
            raise EmitError(
                f"torch target: {n.scope} reads {srcs or 'nothing'}, not the previous op {previous}; "
                f"{n.unit} is not a chain this target implements"
            )
        chain.append(n)
        previous = n.scope
    return chain


def _modules(
    n: Node, cin: str, cout: str | None = None, fresh: bool = False, onednn: bool = False
) -> list[tuple[str, str]]:
    """(module name, constructor call) of each module one op needs: two for a conv with a folded batch norm.

    `onednn`: 1x1 convs are modules that call oneDNN directly (pass onednn_1x1)."""
    if n.op is OpKind.CONV_BN:
        a = n.attrs
        norm = _module(n.replace(op=OpKind.BATCHNORM, attrs=a.bn), cout)
        conv = _folded_conv(n, a.conv, cin, cout, onednn, a.norm)
        return [(n.name, conv), (a.norm, norm.replace("nn.BatchNorm2d(", "FoldedBatchNorm2d(", 1))]
    if n.op is OpKind.CONV and n.attrs.pre:
        return [(n.name, _folded_conv(n, n.attrs, cin, cout, onednn, ""))]
    if n.op is OpKind.LINEAR and n.attrs.pre:
        call = _module(n, cin).replace("nn.Linear(", "FoldedLinear(", 1)
        return [(n.name, f"{call[:-1]}, pre={json.dumps(_dotted(n.attrs.pre))})")]
    if n.op in (OpKind.BN_RELU, OpKind.BN_CLAMP):
        cls = "BNReLU(" if n.op is OpKind.BN_RELU else "BNClamp("
        return [(n.name, _module(n.replace(op=OpKind.BATCHNORM), cin).replace("nn.BatchNorm2d(", cls, 1))]
    if n.op is OpKind.RELU and fresh:
        return [(n.name, "ReLU()")]
    if n.op is OpKind.CONV and onednn and n.attrs.pointwise:
        return [(n.name, _module(n, cin, cout).replace("nn.Conv2d(", "Conv1x1(", 1))]
    return [(n.name, _module(n, cin, cout))]


def _folded_conv(n: Node, conv: ConvAttrs, cin: str, cout: str | None, onednn: bool, norm: str) -> str:
    """A FoldedConv2d: the conv with the batch norm after it (`norm`) and the one of its `pre` folded in."""
    call = _module(n.replace(op=OpKind.CONV, attrs=conv), cin, cout)
    cls = "FoldedConv1x1(" if onednn and conv.pointwise else "FoldedConv2d("
    extra = [f", norm={json.dumps(_ident(norm))}"] if norm else []
    extra += [f", pre={json.dumps(_dotted(conv.pre))}"] if conv.pre else []
    return call.replace("nn.Conv2d(", cls, 1)[:-1] + "".join(extra) + ")"


def _dotted(path: tuple[str, ...]) -> str:
    """A module path relative to a parent module, for `get_submodule`: checked identifiers joined by dots."""
    return ".".join(_ident(p) for p in path)


def _module(n: Node, cin: str, cout: str | None = None) -> str:
    """The constructor call of the module for one op; `cin`/`cout` are literals or argument names."""
    a = n.attrs
    if n.op is OpKind.CONV:
        extra = "".join(
            f", {k}={v}" for k, v in (("stride", a.stride), ("padding", a.padding)) if v != (1 if k == "stride" else 0)
        )
        bias = "" if a.bias else ", bias=False"
        return f"nn.Conv2d({cin}, {cout}, kernel_size={_int(a.kernel)}{extra}{bias})"
    if n.op is OpKind.BATCHNORM:
        defaults = BatchNormAttrs()
        extra = "".join(
            f", {f.name}={_float(getattr(a, f.name))}"
            for f in dataclasses.fields(a)
            if getattr(a, f.name) != getattr(defaults, f.name)
        )
        return f"nn.BatchNorm2d({cin}{extra})"
    if n.op is OpKind.RELU:
        return "nn.ReLU()"
    if n.op in (OpKind.MAXPOOL, OpKind.AVGPOOL):
        cls = "nn.MaxPool2d" if n.op is OpKind.MAXPOOL else "nn.AvgPool2d"
        stride = f", stride={_int(a.stride)}" if a.stride != a.kernel else ""
        padding = f", padding={_int(a.padding)}" if a.padding else ""
        return f"{cls}(kernel_size={_int(a.kernel)}{stride}{padding})"
    if n.op is OpKind.GLOBAL_AVGPOOL:
        return "nn.AdaptiveAvgPool2d(1)"
    if n.op is OpKind.FLATTEN:
        return "nn.Flatten(1)"
    if n.op is OpKind.LINEAR:
        bias = "" if a.bias else ", bias=False"
        return f"nn.Linear({cin}, {_int(a.out_features)}{bias})"
    raise EmitError(f"torch target: {n.scope}: no module for op '{n.op}'")


def _literal_modules(graph: nx.DiGraph, n: Node) -> list[tuple[str, str]]:
    cin = _int(input_nodes(graph, n)[0].shape[0])
    cout = _int(n.shape[0]) if n.op in _CONVS else None
    return _modules(n, cin, cout, _fresh_input(graph, n), _onednn(graph))


def _onednn(graph: nx.DiGraph) -> bool:
    """Whether 1x1 convs call oneDNN directly (pass onednn_1x1)."""
    return graph.graph.get("conv1x1") == "onednn"


# -- unit classes --------------------------------------------------------------------


@dataclass
class UnitClass:
    """A generated nn.Module class for units (dense layers or transitions) that share one chain."""

    name: str
    kind: UnitKind
    signature: tuple
    steps: list[Step]  # from the first instance; dropout rates and channels are arguments
    drop_slots: set[int] = field(default_factory=set)  # indices in `steps` after which dropout may run
    buffered: bool = False  # a dense layer that reads a view of its block buffer, not a list of features
    onednn: bool = False  # its 1x1 convs call oneDNN directly (pass onednn_1x1)

    @property
    def args(self) -> list[str]:
        outs = [s.out_arg for s in self.steps if s.out_arg]
        return ["in_channels", *outs, *(["drop_rate"] if self.drop_slots else [])]

    @property
    def checkpointed(self) -> bool:
        """Dense layers with a bottleneck recompute it in backward under memory_efficient (as torchvision)."""
        convs = [s for s in self.steps if s.node.op in _CONVS]
        return self.kind is UnitKind.DENSE_LAYER and len(convs) > 1 and not self.buffered


def _core(chain: list[Node]) -> tuple[list[Node], set[int], list[float]]:
    """Split a chain into its non-dropout ops, the positions dropouts follow, and their rates."""
    core, slots, rates = [], set(), []
    for n in chain:
        if n.op is OpKind.DROPOUT:
            if not core:
                raise EmitError(f"torch target: {n.scope}: dropout before any op of {n.unit}")
            slots.add(len(core) - 1)
            rates.append(n.attrs.rate)
        elif n.op in _MODULE_OPS:
            core.append(n)
        else:
            raise EmitError(f"torch target: {n.scope}: a {n.op.value} inside {n.unit} has no implementation here")
    if len(set(rates)) > 1:
        raise EmitError(f"torch target: {chain[0].unit} has dropouts of different rates {sorted(set(rates))}")
    return core, slots, rates


def _out_args(kind: UnitKind, core: list[Node]) -> list[str | None]:
    convs = [i for i, n in enumerate(core) if n.op in _CONVS]
    names: dict[int, str] = {}
    if kind is UnitKind.DENSE_LAYER:
        for number, i in enumerate(convs[:-1], start=1):
            names[i] = "width" if number == 1 else f"width{number}"
        if convs:
            names[convs[-1]] = "growth"
    else:
        for number, i in enumerate(convs, start=1):
            names[i] = "out_channels" if number == 1 else f"out_channels{number}"
    return [names.get(i) for i in range(len(core))]


def _signature(core: list[Node], fresh: list[bool]) -> tuple:
    def attrs(n: Node):  # channels are arguments
        if n.op is OpKind.CONV:
            return dataclasses.replace(n.attrs, out_channels=0)
        if n.op is OpKind.CONV_BN:
            return dataclasses.replace(n.attrs, conv=dataclasses.replace(n.attrs.conv, out_channels=0))
        return n.attrs

    return tuple((n.name, n.op, attrs(n), f) for n, f in zip(core, fresh, strict=True))


class Classes:
    """The unit classes a module needs, named in the order they are first met."""

    def __init__(self) -> None:
        self.all: list[UnitClass] = []

    def instance(
        self, graph: nx.DiGraph, kind: UnitKind, chain: list[Node], in_channels: int, buffered: bool = False
    ) -> str:
        """The constructor call of the unit `chain`, creating or widening its class."""
        core, slots, rates = _core(chain)
        if not core:
            raise EmitError(f"torch target: {chain[0].unit} has no ops")
        # a ReLU first in its chain reads the unit's input, which others read too
        fresh = [i > 0 and (i - 1) not in slots and _fresh_input(graph, n) for i, n in enumerate(core)]
        sig = (buffered, _signature(core, fresh))
        cls = next((c for c in self.all if c.kind is kind and c.signature == sig), None)
        if cls is None:
            names = _out_args(kind, core)
            steps = [Step(n, a, f) for n, a, f in zip(core, names, fresh, strict=True)]
            cls = UnitClass(self._name(kind, core), kind, sig, steps, buffered=buffered, onednn=_onednn(graph))
            self.all.append(cls)
        cls.drop_slots |= slots
        values = [f"in_channels={_int(in_channels)}"]
        for s, n in zip(cls.steps, core, strict=True):
            if s.out_arg:
                values.append(f"{s.out_arg}={_int(n.shape[0])}")
        if rates:
            values.append(f"drop_rate={_rate(rates[0])}")
        return f"{cls.name}({', '.join(values)})"

    def _name(self, kind: UnitKind, core: list[Node]) -> str:
        if kind is UnitKind.TRANSITION:
            base = "Transition"
        else:
            base = "DenseLayer" if sum(n.op in _CONVS for n in core) > 1 else "PlainDenseLayer"
        taken = {c.name for c in self.all}
        number = 1
        name = base
        while name in taken:
            number += 1
            name = f"{base}{number}"
        return name


def _class_view(cls: UnitClass, tiled: bool = False) -> dict:
    """The text of one unit class: constructor body, optional bottleneck, forward body.

    `tiled`: a transition runs its chain on batch tiles (pass batch_tile)."""
    init = Code(8)
    channels = "in_channels"
    for s in cls.steps:
        n = s.node
        for name, call in _modules(n, channels, s.out_arg, s.fresh, cls.onednn):
            init.add(f"self.{_ident(name)} = {call}")
        if s.out_arg:
            channels = s.out_arg
    if cls.drop_slots:
        init.add("self.drop_rate = drop_rate")
    if cls.checkpointed:
        init.add("self.memory_efficient = False  # set by DenseNet")
    if tiled and cls.kind is UnitKind.TRANSITION:
        init.add("self.tile_bytes = 0  # set by DenseNet")

    def step_lines(code: Code, indices: range) -> None:
        for i in indices:
            code.add(f"x = self.{cls.steps[i].node.name}(x)")
            if i in cls.drop_slots:
                code.add("if self.drop_rate > 0:")
                code.add("    x = F.dropout(x, p=self.drop_rate, training=self.training)")

    first_conv = next(i for i, s in enumerate(cls.steps) if s.node.op in _CONVS) if cls.checkpointed else -1
    dense = cls.kind is UnitKind.DENSE_LAYER
    bottleneck = Code(8)
    if cls.checkpointed:
        bottleneck.add("x = torch.cat(features, 1)")
        step_lines(bottleneck, range(first_conv + 1))
        bottleneck.add("return x")
    forward = Code(8)
    if dense and not cls.checkpointed and not cls.buffered:
        forward.add("x = torch.cat(features, 1)")
    step_lines(forward, range(first_conv + 1, len(cls.steps)))
    forward.add("return x")
    signature = ", ".join(f"{a}: int" for a in cls.args if a != "drop_rate")
    if cls.drop_slots:
        signature += ", drop_rate: float = 0.0"
    return {
        "name": cls.name,
        "doc": _class_doc(cls),
        "signature": signature,
        "init": init.text(),
        "bottleneck": bottleneck.text() if cls.checkpointed else "",
        "input": "features: list[Tensor]" if dense and not cls.buffered else "x: Tensor",
        "forward": forward.text(),
        "tiled": tiled and cls.kind is UnitKind.TRANSITION,
    }


_OP_WORDS = {
    OpKind.CONV: "Conv",
    OpKind.BATCHNORM: "BN",
    OpKind.RELU: "ReLU",
    OpKind.MAXPOOL: "MaxPool",
    OpKind.AVGPOOL: "AvgPool",
    OpKind.CONV_BN: "Conv",
    OpKind.BN_RELU: "BN+ReLU",
    OpKind.BN_CLAMP: "BN+ReLU as a clamp",
}


def _class_doc(cls: UnitClass) -> str:
    parts = []
    for i, s in enumerate(cls.steps):
        n = s.node
        word = _OP_WORDS[n.op]
        a = conv_attrs(n) or n.attrs
        if n.op in (*_CONVS, OpKind.AVGPOOL, OpKind.MAXPOOL):
            word += f"({a.kernel}x{a.kernel}{f'/{a.stride}' if a.stride > 1 else ''})"
        if s.out_arg:
            word += f" to `{s.out_arg}`"
        if n.op in _CONVS and a.bias:
            word += " with bias"
        if n.op is OpKind.CONV_BN:
            word += "+BN folded"
        if n.op in _CONVS and a.pre:
            word += " (applying that BN)"
        parts.append(word)
        if i in cls.drop_slots:
            parts.append("dropout")
    if cls.kind is UnitKind.DENSE_LAYER:
        what = "Dense layer: reads the concatenation of its block's features so far."
    else:
        what = "Transition between dense blocks."
    chain = textwrap.wrap("-".join(parts) + ".", width=LINE_LENGTH - 24, break_on_hyphens=True)
    return what + "\n\n" + "\n".join(f"    {line}" for line in chain) + "\n    "


# -- the whole module -----------------------------------------------------------------


def view(graph: nx.DiGraph, options: dict) -> dict:
    """The template's data: plain strings, every literal already formatted."""
    name = _network_name(graph.graph.get("name"))
    nodes = ordered(graph)
    init = Code(8)
    init.add("self.features = features = nn.Sequential()")
    head = Code(8)
    classes = Classes()
    positions: list[int] = []  # index in `features` of each dense block
    count = 0  # modules in `features` so far
    block: dict | None = None
    head_modules: list[str] = []
    source_node = None
    for unit, members in units(graph).items():
        kind = unit.kind
        if kind is UnitKind.INPUT:
            (source_node,) = members
        elif kind is UnitKind.STEM:  # one unit: units() groups all of the stem's nodes
            init.comment("stem")
            previous = source_node
            for n in _chain(graph, members, source_node.scope):
                count += _feature(init, graph, n, previous)
                previous = n
        elif kind is UnitKind.DENSE_LAYER:
            if block is None or block["unit"] != unit.block:
                block = _open_block(graph, unit, members, init)
                positions.append(count)
                count += 1
            _dense_layer(graph, unit, members, block, classes, init)
        elif kind is UnitKind.BLOCK_OUTPUT:
            if block is None or block["unit"] != unit.block:
                raise EmitError(f"torch target: {members[0].scope}: a block output without dense layers")
            comment, code, shape = _close_block(graph, members, block)
            init.lines[block["line"]] = comment
            init.lines[block["line"] + 1] = f"{code}  # {shape}"
        elif kind is UnitKind.TRANSITION:
            entry = _entry(graph, members)
            chain = _chain(graph, members, entry.scope)
            parent = _parent(chain, 2)
            call = classes.instance(graph, kind, chain, entry.shape[0])
            init.add(f"features.{_ident(parent[1])} = {call}", _shape(chain[-1]))
            count += 1
        elif kind is UnitKind.HEAD:
            entry = _entry(graph, members)
            previous = entry
            for n in _chain(graph, members, entry.scope):
                if n.op not in _HEAD_OPS:
                    raise EmitError(f"torch target: {n.scope}: a {n.op.value} in the head has no implementation here")
                if n.path[0] == "features" and len(n.path) == 2 and not head_modules:
                    count += _feature(init, graph, n, previous)
                elif len(n.path) == 1:
                    for attr, module in _literal_modules(graph, n):
                        init.add(f"self.{_ident(attr)} = {module}")
                    head_modules.append(n.name)
                    last = n is members[-1]
                    call = f"self.{n.name}(x)"
                    head.add(f"return {call}" if last else f"x = {call}", _shape(n))
                else:
                    raise EmitError(f"torch target: {n.scope}: the head's modules come after `features`")
                previous = n
        if block is not None and kind is not UnitKind.DENSE_LAYER and block.get("open"):
            raise EmitError(f"torch target: {'.'.join(block['path'])} has no block output")
    if not head_modules or not head.lines[-1].startswith("return "):
        raise EmitError("torch target: the network must end in a head module outside `features`")
    checkpointed = [c.name for c in classes.all if c.checkpointed]
    used = {n.op for n in nodes}
    channels_last = graph.graph.get("memory_format") == "channels_last"
    features_node = next(n for n in reversed(nodes) if n.path[0] == "features")
    tile_bytes = graph.graph.get("batch_tile_bytes", 0)
    class_views = [_class_view(c, tile_bytes > 0) for c in classes.all]
    # pass batch_tile: buffered dense blocks and transitions run on batch tiles
    tiled = ["BufferedDenseBlock"] * (OpKind.BUFFER_CONCAT in used) + [c["name"] for c in class_views if c["tiled"]]
    tile_bytes = tile_bytes if tiled else 0
    onednn = [n for n in nodes if _pointwise(n)] if _onednn(graph) else []  # 1x1 convs that call oneDNN
    return {
        "name": name,
        "header": header_lines(graph, TEMPLATE, options),
        "params": f"{sum(n.params for n in nodes):,}",
        "macs": f"{sum(n.macs for n in nodes):,}",
        "input_shape": _shape(source_node),
        "features_shape": _shape(features_node),
        "old_key_pattern": json.dumps(OLD_KEY_PATTERN),  # a double-quoted literal, as ruff format writes it
        "memory_efficient": repr(bool(graph.graph.get("memory_efficient", False))),
        "classes": class_views,
        "uses_dropout": any(c.drop_slots for c in classes.all),
        "checkpointed": _tuple(checkpointed),
        "init": init.text(),
        "head": head.text(),
        "positions": ", ".join(map(str, positions)),
        "last_position": str(positions[-1]) if positions else "-1",
        "inference_only": bool(graph.graph.get("inference_only")),
        "relu": any(n.op is OpKind.RELU and _fresh_input(graph, n) for n in nodes),
        "folded_conv": OpKind.CONV_BN in used or any(n.op is OpKind.CONV and n.attrs.pre for n in nodes),
        "folded_linear": any(n.op is OpKind.LINEAR and n.attrs.pre for n in nodes),
        "bn_clamp": OpKind.BN_CLAMP in used,
        "onednn": bool(onednn),
        "plain_conv1x1": any(n.op is OpKind.CONV and not n.attrs.pre for n in onednn),
        "folded_conv1x1": any(n.op is OpKind.CONV_BN or n.attrs.pre for n in onednn),
        "bn_relu": OpKind.BN_RELU in used,
        "buffered": OpKind.BUFFER_CONCAT in used,
        "plain_block": OpKind.CONCAT in used or not positions,
        "memory_format": "torch.channels_last" if channels_last else "torch.contiguous_format",
        "channels_last": channels_last,
        "tile_bytes": _int(tile_bytes) if tile_bytes else "",
        "tile_words": size_text(tile_bytes),
        "tiled": _tuple(tiled),
    }


def _pointwise(n: Node) -> bool:
    conv = conv_attrs(n)
    return conv is not None and conv.pointwise


def _feature(init: Code, graph: nx.DiGraph, n: Node, previous: Node) -> int:
    """The modules of one op in `features`, a shape comment where the shape changes; returns how many."""
    if n.op not in _MODULE_OPS or len(n.path) != 2 or n.path[0] != "features":
        raise EmitError(f"torch target: {n.scope}: a {n.op.value} cannot be a module of `features` here")
    changed = previous is None or n.shape != previous.shape
    modules = _literal_modules(graph, n)
    for i, (name, module) in enumerate(modules):
        init.add(f"features.{_ident(name)} = {module}", _shape(n) if changed and i == 0 else "")
    return len(modules)


def _entry(graph: nx.DiGraph, members: list[Node]) -> Node:
    srcs = input_nodes(graph, members[0])
    if len(srcs) != 1:
        raise EmitError(f"torch target: {members[0].scope} should read one tensor, reads {len(srcs)}")
    return srcs[0]


def _parent(chain: list[Node], depth: int) -> tuple[str, ...]:
    """The module path all of a unit's nodes share, `depth` long."""
    parents = {n.path[:-1] for n in chain}
    if len(parents) != 1 or len(next(iter(parents))) != depth or next(iter(parents))[0] != "features":
        raise EmitError(f"torch target: {chain[0].unit} spans modules {sorted(parents)}")
    return next(iter(parents))


def _open_block(graph: nx.DiGraph, unit: Unit, members: list[Node], init: Code) -> dict:
    entry = _entry(graph, members)
    parent = _parent(members, 3)
    concats = {node(graph, s).op for s in graph.succ[entry.scope]} & {OpKind.CONCAT, OpKind.BUFFER_CONCAT}
    if len(concats) > 1:
        raise EmitError(f"torch target: {entry.scope} feeds both concats and buffer concats: one block, one kind")
    block = {
        "buffered": concats == {OpKind.BUFFER_CONCAT},
        "unit": unit.block,
        "module": parent[1],
        "path": parent[:2],
        "entry": entry,
        "features": [entry.scope],
        "layers": [],
        "open": True,
        "line": len(init.lines),
    }
    init.lines.append("")  # the block's comment and line, filled in when it closes
    init.lines.append("")
    return block


def _dense_layer(graph: nx.DiGraph, unit: Unit, members: list[Node], block: dict, classes: Classes, init: Code):
    first = members[0]
    if first.op in (OpKind.CONCAT, OpKind.BUFFER_CONCAT):
        _check_features(graph, first, block["features"])
        rest, entry, cin = members[1:], first, first.shape[0]
    else:
        if block["features"] != [block["entry"].scope]:
            raise EmitError(f"torch target: {first.scope} reads {inputs(graph, first.scope)}, not its block's features")
        rest, entry, cin = members, block["entry"], block["entry"].shape[0]
    chain = _chain(graph, rest, entry.scope)
    parent = _parent(members, 3)
    if parent[:2] != block["path"]:
        raise EmitError(f"torch target: {first.scope} is outside its block {'.'.join(block['path'])}")
    out = unit_output(graph, members)
    if out.scope != chain[-1].scope:
        raise EmitError(f"torch target: {unit}: its output {out.scope} is not the end of its chain")
    call = classes.instance(graph, UnitKind.DENSE_LAYER, chain, cin, block["buffered"])
    init.add(f"block.{_ident(parent[2])} = {call}")
    block["features"].append(chain[-1].scope)
    block["layers"].append(out)


def _check_features(graph: nx.DiGraph, cat: Node, features: list[str]) -> None:
    """A concatenation must read exactly the block's features so far, in order: what DenseBlock passes."""
    got = inputs(graph, cat.scope)
    if got != features:
        raise EmitError(
            f"torch target: {cat.scope} concatenates {got}; this target implements only the block's "
            f"features in order {features}"
        )


def _close_block(graph: nx.DiGraph, members: list[Node], block: dict) -> tuple[str, str, str]:
    """Check a block's output; return its comment, its line in __init__ and its shape comment."""
    (cat,) = members
    if cat.op not in (OpKind.CONCAT, OpKind.BUFFER_CONCAT):
        raise EmitError(f"torch target: {cat.scope}: a block ends in a concatenation, not a {cat.op.value}")
    _check_features(graph, cat, block["features"])
    if cat.path[:-1] != block["path"]:
        raise EmitError(f"torch target: {cat.scope} is outside its block {'.'.join(block['path'])}")
    block["open"] = False
    layers = block["layers"]
    growths = sorted({n.shape[0] for n in layers})
    count = f"{len(layers)} layer{'s' if len(layers) != 1 else ''}"
    growth = " and ".join(map(str, growths))
    summary = f"{block['module']}: {count} of growth {growth}, {block['entry'].shape[0]} -> {cat.shape[0]} channels"
    module = f"BufferedDenseBlock(channels={_int(cat.attrs.channels)})" if block["buffered"] else "DenseBlock()"
    return f"# {summary}", f"features.{_ident(block['module'])} = block = {module}", _shape(cat)


def _network_name(name) -> str:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or not name.isascii():
        raise EmitError(f"torch target: network name {name!r} is not a Python identifier")
    if name in _TAKEN or name.startswith("_") or hasattr(builtins, name):
        raise EmitError(f"torch target: network name '{name}' would shadow a name the generated module uses")
    return name


def _ident(name: str) -> str:
    """A module name that goes into the source as an attribute: an ASCII identifier, nothing else."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or not name.isascii():
        raise EmitError(f"torch target: module name {name!r} is not a plain identifier")
    return name


def _int(v) -> str:
    if type(v) is not int or v < 0:
        raise EmitError(f"torch target: expected a non-negative integer, got {v!r}")
    return str(v)


def _float(v) -> str:
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise EmitError(f"torch target: expected a finite number, got {v!r}")
    return repr(float(v))


def _rate(v) -> str:
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or not 0 <= v < 1:
        raise EmitError(f"torch target: expected a rate in [0, 1), got {v!r}")
    return repr(float(v))


def _tuple(names: list[str]) -> str:
    """An isinstance() argument: one class name, or a tuple of them."""
    return f"({', '.join(names)})" if len(names) > 1 else "".join(names)


def _shape(n: Node) -> str:
    return "(" + ", ".join(["B", *map(_int, n.shape)]) + ")"

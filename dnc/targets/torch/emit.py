"""Emit stage, torch target: inferred IR -> the source of one standalone PyTorch module.

The emitter follows the wiring. It walks the IR unit by unit (ir.graph.units) and
matches each unit's subgraph along its edges:

- the stem and the head are chains of modules, emitted in chain order;
- a dense layer is a chain behind the concatenation of its block's features, a
  transition a chain behind its block's output; each becomes an instance of a class
  generated from that chain, one class per distinct chain (ops, their order and
  attributes, channels as constructor arguments);
- a block's output is the concatenation of its features in order (`DenseBlock`).

A unit that matches none of these patterns gets plain graph-following code, as torch.fx
generates it: a class of its own whose `forward` computes its nodes one by one, each
reading the tensors its edges name (a dense layer reads its block's features by
index), with its modules at the same paths, so the state_dict keys stay. Where even
that cannot hold (a unit reading a tensor from outside its block's features), the whole
network is emitted as graph-following code in `forward_features`. So any IR the
verifier accepts emits, and what the code computes is what the IR says.

Every fact about an op (its modules and their arguments, its functional call, its
words) comes from the op table (`dnc.ir.ops.OPS[op].torch`); settings that apply to
the whole network from `dnc.ir.settings`. The runtime the generated module needs
(`templates/torch/runtime/`) is included piece by piece, only what its classes use. The
templates only place the prepared text. Every value that reaches the source is an int, a
float, a bool or a checked identifier. No torch here: compiling stays fast and works
without it.
"""

from __future__ import annotations

import builtins
import dataclasses
import functools
import json
import keyword
import math
import textwrap
from dataclasses import dataclass, field

import networkx as nx

from dnc.errors import EmitError
from dnc.files import size_text
from dnc.ir.graph import (
    IRError,
    Node,
    OpKind,
    Unit,
    UnitKind,
    conv_attrs,
    inference_only,
    input_nodes,
    inputs,
    node,
    ordered,
    unit_output,
    units,
)
from dnc.ir.ops import OLD_KEY_PATTERN, OPS, Arg, Code, Module, TorchContext
from dnc.ir.settings import settings
from dnc.jinja import environment
from dnc.targets.provenance import header_lines

SUFFIX = ".py"
TEMPLATE = "torch/model.py.j2"
LINE_LENGTH = 120  # the project's ruff line-length: generated files must pass `ruff check`

# The generated module's runtime, one snippet per piece (templates/torch/runtime/<snippet>.py.j2), in the order
# they appear in the file: each piece, the snippet that defines it and the pieces it uses.
RUNTIME: dict[str, tuple[str, tuple[str, ...]]] = {
    "any_requires_grad": ("any_requires_grad", ()),
    "_traced": ("traced", ()),
    "_tile_size": ("tile_size", ("_traced",)),
    "conv1x1": ("conv1x1", ("_traced",)),
    "ReLU": ("relu", ()),
    "_eager": ("fold_cache", ()),
    "_FoldedNorm": ("folded_norm", ("_eager",)),
    "BNReLU": ("bn_relu", ("_FoldedNorm",)),
    "BNClamp": ("bn_clamp", ("_FoldedNorm",)),
    "FoldedBatchNorm2d": ("folded_batchnorm", ("_FoldedNorm",)),
    "FoldedConv2d": ("folded_conv", ("_eager",)),
    "FoldedConv1x1": ("folded_conv1x1", ("FoldedConv2d", "conv1x1")),
    "FoldedLinear": ("folded_linear", ("_eager",)),
    "Conv1x1": ("conv1x1_module", ("conv1x1",)),
    "ConvKxK": ("conv_kxk_module", ("conv1x1", "_eager")),
    "fused_block": ("training", ()),  # with fused_input, fused_stem, fused_dense_layer, fused_transition, fused_head
}
# Names the generated module defines or imports: a network may not be called one of these (nor any name with a
# leading underscore, which `_network_name` refuses: the runtime's private helpers need no entry here).
_TAKEN = {"re", "torch", "nn", "F", "Tensor", "OrderedDict", "DenseNet", "DenseBlock", "DenseLayer", "Transition"}
_TAKEN |= {"PlainDenseLayer", "upgrade_state_dict", "build", "checkpoint", "BufferedDenseBlock", "Features"}
_TAKEN |= {"Callable", "operator", "os", "time", "CONV1X1_POLICY", "conv1x1_choices"} | set(RUNTIME)
_TAKEN |= {"threading", "dataclass", "once_differentiable", "aten", "fused_input", "fused_stem", "fused_reason"}
_TAKEN |= {"fused_dense_layer", "fused_transition", "fused_head"}


def emit(graph: nx.DiGraph, options: dict | None = None) -> str:
    """The PyTorch source of the inferred IR `graph`."""
    return environment().get_template(TEMPLATE).render(**view(graph, options or {}))


# -- code lines with shape comments ------------------------------------------------


@dataclass
class Lines:
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


# -- values and modules: what reaches the source ---------------------------------------


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


def _ident(name: str) -> str:
    """A name that goes into the source as code: an ASCII identifier, nothing else."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or not name.isascii():
        raise EmitError(f"torch target: module name {name!r} is not a plain identifier")
    return name


def _dotted(path: tuple[str, ...]) -> str:
    """A module path relative to a parent module, for `get_submodule`: checked identifiers joined by dots."""
    return ".".join(_ident(p) for p in path)


def _value(v) -> str:
    """One constructor argument as source text."""
    if isinstance(v, bool):
        return repr(v)
    if isinstance(v, int):
        return _int(v)
    if isinstance(v, float):
        return _float(v)
    if isinstance(v, Code):
        return _ident(v.text)
    if isinstance(v, str):
        return json.dumps(_ident(v))  # a double-quoted literal, as ruff format writes it
    if isinstance(v, tuple):
        return json.dumps(_dotted(v))
    raise EmitError(f"torch target: cannot write the argument {v!r}")


def _args(args: tuple[Arg, ...]) -> str:
    shown = [a for a in args if not a.name or a.value != a.default]
    positional = [_value(a.value) for a in shown if not a.name]
    keywords = [f"{a.name}={_value(a.value)}" for a in shown if a.name]
    return ", ".join(positional + keywords)


def _constructor(m: Module) -> str:
    cls = m.cls if m.cls.startswith("nn.") else _ident(m.cls)
    return f"{cls}({_args(m.args)})"


def _fresh_input(graph: nx.DiGraph, n: Node) -> bool:
    """A ReLU whose input is a fresh tensor that only it reads: it may then work in place."""
    if n.op is not OpKind.RELU:
        return False
    srcs = input_nodes(graph, n)
    if len(srcs) != 1:
        return False
    form = OPS[srcs[0].op].torch
    return form is not None and form.fresh and len(graph._succ[srcs[0].scope]) == 1  # NOTE: networkx's own dict


def _modules(graph: nx.DiGraph, n: Node, cin, cout=None, fresh: bool | None = None) -> tuple[Module, ...]:
    """The modules an op needs (its own first; a folded conv also keeps its batch norm's tensors beside it)."""
    form = OPS[n.op].torch
    if form is None or form.modules is None:
        raise EmitError(f"torch target: {n.scope}: a {n.op.value} is not a module here")
    if fresh is None:
        fresh = _fresh_input(graph, n)
    s = settings(graph)
    return form.modules(n.attrs, TorchContext(_ident(n.name), cin, cout, fresh, s.conv1x1, s.packed_weights))


@functools.lru_cache(maxsize=4096)
def _classes(op: OpKind, attrs, name: str, fresh: bool, conv1x1: str, packed: bool) -> tuple[str, ...]:
    """The classes of the modules a node of `op` makes (kept: a maximal spec has thousands of alike nodes)."""
    modules = OPS[op].torch.modules(attrs, TorchContext(_ident(name), 1, 1, fresh, conv1x1, packed))
    return tuple(m.cls for m in modules)


def _literal_modules(graph: nx.DiGraph, n: Node) -> tuple[Module, ...]:
    cout = n.shape[0] if conv_attrs(n) is not None else None
    return _modules(graph, n, input_nodes(graph, n)[0].shape[0], cout)


def _is_module(n: Node) -> bool:
    form = OPS[n.op].torch
    return form is not None and form.modules is not None


# -- chains: what a unit computes ----------------------------------------------------


class NotAChain(Exception):
    """A unit is not a chain of the form a pattern class implements; it gets graph-following code instead."""


class Unstructured(Exception):
    """The network does not flow stage to stage (a unit reads outside its block's features): emit it flat."""


@dataclass(frozen=True)
class Step:
    """One op of a chain, with its channel counts abstracted to argument names."""

    node: Node
    out_arg: str | None = None  # the constructor argument holding a conv's output channels
    fresh: bool = False  # a ReLU whose input is a tensor only it reads


def _chain(graph: nx.DiGraph, members: list[Node], entry: str) -> list[Node]:
    """The unit's nodes as a chain starting from `entry` (a node outside the unit)."""
    previous = entry
    for n in members:
        if inputs(graph, n.scope) != [previous]:
            raise NotAChain(n.scope)
        previous = n.scope
    return members


def _core(chain: list[Node]) -> tuple[list[Node], set[int], list[float]]:
    """Split a chain into its module ops, the positions dropouts follow, and their rates."""
    core, slots, rates = [], set(), []
    for n in chain:
        if n.op is OpKind.DROPOUT:
            if not core:
                raise NotAChain(n.scope)
            slots.add(len(core) - 1)
            rates.append(n.attrs.rate)
        elif _is_module(n):
            core.append(n)
        else:
            raise NotAChain(n.scope)
    if not core or len(set(rates)) > 1:
        raise NotAChain(chain[0].scope)
    return core, slots, rates


def _out_args(kind: UnitKind, core: list[Node]) -> list[str | None]:
    convs = [i for i, n in enumerate(core) if conv_attrs(n) is not None]
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


@dataclass
class UnitClass:
    """A generated nn.Module class for units (dense layers or transitions) that share one chain."""

    name: str
    kind: UnitKind
    signature: tuple
    steps: list[Step]  # from the first instance; dropout rates and channels are arguments
    conv1x1: str  # Settings.conv1x1
    packed: bool  # Settings.packed_weights
    drop_slots: set[int] = field(default_factory=set)  # indices in `steps` after which dropout may run
    buffered: bool = False  # a dense layer that reads a view of its block buffer, not a list of features

    @property
    def args(self) -> list[str]:
        outs = [s.out_arg for s in self.steps if s.out_arg]
        return ["in_channels", *outs, *(["drop_rate"] if self.drop_slots else [])]

    @property
    def checkpointed(self) -> bool:
        """Dense layers with a bottleneck recompute it in backward under memory_efficient (as torchvision)."""
        convs = [s for s in self.steps if conv_attrs(s.node) is not None]
        return self.kind is UnitKind.DENSE_LAYER and len(convs) > 1 and not self.buffered

    def modules(self) -> list[Module]:
        out, channels = [], Code("in_channels")
        for s in self.steps:
            cout = Code(s.out_arg) if s.out_arg else None
            out += OPS[s.node.op].torch.modules(
                s.node.attrs, TorchContext(_ident(s.node.name), channels, cout, s.fresh, self.conv1x1, self.packed)
            )
            if s.out_arg:
                channels = Code(s.out_arg)
        return out


class Classes:
    """The unit classes a module needs, named in the order they are first met.

    `frozen`: the module is inference-only, so it never trains and dropout, the identity in eval mode, is left out.
    """

    def __init__(self, frozen: bool = False) -> None:
        self.all: list[UnitClass | GraphClass] = []
        self.frozen = frozen

    def instance(
        self, graph: nx.DiGraph, kind: UnitKind, chain: list[Node], in_channels: int, buffered: bool = False
    ) -> str:
        """The constructor call of the unit `chain`, creating or widening its class."""
        core, slots, rates = _core(chain)
        if self.frozen:
            slots, rates = set(), []
        # a ReLU first in its chain reads the unit's input, which others read too
        fresh = [i > 0 and (i - 1) not in slots and _fresh_input(graph, n) for i, n in enumerate(core)]
        sig = (buffered, _signature(core, fresh))
        cls = next((c for c in self.all if isinstance(c, UnitClass) and c.kind is kind and c.signature == sig), None)
        if cls is None:
            names = _out_args(kind, core)
            steps = [Step(n, a, f) for n, a, f in zip(core, names, fresh, strict=True)]
            base = "Transition" if kind is UnitKind.TRANSITION else "DenseLayer"
            if kind is UnitKind.DENSE_LAYER and sum(conv_attrs(n) is not None for n in core) < 2:
                base = "PlainDenseLayer"
            kernels = settings(graph).conv1x1, settings(graph).packed_weights
            cls = UnitClass(self.name(base), kind, sig, steps, *kernels, buffered=buffered)
            self.all.append(cls)
        cls.drop_slots |= slots
        values = [f"in_channels={_int(in_channels)}"]
        for s, n in zip(cls.steps, core, strict=True):
            if s.out_arg:
                values.append(f"{s.out_arg}={_int(n.shape[0])}")
        if rates:
            values.append(f"drop_rate={_rate(rates[0])}")
        return f"{cls.name}({', '.join(values)})"

    def name(self, base: str) -> str:
        taken = {c.name for c in self.all}
        number = 1
        name = base
        while name in taken:
            number += 1
            name = f"{base}{number}"
        return name


def _unit_doc(kind: UnitKind, parts: list[str]) -> str:
    if kind is UnitKind.DENSE_LAYER:
        what = "Dense layer: reads the concatenation of its block's features so far."
    else:
        what = "Transition between dense blocks."
    sentence = ", ".join(parts)
    return _docstring([what, sentence[:1].upper() + sentence[1:] + "."], indent=4)


def _symbolic_shapes(cls: UnitClass) -> list[str]:
    """Each step's output shape in the class's own terms, for comments: its channel arguments, and H, W divided by
    a non-overlapping window's stride (H/2), or primed where a window changes them otherwise (H')."""
    channels, h, w = "in_channels", "H", "W"
    out = []
    for s in cls.steps:
        a = conv_attrs(s.node) or s.node.attrs
        kernel, stride, padding = (getattr(a, f, d) for f, d in (("kernel", 1), ("stride", 1), ("padding", 0)))
        if stride > 1 and kernel == stride and padding == 0:
            h, w = f"{h}/{stride}", f"{w}/{stride}"
        elif stride > 1 or kernel != 2 * padding + 1:
            h, w = f"{h}'", f"{w}'"
        channels = s.out_arg or channels
        out.append(f"(B, {channels}, {h}, {w})")
    return out


def _fused_call(cls: UnitClass) -> str:
    """The body of a unit class's `fused` method (the training path of pass share_bn_stats): the runtime's function
    for its kind, handed its modules by name and where its dropouts are."""
    steps = cls.steps
    names = [f"self.{_ident(s.node.name)}" for s in steps]
    last = len(steps) - 1

    def drop(i: int) -> str:
        return "self.drop_rate" if i in cls.drop_slots else "0.0"

    if cls.kind is UnitKind.TRANSITION:
        norm = names[0]
        (conv,) = (name for name, s in zip(names, steps, strict=True) if s.node.op is OpKind.CONV)
        pool_first = steps[2].node.op is OpKind.AVGPOOL
        rate = next((drop(i) for i in cls.drop_slots), "0.0")
        return f"return fused_transition(self, {norm}, {conv}, maps, stats, pool_first={pool_first}, drop={rate})"
    if len(steps) == 6:  # bottleneck: norm1, relu1, conv1, norm2, relu2, conv2
        modules = f"{names[0]}, {names[2]}, {names[3]}, {names[5]}"
        drops = f"{drop(2)}, {drop(last)}"
    else:  # plain: norm1, relu1, conv1
        modules = f"{names[0]}, {names[2]}, None, None"
        drops = f"0.0, {drop(last)}"
    return f"return fused_dense_layer(self, {modules}, maps, stats, {drops})"


def _class_view(cls: UnitClass, tiled: bool, training: bool = False) -> dict:
    """The text of one unit class: constructor body, optional bottleneck, forward body.

    `tiled`: a transition runs its chain on batch tiles (setting batch_tile_bytes). `training`: the module has the
    fused training path (`Features.fused`), so a class whose chain starts at a shared batch norm gets `fused`."""
    init = Lines(8)
    for m in cls.modules():
        init.add(f"self.{_ident(m.name)} = {_constructor(m)}")
    if cls.drop_slots:
        init.add("self.drop_rate = drop_rate")
    if cls.checkpointed:
        init.add("self.memory_efficient = False  # set by DenseNet")
    tiled = tiled and cls.kind is UnitKind.TRANSITION
    if tiled:
        init.add("self.tile_bytes = 0  # set by DenseNet")

    shapes = _symbolic_shapes(cls)

    def step_lines(code: Lines, indices: range) -> None:
        for i in indices:
            changed = shapes[i] != shapes[i - 1] if i > 0 else shapes[0] != "(B, in_channels, H, W)"
            code.add(f"x = {_call('self', cls.steps[i].node.name, cls.steps[i].node)}", shapes[i] if changed else "")
            if i in cls.drop_slots:
                code.add("if self.drop_rate > 0:")
                code.add("    x = F.dropout(x, p=self.drop_rate, training=self.training)")

    convs = [i for i, s in enumerate(cls.steps) if conv_attrs(s.node) is not None]
    first_conv = convs[0] if cls.checkpointed else -1
    dense = cls.kind is UnitKind.DENSE_LAYER
    bottleneck = Lines(8)
    if cls.checkpointed:
        bottleneck.add("x = torch.cat(features, 1)", "(B, in_channels, H, W)")
        step_lines(bottleneck, range(first_conv + 1))
        bottleneck.add("return x")
    forward = Lines(8)
    if dense and not cls.checkpointed and not cls.buffered:
        forward.add("x = torch.cat(features, 1)", "(B, in_channels, H, W)")
    step_lines(forward, range(first_conv + 1, len(cls.steps)))
    forward.add("return x")
    signature = ", ".join(f"{a}: int" for a in cls.args if a != "drop_rate")
    if cls.drop_slots:
        signature += ", drop_rate: float = 0.0"
    parts = []
    for i, s in enumerate(cls.steps):
        parts.append(OPS[s.node.op].words(s.node.attrs, f"to `{s.out_arg}` channels" if s.out_arg else ""))
        if i in cls.drop_slots:
            parts.append("dropout")
    fused = training and cls.steps[0].node.op is OpKind.SHARED_BATCHNORM
    preamble = Lines(8)
    if fused and dense:  # a fused block calls each layer (so FSDP2's hooks run) with its statistics
        preamble.add("if stats is not None:")
        preamble.add("    return self.fused(features, stats)")
    return {
        "name": cls.name,
        "doc": _unit_doc(cls.kind, parts),
        "signature": signature,
        "init": init.text(),
        "bottleneck": bottleneck.text() if cls.checkpointed else "",
        "input": "features: list[Tensor]" if dense and not cls.buffered else "x: Tensor",
        "stats": ", stats: list[Tensor] | None = None" if fused and dense else "",
        "preamble": preamble.text() if preamble.lines else "",
        "forward": forward.text(),
        "fused": f"        {_fused_call(cls)}" if fused else "",
        "tiled": tiled,
    }


# -- graph-following code ---------------------------------------------------------------


@dataclass
class GraphClass:
    """A generated class whose forward follows a unit's edges node by node (no pattern matched it)."""

    name: str
    kind: UnitKind
    modules: list[tuple[tuple[str, ...], Module]]  # (path below the class, module)
    forward: Lines
    argument: str  # `features: list[Tensor]` or `x: Tensor`
    container: str = "nn.Module"
    parts: list[str] = field(default_factory=list)


def _graph_lines(
    graph: nx.DiGraph, nodes: list[Node], env: dict[str, str], owner: int, code: Lines, via: str = "self"
) -> None:
    """Compute `nodes` in order, one line each, each reading the expressions its inputs have in `env`.

    A module is reached from `via` by its path below the class that runs the code (the first `owner`
    parts of the node's path are that class's own). Adds each node's variable to `env`. In an inference-only
    network a dropout is the identity, and no line.
    """
    frozen = bool(inference_only(graph)) and any(n.op is OpKind.DROPOUT for n in nodes)
    number = 0
    for n in nodes:
        if frozen and n.op is OpKind.DROPOUT:
            env[n.scope] = env[inputs(graph, n.scope)[0]]
            continue
        number += 1
        form = OPS[n.op].torch
        if form is None:
            raise EmitError(f"torch target: {n.scope}: a {n.op.value} has no torch form")
        args = []
        for src in inputs(graph, n.scope):
            if src not in env:
                raise Unstructured(n.scope)
            args.append(env[src])
        if form.modules is not None:
            call = _call(".".join([via, *(_ident(p) for p in n.path[owner:-1])]), n.name, n, ", ".join(args))
        else:
            call = form.call(n.attrs, args)
        var = f"x{number}"
        code.add(f"{var} = {call}", _shape(n))
        env[n.scope] = var


def _graph_modules(graph: nx.DiGraph, nodes: list[Node], owner: int) -> list[tuple[tuple[str, ...], Module]]:
    out = []
    for n in nodes:
        if _is_module(n):
            for m in _literal_modules(graph, n):
                out.append(((*n.path[owner:-1], m.name), m))
    return out


def _graph_class_view(cls: GraphClass) -> dict:
    init = Lines(8)
    made: set[tuple[str, ...]] = set()
    for path, m in cls.modules:
        for depth in range(1, len(path)):  # containers for deeper paths: modules that compute nothing themselves
            if path[:depth] not in made:
                made.add(path[:depth])
                init.add(f"self.{_dotted(path[:depth])} = nn.Module()")
        init.add(f"self.{_dotted(path)} = {_constructor(m)}")
    what = {
        UnitKind.DENSE_LAYER: "Dense layer, as its graph wires it",
        UnitKind.BLOCK_OUTPUT: "Dense block, as its graph wires it",
        UnitKind.TRANSITION: "Transition, as its graph wires it",
    }[cls.kind]
    doc = f"{what}: each line computes one node from the tensors its edges name."
    return {
        "name": cls.name,
        "container": cls.container,
        "doc": doc,
        "init": init.text(),
        "input": cls.argument,
        "forward": cls.forward.text(),
    }


# -- the whole module -----------------------------------------------------------------


def view(graph: nx.DiGraph, options: dict) -> dict:
    """The template's data: plain strings, every literal already formatted."""
    name = _network_name(graph.graph.get("name"))
    try:
        body = _structured(graph)
    except Unstructured:
        body = _flat(graph)
    nodes = ordered(graph)
    s = settings(graph)
    classes = body["classes"]
    pattern_classes = [c for c in classes.all if isinstance(c, UnitClass)]
    graph_classes = [c for c in classes.all if isinstance(c, GraphClass)]
    checkpointed = [c.name for c in pattern_classes if c.checkpointed]
    tile_bytes = s.batch_tile_bytes
    training = bool(body.get("fused"))
    class_views = [_class_view(c, tile_bytes > 0, training) for c in pattern_classes]
    buffered = body["buffered"]
    tiled = ["BufferedDenseBlock"] * buffered + [c["name"] for c in class_views if c["tiled"]]
    tile_bytes = tile_bytes if tiled else 0
    kernels = s.conv1x1, s.packed_weights
    modules = [(n, _classes(n.op, n.attrs, n.name, _fresh_input(graph, n), *kernels)) for n in nodes if _is_module(n)]
    used = {cls for _, classes in modules for cls in classes}
    used |= {"_tile_size"} if tile_bytes else set()
    used |= {"_traced"} if buffered else set()
    used |= {"any_requires_grad"} if checkpointed else set()
    used |= {"fused_block"} if training else set()
    kinds = {cls for n, classes in modules if n.path[0] == "features" for cls in classes}
    runtime = _runtime(used)
    channels_last = s.memory_format == "channels_last"
    frozen = inference_only(graph)
    block_runtime = []
    if body["plain_block"]:
        block_runtime.append("dense_block")
    if buffered:
        block_runtime.append("tiled_dense_block" if tile_bytes else "buffered_dense_block")
    memory_efficient = bool(graph.graph.get("memory_efficient", False))
    signature = f"memory_efficient: bool = {memory_efficient!r}"
    if tile_bytes:
        signature += f", tile_bytes: int = {_int(tile_bytes)}"
    return {
        "name": name,
        "header": header_lines(graph, TEMPLATE, options),
        "params": f"{sum(n.params for n in nodes):,}",
        "macs": f"{sum(n.macs for n in nodes):,}",
        "input_shape": body["input_shape"],
        "features_shape": body["features_shape"],
        "old_key_pattern": json.dumps(OLD_KEY_PATTERN),  # a double-quoted literal, as ruff format writes it
        "runtime": [f"torch/runtime/{snippet}.py.j2" for snippet in runtime],
        "block_runtime": [f"torch/runtime/{snippet}.py.j2" for snippet in block_runtime],
        "functional": (body["dropout"] and not frozen)
        or any(p in runtime for p in ("conv1x1", "folded_conv", "folded_linear", "training")),
        "folds": "fold_cache" in runtime,  # the fold cache imports operator and Callable
        "timing": "conv1x1" in runtime,  # the measured kernel choice reads the environment and a clock
        "packed": s.packed_weights and "conv1x1" in runtime and "fold_cache" in runtime,  # oneDNN's weights kept, folds
        "sequential": body.get("sequential", ""),
        "fused": body.get("fused", ""),
        "training": training,
        "fused_kinds": sorted(kinds | {"DenseBlock"} | {c.name for c in pattern_classes}),
        "fused_layers": "".join(f"{c.name}, " for c in pattern_classes if c.kind is UnitKind.DENSE_LAYER).rstrip(),
        "classes": class_views,
        "graph_classes": [_graph_class_view(c) for c in graph_classes],
        "checkpointed": _tuple(checkpointed),
        "doc": _network_doc(name, frozen, bool(checkpointed), tile_bytes),
        "init_signature": signature,
        "init": body["init"].text(),
        "features": body["features"].text(),
        "blocks": body["blocks"].text(),
        "head": body["head"].text(),
        "graph_code": body.get("graph_code", ""),
        "inference_only": frozen,
        "inference_only_message": _message_lines(name, frozen),
        "memory_format": "torch.channels_last" if channels_last else "torch.contiguous_format",
        "channels_last": channels_last,
        "tile_bytes": _int(tile_bytes) if tile_bytes else "",
        "tiled": _tuple(tiled),
    }


def _message_lines(name: str, why: list[str]) -> list[str]:
    """The inference-only module's refusal, as string literals of at most a line each."""
    if not why:
        return []
    text = (
        f"this {name} was compiled by dnc -O2 for inference only ({', '.join(why)}): it cannot train or record "
        "gradients; compile it with -O0 or -O1 to train"
    )
    lines = textwrap.wrap(text, width=LINE_LENGTH - 20)  # wrap drops the space at each break: put it back
    return [json.dumps(line + (" " if i < len(lines) - 1 else "")) for i, line in enumerate(lines)]


def _network_doc(name: str, frozen: list[str], checkpointed: bool, tile_bytes: int) -> str:
    """The DenseNet class's docstring: what it is and what its arguments do, in plain words."""
    if frozen:
        paragraphs = [
            f"{name}, compiled by dnc -O2 for inference only: {', '.join(frozen)}.",
            "It starts in eval mode with frozen parameters; `train()` and inputs that require grad are refused. Its"
            " state_dict holds torchvision's keys; the folded tensors are derived from them at init and after every"
            " `load_state_dict` (call `fold()` after writing into parameters by hand). `memory_efficient` is accepted"
            " so that code written for -O0 runs unchanged; it does nothing here.",
        ]
    elif checkpointed:
        paragraphs = [f"{name}. `memory_efficient` recomputes each bottleneck in backward (less memory, more time)."]
    else:
        paragraphs = [f"{name}. `memory_efficient` does nothing here: no layer has a bottleneck to recompute."]
    if tile_bytes:
        paragraphs.append(
            "`tile_bytes`: dense blocks and transitions run as many samples at a time as this many bytes of their"
            f" features hold ({size_text(tile_bytes)}: less memory, data nearer the caches); 0 runs whole batches."
        )
    return _docstring(paragraphs, indent=4)


def _docstring(paragraphs: list[str], indent: int) -> str:
    """A docstring's body: paragraphs wrapped to the line length, the first on the opening line."""
    pad = " " * indent
    wrapped = ["\n".join(textwrap.wrap(p, width=LINE_LENGTH - indent - 3)) for p in paragraphs]
    text = "\n\n".join(wrapped).replace("\n", "\n" + pad).replace("\n" + pad + "\n", "\n\n")
    return text + ("\n" + pad if "\n" in text else "")


def _runtime(used: set[str]) -> list[str]:
    """The runtime snippets that define `used` and what they need, in the file's order."""
    needed: set[str] = set()
    stack = [u for u in used if u in RUNTIME]
    while stack:
        piece = stack.pop()
        if piece not in needed:
            needed.add(piece)
            stack += RUNTIME[piece][1]
    return [RUNTIME[p][0] for p in RUNTIME if p in needed]


def _structured(graph: nx.DiGraph) -> dict:
    """The network as torchvision lays it out: `features` a Sequential of stages, each a module or unit class."""
    init = Lines(8)
    init.add("self.features = features = nn.Sequential()")
    head = Lines(8)
    # each module `features` calls, in order: its name, its op where it is one op's module, its output node
    stages: list[tuple[str, Node | None, Node]] = []
    classes = Classes(frozen=bool(inference_only(graph)))
    found = {"dropout": False, "plain_block": False, "buffered": False}
    items = list(units(graph).items())
    (source,) = items[0][1]
    previous: Node = source  # the stage output that flows into the next stage
    head_modules: list[str] = []
    i = 1
    while i < len(items):
        unit, members = items[i]
        kind = unit.kind
        found["dropout"] |= any(n.op is OpKind.DROPOUT for n in members)
        if kind is UnitKind.STEM:  # one unit: units() groups all of the stem's nodes
            init.comment("stem")
            for n in _as_chain(graph, members, previous.scope):
                stages.append((n.name, _feature(init, graph, n, previous), n))
                previous = n
        elif kind is UnitKind.DENSE_LAYER:
            j = i
            while j < len(items) and items[j][0].kind is UnitKind.DENSE_LAYER and items[j][0].block == unit.block:
                j += 1
            if j == len(items) or items[j][0] != Unit(UnitKind.BLOCK_OUTPUT, unit.block):
                raise Unstructured(members[0].scope)
            found["dropout"] |= any(n.op is OpKind.DROPOUT for _, ms in items[i:j] for n in ms)
            cat, block_class = _block(graph, items[i:j], items[j][1], previous, classes, init)
            stages.append((cat.path[1], None, cat))
            found["plain_block"] |= block_class == "DenseBlock"
            found["buffered"] |= block_class == "BufferedDenseBlock"
            previous, i = cat, j
        elif kind is UnitKind.TRANSITION:
            entry = _entry(graph, members, previous)
            parent = _parent(members, 2)
            try:
                call = classes.instance(graph, kind, _chain(graph, members, entry.scope), entry.shape[0])
            except NotAChain:
                call = _graph_unit(graph, unit, members, {entry.scope: "x"}, classes, "x: Tensor")
            init.add(f"features.{_ident(parent[1])} = {call}", _shape(members[-1]))
            previous = _output(graph, members)
            stages.append((parent[1], None, previous))
        elif kind is UnitKind.HEAD:
            last = _entry(graph, members, previous)
            for n in _as_chain(graph, members, last.scope):
                if n.path[0] == "features" and len(n.path) == 2 and not head_modules:
                    stages.append((n.name, _feature(init, graph, n, last), n))
                elif len(n.path) == 1 and _is_module(n):
                    for m in _literal_modules(graph, n):
                        init.add(f"self.{_ident(m.name)} = {_constructor(m)}")
                    head_modules.append(n.name)
                    call = _call("self", n.name, n)
                    head.add(f"return {call}" if n is members[-1] else f"x = {call}", _shape(n))
                else:
                    raise Unstructured(n.scope)
                last = n
        else:
            raise Unstructured(members[0].scope)
        i += 1
    if not head_modules or not head.lines[-1].startswith("return "):
        raise Unstructured("head")
    channels_last = settings(graph).memory_format == "channels_last"
    # forward_blocks: each stage of `features` in turn, each block's output kept
    blocks = Lines(8)
    if channels_last:
        blocks.add("x = x.contiguous(memory_format=torch.channels_last)")
    blocks.add("outputs: list[Tensor] = []")
    blocks.add("features = self.features")
    last = max(i for i, (_, _, out) in enumerate(stages) if out.unit.kind is UnitKind.BLOCK_OUTPUT)
    for name, op, out in stages[: last + 1]:
        block_output = out.unit.kind is UnitKind.BLOCK_OUTPUT
        blocks.add(f"x = {_call('features', name, op)}", _shape(out) if block_output else "")
        if block_output:
            blocks.add("outputs.append(x)")
    blocks.add("return outputs")
    # `features` calls its modules in turn, as a Sequential does, unless one is handed another's scale and shift
    sequential = Lines(8)
    if any(OPS[op.op].torch.hands(op.attrs) for _, op, _ in stages if op is not None):
        for name, op, out in stages:
            sequential.add(f"x = {_call('self', name, op)}", _shape(out))
        sequential.add("return x")
        init.lines[0] = "self.features = features = Features()"
    fused = _fused_features(graph, stages, dict(items), classes)
    if fused is not None:
        init.lines[0] = "self.features = features = Features()"
    features = Lines(8)
    if channels_last:
        features.add("x = x.contiguous(memory_format=torch.channels_last)")
    features.add("return self.features(x)")
    return {
        "init": init,
        "head": head,
        "blocks": blocks,
        "features": features,
        "sequential": sequential.text(),
        "fused": fused.text() if fused is not None else "",
        "classes": classes,
        "input_shape": _shape(source),
        "features_shape": _shape(stages[-1][2]),
        **found,
    }


def _fused_features(graph: nx.DiGraph, stages: list, members: dict, classes: Classes) -> Lines | None:
    """The body of `Features.fused`, the training path of pass share_bn_stats: each dense block's maps normalised
    once (`fused_block`), each transition and norm5 reading them; None where the IR has no shared batch norm, is
    inference-only, or a unit has graph-following code (then `features` runs its modules in turn)."""
    nodes = ordered(graph)
    if inference_only(graph) or not any(n.op is OpKind.SHARED_BATCHNORM for n in nodes):
        return None
    if any(not isinstance(c, UnitClass) for c in classes.all):
        return None
    code = Lines(8)
    code.add("x = fused_input(x, self.fused_memory_format)")
    stem = [op for _, op, out in stages if out.unit.kind is UnitKind.STEM]
    if [n.op for n in stem] == [OpKind.CONV, OpKind.BATCHNORM, OpKind.RELU, OpKind.MAXPOOL] and stem[2].recomputed:
        conv, norm, _, pool = (f"self.{_ident(n.name)}" for n in stem)
        code.add(f"x = fused_stem(x, {conv}, {norm}, {pool})", _shape(stem[-1]))
    else:
        for n in stem:
            code.add(f"x = {_call('self', n.name, n)}", _shape(n))
    rest = [(name, out) for name, _, out in stages if out.unit.kind is not UnitKind.STEM]
    for i, (name, out) in enumerate(rest):
        kind = out.unit.kind
        if kind is UnitKind.BLOCK_OUTPUT:
            if i + 1 == len(rest):
                return None
            reader = members[rest[i + 1][1].unit][0]  # a transition's batch norm, or norm5
            if reader.op is not OpKind.SHARED_BATCHNORM:
                return None
            code.add(f"maps, stats = fused_block(self.{_ident(name)}, x, self.{_dotted(reader.path[1:])})")
        elif kind is UnitKind.TRANSITION:
            code.add(f"x = self.{_ident(name)}.fused(maps, stats)", _shape(out))
        elif kind is UnitKind.HEAD:
            if len(rest) - i != 2 or out.op is not OpKind.SHARED_BATCHNORM or rest[i + 1][1].op is not OpKind.RELU:
                return None
            code.add(f"return fused_head(self.{_ident(name)}, maps, stats)", _shape(rest[-1][1]))
            return code
        else:
            return None
    return None


def _call(via: str, name: str, op: Node | None, x: str = "x") -> str:
    """The call of module `name` of `via` on `x`; the module of an op is handed what the op table says (another
    module's scale and shift, reached from `via`, its parent)."""
    hands = OPS[op.op].torch.hands(op.attrs) if op is not None else ()
    extra = "".join(f", {key}={via}.{_dotted(path)}.{method}()" for key, path, method in hands)
    return f"{via}.{_ident(name)}({x}{extra})"


def _output(graph: nx.DiGraph, members: list[Node]) -> Node:
    """A unit's one output; a unit that others read in two places does not flow stage to stage."""
    try:
        return unit_output(graph, members)
    except IRError:
        raise Unstructured(members[0].scope) from None


def _as_chain(graph: nx.DiGraph, members: list[Node], entry: str) -> list[Node]:
    """A stem or head: a chain, or the network is not laid out by stages."""
    try:
        return _chain(graph, members, entry)
    except NotAChain:
        raise Unstructured(members[0].scope) from None


def _feature(init: Lines, graph: nx.DiGraph, n: Node, previous: Node) -> Node:
    """The modules of one op in `features`, a shape comment where the shape changes; returns the op."""
    if not _is_module(n) or len(n.path) != 2 or n.path[0] != "features":
        raise Unstructured(n.scope)
    changed = previous is None or n.shape != previous.shape
    for i, m in enumerate(_literal_modules(graph, n)):  # a folded conv's batch norm is held beside it
        init.add(f"features.{_ident(m.name)} = {_constructor(m)}", _shape(n) if changed and i == 0 else "")
    return n


def _entry(graph: nx.DiGraph, members: list[Node], previous: Node) -> Node:
    """The one tensor a stage reads: the previous stage's output, as `features` (a Sequential) passes it."""
    srcs = input_nodes(graph, members[0])
    if len(srcs) != 1 or srcs[0].scope != previous.scope:
        raise Unstructured(members[0].scope)
    return srcs[0]


def _parent(chain: list[Node], depth: int) -> tuple[str, ...]:
    """The module path all of a unit's nodes share, `depth` long."""
    parents = {n.path[:-1] for n in chain}
    if len(parents) != 1 or len(next(iter(parents))) != depth or next(iter(parents))[0] != "features":
        raise Unstructured(chain[0].scope)
    return next(iter(parents))


def _block(graph, layers: list, output: list[Node], previous: Node, classes: Classes, init: Lines):
    """A dense block: its layers (unit, members) and its output concat; returns the output node and block class.

    The block hands each layer the list of its features so far (`DenseBlock`), or, where every concat is a
    buffer view and every layer matches its pattern, a view of one buffer (`BufferedDenseBlock`).
    """
    (cat,) = output
    if cat.op not in (OpKind.CONCAT, OpKind.BUFFER_CONCAT):
        raise Unstructured(cat.scope)
    path = _parent(output, 2)
    entry = previous  # the block's input: what flows through `features` into it
    features, matched = [entry.scope], []
    for _, members in layers:
        if _parent(members, 3)[:2] != path:
            raise Unstructured(members[0].scope)
        matched.append(_layer_chain(graph, members, features, entry))
        features.append(_output(graph, members).scope)
    got = inputs(graph, cat.scope)
    if any(scope not in features for scope in got):
        raise Unstructured(cat.scope)
    concats = [m[0] for _, m in layers if m[0].op in (OpKind.CONCAT, OpKind.BUFFER_CONCAT)] + [cat]
    buffered = all(n.op is OpKind.BUFFER_CONCAT for n in concats) and None not in matched and got == features
    init.lines.append("")  # the block's comment, filled in below
    init.lines.append("")
    line = len(init.lines) - 2
    env = {scope: f"features[{i}]" for i, scope in enumerate(features)}
    for (unit, members), chain in zip(layers, matched, strict=True):
        if chain is None:
            call = _graph_unit(graph, unit, members, env, classes, "features: list[Tensor]")
        else:
            cin = (members[0] if chain[0] is not members[0] else entry).shape[0]
            call = classes.instance(graph, UnitKind.DENSE_LAYER, chain, cin, buffered)
        init.add(f"block.{_ident(members[0].path[2])} = {call}")
    if got == features:
        block_class = "BufferedDenseBlock" if buffered else "DenseBlock"
        module = f"BufferedDenseBlock(channels={_int(cat.attrs.channels)})" if buffered else "DenseBlock()"
    else:  # the block returns its features in another order, or some of them
        order = ", ".join(f"features[{features.index(scope)}]" for scope in got)
        forward = Lines(8)
        forward.add("features = [x]")
        forward.add("for layer in self.values():")
        forward.add("    features.append(layer(features))")
        forward.add(f"return torch.cat([{order}], 1)", _shape(cat))
        cls = GraphClass(classes.name("DenseBlockGraph"), UnitKind.BLOCK_OUTPUT, [], forward, "x: Tensor")
        cls.container = "nn.ModuleDict"
        classes.all.append(cls)
        block_class = cls.name
        module = f"{cls.name}()"
    outs = [node(graph, scope) for scope in features[1:]]
    growths = " and ".join(map(str, sorted({n.shape[0] for n in outs})))
    count = f"{len(outs)} layer{'s' if len(outs) != 1 else ''}"
    init.lines[line] = f"# {path[1]}: {count} of growth {growths}, {entry.shape[0]} -> {cat.shape[0]} channels"
    init.lines[line + 1] = f"features.{_ident(path[1])} = block = {module}  # {_shape(cat)}"
    return cat, block_class


def _layer_chain(graph: nx.DiGraph, members: list[Node], features: list[str], entry: Node) -> list[Node] | None:
    """The chain of a dense layer that reads the concatenation of its block's features in order, or None."""
    first = members[0]
    try:
        if first.op in (OpKind.CONCAT, OpKind.BUFFER_CONCAT):
            if inputs(graph, first.scope) != features:
                return None
            chain = _chain(graph, members[1:], first.scope)
        else:
            if features != [entry.scope]:
                return None
            chain = _chain(graph, members, entry.scope)
        _core(chain)
    except NotAChain:
        return None
    return chain if _output(graph, members).scope == chain[-1].scope else None


def _graph_unit(graph, unit: Unit, members: list[Node], env: dict[str, str], classes: Classes, argument: str) -> str:
    """A class of its own for one unit, computing its nodes by following their edges; returns its constructor call."""
    owner = len(members[0].path) - 1  # modules below the unit's own module
    forward = Lines(8)
    env = dict(env)
    _graph_lines(graph, members, env, owner, forward)
    forward.add(f"return {env[_output(graph, members).scope]}")
    base = {UnitKind.DENSE_LAYER: "DenseLayerGraph", UnitKind.TRANSITION: "TransitionGraph"}[unit.kind]
    cls = GraphClass(classes.name(base), unit.kind, _graph_modules(graph, members, owner), forward, argument)
    classes.all.append(cls)
    return f"{cls.name}()"


def _flat(graph: nx.DiGraph) -> dict:
    """The whole network as graph-following code: `features` and the head hold every module at its path."""
    nodes = ordered(graph)
    source = nodes[0]
    feature_nodes = [n for n in nodes if n.path[0] == "features"]
    head_nodes = [n for n in nodes[1:] if n.path[0] != "features"]
    init = Lines(8)
    init.add("# the network as its graph wires it: modules at torchvision's paths, computed in run_features")
    init.add("self.features = features = nn.Module()")
    made: set[tuple[str, ...]] = {("features",)}
    for n in nodes[1:]:
        if not _is_module(n):
            continue
        for m in _literal_modules(graph, n):
            path = (*n.path[:-1], m.name)
            for depth in range(1, len(path)):
                if path[:depth] not in made:
                    made.add(path[:depth])
                    init.add(f"{_attr(path[:depth])} = nn.Module()")
            init.add(f"{_attr(path)} = {_constructor(m)}")
    # one method computes `features` and keeps each block's output: forward_features and forward_blocks read it
    graph_code = Lines(8)
    if settings(graph).memory_format == "channels_last":
        graph_code.add("x = x.contiguous(memory_format=torch.channels_last)")
    graph_code.add("f = self.features")
    env = {source.scope: "x"}
    _graph_lines(graph, feature_nodes, env, 1, graph_code, via="f")
    last = feature_nodes[-1] if feature_nodes else source
    outputs = [env[n.scope] for n in feature_nodes if n.unit.kind is UnitKind.BLOCK_OUTPUT]
    graph_code.add(f"return [{', '.join([env[last.scope], *outputs])}]")
    features = Lines(8)
    features.add("return self.run_features(x)[0]")
    blocks = Lines(8)
    blocks.add("return self.run_features(x)[1:]")
    head = Lines(8)
    env_head = {last.scope: "x"}
    _graph_lines(graph, head_nodes, env_head, 0, head)
    head.add(f"return {env_head[nodes[-1].scope]}")
    return {
        "init": init,
        "head": head,
        "blocks": blocks,
        "features": features,
        "classes": Classes(),
        "graph_code": graph_code.text(),
        "input_shape": _shape(source),
        "features_shape": _shape(last),
        "dropout": any(n.op is OpKind.DROPOUT for n in nodes),
        "plain_block": False,
        "buffered": False,
    }


def _attr(path: tuple[str, ...]) -> str:
    """`self.<path>` or, below `features`, `features.<rest>` (the local name __init__ gives it)."""
    if path[0] == "features":
        return "features." + _dotted(path[1:]) if len(path) > 1 else "features"
    return f"self.{_dotted(path)}"


def _network_name(name) -> str:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or not name.isascii():
        raise EmitError(f"torch target: network name {name!r} is not a Python identifier")
    if name in _TAKEN or name.startswith("_") or hasattr(builtins, name):
        raise EmitError(f"torch target: network name '{name}' would shadow a name the generated module uses")
    return name


def _tuple(names: list[str]) -> str:
    """An isinstance() argument: one class name, or a tuple of them."""
    return f"({', '.join(names)})" if len(names) > 1 else "".join(names)


def _shape(n: Node) -> str:
    return "(" + ", ".join(["B", *map(_int, n.shape)]) + ")"

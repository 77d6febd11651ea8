"""Lower stage: Spec -> IR, laid out exactly as torchvision's DenseNet.

torchvision's module tree is `features` (conv0, norm0, relu0, pool0, denseblockN
of denselayerM with norm1/relu1/conv1/norm2/relu2/conv2, transitionN with
norm/relu/conv/pool, norm5) and `classifier`. The module paths below follow it, so
that parameter names come out identical. Ops that torchvision calls functionally
(the head's ReLU and pool, dropout, the concatenations) get paths beside them.
This is the one place that decides module paths and units; everything downstream
reads them from the nodes.
"""

from __future__ import annotations

from fractions import Fraction

import networkx as nx

from dnc.frontend.spec import ResolvedBlock, Spec
from dnc.ir.graph import (
    Attrs,
    BatchNormAttrs,
    Builder,
    ConvAttrs,
    DropoutAttrs,
    InputAttrs,
    LinearAttrs,
    NoAttrs,
    OpKind,
    PoolAttrs,
    Unit,
    UnitKind,
)

FEATURES = "features"


def lower(spec: Spec, source: str = "") -> nx.DiGraph:
    """Build the IR of `spec`. `source` names the spec file in generated headers."""
    b = Builder(name=spec.name, source=source, memory_efficient=spec.memory_efficient)
    height, width = spec.input.size
    attrs = InputAttrs(spec.input.channels, height, width)
    x = b.add(("input",), OpKind.INPUT, attrs, Unit(UnitKind.INPUT), [], spec.locate("input"))
    x = _add(b, (FEATURES,), stem_chain(spec), Unit(UnitKind.STEM), x, spec.locate("stem"))
    channels = spec.stem.width
    blocks = spec.resolved_blocks()
    every_conv = spec.dropout_at == "every_conv"
    for i, block in enumerate(blocks, start=1):
        origin = spec.locate("blocks", i - 1)
        at = (FEATURES, f"denseblock{i}")
        features = [x]  # the block input, then each layer's new features, in order
        for j in range(1, block.layers + 1):
            unit, layer = Unit(UnitKind.DENSE_LAYER, i, j), (*at, f"denselayer{j}")
            h = features[0] if j == 1 else b.add((*layer, "cat"), OpKind.CONCAT, NoAttrs(), unit, features, origin)
            features.append(_add(b, layer, layer_chain(block, every_conv), unit, h, origin))
        x = b.add((*at, "cat"), OpKind.CONCAT, NoAttrs(), Unit(UnitKind.BLOCK_OUTPUT, i), features, origin)
        channels += block.layers * block.growth_rate
        if i < len(blocks):
            channels = transition_channels(channels, block.compression)
            chain = transition_chain(block, channels, every_conv)
            x = _add(b, (FEATURES, f"transition{i}"), chain, Unit(UnitKind.TRANSITION, i), x, origin)
    _add(b, (), head_chain(spec), Unit(UnitKind.HEAD), x, spec.locate("head"))
    return b.graph


def transition_channels(channels: int, compression: float) -> int:
    """floor(theta * m), computed exactly: theta is read as the decimal the user wrote."""
    return int(Fraction(str(compression)) * channels)


# -- the chains each unit is made of: lowering adds them to the graph; the limits evaluate them in closed form --

Step = tuple[tuple[str, ...], OpKind, Attrs]  # the op's path below its unit's module, its kind, its attributes


def _add(b: Builder, at: tuple[str, ...], chain: list[Step], unit: Unit, x: str, origin) -> str:
    """Append a chain of ops, each reading the one before; return the last."""
    for path, op, attrs in chain:
        x = b.add((*at, *path), op, attrs, unit, [x], origin)
    return x


def _act(suffix: str, activation: str, at: tuple[str, ...] = ()) -> Step:
    """The activation after a batch norm: `relu<suffix>` as torchvision names it, `act<suffix>` (timm's) otherwise."""
    return ((*at, f"{'relu' if activation == 'relu' else 'act'}{suffix}"), OpKind(activation), NoAttrs())


def _conv_unit(suffix: str, conv: ConvAttrs, activation: str) -> list[Step]:
    """BN -> activation -> conv, torchvision's pre-activation order."""
    return [
        ((f"norm{suffix}",), OpKind.BATCHNORM, BatchNormAttrs()),
        _act(suffix, activation),
        ((f"conv{suffix}",), OpKind.CONV, conv),
    ]


def _dropout(name: str, rate: float) -> list[Step]:
    return [((name,), OpKind.DROPOUT, DropoutAttrs(rate))] if rate else []


def stem_chain(spec: Spec) -> list[Step]:
    """The stem, below `features`."""
    stem = spec.stem
    if stem.kind == "cifar":
        return [(("conv0",), OpKind.CONV, ConvAttrs(stem.width, kernel=3, stride=1, padding=1))]
    if stem.kind == "imagenet":
        convs = [(stem.width, 7, 2, 3)]
    else:  # deep: three 3x3 convs, the first with stride 2 (timm's stem_type="deep")
        mid = stem.mid_width or stem.width
        convs = [(mid, 3, 2, 1), (mid, 3, 1, 1), (stem.width, 3, 1, 1)]
    chain: list[Step] = []
    for i, (out, kernel, stride, padding) in enumerate(convs):
        chain.append(((f"conv{i}",), OpKind.CONV, ConvAttrs(out, kernel, stride, padding)))
        chain.append(((f"norm{i}",), OpKind.BATCHNORM, BatchNormAttrs()))
        chain.append(_act(str(i), spec.activation))
    return [*chain, (("pool0",), OpKind.MAXPOOL, PoolAttrs(3, 2, 1))]


def layer_chain(block: ResolvedBlock, every_conv: bool) -> list[Step]:
    """A dense layer after the concatenation of its block's features, below the layer's module."""
    k = block.growth_rate
    act = block.activation
    if block.bn_size is None:  # plain DenseNet layer: BN-ReLU-Conv(3x3)
        return _conv_unit("1", ConvAttrs(k, 3, 1, 1), act) + _dropout("drop1", block.drop_rate)
    # DenseNet-B layer: BN-ReLU-Conv(1x1, bn_size*k)-BN-ReLU-Conv(3x3, k)
    chain = _conv_unit("1", ConvAttrs(block.bn_size * k, 1), act)
    if every_conv:
        chain += _dropout("drop1", block.drop_rate)
    return chain + _conv_unit("2", ConvAttrs(k, 3, 1, 1), act) + _dropout("drop2", block.drop_rate)


def transition_chain(block: ResolvedBlock, out: int, every_conv: bool) -> list[Step]:
    """The transition after `block`, compressing to `out` channels, below the transition's module."""
    chain = [
        (("norm",), OpKind.BATCHNORM, BatchNormAttrs()),
        _act("", block.activation),
        (("conv",), OpKind.CONV, ConvAttrs(out, 1)),
    ]
    if every_conv:
        chain += _dropout("drop", block.drop_rate)
    return [*chain, (("pool",), OpKind.AVGPOOL, PoolAttrs(2, 2))]


def head_chain(spec: Spec) -> list[Step]:
    """The head, from the network's root (its last batch norm and ReLU are in `features`)."""
    return [
        ((FEATURES, "norm5"), OpKind.BATCHNORM, BatchNormAttrs()),
        _act("5", spec.activation, (FEATURES,)),
        (("avgpool",), OpKind.GLOBAL_AVGPOOL, NoAttrs()),
        (("flatten",), OpKind.FLATTEN, NoAttrs()),
        (("classifier",), OpKind.LINEAR, LinearAttrs(spec.head.classes)),
    ]

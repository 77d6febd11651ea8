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
    x, channels = _stem(b, spec, x), spec.stem.width
    blocks = spec.resolved_blocks()
    every_conv = spec.dropout_at == "every_conv"
    for i, block in enumerate(blocks, start=1):
        origin = spec.locate("blocks", i - 1)
        x = _dense_block(b, i, block, x, every_conv, origin)
        channels += block.layers * block.growth_rate
        if i < len(blocks):
            channels = transition_channels(channels, block.compression)
            x = _transition(b, i, block, x, channels, every_conv, origin)
    _head(b, spec, x)
    return b.graph


def transition_channels(channels: int, compression: float) -> int:
    """floor(theta * m), computed exactly: theta is read as the decimal the user wrote."""
    return int(Fraction(str(compression)) * channels)


def _conv_unit(b: Builder, at: tuple[str, ...], suffix: str, unit: Unit, x: str, conv: ConvAttrs, origin) -> str:
    """BN -> ReLU -> conv, torchvision's pre-activation order."""
    x = b.add((*at, f"norm{suffix}"), OpKind.BATCHNORM, BatchNormAttrs(), unit, [x], origin)
    x = b.add((*at, f"relu{suffix}"), OpKind.RELU, NoAttrs(), unit, [x], origin)
    return b.add((*at, f"conv{suffix}"), OpKind.CONV, conv, unit, [x], origin)


def _dropout(b: Builder, path: tuple[str, ...], unit: Unit, x: str, rate: float, origin) -> str:
    if rate == 0:
        return x
    return b.add(path, OpKind.DROPOUT, DropoutAttrs(rate), unit, [x], origin)


def _stem(b: Builder, spec: Spec, x: str) -> str:
    stem, origin, unit = spec.stem, spec.locate("stem"), Unit(UnitKind.STEM)

    def add(name: str, op: OpKind, attrs, x: str) -> str:
        return b.add((FEATURES, name), op, attrs, unit, [x], origin)

    if stem.kind == "cifar":
        return add("conv0", OpKind.CONV, ConvAttrs(stem.width, kernel=3, stride=1, padding=1), x)
    if stem.kind == "imagenet":
        x = add("conv0", OpKind.CONV, ConvAttrs(stem.width, 7, 2, 3), x)
        x = add("norm0", OpKind.BATCHNORM, BatchNormAttrs(), x)
        x = add("relu0", OpKind.RELU, NoAttrs(), x)
    else:  # deep: three 3x3 convs, the first with stride 2 (timm's stem_type="deep")
        mid = stem.mid_width or stem.width
        for i, (out, stride) in enumerate([(mid, 2), (mid, 1), (stem.width, 1)]):
            x = add(f"conv{i}", OpKind.CONV, ConvAttrs(out, 3, stride, 1), x)
            x = add(f"norm{i}", OpKind.BATCHNORM, BatchNormAttrs(), x)
            x = add(f"relu{i}", OpKind.RELU, NoAttrs(), x)
    return add("pool0", OpKind.MAXPOOL, PoolAttrs(3, 2, 1), x)


def _dense_block(b: Builder, i: int, block: ResolvedBlock, x: str, every_conv: bool, origin) -> str:
    at = (FEATURES, f"denseblock{i}")
    features = [x]  # the block input, then each layer's new features, in order
    k = block.growth_rate
    for j in range(1, block.layers + 1):
        unit, layer = Unit(UnitKind.DENSE_LAYER, i, j), (*at, f"denselayer{j}")
        h = features[0] if j == 1 else b.add((*layer, "cat"), OpKind.CONCAT, NoAttrs(), unit, features, origin)
        if block.bn_size is None:  # plain DenseNet layer: BN-ReLU-Conv(3x3)
            h = _conv_unit(b, layer, "1", unit, h, ConvAttrs(k, 3, 1, 1), origin)
            h = _dropout(b, (*layer, "drop1"), unit, h, block.drop_rate, origin)
        else:  # DenseNet-B layer: BN-ReLU-Conv(1x1, bn_size*k)-BN-ReLU-Conv(3x3, k)
            h = _conv_unit(b, layer, "1", unit, h, ConvAttrs(block.bn_size * k, 1), origin)
            if every_conv:
                h = _dropout(b, (*layer, "drop1"), unit, h, block.drop_rate, origin)
            h = _conv_unit(b, layer, "2", unit, h, ConvAttrs(k, 3, 1, 1), origin)
            h = _dropout(b, (*layer, "drop2"), unit, h, block.drop_rate, origin)
        features.append(h)
    unit = Unit(UnitKind.BLOCK_OUTPUT, i)
    return b.add((*at, "cat"), OpKind.CONCAT, NoAttrs(), unit, features, origin)


def _transition(b: Builder, i: int, block: ResolvedBlock, x: str, out: int, every_conv: bool, origin) -> str:
    unit, at = Unit(UnitKind.TRANSITION, i), (FEATURES, f"transition{i}")
    x = b.add((*at, "norm"), OpKind.BATCHNORM, BatchNormAttrs(), unit, [x], origin)
    x = b.add((*at, "relu"), OpKind.RELU, NoAttrs(), unit, [x], origin)
    x = b.add((*at, "conv"), OpKind.CONV, ConvAttrs(out, 1), unit, [x], origin)
    if every_conv:
        x = _dropout(b, (*at, "drop"), unit, x, block.drop_rate, origin)
    return b.add((*at, "pool"), OpKind.AVGPOOL, PoolAttrs(2, 2), unit, [x], origin)


def _head(b: Builder, spec: Spec, x: str) -> str:
    origin, unit = spec.locate("head"), Unit(UnitKind.HEAD)
    x = b.add((FEATURES, "norm5"), OpKind.BATCHNORM, BatchNormAttrs(), unit, [x], origin)
    x = b.add((FEATURES, "relu5"), OpKind.RELU, NoAttrs(), unit, [x], origin)
    x = b.add(("avgpool",), OpKind.GLOBAL_AVGPOOL, NoAttrs(), unit, [x], origin)
    x = b.add(("flatten",), OpKind.FLATTEN, NoAttrs(), unit, [x], origin)
    return b.add(("classifier",), OpKind.LINEAR, LinearAttrs(spec.head.classes), unit, [x], origin)

"""Lower stage: Spec -> IR, laid out exactly as torchvision's DenseNet.

torchvision's module tree is `features` (conv0, norm0, relu0, pool0, denseblockN
of denselayerM with norm1/relu1/conv1/norm2/relu2/conv2, transitionN with
norm/relu/conv/pool, norm5) and `classifier`. The scopes below follow it, so that
parameter names come out identical. Ops that torchvision calls functionally
(the head's ReLU and pool, dropout, the concatenations) get scopes beside them.
"""

from __future__ import annotations

from fractions import Fraction

import networkx as nx

from dnc.ir import (
    BatchNormAttrs,
    Builder,
    ConvAttrs,
    DropoutAttrs,
    InputAttrs,
    LinearAttrs,
    NoAttrs,
    OpKind,
    PoolAttrs,
)
from dnc.spec import ResolvedBlock, Spec


def lower(spec: Spec, source: str = "") -> nx.DiGraph:
    """Build the IR of `spec`. `source` names the spec file in generated headers."""
    b = Builder(name=spec.name, source=source, memory_efficient=spec.memory_efficient)
    height, width = spec.input.size
    x = b.add("input", OpKind.INPUT, InputAttrs(spec.input.channels, height, width), "input", [], spec.locate("input"))
    x, channels = _stem(b, spec, x)
    blocks = spec.resolved_blocks()
    every_conv = spec.dropout_at == "every_conv"
    for i, block in enumerate(blocks, start=1):
        origin = spec.locate("blocks", i - 1)
        x, channels = _dense_block(b, i, block, x, channels, every_conv, origin)
        if i < len(blocks):
            x, channels = _transition(b, i, block, x, channels, every_conv, origin)
    _head(b, spec, x)
    return b.graph


def transition_channels(channels: int, compression: float) -> int:
    """floor(theta * m), computed exactly: theta is read as the decimal the user wrote."""
    return int(Fraction(str(compression)) * channels)


def _conv_unit(b: Builder, scope: str, suffix: str, stage: str, x: str, conv: ConvAttrs, origin) -> str:
    """BN -> ReLU -> conv, torchvision's pre-activation order."""
    x = b.add(f"{scope}.norm{suffix}", OpKind.BATCHNORM, BatchNormAttrs(), stage, [x], origin)
    x = b.add(f"{scope}.relu{suffix}", OpKind.RELU, NoAttrs(), stage, [x], origin)
    return b.add(f"{scope}.conv{suffix}", OpKind.CONV, conv, stage, [x], origin)


def _dropout(b: Builder, scope: str, stage: str, x: str, rate: float, origin) -> str:
    if rate == 0:
        return x
    return b.add(scope, OpKind.DROPOUT, DropoutAttrs(rate), stage, [x], origin)


def _stem(b: Builder, spec: Spec, x: str) -> tuple[str, int]:
    stem, origin = spec.stem, spec.locate("stem")
    add = b.add
    if stem.kind == "cifar":
        conv = ConvAttrs(stem.width, kernel=3, stride=1, padding=1)
        return add("features.conv0", OpKind.CONV, conv, "stem", [x], origin), stem.width
    if stem.kind == "imagenet":
        x = add("features.conv0", OpKind.CONV, ConvAttrs(stem.width, 7, 2, 3), "stem", [x], origin)
        x = add("features.norm0", OpKind.BATCHNORM, BatchNormAttrs(), "stem", [x], origin)
        x = add("features.relu0", OpKind.RELU, NoAttrs(), "stem", [x], origin)
    else:  # deep: three 3x3 convs, the first with stride 2 (timm's stem_type="deep")
        mid = stem.mid_width or stem.width
        for i, (out, stride) in enumerate([(mid, 2), (mid, 1), (stem.width, 1)]):
            x = add(f"features.conv{i}", OpKind.CONV, ConvAttrs(out, 3, stride, 1), "stem", [x], origin)
            x = add(f"features.norm{i}", OpKind.BATCHNORM, BatchNormAttrs(), "stem", [x], origin)
            x = add(f"features.relu{i}", OpKind.RELU, NoAttrs(), "stem", [x], origin)
    x = add("features.pool0", OpKind.MAXPOOL, PoolAttrs(3, 2, 1), "stem", [x], origin)
    return x, stem.width


def _dense_block(
    b: Builder, i: int, block: ResolvedBlock, x: str, channels: int, every_conv: bool, origin
) -> tuple[str, int]:
    stage = f"denseblock{i}"
    features = [x]  # the block input, then each layer's new features, in order
    k = block.growth_rate
    for j in range(1, block.layers + 1):
        scope = f"features.{stage}.denselayer{j}"
        h = features[0] if j == 1 else b.add(f"{scope}.cat", OpKind.CONCAT, NoAttrs(), stage, features, origin)
        if block.bn_size is None:  # plain DenseNet layer: BN-ReLU-Conv(3x3)
            h = _conv_unit(b, scope, "1", stage, h, ConvAttrs(k, 3, 1, 1), origin)
            h = _dropout(b, f"{scope}.drop1", stage, h, block.drop_rate, origin)
        else:  # DenseNet-B layer: BN-ReLU-Conv(1x1, bn_size*k)-BN-ReLU-Conv(3x3, k)
            h = _conv_unit(b, scope, "1", stage, h, ConvAttrs(block.bn_size * k, 1), origin)
            if every_conv:
                h = _dropout(b, f"{scope}.drop1", stage, h, block.drop_rate, origin)
            h = _conv_unit(b, scope, "2", stage, h, ConvAttrs(k, 3, 1, 1), origin)
            h = _dropout(b, f"{scope}.drop2", stage, h, block.drop_rate, origin)
        features.append(h)
    out = b.add(f"features.{stage}.cat", OpKind.CONCAT, NoAttrs(), stage, features, origin)
    return out, channels + block.layers * k


def _transition(
    b: Builder, i: int, block: ResolvedBlock, x: str, channels: int, every_conv: bool, origin
) -> tuple[str, int]:
    stage, scope = f"transition{i}", f"features.transition{i}"
    out = transition_channels(channels, block.compression)
    x = b.add(f"{scope}.norm", OpKind.BATCHNORM, BatchNormAttrs(), stage, [x], origin)
    x = b.add(f"{scope}.relu", OpKind.RELU, NoAttrs(), stage, [x], origin)
    x = b.add(f"{scope}.conv", OpKind.CONV, ConvAttrs(out, 1), stage, [x], origin)
    if every_conv:
        x = _dropout(b, f"{scope}.drop", stage, x, block.drop_rate, origin)
    x = b.add(f"{scope}.pool", OpKind.AVGPOOL, PoolAttrs(2, 2), stage, [x], origin)
    return x, out


def _head(b: Builder, spec: Spec, x: str) -> str:
    origin = spec.locate("head")
    x = b.add("features.norm5", OpKind.BATCHNORM, BatchNormAttrs(), "head", [x], origin)
    x = b.add("features.relu5", OpKind.RELU, NoAttrs(), "head", [x], origin)
    x = b.add("avgpool", OpKind.GLOBAL_AVGPOOL, NoAttrs(), "head", [x], origin)
    x = b.add("flatten", OpKind.FLATTEN, NoAttrs(), "head", [x], origin)
    return b.add("classifier", OpKind.LINEAR, LinearAttrs(spec.head.classes), "head", [x], origin)

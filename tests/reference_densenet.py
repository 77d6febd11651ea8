"""A small eager DenseNet written from the paper, to check dnc where torchvision cannot.

Huang, Liu, van der Maaten, Weinberger, "Densely Connected Convolutional Networks"
(CVPR 2017). Layer l of a dense block sees the concatenation [x0, x1, ..., x(l-1)] of
the block input and every earlier layer's output and adds `growth` channels:

- plain layer (DenseNet):        BN-ReLU-Conv(3x3, growth)
- bottleneck layer (DenseNet-B): BN-ReLU-Conv(1x1, bn_size * growth), BN-ReLU-Conv(3x3, growth)
- transition (between blocks):   BN-ReLU-Conv(1x1, floor(theta * m)), 2x2 average pool, stride 2
- head:                          BN-ReLU, global average pool, linear
- stems: "imagenet" Conv(7x7/2)-BN-ReLU-MaxPool(3x3/2); "cifar" one Conv(3x3); "deep" (timm's
  stem_type="deep") three Conv(3x3)-BN-ReLU, the first with stride 2, then MaxPool(3x3/2)
- dropout: "conv3x3" after each dense layer's 3x3 conv (torchvision); "every_conv" after every
  conv but the first one, transitions included (the paper's Section 4.2)
- activation: ReLU in the paper; SiLU, GELU (exact) or Mish in its place (timm's act_layer), for the
  whole network or per block (that block's layers and the transition after it)

Plain Python arguments, no spec, no IR: this file imports nothing from dnc. Modules
carry torchvision's names (features.conv0, features.denseblock1.denselayer1.norm1,
features.transition1.conv, features.norm5, classifier), so state_dicts transfer by key.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class BlockArgs:
    """One dense block and the transition after it (`compression` is unused for the last block)."""

    layers: int
    growth: int
    bn_size: int | None = 4  # None: plain layers, no bottleneck
    drop: float = 0.0
    compression: float = 0.5
    activation: str = "relu"


ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish}


def compressed(channels: int, theta: float) -> int:
    """floor(theta * m), exact for the decimal theta is written as (0.7 * 90 is 62.99999999999999 in binary)."""
    return int(Fraction(str(theta)) * channels)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=False)


class Layer(nn.Module):
    def __init__(
        self, cin: int, growth: int, bn_size: int | None, drop: float, every_conv: bool, act: str = "relu"
    ) -> None:
        super().__init__()
        self.bottleneck = bn_size is not None
        width = bn_size * growth if self.bottleneck else cin
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = ACTIVATIONS[act]()
        self.conv1 = _conv(cin, width, 1) if self.bottleneck else _conv(cin, growth, 3)
        if self.bottleneck:
            self.norm2 = nn.BatchNorm2d(width)
            self.relu2 = ACTIVATIONS[act]()
            self.conv2 = _conv(width, growth, 3)
        self.drop_mid = drop if (every_conv and self.bottleneck) else 0.0
        self.drop_out = drop

    def forward(self, features: list[Tensor]) -> Tensor:
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        if not self.bottleneck:
            return F.dropout(x, self.drop_out, self.training) if self.drop_out else x
        if self.drop_mid:
            x = F.dropout(x, self.drop_mid, self.training)
        x = self.conv2(self.relu2(self.norm2(x)))
        return F.dropout(x, self.drop_out, self.training) if self.drop_out else x


class Block(nn.Module):
    def __init__(self, cin: int, args: BlockArgs, every_conv: bool) -> None:
        super().__init__()
        for i in range(args.layers):
            layer = Layer(cin + i * args.growth, args.growth, args.bn_size, args.drop, every_conv, args.activation)
            self.add_module(f"denselayer{i + 1}", layer)
        self.out_channels = cin + args.layers * args.growth

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.children():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Module):
    def __init__(self, cin: int, cout: int, drop: float, act: str = "relu") -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = ACTIVATIONS[act]()
        self.conv = _conv(cin, cout, 1)
        self.pool = nn.AvgPool2d(2, 2)
        self.drop = drop

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(self.relu(self.norm(x)))
        if self.drop:
            x = F.dropout(x, self.drop, self.training)
        return self.pool(x)


def _stem(kind: str, cin: int, width: int, mid_width: int | None, act: str) -> list[tuple[str, nn.Module]]:
    if kind == "cifar":
        return [("conv0", _conv(cin, width, 3))]
    if kind == "imagenet":
        convs = [(cin, width, 7, 2)]
    elif kind == "deep":
        mid = mid_width or width
        convs = [(cin, mid, 3, 2), (mid, mid, 3, 1), (mid, width, 3, 1)]
    else:
        raise ValueError(f"unknown stem {kind!r}")
    out = []
    for i, (a, b, kernel, stride) in enumerate(convs):
        out += [
            (f"conv{i}", _conv(a, b, kernel, stride)),
            (f"norm{i}", nn.BatchNorm2d(b)),
            (f"relu{i}", ACTIVATIONS[act]()),
        ]
    return [*out, ("pool0", nn.MaxPool2d(3, 2, padding=1))]


class DenseNet(nn.Module):
    """The network; `forward_blocks` gives each dense block's output, as dnc's generated model."""

    def __init__(
        self,
        blocks: list[BlockArgs],
        *,
        stem: str = "imagenet",
        width: int = 64,
        mid_width: int | None = None,
        classes: int = 1000,
        in_channels: int = 3,
        dropout_at: str = "conv3x3",
        activation: str = "relu",
    ) -> None:
        super().__init__()
        assert dropout_at in ("conv3x3", "every_conv"), dropout_at
        every_conv = dropout_at == "every_conv"
        modules = _stem(stem, in_channels, width, mid_width, activation)
        channels = width
        for i, args in enumerate(blocks, start=1):
            block = Block(channels, args, every_conv)
            modules.append((f"denseblock{i}", block))
            channels = block.out_channels
            if i < len(blocks):
                out = compressed(channels, args.compression)
                drop = args.drop if every_conv else 0.0
                modules.append((f"transition{i}", Transition(channels, out, drop, args.activation)))
                channels = out
        modules += [("norm5", nn.BatchNorm2d(channels)), ("relu5", ACTIVATIONS[activation]())]
        self.features = nn.Sequential(OrderedDict(modules))
        self.classifier = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))

    def forward_blocks(self, x: Tensor) -> list[Tensor]:
        out = []
        for name, module in self.features.named_children():
            x = module(x)
            if name.startswith("denseblock"):
                out.append(x)
        return out


def random_state(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """Seeded random values for every state_dict entry, BN running statistics too (identity BN hides bugs).

    Scales keep a deep network's activations finite: He-normal convs, BN gamma near 1,
    running variance in [0.5, 1.5].
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        leaf = key.rsplit(".", 1)[-1]
        shape = value.shape
        if leaf == "num_batches_tracked":
            out[key] = torch.randint(0, 1000, (), generator=gen)
        elif leaf == "running_var":
            out[key] = torch.rand(shape, generator=gen) + 0.5
        elif leaf == "running_mean":
            out[key] = torch.randn(shape, generator=gen) * 0.1
        elif leaf == "weight" and len(shape) == 1:
            out[key] = torch.rand(shape, generator=gen) * 0.4 + 0.8
        elif leaf == "bias":
            out[key] = torch.randn(shape, generator=gen) * 0.05
        else:
            fan_in = shape[1:].numel()
            out[key] = torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5
    return out

"""The reference: torchvision's DenseNet for a spec, where torchvision can express it.

Used by `dnc verify` and by the parity tests. Imports torch and torchvision.
"""

from __future__ import annotations

from torchvision.models.densenet import DenseNet

from dnc.errors import DncError
from dnc.frontend.spec import Spec


def torchvision_densenet(spec: Spec) -> DenseNet:
    """torchvision's DenseNet with the spec's configuration, or DncError naming what it lacks."""
    blocks = spec.resolved_blocks()
    lacks = []
    if spec.stem.kind != "imagenet":
        lacks.append(f"a '{spec.stem.kind}' stem")
    if len({(b.growth_rate, b.bn_size, b.drop_rate) for b in blocks}) != 1:
        lacks.append("per-block growth rate, bottleneck or drop rate")
    if blocks[0].bn_size is None:
        lacks.append("layers without a bottleneck")
    if any(b.compression != 0.5 for b in blocks[:-1]):
        lacks.append("compression other than 0.5")
    if spec.drop_rate and spec.dropout_at != "conv3x3":
        lacks.append("dropout after every conv")
    if spec.input.channels != 3:
        lacks.append("inputs of other than 3 channels")
    if lacks:
        raise DncError(f"torchvision's DenseNet cannot express {spec.name}: it lacks " + ", ".join(lacks))
    return DenseNet(
        growth_rate=spec.growth_rate,
        block_config=tuple(b.layers for b in blocks),
        num_init_features=spec.stem.width,
        bn_size=blocks[0].bn_size,
        drop_rate=spec.drop_rate,
        num_classes=spec.head.classes,
        memory_efficient=spec.memory_efficient,
    )

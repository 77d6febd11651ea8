"""Network limits, checked from the spec's numbers before anything is built.

A spec is a few numbers, and a few numbers can ask for 10^20 layers or a 2.6 TiB
weight tensor: lowering would hang, seeded weights would exhaust memory. So before
lowering, `check_limits` bounds every count a spec sets and estimates parameters
and MACs in closed form (sums over a block's layers are arithmetic series), which
costs the same for 10^20 layers as for 6.

The defaults fit every real DenseNet with room to spare: the zoo's largest have
64 layers in a block (DenseNet-264), 130 layers in all, 2,688 channels, 33M
parameters and 9.3 GMACs (DenseNet-BC-190). The layer limits also bound the
time to build: a dense block's concatenations grow with the square of its layers
(512 layers build in about a second). `--limit NAME=N` raises one for a run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from dnc.errors import DncError, LimitError, ShapeError
from dnc.frontend.spec import Spec

_VALUE = re.compile(r"[0-9][0-9_]*")


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what a spec may ask for; each is raisable with `--limit NAME=N`."""

    layers_per_block: int = 512  # dense layers in one block
    layers: int = 2_048  # dense layers in all blocks together
    channels: int = 65_536  # any channel count: widths, growth rate, bottleneck, a block's output, classes
    input_size: int = 8_192  # pixels on each side of the input
    params: int = 2_000_000_000  # trainable parameters (8 GB in float32)
    macs: int = 10**15  # multiply-accumulates of one forward pass of one image

    def raised(self, texts: Sequence[str]) -> Limits:
        """These limits with `NAME=N` settings (from `--limit`) applied."""
        known = [f.name for f in fields(self)]
        changes = {}
        for text in texts:
            name, sep, value = text.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in known:
                raise DncError(f"--limit '{text}': expected NAME=N with NAME one of {', '.join(known)}")
            if not _VALUE.fullmatch(value.strip()) or len(value) > 40:
                raise DncError(f"--limit '{text}': expected a whole number, e.g. {name}={getattr(self, name) * 2}")
            changes[name] = int(value.strip().replace("_", ""))
        return replace(self, **changes)


@dataclass(frozen=True)
class Estimate:
    """What a spec builds, from its numbers alone."""

    layers: int
    params: int
    macs: int


def check_limits(spec: Spec, limits: Limits = Limits()) -> Estimate:
    """Raise LimitError naming the field and the limit unless `spec` fits `limits`; return the estimate."""

    def over(path: tuple, value: int, name: str, what: str = "") -> None:
        field = ".".join(map(str, path))
        limit = getattr(limits, name)
        if value > limit:
            shown = what or f"{value:,}"
            message = f"{field}: {shown} is over the {name} limit of {limit:,} (raise it with --limit {name}=N)"
            raise LimitError(message, spec.locate(*path))

    for i, side in enumerate(spec.input.size):
        over(("input", "size", i), side, "input_size")
    over(("input", "channels"), spec.input.channels, "channels")
    over(("stem", "width"), spec.stem.width, "channels")
    if spec.stem.mid_width is not None:
        over(("stem", "mid_width"), spec.stem.mid_width, "channels")
    over(("head", "classes"), spec.head.classes, "channels")
    blocks = spec.resolved_blocks()
    for i, (block, given) in enumerate(zip(blocks, spec.blocks, strict=True)):
        over(("blocks", i, "layers"), block.layers, "layers_per_block")
        k_path = ("blocks", i, "growth_rate") if "growth_rate" in given.model_fields_set else ("growth_rate",)
        over(k_path, block.growth_rate, "channels")
        if block.bn_size is not None:
            bn_path = ("blocks", i, "bn_size") if "bn_size" in given.model_fields_set else ("bn_size",)
            width = block.bn_size * block.growth_rate
            over(bn_path, width, "channels", f"a bottleneck of {width:,} channels (bn_size x growth_rate)")
    total = sum(b.layers for b in blocks)
    over(("blocks",), total, "layers", f"{total:,} dense layers in all")
    estimate = estimate_network(spec, limits)
    over(("blocks",), estimate.params, "params", f"about {estimate.params:,} parameters")
    over(("blocks",), estimate.macs, "macs", f"about {estimate.macs:,} MACs per image")
    return estimate


def estimate_network(spec: Spec, limits: Limits = Limits()) -> Estimate:
    """Parameters and MACs in closed form (exact for the layers; spatial sizes floored as torch does).

    Channel counts are checked against `limits.channels` as they grow, block by block.
    """
    from dnc.ir.lower import transition_channels  # the one place the floor(theta * m) rule lives

    h, w = spec.input.size
    c_in, stem = spec.input.channels, spec.stem
    params = macs = 0
    if stem.kind == "cifar":
        params += 9 * c_in * stem.width
        macs += 9 * c_in * stem.width * h * w
    else:
        if stem.kind == "imagenet":
            h, w = _out(h, 7, 2, 3), _out(w, 7, 2, 3)
            conv = 49 * c_in * stem.width
            params, macs = conv + 2 * stem.width, conv * h * w
        else:
            mid = stem.mid_width or stem.width
            h, w = _out(h, 3, 2, 1), _out(w, 3, 2, 1)
            convs = 9 * (c_in * mid + mid * mid + mid * stem.width)
            params, macs = convs + 2 * (2 * mid + stem.width), convs * h * w
        h, w = _out(h, 3, 2, 1), _out(w, 3, 2, 1)
    channels = stem.width
    blocks = spec.resolved_blocks()
    for i, b in enumerate(blocks):
        n, k = b.layers, b.growth_rate
        inputs = n * channels + k * n * (n - 1) // 2  # channels into all layers: an arithmetic series
        if b.bn_size is None:
            params += 2 * inputs + 9 * k * inputs
            macs += 9 * k * inputs * h * w
        else:
            mid = b.bn_size * k
            params += 2 * inputs + mid * inputs + n * (2 * mid + 9 * mid * k)
            macs += (mid * inputs + n * 9 * mid * k) * h * w
        channels += n * k
        if channels > limits.channels:
            raise LimitError(
                f"blocks.{i}: the block ends with {channels:,} channels, over the channels limit of "
                f"{limits.channels:,} (raise it with --limit channels=N)",
                spec.locate("blocks", i),
            )
        if i < len(blocks) - 1:
            out = transition_channels(channels, b.compression)
            if out < 1:  # NOTE: inference rejects it too; here it is named before anything is built
                own = "compression" in spec.blocks[i].model_fields_set
                path = ("blocks", i, "compression") if own else ("compression",)
                raise ShapeError(
                    f"{'.'.join(map(str, path))}: the transition after block {i + 1} would keep "
                    f"floor({b.compression} x {channels}) = 0 channels",
                    spec.locate(*path),
                )
            params += 2 * channels + channels * out
            macs += channels * out * h * w
            channels, h, w = out, max(1, h // 2), max(1, w // 2)
    classes = spec.head.classes
    params += 2 * channels + channels * classes + classes
    macs += channels * classes
    return Estimate(sum(b.layers for b in blocks), params, macs)


def _out(size: int, kernel: int, stride: int, padding: int) -> int:
    return max(1, (size + 2 * padding - kernel) // stride + 1)

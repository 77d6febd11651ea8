"""Network limits, checked from the spec's numbers before anything is built.

A spec is a few numbers, and a few numbers can ask for 10^20 layers or a 2.6 TiB
weight tensor: lowering would hang, seeded weights would exhaust memory. So before
lowering, `check_limits` bounds every count a spec sets and estimates parameters,
MACs and the activations training keeps in closed form, which costs the same for
10^20 layers as for 6. The formulas are the op table's (`OPS[op].shape`, `.tensors`,
`.macs`, `.saves`) applied to the chains lowering builds (`lower.stem_chain`,
`layer_chain`, ...): a dense layer's costs are affine in the channels it reads, so a
block's sum is an arithmetic series taken from two evaluations (checked on a third).
`tests/test_limits.py` shows the estimates equal the sums over the built IR.

The defaults fit every real DenseNet with room to spare: the zoo's largest have
64 layers in a block (DenseNet-264), 130 layers in all, 2,688 channels, 33M
parameters and 9.3 GMACs (DenseNet-BC-190). The layer limits also bound the
time to build: a dense block's concatenations grow with the square of its layers
(512 layers build in about a second). `--limit NAME=N` raises one for a run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from dnc.errors import DncError, LimitError, ShapeError
from dnc.frontend.spec import Spec
from dnc.ir.lower import Step, head_chain, layer_chain, stem_chain, transition_chain, transition_channels
from dnc.ir.ops import OPS, RuleError, Shape, param_count

FLOAT_BYTES = 4  # the estimate is of a float32 step
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
    # bytes of activations a run of the network may hold (checked where a batch is known: `dnc verify`); a
    # 64-image densenet264 batch keeps 16.5 GiB in a float32 training step, 33 GiB in float64
    activations: int = 64 << 30

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
    activations: int  # bytes per sample a float32 training step keeps for backward (as dnc/reports/memory.py counts)


def check_activations(spec: Spec, batch: int, itemsize: int, limits: Limits = Limits(), what: str = "") -> None:
    """Raise LimitError unless `batch` samples of `spec` in a dtype of `itemsize` bytes fit the activations limit.

    The estimate is what a training step keeps for backward (more than an eval pass holds at once), before anything
    is allocated: `what` says what the run is (shown in the message)."""
    per_sample = estimate_network(spec, limits).activations * itemsize // FLOAT_BYTES
    need = batch * per_sample
    if need > limits.activations:
        run = f" ({what})" if what else ""
        raise LimitError(
            f"a batch of {batch:,} needs about {_bytes(need)} of activations{run}, over the activations limit of "
            f"{_bytes(limits.activations)} (a smaller --batch, or raise it with --limit activations=N)",
            spec.locate("input"),
        )


def _bytes(n: int) -> str:
    return f"{n / (1 << 30):,.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):,.1f} MiB"


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
    """Parameters, MACs and kept activations in closed form, from the op table and lowering's chains.

    Channel counts are checked against `limits.channels` as they grow, block by block. Where a feature map
    would shrink to nothing the estimate stops there (inference names the stage that does it).
    """
    blocks = spec.resolved_blocks()
    every_conv = spec.dropout_at == "every_conv"
    total = Cost()
    shape: Shape = (spec.input.channels, *spec.input.size)
    try:
        shape = total.add_chain(stem_chain(spec), shape, network_input=True)
        for i, b in enumerate(blocks):
            shape = total.add_block(layer_chain(b, every_conv), shape, b.layers)
            if shape[0] > limits.channels:
                raise LimitError(
                    f"blocks.{i}: the block ends with {shape[0]:,} channels, over the channels limit of "
                    f"{limits.channels:,} (raise it with --limit channels=N)",
                    spec.locate("blocks", i),
                )
            if i < len(blocks) - 1:
                out = transition_channels(shape[0], b.compression)
                if out < 1:  # NOTE: inference rejects it too; here it is named before anything is built
                    own = "compression" in spec.blocks[i].model_fields_set
                    path = ("blocks", i, "compression") if own else ("compression",)
                    raise ShapeError(
                        f"{'.'.join(map(str, path))}: the transition after block {i + 1} would keep "
                        f"floor({b.compression} x {shape[0]}) = 0 channels",
                        spec.locate(*path),
                    )
                shape = total.add_chain(transition_chain(b, out, every_conv), shape)
        total.add_chain(head_chain(spec), shape)
    except RuleError:
        pass  # a map shrinks to nothing: inference refuses the spec, naming the stage
    return Estimate(sum(b.layers for b in blocks), total.params, total.macs, total.activations)


@dataclass
class Cost:
    """Running totals of what the op table says the ops of some chains cost."""

    params: int = 0
    macs: int = 0
    activations: int = 0  # bytes per sample kept for backward, float32

    def add_chain(self, chain: list[Step], shape: Shape, network_input: bool = False) -> Shape:
        """Add a chain's costs for an input of `shape`; return its output shape. The network's input is not kept by
        training (it exists anyway), so a chain that reads it does not count it."""
        params, macs, kept, out = chain_cost(chain, shape, count_input=not network_input)
        self.params, self.macs, self.activations = self.params + params, self.macs + macs, self.activations + kept
        return out

    def add_block(self, chain: list[Step], shape: Shape, layers: int) -> Shape:
        """Add `layers` dense layers, layer j reading the block input and the j-1 layers before it."""
        first = chain_cost(chain, shape)
        growth = first[3][0]
        second = chain_cost(chain, (shape[0] + growth, *shape[1:]))
        third = chain_cost(chain, (shape[0] + 2 * growth, *shape[1:]))
        steps = [b - a for a, b in zip(first[:3], second[:3], strict=True)]
        assert steps == [c - b for b, c in zip(second[:3], third[:3], strict=True)], "a layer's cost is not affine"
        # layer j costs first + (j - 1) * step: the sum over a block is an arithmetic series
        series = layers * (layers - 1) // 2
        params, macs, kept = (layers * f + series * d for f, d in zip(first[:3], steps, strict=True))
        self.params, self.macs, self.activations = self.params + params, self.macs + macs, self.activations + kept
        return (shape[0] + layers * growth, *first[3][1:])


def chain_cost(chain: list[Step], shape: Shape, count_input: bool = True) -> tuple[int, int, int, Shape]:
    """Parameters, MACs and bytes kept for backward (per sample, float32) of a chain of ops, and its output shape.

    A tensor that several ops keep is counted once, as dnc/reports/memory.py counts it; the chain's input is
    counted when an op of the chain keeps it (each chain reads a tensor of its own).
    """
    params = macs = 0
    kept: dict[object, int] = {}
    shapes = {-1: shape}
    for i, (_, op, attrs) in enumerate(chain):
        rule = OPS[op]
        source = i - 1
        while source >= 0 and OPS[chain[source][1]].view:  # a view's memory is its input's
            source -= 1
        out = rule.shape(attrs, [shapes[i - 1]])
        shapes[i] = out
        params += param_count(rule.tensors(attrs, [shapes[i - 1]]))
        macs += rule.macs(attrs, [shapes[i - 1]], out)
        for saved in rule.saves(attrs):
            tensor = shapes[i - 1] if saved.of == "input" else out
            key = (i, saved.tag) if saved.itemsize else (source if saved.of == "input" else i)
            kept[key] = math.prod(tensor) * (saved.itemsize or FLOAT_BYTES)
    if not count_input:
        kept.pop(-1, None)
    return params, macs, sum(kept.values()), shapes[len(chain) - 1]

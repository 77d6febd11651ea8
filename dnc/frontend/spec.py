"""The spec: a strict, frozen pydantic model of one DenseNet.

Everything a user can say lives here; the loader (loader.py) turns YAML into the
plain data these models validate. Field validators are pydantic's own constraints;
the `model_validator`s check only rules that span fields, and raise `RuleError` so
the loader can point at the exact key.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, WrapValidator, model_validator

from dnc.errors import Location

SPEC_VERSION = 1

Path = tuple[str | int, ...]


class RuleError(ValueError):
    """A cross-field rule failed; `path` is the offending field, relative to the model."""

    def __init__(self, path: Path, message: str):
        super().__init__(message)
        self.path = path


class WrittenFloat(float):
    """A float that keeps the decimal it was written as (in the YAML, or a `--set` value).

    `str()` and f-strings give that decimal, so `Fraction(str(theta))` is the number as
    written: floor(theta * m) (`ir.lower.transition_channels`) takes 29 of 100 channels for
    0.29999999999999999999, which as a float is 0.3. Arithmetic, `repr()` and JSON are the float's.
    """

    _DECIMAL = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")

    def __new__(cls, text: str) -> WrittenFloat:
        self = super().__new__(cls, text)
        self.text = text
        return self

    @classmethod
    def parse(cls, text: str) -> WrittenFloat | None:
        """The float of a plain decimal, keeping its text; None for anything else (.inf, 1_000.5)."""
        return cls(text) if cls._DECIMAL.fullmatch(text) and len(text) <= 100 else None

    def __str__(self) -> str:
        return self.text

    def __reduce__(self) -> tuple:
        return (WrittenFloat, (self.text,))


def _keep_written(value: Any, handler: Any) -> float:
    out = handler(value)  # the float's own checks (type, bounds)
    return value if isinstance(value, WrittenFloat) else out


# A fraction in (0, 1] that floors a channel count: validated as a float, kept as written
Theta = Annotated[float, Field(gt=0, le=1), WrapValidator(_keep_written)]


def _exact_int(value: object) -> object:
    # NOTE: a Literal compares by ==, and True == 1.0 == 1: let only a real int through
    if isinstance(value, bool | float):
        raise ValueError(f"expected the integer {SPEC_VERSION}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# imagenet: 7x7/2 conv + BN + ReLU + 3x3/2 max pool (torchvision)
# cifar:    one 3x3 conv (the paper's CIFAR networks)
# deep:     three 3x3 convs (the first stride 2), each + BN + ReLU, + max pool (timm's "deep")
StemKind = Literal["imagenet", "cifar", "deep"]

# relu: max(x, 0) (torchvision); silu: x * sigmoid(x); gelu: x * Phi(x), exact (erf); mish: x * tanh(softplus(x))
# (timm's act_layer): the activation after every batch norm
Activation = Literal["relu", "silu", "gelu", "mish"]

# conv3x3:    after each dense layer's 3x3 conv only (torchvision)
# every_conv: after every conv, transitions included (the paper's Lua code)
DropoutAt = Literal["conv3x3", "every_conv"]


class Input(_Strict):
    channels: Annotated[int, Field(gt=0, description="Input channels (3 for RGB).")] = 3
    size: Annotated[
        list[Annotated[int, Field(gt=0)]],
        Field(min_length=2, max_length=2, description="Input [height, width] in pixels."),
    ]


class Stem(_Strict):
    kind: Annotated[StemKind, Field(description="Which stem.")] = "imagenet"
    width: Annotated[int, Field(gt=0, description="Channels out of the stem.")] = 64
    mid_width: Annotated[
        int | None,
        Field(gt=0, description="deep stem only: channels of its first two 3x3 convs (default: width)."),
    ] = None

    @model_validator(mode="after")
    def _mid_width_only_for_deep(self) -> Stem:
        if self.mid_width is not None and self.kind != "deep":
            raise RuleError(("mid_width",), f"mid_width applies only to the deep stem, not '{self.kind}'")
        return self


class Block(_Strict):
    """One dense block. Fields left out take the spec-wide value."""

    layers: Annotated[int, Field(gt=0, description="Dense layers in this block.")]
    # NOTE: a default of None that is not itself valid: leaving the key out means
    # "inherit", while an explicit null is an error (except for bn_size, where null
    # means "no bottleneck"). model_fields_set tells the two apart.
    growth_rate: Annotated[int, Field(gt=0, description="Override of growth_rate.")] = None
    bn_size: Annotated[int | None, Field(gt=0, description="Override of bn_size; null for no bottleneck.")] = None
    drop_rate: Annotated[float, Field(ge=0, lt=1, description="Override of drop_rate.")] = None
    compression: Annotated[Theta, Field(description="Override of compression for the transition after this block.")] = (
        None
    )
    activation: Annotated[
        Activation, Field(description="Override of activation, for this block's layers and the transition after it.")
    ] = None


class Head(_Strict):
    classes: Annotated[int, Field(gt=0, description="Outputs of the final linear layer.")] = 1000


class Spec(_Strict):
    """A DenseNet. The YAML keys are these fields; see the README for each."""

    version: Annotated[Literal[1], BeforeValidator(_exact_int), Field(description="Spec format version.")]
    name: Annotated[
        str,
        Field(
            pattern=r"^[a-z][a-z0-9_]*$",
            max_length=64,
            description="Network name: lower-case identifier; names generated files. Default: the file name.",
        ),
    ]
    description: Annotated[str, Field(max_length=500, description="One line for people; not emitted.")] = ""
    input: Input
    stem: Stem = Stem()
    growth_rate: Annotated[int, Field(gt=0, description="k: channels each dense layer adds.")]
    bn_size: Annotated[
        int | None,
        Field(gt=0, description="Bottleneck: 1x1 conv to bn_size*k before the 3x3; null for a plain DenseNet."),
    ] = 4
    compression: Annotated[
        Theta, Field(description="theta: a transition outputs floor(theta*m) of its m channels.")
    ] = 0.5
    drop_rate: Annotated[float, Field(ge=0, lt=1, description="Dropout probability (train mode only).")] = 0.0
    dropout_at: Annotated[DropoutAt, Field(description="Where dropout goes when drop_rate > 0.")] = "conv3x3"
    activation: Annotated[Activation, Field(description="The activation after every batch norm.")] = "relu"
    blocks: Annotated[list[Block], Field(min_length=1, description="Dense blocks, in order.")]
    head: Head = Head()
    memory_efficient: Annotated[
        bool, Field(description="Checkpoint each dense layer's bottleneck in training (as torchvision's option).")
    ] = False

    _locations: dict[Path, Location] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _last_block_has_no_transition(self) -> Spec:
        if self.blocks[-1].compression is not None:
            where = ("blocks", len(self.blocks) - 1, "compression")
            raise RuleError(where, "the last block has no transition after it, so it takes no compression")
        return self

    def locate(self, *path: str | int) -> Location | None:
        """The source position of a field, or of its nearest enclosing one."""
        for end in range(len(path), -1, -1):
            if path[:end] in self._locations:
                return self._locations[path[:end]]
        return None

    def resolved_blocks(self) -> list[ResolvedBlock]:
        """Each block with every per-block setting filled in from the spec-wide one."""
        out = []
        for b in self.blocks:
            given = b.model_fields_set
            out.append(
                ResolvedBlock(
                    layers=b.layers,
                    growth_rate=b.growth_rate if "growth_rate" in given else self.growth_rate,
                    bn_size=b.bn_size if "bn_size" in given else self.bn_size,
                    drop_rate=b.drop_rate if "drop_rate" in given else self.drop_rate,
                    compression=b.compression if "compression" in given else self.compression,
                    activation=b.activation if "activation" in given else self.activation,
                )
            )
        return out


class ResolvedBlock(_Strict):
    layers: int
    growth_rate: int
    bn_size: int | None
    drop_rate: float
    compression: Theta
    activation: Activation

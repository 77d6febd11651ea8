"""The op table: every fact about an op kind, decided once.

For each `OpKind`, `OPS` holds its attribute type, its arity, its shape rule, its
parameter tensors (torch's names, shapes, how seeded weights fill them, whether an
ONNX node reads them) and its MAC count. Inference, the state_dict layout, ONNX
initializers, seeded weights and summaries all read this table; none of them knows
an op's tensors or costs by itself. torchvision's naming (module paths from
lowering, tensor names here, the old-checkpoint key pattern below) lives nowhere else.

Shapes are per sample: (C, H, W) for feature maps, (F,) after flatten. MACs count the
multiply-accumulates of convolutions and linear layers (torchvision's "GFLOPS"
convention); BN, ReLU and pooling count none. No torch here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

Shape = tuple[int, ...]

# torchvision's old DenseNet checkpoints name `denselayer1.norm.1.weight` what it now names
# `denselayer1.norm1.weight`; torchvision renames keys with the same pattern when it loads them.
# The checkpoint reader and every generated file use this one pattern.
OLD_KEY_PATTERN = (
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


class OpKind(StrEnum):
    INPUT = "input"
    CONV = "conv"
    BATCHNORM = "batchnorm"
    RELU = "relu"
    MAXPOOL = "maxpool"
    AVGPOOL = "avgpool"
    CONCAT = "concat"
    DROPOUT = "dropout"
    GLOBAL_AVGPOOL = "global_avgpool"
    FLATTEN = "flatten"
    LINEAR = "linear"
    # Made by passes (dnc/passes.py), never by lowering:
    CONV_BN = "conv_bn"  # a convolution with the batch norm after it folded in (eval only)
    BN_RELU = "bn_relu"  # a batch norm and the ReLU after it, one step (eval only)
    # ReLU(batch norm) whose scale and shift a conv or linear downstream applies (its `pre`): what is
    # left here is the ReLU's per-channel threshold, a clamp (eval only)
    BN_CLAMP = "bn_clamp"
    BUFFER_CONCAT = "buffer_concat"  # a concat whose inputs are written once into a preallocated block buffer


@dataclass(frozen=True)
class InputAttrs:
    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class ConvAttrs:
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    bias: bool = False
    # pass fold_preact_bn: the BN_CLAMP node upstream whose batch norm scale and shift this conv applies
    # to its input first; its path relative to this node's parent module (("norm1",)); () for none
    pre: tuple[str, ...] = ()

    @property
    def pointwise(self) -> bool:
        """A 1x1 conv, stride 1, no padding: a per-pixel linear map of the channels."""
        return (self.kernel, self.stride, self.padding) == (1, 1, 0)


@dataclass(frozen=True)
class BatchNormAttrs:
    eps: float = 1e-5
    momentum: float = 0.1


@dataclass(frozen=True)
class PoolAttrs:
    kernel: int
    stride: int
    padding: int = 0


@dataclass(frozen=True)
class DropoutAttrs:
    rate: float


@dataclass(frozen=True)
class LinearAttrs:
    out_features: int
    bias: bool = True
    pre: tuple[str, ...] = ()  # as ConvAttrs.pre


@dataclass(frozen=True)
class NoAttrs:
    pass


@dataclass(frozen=True)
class ConvBNAttrs:
    """A conv and the batch norm it absorbed; the BN's tensors keep their keys under `norm`, a sibling module."""

    conv: ConvAttrs
    norm: str  # the batch norm's module name beside the conv (`norm2`)
    bn: BatchNormAttrs = BatchNormAttrs()

    @property
    def pre(self) -> tuple[str, ...]:
        return self.conv.pre


@dataclass(frozen=True)
class BufferAttrs:
    channels: int  # the block buffer's channels: the block output's; each concat is a view of its first ones


Attrs = (
    InputAttrs
    | ConvAttrs
    | BatchNormAttrs
    | PoolAttrs
    | DropoutAttrs
    | LinearAttrs
    | NoAttrs
    | ConvBNAttrs
    | BufferAttrs
)


class Init(StrEnum):
    """How seeded weights fill a tensor (see weights.seeded_state)."""

    HE_NORMAL = "he_normal"  # conv and linear weights
    GAMMA = "gamma"  # BN scale, near 1
    SMALL = "small"  # biases and BN shift, near 0
    RUNNING_MEAN = "running_mean"
    RUNNING_VAR = "running_var"  # positive
    COUNT = "count"  # BN's num_batches_tracked


@dataclass(frozen=True)
class Tensor:
    """One state_dict entry of an op: `<module path>.<name>`."""

    name: str  # torch's attribute name: weight, bias, running_mean, ...
    shape: Shape
    init: Init
    trainable: bool  # a parameter (counted in params) or a buffer
    onnx: bool = True  # an input of the ONNX node, in this order; False: no inference op reads it
    integer: bool = False  # int64 (a counter), else float32
    module: str = ""  # a sibling module that holds it (a folded BN's tensors keep their keys); "": the node's own

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def tensor_key(path: tuple[str, ...], t: Tensor) -> str:
    """The state_dict key of tensor `t` of the node at module `path`."""
    owner = (*path[:-1], t.module) if t.module else path
    return ".".join((*owner, t.name))


class RuleError(Exception):
    """A shape rule cannot apply; inference names the node, its stage and the network input."""


@dataclass(frozen=True)
class OpDef:
    attrs: type
    arity: int | None  # inputs the op takes; None: one or more, in port order
    shape: Callable[[Attrs, list[Shape]], Shape]
    tensors: Callable[[Attrs, list[Shape]], list[Tensor]] = lambda attrs, shapes: []
    macs: Callable[[Attrs, list[Shape], Shape], int] = lambda attrs, shapes, out: 0


def _feature_map(shapes: list[Shape]) -> Shape:
    (shape,) = shapes
    if len(shape) != 3:
        raise RuleError("needs a C x H x W feature map")
    return shape


def _window(size: int, kernel: int, stride: int, padding: int) -> int:
    out = (size + 2 * padding - kernel) // stride + 1
    if size + 2 * padding < kernel or out < 1:
        raise RuleError(f"would shrink {size} to nothing ({kernel}x{kernel} window, stride {stride})")
    return out


def _channels(n: int) -> int:
    if n < 1:
        raise RuleError(f"would have {n} channels")
    return n


def _windowed(a: ConvAttrs | PoolAttrs, shapes: list[Shape], channels: int) -> Shape:
    _, h, w = _feature_map(shapes)
    return (
        _channels(channels),
        _window(h, a.kernel, a.stride, a.padding),
        _window(w, a.kernel, a.stride, a.padding),
    )


def _input(a: InputAttrs, shapes: list[Shape]) -> Shape:
    return (_channels(a.channels), a.height, a.width)


def _conv_tensors(a: ConvAttrs, shapes: list[Shape]) -> list[Tensor]:
    weight = Tensor("weight", (a.out_channels, shapes[0][0], a.kernel, a.kernel), Init.HE_NORMAL, True)
    return [weight] + ([Tensor("bias", (a.out_channels,), Init.SMALL, True)] if a.bias else [])


def _conv_macs(a: ConvAttrs, shapes: list[Shape], out: Shape) -> int:
    return a.out_channels * shapes[0][0] * a.kernel * a.kernel * out[1] * out[2]


def _batchnorm_tensors(a: BatchNormAttrs, shapes: list[Shape]) -> list[Tensor]:
    c = (shapes[0][0],)
    return [  # ONNX BatchNormalization reads scale, B, mean, var in this order
        Tensor("weight", c, Init.GAMMA, True),
        Tensor("bias", c, Init.SMALL, True),
        Tensor("running_mean", c, Init.RUNNING_MEAN, False),
        Tensor("running_var", c, Init.RUNNING_VAR, False),
        Tensor("num_batches_tracked", (), Init.COUNT, False, onnx=False, integer=True),
    ]


def _same(a: Attrs, shapes: list[Shape]) -> Shape:
    (shape,) = shapes
    return shape


def _concat(a: NoAttrs, shapes: list[Shape]) -> Shape:
    for s in shapes:
        _feature_map([s])
    if len({s[1:] for s in shapes}) != 1:
        raise RuleError("joins feature maps of different spatial sizes")
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def _global_avgpool(a: NoAttrs, shapes: list[Shape]) -> Shape:
    return (_feature_map(shapes)[0], 1, 1)


def _flatten(a: NoAttrs, shapes: list[Shape]) -> Shape:
    (shape,) = shapes
    return (math.prod(shape),)


def _linear_shape(a: LinearAttrs, shapes: list[Shape]) -> Shape:
    (shape,) = shapes
    if len(shape) != 1:
        raise RuleError("needs a flat input")
    return (_channels(a.out_features),)


def _linear_tensors(a: LinearAttrs, shapes: list[Shape]) -> list[Tensor]:
    weight = Tensor("weight", (a.out_features, shapes[0][0]), Init.HE_NORMAL, True)
    return [weight] + ([Tensor("bias", (a.out_features,), Init.SMALL, True)] if a.bias else [])


def _conv_bn_tensors(a: ConvBNAttrs, shapes: list[Shape]) -> list[Tensor]:
    # No ONNX node reads these: the ONNX emitter writes the folded weight and bias instead.
    conv = [dataclasses.replace(t, onnx=False) for t in _conv_tensors(a.conv, shapes)]
    norm = _batchnorm_tensors(a.bn, [(a.conv.out_channels,)])
    return conv + [dataclasses.replace(t, module=a.norm, onnx=False) for t in norm]


def _buffer_concat(a: BufferAttrs, shapes: list[Shape]) -> Shape:
    shape = _concat(NoAttrs(), shapes)
    if shape[0] > a.channels:
        raise RuleError(f"needs {shape[0]} channels of a {a.channels}-channel block buffer")
    return shape


OPS: dict[OpKind, OpDef] = {
    OpKind.INPUT: OpDef(InputAttrs, 0, _input),
    OpKind.CONV: OpDef(ConvAttrs, 1, lambda a, s: _windowed(a, s, a.out_channels), _conv_tensors, _conv_macs),
    OpKind.BATCHNORM: OpDef(BatchNormAttrs, 1, lambda a, s: _feature_map(s), _batchnorm_tensors),
    OpKind.RELU: OpDef(NoAttrs, 1, _same),
    OpKind.MAXPOOL: OpDef(PoolAttrs, 1, lambda a, s: _windowed(a, s, s[0][0])),
    OpKind.AVGPOOL: OpDef(PoolAttrs, 1, lambda a, s: _windowed(a, s, s[0][0])),
    OpKind.CONCAT: OpDef(NoAttrs, None, _concat),
    OpKind.DROPOUT: OpDef(DropoutAttrs, 1, _same),
    OpKind.GLOBAL_AVGPOOL: OpDef(NoAttrs, 1, _global_avgpool),
    OpKind.FLATTEN: OpDef(NoAttrs, 1, _flatten),
    OpKind.LINEAR: OpDef(LinearAttrs, 1, _linear_shape, _linear_tensors, lambda a, s, out: a.out_features * s[0][0]),
    OpKind.CONV_BN: OpDef(
        ConvBNAttrs,
        1,
        lambda a, s: _windowed(a.conv, s, a.conv.out_channels),
        _conv_bn_tensors,
        lambda a, s, out: _conv_macs(a.conv, s, out),
    ),
    OpKind.BN_RELU: OpDef(BatchNormAttrs, 1, lambda a, s: _feature_map(s), _batchnorm_tensors),
    OpKind.BN_CLAMP: OpDef(BatchNormAttrs, 1, lambda a, s: _feature_map(s), _batchnorm_tensors),
    OpKind.BUFFER_CONCAT: OpDef(BufferAttrs, None, _buffer_concat),
}


def param_count(tensors: list[Tensor]) -> int:
    """Trainable weights; BN running statistics are buffers."""
    return sum(t.numel for t in tensors if t.trainable)

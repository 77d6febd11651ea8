"""The op table: every fact about an op kind, decided once.

For each `OpKind`, `OPS` holds its attribute type, its arity, its shape rule, its
parameter tensors (torch's names, shapes, how seeded weights fill them, whether an
ONNX node reads them), its MAC count, what its backward keeps (`saves`), whether it
holds only in eval mode, its words for documentation, and its form in each target:
the torch modules or call that compute it (`TorchForm`) and its ONNX nodes
(`onnx`). Inference, the verifier, the state_dict layout, both emitters, seeded
weights, the limits, the memory estimate and summaries all read this table; none of
them knows an op's tensors, costs or code by itself. Adding an op kind is one entry
here (and its own code in the interpreter, which must stay independent). torchvision's
naming (module paths from lowering, tensor names here, the old-checkpoint key pattern
below) lives nowhere else.

Shapes are per sample: (C, H, W) for feature maps, (F,) after flatten. MACs count the
multiply-accumulates of convolutions and linear layers (torchvision's "GFLOPS"
convention); BN, ReLU and pooling count none. No torch here.
"""

from __future__ import annotations

import functools
import math
import operator
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
    SILU = "silu"  # x * sigmoid(x)
    GELU = "gelu"  # x * Phi(x), the exact (erf) form
    MISH = "mish"  # x * tanh(softplus(x))
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
    # a batch norm reading a dense block's feature maps whose batch statistics, in training, are computed once per
    # map and shared by every batch norm that reads it (its input normalised once, into one block buffer)
    SHARED_BATCHNORM = "shared_batchnorm"


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
class Saved:
    """A tensor an op's backward keeps: its input or its output, or a companion of that size (indices, a mask)."""

    of: str  # "input" or "output": the tensor, or the one whose size the companion has; "maps": each feature map
    # the input is a concatenation of (or the input itself), normalised, one copy per map whoever reads it
    itemsize: int = 0  # bytes per element of a companion tensor; 0: the tensor itself (the network's float type)
    tag: str = ""  # names a companion (`indices`, `mask`), so that it is counted apart from the tensor


# -- target forms: plain data the emitters render; no torch or onnx here -------------------------------


@dataclass(frozen=True)
class Code:
    """A name the torch emitter writes as code, not as a literal: a constructor argument (`width`)."""

    text: str


Value = int | float | bool | str | tuple | Code  # a tuple is a module path, written as a dotted string


@dataclass(frozen=True)
class Arg:
    """A constructor argument: positional when `name` is empty, else keyword, left out when it equals `default`."""

    name: str
    value: Value
    default: object = None


@dataclass(frozen=True)
class Module:
    """One torch module an op needs: its attribute name in the parent module, its class, its arguments."""

    name: str
    cls: str  # `nn.Conv2d`, or a class of the generated runtime (`BNClamp`)
    args: tuple[Arg, ...] = ()


@dataclass(frozen=True)
class TorchContext:
    """What a torch form depends on beyond the op's attributes."""

    name: str  # the node's module name (`conv1`)
    cin: int | Code  # input channels: a literal, or the constructor argument that holds them
    cout: int | Code | None  # output channels of a conv, likewise
    fresh: bool = False  # the input is a fresh tensor only this op reads (a ReLU may then work in place)
    conv1x1: str = "torch"  # Settings.conv1x1: how 1x1 convs choose their kernel
    packed: bool = False  # Settings.packed_weights: stride-1 kxk convs choose their kernel too


@dataclass(frozen=True)
class TorchForm:
    """How the torch target computes an op: modules called in order on the input, or a functional call."""

    modules: Callable[[Attrs, TorchContext], tuple[Module, ...]] | None = None  # the first one is called
    call: Callable[[Attrs, list[str]], str] | None = None  # code of the result from the inputs' code
    # what the caller hands the first module besides the input: (keyword, a module's path from the node's parent,
    # the method of it whose result is handed), e.g. ("pre", ("norm1",), "scale_shift")
    hands: Callable[[Attrs], tuple[tuple[str, tuple[str, ...], str], ...]] = lambda attrs: ()
    fresh: bool = False  # returns a tensor of its own (not a view, not its input): a ReLU after it may work in place


@dataclass(frozen=True)
class OnnxNode:
    """One ONNX node: its op type, input and output tensor names, node name and attributes (sorted)."""

    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    name: str
    attrs: tuple[tuple[str, object], ...] = ()


# (attributes, input tensor names (the node's weights last), output name, node name, opset) -> the nodes
OnnxForm = Callable[[Attrs, list[str], str, str, int], list[OnnxNode]]


@dataclass(frozen=True)
class OpDef:
    attrs: type
    arity: int | None  # inputs the op takes; None: one or more, in port order
    shape: Callable[[Attrs, list[Shape]], Shape]
    tensors: Callable[[Attrs, list[Shape]], list[Tensor]] = lambda attrs, shapes: []
    macs: Callable[[Attrs, list[Shape], Shape], int] = lambda attrs, shapes, out: 0
    saves: Callable[[Attrs], tuple[Saved, ...]] = lambda attrs: ()  # what autograd keeps for its backward
    eval_only: str = ""  # made by an eval-only pass: why it holds only in eval (the network then does not train)
    view: bool = False  # its output is a view of its input: no memory of its own
    # the op in plain words, for generated docstrings; `out` says where its output channels go (`to 128 channels`)
    words: Callable[[Attrs, str], str] = lambda attrs, out: ""
    torch: TorchForm | None = None  # None: the torch target has no form for it (the input, concats: structure)
    onnx: OnnxForm | None = None  # None: the ONNX target refuses it by name


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


def _conv_tensors(a: ConvAttrs, shapes: list[Shape], onnx: bool = True) -> list[Tensor]:
    weight = Tensor("weight", (a.out_channels, shapes[0][0], a.kernel, a.kernel), Init.HE_NORMAL, True, onnx)
    return [weight] + ([Tensor("bias", (a.out_channels,), Init.SMALL, True, onnx)] if a.bias else [])


def _conv_macs(a: ConvAttrs, shapes: list[Shape], out: Shape) -> int:
    return a.out_channels * shapes[0][0] * a.kernel * a.kernel * out[1] * out[2]


def _batchnorm_tensors(a: BatchNormAttrs, shapes: list[Shape]) -> list[Tensor]:
    return list(_norm_tensors(shapes[0][0]))


@functools.lru_cache(maxsize=1024)
def _norm_tensors(channels: int) -> tuple[Tensor, ...]:
    # NOTE: kept: a maximal spec has thousands of batch norms of a few widths, each derived after every pass
    c = (channels,)
    return (  # ONNX BatchNormalization reads scale, B, mean, var in this order
        Tensor("weight", c, Init.GAMMA, True),
        Tensor("bias", c, Init.SMALL, True),
        Tensor("running_mean", c, Init.RUNNING_MEAN, False),
        Tensor("running_var", c, Init.RUNNING_VAR, False),
        Tensor("num_batches_tracked", (), Init.COUNT, False, onnx=False, integer=True),
    )


def _same(a: Attrs, shapes: list[Shape]) -> Shape:
    (shape,) = shapes
    return shape


def _concat(a: NoAttrs, shapes: list[Shape]) -> Shape:
    # NOTE: set and map run in C: a maximal spec's concats have half a million inputs in all (few distinct shapes)
    distinct = set(shapes)
    if set(map(len, distinct)) != {3}:
        raise RuleError("needs a C x H x W feature map")
    if len({s[1:] for s in distinct}) != 1:
        raise RuleError("joins feature maps of different spatial sizes")
    return (sum(map(operator.itemgetter(0), shapes)), *shapes[0][1:])


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
    return _conv_tensors(a.conv, shapes, onnx=False) + list(_folded_norm_tensors(a.bn, a.conv.out_channels, a.norm))


@functools.lru_cache(maxsize=1024)
def _folded_norm_tensors(bn: BatchNormAttrs, channels: int, norm: str) -> tuple[Tensor, ...]:
    """A folded batch norm's tensors, kept under its own module `norm` (the same for every layer of a network: a
    maximal spec folds thousands)."""
    return tuple(
        Tensor(t.name, t.shape, t.init, t.trainable, False, t.integer, norm)
        for t in _batchnorm_tensors(bn, [(channels,)])
    )


def _buffer_concat(a: BufferAttrs, shapes: list[Shape]) -> Shape:
    shape = _concat(NoAttrs(), shapes)
    if shape[0] > a.channels:
        raise RuleError(f"needs {shape[0]} channels of a {a.channels}-channel block buffer")
    return shape


# -- each op's forms ---------------------------------------------------------------------------------------

_INPUT, _OUTPUT = (Saved("input"),), (Saved("output"),)


def _conv_args(a: ConvAttrs, ctx: TorchContext) -> tuple[Arg, ...]:
    return (
        Arg("", ctx.cin),
        Arg("", ctx.cout),
        Arg("kernel_size", a.kernel),
        Arg("stride", a.stride, 1),
        Arg("padding", a.padding, 0),
        Arg("bias", a.bias, True),
    )


def _conv_class(a: ConvAttrs, ctx: TorchContext, folded: bool) -> str:
    """nn.Conv2d, or a runtime class: a folded conv (batch norms folded in), a conv choosing its kernel."""
    own_kernel = a.pointwise and ctx.conv1x1 != "torch"
    if folded:
        return "FoldedConv1x1" if own_kernel else "FoldedConv2d"
    if own_kernel:
        return "Conv1x1"
    if ctx.packed and ctx.conv1x1 != "torch" and a.stride == 1:
        return "ConvKxK"
    return "nn.Conv2d"


def _conv_modules(a: ConvAttrs, ctx: TorchContext) -> tuple[Module, ...]:
    return (Module(ctx.name, _conv_class(a, ctx, folded=bool(a.pre)), _conv_args(a, ctx)),)


def _pre(a: ConvAttrs | LinearAttrs) -> tuple[tuple[str, tuple[str, ...], str], ...]:
    """A layer that applies the batch norm of a BNClamp before it is handed that norm's scale and shift."""
    return (("pre", a.pre, "scale_shift"),) if a.pre else ()


def _conv_words(a: ConvAttrs, out: str) -> str:
    extras = [f"stride {a.stride}"] * (a.stride > 1) + ["bias"] * a.bias
    shown = f" ({', '.join(extras)})" if extras else ""
    pre = ", applying the batch norm before it to its input" if a.pre else ""
    return f"{a.kernel}x{a.kernel} conv{shown}{f' {out}' if out else ''}{pre}"


def _window_attrs(kernel: int, stride: int, padding: int) -> tuple[tuple[str, object], ...]:
    return (("kernel_shape", [kernel] * 2), ("pads", [padding] * 4), ("strides", [stride] * 2))


def _conv_onnx(a: ConvAttrs, ins: list[str], out: str, name: str, opset: int) -> list[OnnxNode]:
    return [OnnxNode("Conv", tuple(ins), (out,), name, _window_attrs(a.kernel, a.stride, a.padding))]


def _bn_args(a: BatchNormAttrs, channels: int | Code) -> tuple[Arg, ...]:
    return (Arg("", channels), Arg("eps", a.eps, 1e-5), Arg("momentum", a.momentum, 0.1))


def _bn_onnx(a: BatchNormAttrs, ins: list[str], out: str, name: str, opset: int) -> list[OnnxNode]:
    return [OnnxNode("BatchNormalization", tuple(ins), (out,), name, (("epsilon", a.eps),))]


def _bn_form(cls: str) -> TorchForm:
    return TorchForm(lambda a, ctx: (Module(ctx.name, cls, _bn_args(a, ctx.cin)),), fresh=True)


def _conv_bn_modules(a: ConvBNAttrs, ctx: TorchContext) -> tuple[Module, ...]:
    conv = Module(ctx.name, _conv_class(a.conv, ctx, folded=True), _conv_args(a.conv, ctx))
    return conv, Module(a.norm, "FoldedBatchNorm2d", _bn_args(a.bn, ctx.cout))


def conv_bn_fold(a: ConvBNAttrs, get: Callable[[str, str], object]) -> dict[str, object]:
    """The weight and bias of the one conv that computes conv then batch norm (eval), from arrays `get(module,
    name)` (module "" for the conv's own, `a.norm` for the batch norm's); the ONNX target names them
    `<conv key>.folded_weight` and `.folded_bias`. Works on any array type with arithmetic (numpy in float64)."""
    scale = get(a.norm, "weight") / (get(a.norm, "running_var") + a.bn.eps) ** 0.5
    bias = get(a.norm, "bias") - get(a.norm, "running_mean") * scale
    if a.conv.bias:
        bias = bias + get("", "bias") * scale
    return {"folded_weight": get("", "weight") * scale[:, None, None, None], "folded_bias": bias}


def _pool_form(cls: str) -> TorchForm:
    def modules(a: PoolAttrs, ctx: TorchContext) -> tuple[Module, ...]:
        args = (Arg("kernel_size", a.kernel), Arg("stride", a.stride, a.kernel), Arg("padding", a.padding, 0))
        return (Module(ctx.name, cls, args),)

    return TorchForm(modules, fresh=True)


def _pool_words(kind: str) -> Callable[[PoolAttrs, str], str]:
    def words(a: PoolAttrs, out: str) -> str:
        return f"{a.kernel}x{a.kernel} {kind} pool" + (f" (stride {a.stride})" if a.stride != a.kernel else "")

    return words


def _maxpool_onnx(a: PoolAttrs, ins: list[str], out: str, name: str, opset: int) -> list[OnnxNode]:
    return [OnnxNode("MaxPool", tuple(ins), (out,), name, _window_attrs(a.kernel, a.stride, a.padding))]


def _avgpool_onnx(a: PoolAttrs, ins: list[str], out: str, name: str, opset: int) -> list[OnnxNode]:
    # torch's AvgPool2d counts padding in the divisor by default
    attrs = (("count_include_pad", 1), *_window_attrs(a.kernel, a.stride, a.padding))
    return [OnnxNode("AveragePool", tuple(ins), (out,), name, attrs)]


def _concat_onnx(a: Attrs, ins: list[str], out: str, name: str, opset: int) -> list[OnnxNode]:
    return [OnnxNode("Concat", tuple(ins), (out,), name, (("axis", 1),))]


def _one(op_type: str, **attrs) -> OnnxForm:
    return lambda a, ins, out, name, opset: [OnnxNode(op_type, tuple(ins), (out,), name, tuple(sorted(attrs.items())))]


def _module_form(cls: str, *args: Arg) -> TorchForm:
    return TorchForm(lambda a, ctx: (Module(ctx.name, cls, args),))


def _linear_modules(a: LinearAttrs, ctx: TorchContext) -> tuple[Module, ...]:
    args = (Arg("", ctx.cin), Arg("", a.out_features), Arg("bias", a.bias, True))
    return (Module(ctx.name, "FoldedLinear" if a.pre else "nn.Linear", args),)


def _bn_relu_onnx(a: BatchNormAttrs, ins: list[str], out: str, name: str, opset: int) -> list[OnnxNode]:
    return _bn_onnx(a, ins, f"{name}/bn", name, opset) + [OnnxNode("Relu", (f"{name}/bn",), (out,), f"{name}/relu")]


def _onnx_chain(*steps: tuple[str, tuple, tuple]) -> OnnxForm:
    """An activation as several ONNX nodes: (op, inputs, attributes) with "x" the input, "c" a float constant and
    "<i>" the output of step i; the last step's output is the op's."""

    def nodes(a: Attrs, ins: list[str], out: str, name: str, opset: int) -> list[OnnxNode]:
        made = []
        for i, (op_type, args, attrs) in enumerate(steps):
            result = out if i == len(steps) - 1 else f"{name}/{i}"
            names = []
            for j, arg in enumerate(args):
                if isinstance(arg, float):  # a scalar constant, a node of its own
                    made.append(
                        OnnxNode("Constant", (), (f"{name}/{i}c{j}",), f"{name}/{i}c{j}", (("value_float", arg),))
                    )
                    names.append(f"{name}/{i}c{j}")
                else:
                    names.append(ins[0] if arg == "x" else f"{name}/{arg}")
            made.append(OnnxNode(op_type, tuple(names), (result,), f"{name}/{op_type.lower()}{i}", attrs))
        return made

    return nodes


_SILU_ONNX = _onnx_chain(("Sigmoid", ("x",), ()), ("Mul", ("x", "0"), ()))  # every opset: no SiLU op


def _gelu_onnx(a: Attrs, ins: list[str], out: str, name: str, opset: int) -> list[OnnxNode]:
    if opset >= 20:  # the Gelu op, exact (approximate="none") by default
        return [OnnxNode("Gelu", tuple(ins), (out,), name)]
    # x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))
    return _onnx_chain(
        ("Div", ("x", math.sqrt(2.0)), ()),
        ("Erf", ("0",), ()),
        ("Add", ("1", 1.0), ()),
        ("Mul", ("x", "2"), ()),
        ("Mul", ("3", 0.5), ()),
    )(a, ins, out, name, opset)


def _mish_onnx(a: Attrs, ins: list[str], out: str, name: str, opset: int) -> list[OnnxNode]:
    if opset >= 18:
        return [OnnxNode("Mish", tuple(ins), (out,), name)]
    chain = _onnx_chain(("Softplus", ("x",), ()), ("Tanh", ("0",), ()), ("Mul", ("x", "1"), ()))
    return chain(a, ins, out, name, opset)


def _activation(word: str, cls: str, onnx: OnnxForm) -> OpDef:
    """An activation other than ReLU: it keeps its input for backward; no pass fuses it (the fusions built for ReLU
    are exact for ReLU only)."""
    return OpDef(
        NoAttrs,
        1,
        _same,
        saves=lambda a: _INPUT,
        words=lambda a, out: word,
        torch=TorchForm(lambda a, ctx: (Module(ctx.name, cls),), fresh=True),
        onnx=onnx,
    )


def _dropout_call(a: DropoutAttrs, ins: list[str]) -> str:
    return f"F.dropout({ins[0]}, p={a.rate!r}, training=self.training)"


OPS: dict[OpKind, OpDef] = {
    OpKind.INPUT: OpDef(InputAttrs, 0, _input),
    OpKind.CONV: OpDef(
        ConvAttrs,
        1,
        lambda a, s: _windowed(a, s, a.out_channels),
        _conv_tensors,
        _conv_macs,
        saves=lambda a: _INPUT,
        words=_conv_words,
        torch=TorchForm(_conv_modules, fresh=True, hands=_pre),
        onnx=_conv_onnx,
    ),
    OpKind.BATCHNORM: OpDef(
        BatchNormAttrs,
        1,
        lambda a, s: _feature_map(s),
        _batchnorm_tensors,
        saves=lambda a: _INPUT,
        words=lambda a, out: "batch norm",
        torch=_bn_form("nn.BatchNorm2d"),
        onnx=_bn_onnx,
    ),
    OpKind.RELU: OpDef(
        NoAttrs,
        1,
        _same,
        saves=lambda a: _OUTPUT,  # generated ReLUs never work in place while autograd records
        words=lambda a, out: "ReLU",
        torch=TorchForm(lambda a, ctx: (Module(ctx.name, "ReLU" if ctx.fresh else "nn.ReLU"),)),
        onnx=_one("Relu"),
    ),
    OpKind.SILU: _activation("SiLU", "nn.SiLU", _SILU_ONNX),
    OpKind.GELU: _activation("GELU", "nn.GELU", _gelu_onnx),
    OpKind.MISH: _activation("Mish", "nn.Mish", _mish_onnx),
    OpKind.MAXPOOL: OpDef(
        PoolAttrs,
        1,
        lambda a, s: _windowed(a, s, s[0][0]),
        saves=lambda a: (Saved("input"), Saved("output", 8, "indices")),  # int64 indices
        words=_pool_words("max"),
        torch=_pool_form("nn.MaxPool2d"),
        onnx=_maxpool_onnx,
    ),
    OpKind.AVGPOOL: OpDef(
        PoolAttrs,
        1,
        lambda a, s: _windowed(a, s, s[0][0]),
        saves=lambda a: _INPUT,
        words=_pool_words("average"),
        torch=_pool_form("nn.AvgPool2d"),
        onnx=_avgpool_onnx,
    ),
    OpKind.CONCAT: OpDef(
        NoAttrs,
        None,
        _concat,
        words=lambda a, out: "concatenation",
        torch=TorchForm(call=lambda a, ins: f"torch.cat([{', '.join(ins)}], 1)"),
        onnx=_concat_onnx,
    ),
    OpKind.DROPOUT: OpDef(
        DropoutAttrs,
        1,
        _same,
        saves=lambda a: (Saved("output", 1, "mask"),) if a.rate > 0 else (),  # a one-byte mask
        words=lambda a, out: "dropout",
        torch=TorchForm(call=_dropout_call),
        onnx=lambda a, ins, out, name, opset: [],  # the identity at inference: its output is its input
    ),
    OpKind.GLOBAL_AVGPOOL: OpDef(
        NoAttrs,
        1,
        _global_avgpool,
        saves=lambda a: _INPUT,
        words=lambda a, out: "global average pool",
        torch=_module_form("nn.AdaptiveAvgPool2d", Arg("", 1)),
        onnx=_one("GlobalAveragePool"),
    ),
    OpKind.FLATTEN: OpDef(
        NoAttrs,
        1,
        _flatten,
        view=True,
        words=lambda a, out: "flatten",
        torch=_module_form("nn.Flatten", Arg("", 1)),
        onnx=_one("Flatten", axis=1),
    ),
    OpKind.LINEAR: OpDef(
        LinearAttrs,
        1,
        _linear_shape,
        _linear_tensors,
        lambda a, s, out: a.out_features * s[0][0],
        saves=lambda a: _INPUT,
        words=lambda a, out: "linear layer" + (", applying the batch norm before it to its input" if a.pre else ""),
        torch=TorchForm(_linear_modules, fresh=True, hands=_pre),
        onnx=_one("Gemm", transB=1),  # y = x W^T + b, W stored (out, in) as torch stores it
    ),
    OpKind.CONV_BN: OpDef(
        ConvBNAttrs,
        1,
        lambda a, s: _windowed(a.conv, s, a.conv.out_channels),
        _conv_bn_tensors,
        lambda a, s, out: _conv_macs(a.conv, s, out),
        eval_only="batch norms folded into convolutions",
        words=lambda a, out: _conv_words(a.conv, out) + ", with the batch norm after it folded in",
        torch=TorchForm(
            _conv_bn_modules, fresh=True, hands=lambda a: _pre(a.conv) + (("post", (a.norm,), "eval_affine"),)
        ),
        onnx=lambda a, ins, out, name, opset: _conv_onnx(a.conv, ins, out, name, opset),
    ),
    OpKind.BN_RELU: OpDef(
        BatchNormAttrs,
        1,
        lambda a, s: _feature_map(s),
        _batchnorm_tensors,
        eval_only="batch norm and ReLU fused",
        words=lambda a, out: "batch norm and ReLU in one step",
        torch=_bn_form("BNReLU"),
        onnx=_bn_relu_onnx,
    ),
    OpKind.BN_CLAMP: OpDef(
        BatchNormAttrs,
        1,
        lambda a, s: _feature_map(s),
        _batchnorm_tensors,
        eval_only="batch norms moved across ReLUs into the next layer",
        words=lambda a, out: "batch norm and ReLU as a per-channel clamp (the next layer applies the scale and shift)",
        torch=_bn_form("BNClamp"),
        # NOTE: no ONNX form: a per-channel clamp is a Max with a broadcast bound, which onnxruntime runs outside
        # its NCHWc kernels (README, Optimisation levels); the pass is the torch target's.
    ),
    OpKind.SHARED_BATCHNORM: OpDef(
        BatchNormAttrs,
        1,
        lambda a, s: _feature_map(s),
        _batchnorm_tensors,
        saves=lambda a: (Saved("maps", tag="normalised"),),
        words=lambda a, out: "batch norm with batch statistics shared per feature map in training",
        torch=_bn_form("nn.BatchNorm2d"),
        onnx=_bn_onnx,
    ),
    OpKind.BUFFER_CONCAT: OpDef(
        BufferAttrs,
        None,
        _buffer_concat,
        # NOTE: autograd cannot train through it: every layer's saved input is a view of a buffer written later
        eval_only="block buffers",
        words=lambda a, out: "view of the block buffer",
        torch=TorchForm(call=lambda a, ins: f"torch.cat([{', '.join(ins)}], 1)"),
        onnx=_concat_onnx,
    ),
}


def param_count(tensors: list[Tensor]) -> int:
    """Trainable weights; BN running statistics are buffers."""
    return sum(t.numel for t in tensors if t.trainable)

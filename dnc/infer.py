"""Infer stage: IR -> IR with each node's output shape, parameter count and MACs.

One rule per OpKind, in RULES. Sizes follow PyTorch's floor rule for convolutions
and pools; a map that would shrink to nothing is an error naming the stage. MACs
count the multiply-accumulates of convolutions and linear layers, the convention of
torchvision's model table ("GFLOPS") and of most papers; BN, ReLU and pooling are
not counted. Parameters are trainable weights; BN running statistics are buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import networkx as nx

from dnc.errors import ShapeError
from dnc.ir import Node, OpKind, Shape, graph_input, inputs, ordered, replace_node, verify


@dataclass(frozen=True)
class Inferred:
    shape: Shape
    params: int = 0
    macs: int = 0


Rule = Callable[[Node, list[Shape]], Inferred]


def infer(graph: nx.DiGraph) -> nx.DiGraph:
    """Return a copy of `graph` with every node's shape, params and MACs filled in."""
    graph = graph.copy()
    for n in ordered(graph):
        if n.op not in RULES:
            raise ShapeError(f"no shape rule for op '{n.op.value}' (node {n.scope})", n.origin)
        shapes = [graph.nodes[src]["node"].shape for src in inputs(graph, n.scope)]
        try:
            result = RULES[n.op](n, shapes)
        except ShapeError as err:  # name the size the user chose: usually what to change
            raise ShapeError(f"{err.message}; network input {_fmt(graph_input(graph).shape)}", err.location) from None
        replace_node(graph, n.replace(shape=result.shape, params=result.params, macs=result.macs))
    verify(graph, inferred=True)
    return graph


def _fail(n: Node, shapes: list[Shape], message: str) -> ShapeError:
    got = ", ".join(_fmt(s) for s in shapes)
    return ShapeError(f"stage {n.stage}: {n.scope} ({n.op.value}) {message} (input {got})", n.origin)


def _fmt(shape: Shape) -> str:
    return "x".join(map(str, shape))


def _feature_map(n: Node, shapes: list[Shape]) -> Shape:
    (shape,) = shapes
    if len(shape) != 3:
        raise _fail(n, shapes, "needs a C x H x W feature map")
    return shape


def _window(n: Node, shapes: list[Shape], size: int, kernel: int, stride: int, padding: int) -> int:
    out = (size + 2 * padding - kernel) // stride + 1
    if size + 2 * padding < kernel or out < 1:
        raise _fail(n, shapes, f"would shrink {size} to nothing ({kernel}x{kernel} window, stride {stride})")
    return out


def _input(n: Node, shapes: list[Shape]) -> Inferred:
    a = n.attrs
    return Inferred((a.channels, a.height, a.width))


def _conv(n: Node, shapes: list[Shape]) -> Inferred:
    c, h, w = _feature_map(n, shapes)
    a = n.attrs
    ho = _window(n, shapes, h, a.kernel, a.stride, a.padding)
    wo = _window(n, shapes, w, a.kernel, a.stride, a.padding)
    weights = a.out_channels * c * a.kernel * a.kernel
    return Inferred((a.out_channels, ho, wo), weights + (a.out_channels if a.bias else 0), weights * ho * wo)


def _pool(n: Node, shapes: list[Shape]) -> Inferred:
    c, h, w = _feature_map(n, shapes)
    a = n.attrs
    return Inferred(
        (c, _window(n, shapes, h, a.kernel, a.stride, a.padding), _window(n, shapes, w, a.kernel, a.stride, a.padding))
    )


def _batchnorm(n: Node, shapes: list[Shape]) -> Inferred:
    c, h, w = _feature_map(n, shapes)
    return Inferred((c, h, w), params=2 * c)


def _same(n: Node, shapes: list[Shape]) -> Inferred:
    (shape,) = shapes
    return Inferred(shape)


def _concat(n: Node, shapes: list[Shape]) -> Inferred:
    for s in shapes:
        _feature_map(n, [s])
    if len({s[1:] for s in shapes}) != 1:
        raise _fail(n, shapes, "joins feature maps of different spatial sizes")
    return Inferred((sum(s[0] for s in shapes), *shapes[0][1:]))


def _global_avgpool(n: Node, shapes: list[Shape]) -> Inferred:
    c, _, _ = _feature_map(n, shapes)
    return Inferred((c, 1, 1))


def _flatten(n: Node, shapes: list[Shape]) -> Inferred:
    (shape,) = shapes
    size = 1
    for d in shape:
        size *= d
    return Inferred((size,))


def _linear(n: Node, shapes: list[Shape]) -> Inferred:
    (shape,) = shapes
    if len(shape) != 1:
        raise _fail(n, shapes, "needs a flat input")
    (features,) = shape
    out = n.attrs.out_features
    return Inferred((out,), features * out + (out if n.attrs.bias else 0), features * out)


RULES: dict[OpKind, Rule] = {
    OpKind.INPUT: _input,
    OpKind.CONV: _conv,
    OpKind.BATCHNORM: _batchnorm,
    OpKind.RELU: _same,
    OpKind.MAXPOOL: _pool,
    OpKind.AVGPOOL: _pool,
    OpKind.CONCAT: _concat,
    OpKind.DROPOUT: _same,
    OpKind.GLOBAL_AVGPOOL: _global_avgpool,
    OpKind.FLATTEN: _flatten,
    OpKind.LINEAR: _linear,
}


def state_dict_shapes(graph: nx.DiGraph) -> dict[str, tuple[int, ...]]:
    """The torch state_dict keys of the network and their shapes, in torchvision's order."""
    out: dict[str, tuple[int, ...]] = {}
    for n in ordered(graph):
        shapes = [graph.nodes[src]["node"].shape for src in inputs(graph, n.scope)]
        if n.op is OpKind.CONV:
            c = shapes[0][0]
            out[f"{n.scope}.weight"] = (n.attrs.out_channels, c, n.attrs.kernel, n.attrs.kernel)
            if n.attrs.bias:
                out[f"{n.scope}.bias"] = (n.attrs.out_channels,)
        elif n.op is OpKind.BATCHNORM:
            c = n.shape[0]
            for key in ("weight", "bias", "running_mean", "running_var"):
                out[f"{n.scope}.{key}"] = (c,)
            out[f"{n.scope}.num_batches_tracked"] = ()
        elif n.op is OpKind.LINEAR:
            out[f"{n.scope}.weight"] = (n.attrs.out_features, shapes[0][0])
            if n.attrs.bias:
                out[f"{n.scope}.bias"] = (n.attrs.out_features,)
    return out

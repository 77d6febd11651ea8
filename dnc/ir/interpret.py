"""The interpreter: any legal IR evaluated in eager torch, node by node, from the IR alone.

It is the oracle `dnc verify` compares every target and level against, as torch.fx's
Interpreter runs a graph without code generation. To be worth that, it is independent of
what it checks: each op's computation is written here, from what the op means, and
shares nothing with the emitters (no template, no generated code, no helper of theirs,
no `nn.BatchNorm2d` or `F.batch_norm`). Batch norm and ReLU are spelled out; convolution,
pooling, the linear layer and concatenation are torch's functional primitives. `dnc verify`
runs it on the -O0 IR: a wrong pass would agree with itself on the IR it rewrote.

Nodes run in creation order (a topological order, which the verifier checks), each
reading its inputs in port order, its attributes, and its tensors from `state` by
state_dict key (`Node.key`). Floating tensors are cast to the input's dtype and device,
so the same call runs in float64 or float32; the cast is a no-op where they match and
differentiable where they do not, so gradients reach the caller's leaf tensors
(`leaf_state` makes them). In train mode batch norm normalises with the batch's
statistics and the result carries the updated running statistics; dropout draws its
masks as `F.dropout` does on the CPU, from torch's global generator in network order, so
the same seed gives the generated model's masks. Ops that passes make evaluate to what
they mean: `conv_bn` is the conv then the batch norm, `bn_relu` and `bn_clamp` are
ReLU(batch norm) (the layer whose `pre` names a `bn_clamp` applies that norm's scale and
shift in the generated code; here the clamp already did, and the pools between commute),
`buffer_concat` is a concatenation. The first three exist only in eval mode and are
refused in train mode. Graph attributes (memory format, batch tiles, kernel choices)
change how a target runs, not what it computes, and are ignored.

The only module of dnc.ir that imports torch; nothing imports it at package import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import networkx as nx
import torch
import torch.nn.functional as F

from dnc.errors import DncError
from dnc.ir.graph import Node, OpKind, inputs, ordered, output
from dnc.ir.verifier import verify

Tensor = torch.Tensor


@dataclass(frozen=True)
class Interpreted:
    """What a run gives: the network's output and the state after it (running statistics updated in train mode)."""

    output: Tensor
    state: dict[str, Tensor]


def interpret(graph: nx.DiGraph, state: Mapping[str, Tensor], x: Tensor, *, train: bool = False) -> Interpreted:
    """Evaluate the inferred IR `graph`, verified first, on the batch `x` (N, C, H, W) with the weights `state`
    (by state_dict key).

    The computation runs in `x`'s dtype on `x`'s device. `train`: batch norm uses batch
    statistics and updates the running ones (returned in `.state`, in that dtype), dropout
    drops. Under autograd, gradients flow to every tensor of `state` and to `x`.
    """
    verify(graph, inferred=True)  # a legal IR only: what the op table says each node is
    if not x.is_floating_point() or x.dim() != 4:
        raise DncError(f"interpreter: expected a floating-point (N, C, H, W) batch, got {x.dtype} {tuple(x.shape)}")
    run = _Run(state, x, train)
    values: dict[str, Tensor] = {}
    readers = {scope: graph.out_degree(scope) for scope in graph}  # to free each value after its last reader
    for n in ordered(graph):
        srcs = inputs(graph, n.scope)
        rule = _RULES.get(n.op)
        if rule is None:
            raise DncError(f"interpreter: {n.scope}: no rule for op '{n.op}'")
        values[n.scope] = rule(run, n, [values[s] for s in srcs])
        for s in srcs:
            readers[s] -= 1
            if readers[s] == 0:
                del values[s]
    return Interpreted(values[output(graph).scope], run.state)


def leaf_state(graph: nx.DiGraph, state: Mapping[str, object], dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """`state` as new tensors for a gradient reference: floating ones in `dtype`, counters as integers, and each
    trainable tensor (the op table's `trainable`: weights and biases, not running statistics) a leaf that
    requires grad. Accepts torch tensors or numpy arrays."""
    trainable = {n.key(t): t.trainable for n in ordered(graph) for t in n.tensors}
    out = {}
    for key, value in state.items():
        t = torch.as_tensor(value).detach().clone()
        if t.is_floating_point():
            t = t.to(dtype).requires_grad_(trainable.get(key, False))
        out[key] = t
    return out


class _Run:
    """One evaluation: the weights, the input's dtype and device, the mode, and the state it updates."""

    def __init__(self, state: Mapping[str, Tensor], x: Tensor, train: bool):
        self.given, self.x, self.train = state, x, train
        self.state = dict(state)

    def tensor(self, n: Node, name: str, module: str = "") -> Tensor:
        """The node's tensor `name` (of the sibling `module`, for a folded batch norm), cast for this run."""
        found = [t for t in n.tensors if (t.name, t.module) == (name, module)]
        if not found:
            raise DncError(f"interpreter: {n.scope} has no tensor {name!r} in its op table entry")
        key = n.key(found[0])
        if key not in self.given:
            raise DncError(f"interpreter: {n.scope}: the weights have no {key}")
        value = self.given[key]
        if value.is_floating_point():
            return value.to(self.x.device, self.x.dtype)
        return value.to(self.x.device)

    def eval_only(self, n: Node) -> None:
        if self.train:
            raise DncError(
                f"interpreter: {n.scope} is a {n.op.value}, which holds only in eval mode (an -O2 pass made it): "
                "interpret the -O0 or -O1 IR to train"
            )


def _channel(v: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast over (N, C, H, W)."""
    return v.reshape(1, -1, 1, 1)


def _relu(x: Tensor) -> Tensor:
    # max(x, 0), with torch.relu's gradient convention: 0 where x is 0
    return torch.where(x > 0, x, 0.0)


def _batchnorm(run: _Run, n: Node, x: Tensor, module: str = "") -> Tensor:
    """Batch norm: (x - mean) / sqrt(var + eps) * weight + bias, per channel.

    Eval: the running statistics. Train: the batch's mean and biased variance over (N, H, W), and the
    running statistics updated with the unbiased variance, by `momentum`, or by the cumulative average
    through `num_batches_tracked` where `momentum` is None."""
    attrs = n.attrs.bn if n.op is OpKind.CONV_BN else n.attrs
    weight, bias = run.tensor(n, "weight", module), run.tensor(n, "bias", module)
    mean, var = run.tensor(n, "running_mean", module), run.tensor(n, "running_var", module)
    if not run.train:  # per channel, x * scale + shift: one pass over the feature map
        scale = weight / torch.sqrt(var + attrs.eps)
        return torch.addcmul(_channel(bias - mean * scale), x, _channel(scale))
    count = x.numel() // x.shape[1]  # values per channel
    if count < 2:
        raise DncError(f"interpreter: {n.scope}: batch norm in train mode needs more than one value per channel")
    batch_mean = x.mean((0, 2, 3))
    centred = x - _channel(batch_mean)
    batch_var = (centred * centred).mean((0, 2, 3))
    y = centred / torch.sqrt(_channel(batch_var) + attrs.eps) * _channel(weight) + _channel(bias)
    tracked = run.tensor(n, "num_batches_tracked", module) + 1
    momentum = attrs.momentum if attrs.momentum is not None else 1.0 / float(tracked)
    unbiased = batch_var.detach() * (count / (count - 1))
    updates = {
        "running_mean": (1 - momentum) * mean.detach() + momentum * batch_mean.detach(),
        "running_var": (1 - momentum) * var.detach() + momentum * unbiased,
        "num_batches_tracked": tracked,
    }
    for t in n.tensors:
        if t.module == module and t.name in updates:
            run.state[n.key(t)] = updates[t.name]
    return y


def _conv(run: _Run, n: Node, x: Tensor) -> Tensor:
    # a `pre` needs nothing here: the bn_clamp it names already computed relu(BN(.)) in full
    a = n.attrs.conv if n.op is OpKind.CONV_BN else n.attrs
    bias = run.tensor(n, "bias") if a.bias else None
    return F.conv2d(x, run.tensor(n, "weight"), bias, a.stride, a.padding)


def _conv_bn(run: _Run, n: Node, x: Tensor) -> Tensor:
    run.eval_only(n)
    return _batchnorm(run, n, _conv(run, n, x), module=n.attrs.norm)


def _bn_relu(run: _Run, n: Node, x: Tensor) -> Tensor:
    """bn_relu and bn_clamp: ReLU(batch norm), eval only."""
    run.eval_only(n)
    return _relu(_batchnorm(run, n, x))


def _dropout(run: _Run, n: Node, x: Tensor) -> Tensor:
    p = n.attrs.rate
    if not run.train or p == 0:
        return x
    if p == 1:
        return x * 0.0
    # as F.dropout on the CPU: a Bernoulli(1 - p) draw into a tensor laid out like x, scaled by 1 / (1 - p)
    mask = torch.empty_like(x).bernoulli_(1 - p)
    return x * mask.div_(1 - p)


def _linear(run: _Run, n: Node, x: Tensor) -> Tensor:
    bias = run.tensor(n, "bias") if n.attrs.bias else None
    return F.linear(x, run.tensor(n, "weight"), bias)


def _one(f: Callable[[_Run, Node, Tensor], Tensor]) -> Callable[[_Run, Node, list[Tensor]], Tensor]:
    """A rule of a one-input op."""
    return lambda run, n, args: f(run, n, args[0])


def _pool(f):
    return _one(lambda run, n, x: f(x, n.attrs.kernel, n.attrs.stride, n.attrs.padding))


_RULES: dict[OpKind, Callable[[_Run, Node, list[Tensor]], Tensor]] = {
    OpKind.INPUT: lambda run, n, args: run.x,
    OpKind.CONV: _one(_conv),
    OpKind.BATCHNORM: _one(_batchnorm),
    OpKind.SHARED_BATCHNORM: _one(_batchnorm),  # the same batch norm: where its statistics come from is the runtime's
    OpKind.RELU: _one(lambda run, n, x: _relu(x)),
    OpKind.SILU: _one(lambda run, n, x: x * torch.sigmoid(x)),
    OpKind.GELU: _one(lambda run, n, x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))),
    # softplus(x) = log(1 + e^x), written so that e^x never overflows: max(x, 0) + log1p(e^-|x|)
    OpKind.MISH: _one(lambda run, n, x: x * torch.tanh(x.clamp_min(0) + torch.log1p(torch.exp(-x.abs())))),
    OpKind.MAXPOOL: _pool(F.max_pool2d),
    OpKind.AVGPOOL: _pool(F.avg_pool2d),  # zero padding counts in the mean, as in nn.AvgPool2d
    OpKind.CONCAT: lambda run, n, args: torch.cat(args, 1),
    OpKind.DROPOUT: _one(_dropout),
    OpKind.GLOBAL_AVGPOOL: _one(lambda run, n, x: x.mean((2, 3), keepdim=True)),
    OpKind.FLATTEN: _one(lambda run, n, x: x.flatten(1)),
    OpKind.LINEAR: _one(_linear),
    OpKind.CONV_BN: _one(_conv_bn),
    OpKind.BN_RELU: _one(_bn_relu),
    OpKind.BN_CLAMP: _one(_bn_relu),
    OpKind.BUFFER_CONCAT: lambda run, n, args: torch.cat(args, 1),
}

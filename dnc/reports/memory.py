"""Training memory of an inferred IR, estimated statically (no torch): what `dnc summary --batch N` shows.

A training step keeps, until backward has used them, the tensors each op's backward
needs, as PyTorch's autograd saves them; the op table says which (`OpDef.saves`: for
example a conv its input, a ReLU its output, a max pool its input and int64 indices
the size of its output, a dropout a one-byte mask; a flatten's output is a view of its
input, `OpDef.view`).

A tensor several ops save is counted once. With `memory_efficient`, each dense layer with a
bottleneck recomputes its concat, norm1, relu1 and conv1 in backward (torch.utils.checkpoint):
those save nothing, and the checkpoint keeps only its inputs (tensors the block keeps anyway).
Recomputation briefly rebuilds one layer's concatenation in backward; that, the gradients of
activations in flight, BN's per-channel statistics and the allocator's slack are not counted.
The network input is not counted either: it exists whether or not you train.

Everything is float32; a parameter's gradient is its size again; the optimizer state is one
buffer per parameter for SGD with momentum and two for AdamW (exp_avg, exp_avg_sq).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import networkx as nx

from dnc.ir.graph import Node, OpKind, UnitKind, input_nodes, ordered
from dnc.ir.ops import OPS

FLOAT = 4  # bytes of a float32
INDEX = 8  # bytes of an int64 counter (a batch norm's num_batches_tracked)

OPTIMIZERS = {"sgd_momentum": ("SGD with momentum", 1), "adamw": ("AdamW", 2)}


@dataclass(frozen=True)
class StageMemory:
    stage: str
    activations: int  # bytes kept for backward
    activations_memory_efficient: int  # the same with memory_efficient recomputation
    weights: int  # parameters and buffers


@dataclass(frozen=True)
class TrainingMemory:
    batch: int
    stages: list[StageMemory]
    activations: int
    activations_memory_efficient: int
    weights: int  # parameters and float32 buffers (BN running statistics)
    gradients: int
    optimizer_state: dict[str, int]  # optimizer name -> bytes

    def total(self, optimizer: str, memory_efficient: bool) -> int:
        acts = self.activations_memory_efficient if memory_efficient else self.activations
        return acts + self.weights + self.gradients + self.optimizer_state[optimizer]

    def to_json(self) -> dict:
        data = asdict(self)
        data["optimizers"] = {key: name for key, (name, _) in OPTIMIZERS.items()}
        data["totals"] = {
            f"{opt}{'_memory_efficient' if me else ''}": self.total(opt, me)
            for opt in OPTIMIZERS
            for me in (False, True)
        }
        return data


def training_memory(graph: nx.DiGraph, batch: int) -> TrainingMemory:
    """Bytes a float32 training step with `batch` samples keeps, per stage and in total."""
    plain = _saved(graph, recompute=set())
    efficient = _saved(graph, recompute=_recomputed(graph))
    rows: dict[str, list[int]] = {}
    params = 0
    for n in ordered(graph):
        if n.unit.kind is UnitKind.INPUT:
            continue
        row = rows.setdefault(n.stage, [0, 0, 0])
        row[0] += plain.get(n.scope, 0) * batch
        row[1] += efficient.get(n.scope, 0) * batch
        row[2] += sum(t.numel * (INDEX if t.integer else FLOAT) for t in n.tensors)
        params += n.params
    stages = [StageMemory(stage, *row) for stage, row in rows.items()]
    return TrainingMemory(
        batch=batch,
        stages=stages,
        activations=sum(s.activations for s in stages),
        activations_memory_efficient=sum(s.activations_memory_efficient for s in stages),
        weights=sum(s.weights for s in stages),
        gradients=params * FLOAT,
        optimizer_state={key: params * FLOAT * buffers for key, (_, buffers) in OPTIMIZERS.items()},
    )


def _recomputed(graph: nx.DiGraph) -> set[str]:
    """The nodes memory_efficient recomputes: in each dense layer with a bottleneck, up to its first conv
    (torch.utils.checkpoint). A layer whose batch norm shares its block's statistics (pass share_bn_stats)
    recomputes everything after that norm instead, which keeps only the block's normalised maps."""
    out: set[str] = set()
    layers: dict = {}
    for n in ordered(graph):
        if n.unit.kind is UnitKind.DENSE_LAYER:
            layers.setdefault(n.unit, []).append(n)
    for members in layers.values():
        convs = [i for i, n in enumerate(members) if n.op is OpKind.CONV]
        if len(convs) == 2:  # bottleneck: conv1 (1x1) then conv2 (3x3)
            shared = [i for i, n in enumerate(members) if n.op is OpKind.SHARED_BATCHNORM]
            out.update(n.scope for n in (members[shared[0] + 1 :] if shared else members[: convs[0] + 1]))
    return out


def _saved(graph: nx.DiGraph, recompute: set[str]) -> dict[str, int]:
    """Bytes per sample each node's saved tensors take, charged to the first node that saves them."""
    owner: dict[str, str] = {}  # tensor (its producer's scope) -> the node charged for it
    size: dict[str, int] = {}

    def keep(tensor: Node, by: Node, nbytes: int, key: str | None = None) -> None:
        key = key or tensor.scope
        if key not in owner and tensor.op is not OpKind.INPUT:
            owner[key] = by.scope
            size[key] = nbytes

    nodes = ordered(graph)
    # dense layers whose batch norm shares its block's statistics: memory_efficient keeps nothing of them
    fused = {n.unit for n in nodes if n.op is OpKind.SHARED_BATCHNORM and n.unit.kind is UnitKind.DENSE_LAYER}
    for n in nodes:
        sources = input_nodes(graph, n)
        if n.recomputed or (n.scope in recompute and n.unit in fused):
            continue  # its backward recomputes what it needs from what others keep
        if n.scope in recompute:
            for src in sources:  # the checkpoint keeps its inputs: the tensors from outside it
                if src.scope not in recompute:
                    keep(_storage(graph, src), n, _numel(src) * FLOAT)
            continue
        for saved in OPS[n.op].saves(n.attrs):
            if saved.of == "maps":  # one normalised copy of each map the input concatenates, whoever reads it
                maps = input_nodes(graph, sources[0]) if sources[0].op is OpKind.CONCAT else sources[:1]
                for m in maps:
                    keep(m, n, _numel(m) * FLOAT, key=f"{m.scope}#{saved.tag}")
                continue
            tensor = sources[0] if saved.of == "input" else n
            if saved.of == "input" and n.op is OpKind.MAXPOOL and sources[0].recomputed:
                tensor = n  # a max pool after a ReLU that keeps nothing (-O1's stem) keeps its output instead
            if saved.of == "input" and tensor.op is OpKind.INPUT and fused:
                # the fused path runs channels_last on the CPU: the stem keeps its copy of an NCHW input (the caller's
                # own input is not counted)
                keep(n, n, _numel(tensor) * FLOAT, key=f"{tensor.scope}#channels_last")
                continue
            if saved.itemsize:  # a companion the size of the tensor (indices, a mask), counted on its own
                keep(n, n, _numel(tensor) * saved.itemsize, key=f"{n.scope}#{saved.tag}")
            else:
                keep(_storage(graph, tensor), n, _numel(tensor) * FLOAT)
    out: dict[str, int] = {}
    for key, scope in owner.items():
        out[scope] = out.get(scope, 0) + size[key]
    return out


def _storage(graph: nx.DiGraph, n: Node) -> Node:
    """The node whose memory `n`'s output is: a view's is its input's."""
    while OPS[n.op].view:
        n = input_nodes(graph, n)[0]
    return n


def _numel(n: Node) -> int:
    return math.prod(n.shape)

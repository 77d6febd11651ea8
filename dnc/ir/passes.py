"""Optimisation passes: IR -> IR rewrites that know DenseNet's structure, and the -O levels.

Each pass is a pure function of an inferred IR that returns a new, re-inferred one
(the pipeline verifies it), registered once in `PASSES` with its level, the targets
it serves, its kind and one line on what it does. A *rewrite* changes nodes; a
*setting* changes only `Settings` (dnc/ir/settings.py), what applies to the whole
network, and leaves every node as it was:

- level 1 keeps training semantics and the state_dict layout: the output still trains;
- level 2 adds rewrites that hold only in eval mode: they make ops the op table marks
  `eval_only` (or a setting that is), so the graph is inference-only
  (`graph.inference_only`) and the torch emitter writes a module that refuses training.

Every rewrite is exact algebra; none renames a state_dict key (a folded batch norm's
tensors keep theirs, see `ops.Tensor.module`). No torch here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import networkx as nx

from dnc.errors import DncError
from dnc.files import size_text
from dnc.ir.graph import (
    BufferAttrs,
    ConvBNAttrs,
    Node,
    OpKind,
    UnitKind,
    commutes_with_affine,
    copy,
    input_nodes,
    inputs,
    node,
    ordered,
    replace_input,
    replace_node,
    takes_pre,
    units,
)
from dnc.ir.infer import infer_in_place
from dnc.ir.settings import Settings

Pass = Callable[[nx.DiGraph], nx.DiGraph]
NamedPass = tuple[str, "Pass | Rewrite | Setting"]  # what the pipeline runs: a name and a rewrite or a setting

LEVELS = (0, 1, 2)
# batch_tile: the most bytes of features one tile of samples may hold. Every op is per sample in eval
# mode, so a dense block can run its layers a few samples at a time; the transient bottleneck input
# then stays near the caches and peak memory drops. Measured in benchmarks/opt_levels.py (README).
TILE_BYTES = 16 << 20


@dataclass(frozen=True)
class PassInfo:
    name: str
    level: int  # the lowest -O level that runs it
    targets: frozenset[str]
    doc: str
    run: Rewrite | Setting
    last: int = LEVELS[-1]  # the highest -O level that runs it

    def runs_at(self, level: int) -> bool:
        return self.level <= level <= self.last

    @property
    def levels(self) -> str:
        """ "-O1", "-O1+" (and above), "-O1-O2" (a range)."""
        if self.level == self.last:
            return f"-O{self.level}"
        return f"-O{self.level}+" if self.last == LEVELS[-1] else f"-O{self.level}-O{self.last}"

    @property
    def kind(self) -> str:
        """ "rewrite": changes nodes (IR -> IR); "setting": changes only the graph's Settings."""
        return "setting" if isinstance(self.run, Setting) else "rewrite"


@dataclass(frozen=True)
class Rewrite:
    """A pass that changes nodes: IR -> IR. Called, it rewrites a copy of the graph it is given (a pure function);
    the pipeline, which owns the graph it hands over and keeps none, calls `in_place` and saves the copy."""

    rewrite: Callable[[nx.DiGraph], nx.DiGraph]  # rewrites its argument and infers what it changed
    doc: str

    def __call__(self, graph: nx.DiGraph) -> nx.DiGraph:
        return self.rewrite(copy(graph))

    def in_place(self, graph: nx.DiGraph) -> nx.DiGraph:
        return self.rewrite(graph)


def _rewrite(fn: Callable[[nx.DiGraph], nx.DiGraph]) -> Rewrite:
    """A rewrite pass, from a function that rewrites the graph it is given."""
    return Rewrite(fn, fn.__doc__)


def _change(graph: nx.DiGraph, n: Node, **changes) -> None:
    """Replace `n` by a changed record whose tensors and counts inference fills in again (and its shape, which
    it keeps until then: inference compares the new shape with it to know whether its readers change too).

    Every node a pass changes or rewires goes through here: `infer_in_place` then recomputes it and what
    reads it, and leaves the rest (the verifier re-derives each of those, and each of their readers)."""
    replace_node(graph, n.replace(**changes, tensors=None, params=None, macs=None))


def _sole_consumer(graph: nx.DiGraph, n: Node) -> Node | None:
    succ = list(graph._succ[n.scope])  # NOTE: networkx's own dict
    return node(graph, succ[0]) if len(succ) == 1 else None


def _bypass(graph: nx.DiGraph, dropped: Node, into: Node) -> None:
    """Remove `dropped`, whose one input is `into`; its consumers read `into` at the same ports."""
    replace_input(graph, dropped.scope, into.scope)
    graph.remove_node(dropped.scope)


@_rewrite
def pool_first(graph: nx.DiGraph) -> nx.DiGraph:
    """Transition: 2x2 average pool before the 1x1 conv (both linear, so they commute): 1/4 of its MACs."""
    for n in ordered(graph):
        pool = _sole_consumer(graph, n) if n.op is OpKind.CONV else None
        if pool is None or pool.op is not OpKind.AVGPOOL or n.unit.kind is not UnitKind.TRANSITION:
            continue
        c, p = n.attrs, pool.attrs
        if not c.pointwise or p.padding != 0 or p.kernel != p.stride:
            continue  # only a pointwise conv commutes with a non-overlapping, unpadded pool
        (src,) = inputs(graph, n.scope)
        graph.remove_edge(src, n.scope)
        graph.remove_edge(n.scope, pool.scope)
        replace_input(graph, pool.scope, n.scope)
        graph.add_edge(src, pool.scope, port=0)
        graph.add_edge(pool.scope, n.scope, port=0)
        # creation order stays a topological order: the pool takes the conv's place
        _change(graph, pool, order=n.order)
        _change(graph, n, order=pool.order)
    return infer_in_place(graph)


@_rewrite
def fold_conv_bn(graph: nx.DiGraph) -> nx.DiGraph:
    """A batch norm right after a conv (stem norm0, each bottleneck's norm2) folded into it; the conv gains a bias."""
    for n in ordered(graph):
        bn = _sole_consumer(graph, n) if n.op is OpKind.CONV else None
        if bn is None or bn.op is not OpKind.BATCHNORM or bn.path[:-1] != n.path[:-1]:
            continue
        attrs = ConvBNAttrs(conv=n.attrs, norm=bn.name, bn=bn.attrs)
        _bypass(graph, bn, n)
        _change(graph, n, op=OpKind.CONV_BN, attrs=attrs)
    return infer_in_place(graph)


@_rewrite
def fuse_bn_relu(graph: nx.DiGraph) -> nx.DiGraph:
    """Pre-activation batch norm + ReLU as one step: a multiply-add by the folded scale and shift, then ReLU."""
    for n in ordered(graph):
        relu = _sole_consumer(graph, n) if n.op is OpKind.BATCHNORM else None
        if relu is None or relu.op is not OpKind.RELU or relu.unit != n.unit:
            continue
        _bypass(graph, relu, n)
        _change(graph, n, op=OpKind.BN_RELU)
    return infer_in_place(graph)


@_rewrite
def fold_preact_bn(graph: nx.DiGraph) -> nx.DiGraph:
    """A pre-activation BN+ReLU feeding a 1x1 conv or the classifier: the BN's scale and shift move into that
    layer (across pools), its ReLU becomes a per-channel clamp: one pass over the data instead of two."""
    for n in ordered(graph):
        relu = _sole_consumer(graph, n) if n.op is OpKind.BATCHNORM else None
        fused = n.op is OpKind.BN_RELU
        if not fused and (relu is None or relu.op is not OpKind.RELU or relu.unit != n.unit):
            continue
        target = _affine_reader(graph, n if fused else relu)
        parent = target.path[:-1] if target else ()
        if target is None or n.path[: len(parent)] != parent:
            continue
        if not fused:
            _bypass(graph, relu, n)
        # relu(s*x + b) = s*max(x, -b/s) + b where s > 0 (min where s < 0): the clamp stays, s and b move on
        _change(graph, n, op=OpKind.BN_CLAMP)
        pre = n.path[len(parent) :]
        if target.op is OpKind.CONV_BN:
            attrs = dataclasses.replace(target.attrs, conv=dataclasses.replace(target.attrs.conv, pre=pre))
        else:
            attrs = dataclasses.replace(target.attrs, pre=pre)
        _change(graph, target, attrs=attrs)
    return infer_in_place(graph)


def _affine_reader(graph: nx.DiGraph, n: Node) -> Node | None:
    """The conv or linear layer that may apply a per-channel affine in place of `n`'s readers, if any.

    It reads `n` through a chain of sole consumers that commute with the affine (pools), pads nothing,
    takes no affine yet, and reads as many features as `n` has channels."""
    at = _sole_consumer(graph, n)
    while at is not None and commutes_with_affine(at):
        at = _sole_consumer(graph, at)
    if at is None or not takes_pre(at) or at.attrs.pre:
        return None
    return at if input_nodes(graph, at)[0].shape[0] == n.shape[0] else None


@_rewrite
def block_buffer(graph: nx.DiGraph) -> nx.DiGraph:
    """Each dense block writes every layer's new features once into one preallocated buffer; concats become views."""
    # the block buffer holds the block's output: its concat's channels
    outputs = {n.unit.block: n.shape[0] for n in ordered(graph) if n.unit.kind is UnitKind.BLOCK_OUTPUT}
    for n in ordered(graph):
        if n.op is not OpKind.CONCAT or n.unit.kind not in (UnitKind.DENSE_LAYER, UnitKind.BLOCK_OUTPUT):
            continue
        if n.unit.block not in outputs:
            raise DncError(f"{n.scope}: its dense block has no output concat")
        _change(graph, n, op=OpKind.BUFFER_CONCAT, attrs=BufferAttrs(outputs[n.unit.block]))
    return infer_in_place(graph)


@_rewrite
def share_bn_stats(graph: nx.DiGraph) -> nx.DiGraph:
    """Training: each dense block's feature maps are normalised once per step, their batch statistics shared by every
    batch norm that reads them (each applies its own scale and shift and keeps its own running statistics); the
    ReLU after such a norm and what it feeds are recomputed in backward; the stem's ReLU keeps nothing (its max pool
    keeps its output, where the ReLU's mask is read)."""
    # NOTE: exact in train mode (one map's statistics are the same for every reader) and in eval (each reader's own
    # running statistics: the runtime then runs the -O0 computation). All or nothing, as the runtime decides.
    plan = _training_plan(graph)
    if plan is None:
        return graph
    shared, recomputed = plan
    for n in shared:
        _change(graph, n, op=OpKind.SHARED_BATCHNORM)
    for n in recomputed:
        replace_node(graph, node(graph, n.scope).replace(recomputed=True))
    return infer_in_place(graph)


def _training_plan(graph: nx.DiGraph) -> tuple[list[Node], list[Node]] | None:
    """The batch norms that read a block's maps and the ops recomputed in backward, where the network has the form the
    training runtime fuses (ReLU activations, bottleneck or plain layers, transitions, norm5 and relu5); else None."""
    shared, recomputed = [], []

    def ops(chain: list[Node]) -> list[OpKind]:
        return [n.op for n in chain]

    def same_size(chain: list[Node]) -> bool:  # the convs keep H and W: stride 1, "same" padding, no bias
        convs = [n.attrs for n in chain if n.op is OpKind.CONV]
        return all(a.stride == 1 and a.kernel == 2 * a.padding + 1 and not a.bias for a in convs)

    for unit, chain in units(graph).items():
        kind = unit.kind
        if kind is UnitKind.STEM:
            if ops(chain) == [OpKind.CONV, OpKind.BATCHNORM, OpKind.RELU, OpKind.MAXPOOL] and not chain[0].attrs.bias:
                # conv0's output (norm0's input) and the pool's output and indices are what the stem keeps: relu0's
                # output is not kept (its mask is read at the pool's maxima, where it is the pooled value)
                recomputed.append(chain[2])
        elif kind is UnitKind.DENSE_LAYER:
            body = [n for n in chain if n.op is not OpKind.CONCAT]
            core = [n.op for n in body if n.op is not OpKind.DROPOUT]
            bottleneck = [OpKind.BATCHNORM, OpKind.RELU, OpKind.CONV] * 2
            if core not in (bottleneck, bottleneck[:3]) or not same_size(body):
                return None
            if core == bottleneck and [n.attrs.kernel for n in body if n.op is OpKind.CONV][1] != 3:
                return None  # the runtime's second conv is 3x3
            shared.append(body[0])
            recomputed += [n for n in body[1:3] if n.op is not OpKind.DROPOUT]  # relu1, and conv1 reads it
        elif kind is UnitKind.TRANSITION:
            pools = [n.attrs for n in chain if n.op is OpKind.AVGPOOL]
            if ops(chain)[:2] != [OpKind.BATCHNORM, OpKind.RELU] or not same_size(chain):
                return None
            if [(a.kernel, a.stride, a.padding) for a in pools] != [(2, 2, 0)]:
                return None
            if any(n.attrs.kernel != 1 for n in chain if n.op is OpKind.CONV):
                return None
            shared.append(chain[0])
            if ops(chain) == [OpKind.BATCHNORM, OpKind.RELU, OpKind.AVGPOOL, OpKind.CONV]:
                recomputed += chain[1:]  # pool first: one kernel keeps nothing but the block's maps
            elif [n.op for n in chain if n.op is not OpKind.DROPOUT] == [
                OpKind.BATCHNORM,
                OpKind.RELU,
                OpKind.CONV,
                OpKind.AVGPOOL,
            ]:
                recomputed.append(chain[1])  # a dropout between conv and pool: the conv keeps the ReLU's output
            else:
                return None
        elif kind is UnitKind.HEAD:
            if ops(chain)[:2] != [OpKind.BATCHNORM, OpKind.RELU]:
                return None
            shared.append(chain[0])
            recomputed.append(chain[1])
    return (shared, recomputed) if shared else None


@dataclass(frozen=True)
class Setting:
    """A pass that only chooses settings: Settings -> Settings. It changes no node, so the pipeline applies it to the
    graph's settings without copying or re-verifying the graph."""

    changes: tuple[tuple[str, object], ...]
    doc: str

    def __call__(self, settings: Settings) -> Settings:
        return settings.replace(**dict(self.changes))


# NOTE: exact only in eval mode: a training batch norm's statistics span the whole batch (Settings.eval_only)
batch_tile = Setting((("batch_tile_bytes", TILE_BYTES),), "Dense blocks and transitions run a few samples at a time.")
# NOTE: below batch 16 on one thread torch runs a 1x1 conv in float32 as a GEMM; oneDNN's kernel was 1.33x faster on
# an AMD Zen 5 and 0.9x on an Intel Xeon with AMX: which one wins depends on the host, so it is measured there.
measure_1x1 = Setting(
    (("conv1x1", "measured"),),
    "1x1 convolutions on the CPU choose oneDNN's kernel or torch's own on their first calls, timed where the model "
    "runs, per shape, dtype, thread count and mode (not when traced or scripted).",
)
# NOTE: torch reorders a weight into oneDNN's blocked layout on every call of its convolution (3.0 of 22.3 ms of a
# densenet121 batch-1 forward); torch's private ops that Inductor's CPU path uses keep it. Eval only: they have no
# autograd. Not always faster (forced on every conv, batch 1 on one thread ran slower; packed without the input's
# shape, one 1x1 conv ran 18x slower): so it is a candidate of the measured kernel choice, timed per key.
pack_weights = Setting(
    (("packed_weights", True),),
    "In eval, convolutions may also choose oneDNN's kernel with their weight kept in oneDNN's blocked layout between "
    "calls (torch reorders it on every call), timed against the others where the model runs; 3x3 convolutions choose "
    "their kernel as 1x1 ones do (with measure_1x1).",
)
channels_last = Setting(
    (("memory_format", "channels_last"),),
    "Run in the channels_last memory format (NHWC): the input is converted once, inside forward.",
)


_tile_doc = f"Dense blocks and transitions run as many samples at a time as {size_text(TILE_BYTES)} of features hold."
PASSES: dict[str, PassInfo] = {
    p.name: p
    for p in (
        PassInfo("pool_first", 1, frozenset({"torch", "onnx"}), pool_first.doc, pool_first),
        # -O1 only: it serves training, and -O2 (inference only) folds every batch norm instead
        PassInfo("share_bn_stats", 1, frozenset({"torch"}), share_bn_stats.doc, share_bn_stats, last=1),
        PassInfo("measure_1x1", 1, frozenset({"torch"}), measure_1x1.doc, measure_1x1),
        PassInfo("fold_conv_bn", 2, frozenset({"torch", "onnx"}), fold_conv_bn.doc, fold_conv_bn),
        PassInfo("fuse_bn_relu", 2, frozenset({"torch", "onnx"}), fuse_bn_relu.doc, fuse_bn_relu),
        PassInfo("fold_preact_bn", 2, frozenset({"torch"}), fold_preact_bn.doc, fold_preact_bn),
        PassInfo("block_buffer", 2, frozenset({"torch"}), block_buffer.doc, block_buffer),
        PassInfo("batch_tile", 2, frozenset({"torch"}), _tile_doc, batch_tile),
        PassInfo("pack_weights", 2, frozenset({"torch"}), pack_weights.doc, pack_weights),
        PassInfo("channels_last", 2, frozenset({"torch"}), channels_last.doc, channels_last),
    )
}


def select(target: str, level: int, enable: Iterable[str] = (), disable: Iterable[str] = ()) -> list[NamedPass]:
    """The passes `target` runs at -O`level`, plus `enable`, minus `disable`, in registry order."""
    enable, disable = set(enable), set(disable)
    unknown = sorted((enable | disable) - set(PASSES))
    if unknown:
        raise DncError(f"unknown pass '{unknown[0]}': expected one of {', '.join(PASSES)}")
    if level not in LEVELS:
        raise DncError(f"-O{level}: expected one of {', '.join(f'-O{v}' for v in LEVELS)}")
    chosen = []
    for p in PASSES.values():
        wanted = (p.runs_at(level) or p.name in enable) and p.name not in disable
        if wanted and target not in p.targets:
            if p.name in enable:
                raise DncError(f"pass '{p.name}' is not for --target {target} (only {', '.join(sorted(p.targets))})")
            continue
        if wanted:
            chosen.append((p.name, p.run))
    return chosen


def names(passes: Sequence[NamedPass]) -> list[str]:
    return [name for name, _ in passes]

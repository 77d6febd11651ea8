"""ONNX emitter: inferred IR + state dict -> an inference-mode `onnx.ModelProto`.

Built with onnx.helper straight from the IR (no torch.onnx.export): one ONNX node
per IR node, named by its scope, its output tensor named by its scope too, so a
node in Netron reads like the torchvision module it stands for. Initializer names
are the torch state_dict keys.

Choices, and why:
- Eval mode only: BatchNormalization in inference mode (running statistics),
  dropout omitted (it is the identity at inference; torch.onnx.export drops it too).
- `num_batches_tracked` is not an initializer: no inference op reads it, and ONNX
  checkers and runtimes would carry an unused int64 tensor per BN layer.
- Weights are stored as float32 whatever the checkpoint's float type, or as float16 with
  `dtype="float16"` (for GPU execution providers): then the input and output are float16
  too, every weight is cast once from its widest form (a checkpoint's float32 or float64, a
  fold's float64), and one beyond float16's range is refused by key rather than stored as
  infinity. float32 is the default and is not recorded, so its bytes do not depend on
  whether `--dtype float32` was given.
- The batch axis is the symbolic dim "batch"; the input is "input", the output
  "logits".
- The IR version is the lowest that the chosen opset needs, so a model at an old
  opset also loads in an old runtime.
- Pass outputs (dnc/ir/passes.py): a conv with a folded batch norm is one Conv whose
  weight and bias are computed here from the checkpoint, named `<conv key>.folded_weight`
  and `<conv key>.folded_bias` (e.g. `features.conv0.folded_weight`); a fused BN+ReLU is
  BatchNormalization then Relu (`<norm key>/relu`); a block-buffer concat is a Concat.
"""

from __future__ import annotations

from collections.abc import Mapping

import networkx as nx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dnc import __version__
from dnc.errors import EmitError
from dnc.ir.graph import Node, OpKind, graph_input, inputs, ordered, output
from dnc.ir.infer import state_dict_layout
from dnc.ir.ops import OPS, OnnxNode, conv_bn_fold
from dnc.targets.provenance import command, record
from dnc.text import comment_safe
from dnc.weights import network_state

MIN_OPSET = 13  # from 13 on, each op emitted here means the same at inference in every opset
# NOTE: onnxruntime 1.32 runs opset 28 and rejects 29; onnx 1.23 knows up to 28. Raise this
# together with the pinned onnx/onnxruntime (tests/test_onnx_target.py checks both ends).
MAX_OPSET = min(28, onnx.defs.onnx_opset_version())
DEFAULT_OPSET = 17  # widely supported by deployed runtimes (onnxruntime >= 1.13, TensorRT 8.6)
# --dtype: the element type of the weights, the input and the output
DTYPES = {"float32": (TensorProto.FLOAT, np.float32), "float16": (TensorProto.FLOAT16, np.float16)}
DEFAULT_DTYPE = "float32"
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: above it float16 holds only infinity
SUFFIX = ".onnx"
INPUT_NAME, OUTPUT_NAME, BATCH = "input", "logits", "batch"
# NOTE: protobuf serialises one message of at most 2 GiB; the graph itself needs room beside the weights
MAX_MODEL_BYTES = (2 << 30) - (64 << 20)
INT64_MAX = 2**63 - 1  # ONNX's dimensions


def check_opset(opset: int) -> None:
    """Raise EmitError unless dnc can emit `opset`."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise EmitError(f"--opset {opset} is not supported: choose {MIN_OPSET} to {MAX_OPSET}")


def check_dtype(dtype: str) -> None:
    """Raise EmitError unless dnc can emit weights of `dtype`."""
    if dtype not in DTYPES:
        raise EmitError(f"--dtype {dtype} is not supported: choose {' or '.join(DTYPES)}")


def check_model_size(graph: nx.DiGraph, dtype: str = DEFAULT_DTYPE) -> None:
    """Refuse, before any weight exists, a model whose weights do not fit one protobuf message."""
    itemsize = np.dtype(DTYPES[dtype][1]).itemsize
    size = itemsize * sum(t.numel for t in state_dict_layout(graph).values() if t.onnx)
    if size > MAX_MODEL_BYTES:
        raise EmitError(
            f"the ONNX model's weights take {size / (1 << 30):.1f} GiB, over the 2 GiB that one ONNX file "
            "(a protobuf message) can hold; dnc does not write external data: make the network smaller"
        )


def initializer_keys(graph: nx.DiGraph) -> list[str]:
    """The state_dict keys that become initializers: those an inference op reads (op table's `onnx`)."""
    return [k for k, t in state_dict_layout(graph).items() if t.onnx]


def emit_onnx(
    graph: nx.DiGraph,
    state: Mapping[str, np.ndarray],
    opset: int = DEFAULT_OPSET,
    options: dict | None = None,
    dtype: str = DEFAULT_DTYPE,
) -> onnx.ModelProto:
    """The inference-mode ONNX model of an inferred IR, with `state`'s weights as initializers.

    `state` maps torch state_dict keys to arrays (checked against the IR by the caller,
    see `weights.check_state`); keys no op reads are ignored. `dtype` is the element type
    of the weights, the input and the output (DTYPES).
    """
    check_opset(opset)
    check_dtype(dtype)
    names: dict[str, str] = {}  # IR scope -> the tensor holding its output
    nodes, used = [], []
    folded: dict[str, np.ndarray] = {}
    for n in ordered(graph):
        srcs = [names[s] for s in inputs(graph, n.scope)]
        if n.op is OpKind.INPUT:
            names[n.scope] = INPUT_NAME
            continue
        form = OPS[n.op].onnx
        if form is None:
            raise EmitError(f"{n.scope}: no ONNX rule for op '{n.op.value}'", n.origin)
        out = OUTPUT_NAME if graph.out_degree(n.scope) == 0 else n.scope
        if n.op is OpKind.CONV_BN:
            _check_weights(n, state)
            for suffix, value in conv_bn_fold(n.attrs, _getter(n, state)).items():
                folded[f"{n.scope}.{suffix}"] = value
            params = [f"{n.scope}.folded_weight", f"{n.scope}.folded_bias"]
        else:
            params = _param_keys(n)
        made = [_node(spec) for spec in form(n.attrs, srcs + params, out, n.scope, opset)]
        if not made:  # the identity at inference (dropout): its output is its input
            names[n.scope] = srcs[0]
            continue
        nodes += made
        used += params
        names[n.scope] = out

    missing = [k for k in used if k not in state and k not in folded]
    if missing:
        raise EmitError(f"no weights for {len(missing)} parameters (first: {missing[0]})")
    elem_type, np_dtype = DTYPES[dtype]
    initializers = [_initializer(k, folded[k] if k in folded else state[k], np_dtype) for k in used]
    first, last = graph_input(graph), output(graph)
    for what, shape in (("input", first.shape), ("output", last.shape)):
        if max(shape) > INT64_MAX:  # a limit raised with --limit can let a side through that ONNX cannot store
            raise EmitError(f"the {what} shape {'x'.join(map(str, shape))} does not fit ONNX's int64 dimensions")
    x = helper.make_tensor_value_info(INPUT_NAME, elem_type, [BATCH, *first.shape])
    y = helper.make_tensor_value_info(OUTPUT_NAME, elem_type, [BATCH, *last.shape])
    name = graph.graph.get("name", "densenet")
    source = comment_safe(graph.graph.get("source", ""))  # a file name need not be UTF-8: protobuf strings must
    onnx_graph = helper.make_graph(nodes, name, [x], [y], initializer=initializers)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        onnx_graph,
        opset_imports=opsets,
        ir_version=helper.find_min_ir_version_for(opsets),
        producer_name="dnc",
        producer_version=__version__,
        doc_string=f"{name}, compiled by dnc from {source or 'a spec'}; inference mode",
    )
    recorded = {k: v for k, v in (options or {}).items() if k not in ("opset", "dtype")} | {"opset": opset}
    if dtype != DEFAULT_DTYPE:  # float32 unrecorded: its bytes stay what they were before --dtype existed
        recorded["dtype"] = dtype
    rec = record(graph, "onnx", recorded)
    props = {"dnc.spec": source, "dnc.network": name, "dnc.regenerate": comment_safe(command(rec))}
    helper.set_model_props(model, props)
    return model


def _check_weights(n: Node, state: Mapping[str, np.ndarray]) -> None:
    missing = [n.key(t) for t in n.tensors if not t.integer and n.key(t) not in state]
    if missing:
        raise EmitError(f"no weights for {len(missing)} parameters (first: {missing[0]})")


def _getter(n: Node, state: Mapping[str, np.ndarray]):
    """(module, name) -> the float64 array of one of a node's tensors: "" is the node's own module."""
    keys = {(t.module, t.name): n.key(t) for t in n.tensors}
    return lambda module, name: np.asarray(state[keys[module, name]], np.float64)


def _initializer(key: str, value: np.ndarray, np_dtype: type) -> onnx.TensorProto:
    """The initializer `key`, cast once to `np_dtype` from `value` (float32 or wider); EmitError if it overflows."""
    value = np.asarray(value)
    if np_dtype is np.float16 and value.size and np.abs(value).max() > FLOAT16_MAX:
        folded = " (a conv's with its batch norm folded in)" if key.endswith((".folded_weight", ".folded_bias")) else ""
        raise EmitError(
            f"--dtype float16: weight {key}{folded} holds {np.abs(value).max():.6g}, beyond float16's largest "
            f"value {FLOAT16_MAX:g}; keep --dtype float32 for these weights"
        )
    return numpy_helper.from_array(value.astype(np_dtype), key)


def _param_keys(n: Node) -> list[str]:
    """The node's weight inputs, in ONNX's input order (the op table's order), named as torch names them."""
    return [n.key(t) for t in n.tensors if t.onnx]


def _node(spec: OnnxNode) -> onnx.NodeProto:
    return helper.make_node(spec.op_type, list(spec.inputs), list(spec.outputs), spec.name, **dict(spec.attrs))


def emit(graph: nx.DiGraph, options: dict | None = None) -> bytes:
    """The serialised model of `graph` (deterministic bytes); options: weights (a checkpoint), seed, opset, dtype."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    opset, dtype = options.get("opset", DEFAULT_OPSET), options.get("dtype", DEFAULT_DTYPE)
    check_opset(opset)
    check_dtype(dtype)
    check_model_size(graph, dtype)
    state = network_state(state_dict_layout(graph), options.get("weights"), options.get("seed", 0))
    return emit_onnx(graph, state, opset, options, dtype).SerializeToString(deterministic=True)

"""dnc: a declarative graph compiler for DenseNets.

The pipeline, one module per stage (each arrow a pure function):

    loader.load_spec   YAML -> Spec (pydantic)
    lower.lower        Spec -> IR (networkx.DiGraph of ir.Node)
    infer.infer        IR -> IR with shapes, params and MACs
    emit_torch / emit_onnx   IR -> generated code or model
"""

__version__ = "0.2.0"  # the one place the version is decided (pyproject.toml reads it)

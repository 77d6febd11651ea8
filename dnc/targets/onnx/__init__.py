"""The ONNX target: `emit` builds an ONNX model from the IR with onnx.helper, `run` runs it on onnxruntime."""

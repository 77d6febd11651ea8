"""The torch target: `emit` writes a standalone PyTorch module from the IR, `run` imports and runs it."""

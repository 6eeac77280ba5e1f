"""toolchain.export: exporters that read a compressed model's integer state (blob, ONNX, interop)."""

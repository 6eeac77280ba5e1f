"""GPU target: 2:4 TensorRT-ready bundles (an ONNX graph whose decoder GEMM weights carry 2:4 along K, engine
build scripts, a manifest) and their runner."""

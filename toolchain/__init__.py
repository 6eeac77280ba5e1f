"""toolchain: prune, quantize and export pretrained LLMs down to FPGA and GPU targets."""

__version__ = "0.1.0"

"""The code widths a quantized weight may have. The quantizer's grid, the blob format and the FPGA datapath
all support exactly these; an exporter whose target format supports fewer checks its own subset."""

SUPPORTED_BITS = (2, 3, 4, 8)

"""FPGA target: an accelerator config object, the plain parameterised SystemVerilog of rtl_templates/ and HLS
C++ of hls/ with the design's constants rendered beside them, and a writer that lays out the bundle (RTL, weight images, contract, testbench, report)."""

"""FPGA target: an accelerator config object, Jinja2 templates in rtl_templates/ and hls/ that only render,
and a writer that lays out the bundle (RTL, weight images, contract, testbench, report)."""

"""toolchain.sim: integer golden models, cocotb benches and simulator runners for the FPGA target."""

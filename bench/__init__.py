"""Every benchmark of the toolchain (package `toolchain.bench`), its stand-alone scripts and its results.

- `registry`: `toolchain bench WHAT` by name (`run_benchmark`); `common`: what the benchmarks share (the work
  dir under --out, `--only` checks, result files).
- `prune`, `quality`, `quant`, `export`, `fpga`, `fpga_dram`: one benchmark each.
- `gpu/`: `toolchain gpu-bench` (GPU spec tables, roofline estimate, CUDA measurement, report and plot).
- `scripts/`: stand-alone measurements run by hand; `results/`: the result files (data, not code).

The product (`toolchain.*`) never imports this package; `toolchain.cli` calls into it for its bench commands.
"""

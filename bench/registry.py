"""`toolchain bench WHAT`: the benchmarks by name, and which of them take `--only`."""
from __future__ import annotations

from pathlib import Path

from toolchain.errors import ConfigError

from .evaluation import run_eval_bench
from .export import run_export_bench
from .fpga import run_fpga_bench
from .fpga_dram import run_fpga_dram_bench
from .prune import run_prune_bench
from .quality import run_quality_bench
from .quant import run_quant_bench
from .structured import run_structured_bench

# name -> the benchmark; each takes (model, out_dir) and, where it has configurations to pick, only=[...]
BENCHMARKS = {"prune": run_prune_bench, "prune-quality": run_quality_bench, "quant": run_quant_bench,
              "export": run_export_bench, "fpga": run_fpga_bench, "fpga-dram": run_fpga_dram_bench,
              "eval": run_eval_bench, "structured": run_structured_bench}
TAKES_ONLY = ("prune", "prune-quality", "quant", "export", "eval", "structured")


def run_benchmark(what: str, model: str, out_dir: str | Path, only: list[str] | None = None) -> dict:
    """Run benchmark `what` on `model`, writing under `out_dir`; `only` names the configurations to run."""
    if what not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {what!r}; the benchmarks are: {', '.join(BENCHMARKS)}")
    if only is None:
        return BENCHMARKS[what](model, out_dir)
    if what not in TAKES_ONLY:
        raise ConfigError(f"bench {what} takes no --only: it runs its designs and layers as one measurement "
                          f"(--only applies to: {', '.join(TAKES_ONLY)})")
    return BENCHMARKS[what](model, out_dir, only=only)

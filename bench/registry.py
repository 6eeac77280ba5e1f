"""`toolchain bench WHAT`: the benchmarks by name, and which of them take `--only`."""
from __future__ import annotations

from pathlib import Path

from toolchain.errors import ConfigError

from .evaluation import run_eval_bench
from .export import run_export_bench
from .fpga import run_fpga_bench
from .fpga_dram import run_fpga_dram_bench
from .fpga_eval import run_fpga_eval_bench
from .fpga_pnr import run_fpga_pnr_bench
from .prune import run_prune_bench
from .quality import run_quality_bench
from .quant import run_quant_bench
from .reasoning import run_reasoning_bench
from .scale import run_scale_bench
from .streaming import run_streaming_bench
from .structured import run_structured_bench

# name -> the benchmark; each takes (model, out_dir) and, where it has configurations to pick, only=[...]
BENCHMARKS = {"prune": run_prune_bench, "prune-quality": run_quality_bench, "quant": run_quant_bench,
              "export": run_export_bench, "fpga": run_fpga_bench, "fpga-dram": run_fpga_dram_bench,
              "fpga-eval": run_fpga_eval_bench, "fpga-pnr": run_fpga_pnr_bench,
              "eval": run_eval_bench, "reasoning": run_reasoning_bench,
              "scale": run_scale_bench, "streaming": run_streaming_bench, "structured": run_structured_bench}
TAKES_ONLY = ("prune", "prune-quality", "quant", "export", "eval", "reasoning", "scale", "streaming", "structured")
# the benchmarks that take task options (--tasks, --limit, --zero-shot-limit, --max-gen-toks, --ppl-windows)
TAKES_TASK_OPTIONS = ("reasoning",)


def run_benchmark(what: str, model: str, out_dir: str | Path, only: list[str] | None = None, **options) -> dict:
    """Run benchmark `what` on `model`, writing under `out_dir`; `only` names the configurations to run;
    `options` are task options (limit, zero_shot_limit, max_gen_toks, tasks, ppl_windows), for the benchmarks that take them."""
    if what not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {what!r}; the benchmarks are: {', '.join(BENCHMARKS)}")
    if options and what not in TAKES_TASK_OPTIONS:
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        raise ConfigError(f"bench {what} takes no {flags} (task options apply to: {', '.join(TAKES_TASK_OPTIONS)})")
    if options:
        return BENCHMARKS[what](model, out_dir, only=only, **options)
    if only is None:
        return BENCHMARKS[what](model, out_dir)
    if what not in TAKES_ONLY:
        raise ConfigError(f"bench {what} takes no --only: it runs as one measurement "
                          f"(--only applies to: {', '.join(TAKES_ONLY)})")
    return BENCHMARKS[what](model, out_dir, only=only)

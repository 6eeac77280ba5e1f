"""The pruning-quality benchmark's configurations and table (the runs themselves are `make bench`)."""
from __future__ import annotations

import pytest

from toolchain.bench.quality import best_per_column, quality_configs, quality_table
from toolchain.cli import build_parser
from toolchain.jobs.config import PruneConfig
from toolchain.jobs.options import config_from_args


@pytest.mark.parametrize("name,method,init,extra,sparsities", quality_configs())
def test_every_configuration_is_a_valid_prune_command(name, method, init, extra, sparsities):
    for sparsity in sparsities:
        argv = ["prune", "--model", "smollm2", "--method", method, "--sparsity", sparsity, "--out", "x",
                *(["--init", init] if init else []), *extra]
        args = build_parser().parse_args(argv)
        cfg, given = config_from_args(PruneConfig, args)
        cfg.validate(given)   # raises on a combination the pruner refuses, or a flag it would ignore


def test_sweep_covers_alpha_and_granularity_with_nm_on_rows_only():
    barber = [(n, sp) for n, m, _, _, sp in quality_configs() if m == "barber" and "α=" in n]
    assert len(barber) == 12
    assert all(sp == ("0.5",) for n, sp in barber if not n.endswith(" row"))
    assert {n.split("α=")[1].split()[0] for n, _ in barber} == {"0.01", "0.05", "0.1", "0.2"}


def _row(name, sparsity, ppl, seconds, command="toolchain prune --model smollm2"):
    return {"name": name, "sparsity": sparsity, "ppl": ppl, "prune_seconds": seconds, "peak_anon_x_fp32": 2.0,
            "command": command}


def test_table_bolds_the_best_of_each_column_and_compares_it_with_sparsegpt():
    rows = [{"name": "dense", "sparsity": "-", "ppl": 13.2},
            _row("sparsegpt", "0.5", 19.0, 100.0), _row("sparsegpt", "2:4", 29.0, 90.0),
            _row("sparsegpt + reconstruct", "0.5", 17.1, 280.0, "toolchain prune --reconstruct block"),
            _row("sparsegpt + reconstruct", "2:4", 30.0, 270.0), _row("wanda", "0.5", 25.0, 60.0)]
    best = best_per_column(rows)
    assert best["0.5"]["name"] == "sparsegpt + reconstruct" and best["2:4"]["name"] == "sparsegpt"
    text = quality_table({"model": "m", "calibration": "c", "eval": "e", "rows": rows})
    assert "| sparsegpt + reconstruct | **17.10** · 280 s · 2.0× | 30.00 · 270 s · 2.0× |" in text
    assert "| sparsegpt | 19.00 · 100 s · 2.0× | **29.00** · 90 s · 2.0× |" in text
    assert "| wanda | 25.00 · 60 s · 2.0× |  |" in text
    assert "50%, best: **sparsegpt + reconstruct** 17.10 vs sparsegpt 19.00 (-10.0%), time 2.80× SparseGPT's. " \
           "Command: `toolchain prune --reconstruct block`" in text
    assert "50%, best within 3×" not in text          # the best is already within the bound
    slow = rows + [_row("slow", "0.5", 16.0, 400.0, "toolchain prune --slow")]
    text = quality_table({"model": "m", "calibration": "c", "eval": "e", "rows": slow})
    assert "50%, best: **slow** 16.00" in text
    assert "50%, best within 3×: **sparsegpt + reconstruct** 17.10" in text
    assert "dense perplexity 13.20" in text

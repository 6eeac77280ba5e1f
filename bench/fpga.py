"""`toolchain bench fpga`: the accelerator on SmolLM2-135M's real layers.

The input is the export benchmark's model (Wanda 2:4 + GPTQ 4-bit g64). Two bundles are written from the
same templates: the 2:4 design and its dense twin (N = M = 2, the same multipliers per PE). Every row of
one attention and two MLP projections is simulated in Verilator (bit-exact against the golden model, with
back-pressure, and again at full rate for cycles) and in the HLS C-simulation; the dense twin runs the
attention projection, so both designs' measured dense-equivalent MACs per cycle per multiplier compare.
The designs and layers are one measurement, so this benchmark takes no `--only`.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from .common import save_result, work_dir
from .export import compressed_source

LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj")


def _bundle(src: Path, out: Path, config: Path | None) -> tuple[dict, float]:
    from toolchain.fpga.bundle import write_bundle

    t0 = time.perf_counter()
    report = write_bundle(src, out, str(config) if config else None)
    return report, round(time.perf_counter() - t0, 1)


def run_fpga_bench(model: str, out_dir: str | Path) -> dict:
    from toolchain.fpga.config import load_config
    from toolchain.sim.bundle_sim import simulate_bundle

    work = work_dir(out_dir)
    src = compressed_source(model, work)
    sparse_dir, dense_dir = work / "fpga-2of4", work / "fpga-dense"
    sparse_report, sparse_s = _bundle(src, sparse_dir, None)
    dense_cfg = load_config(sparse_dir / "accel.json").dense_twin()
    dense_json = work / "accel-dense.json"
    dense_json.write_text(json.dumps(asdict(dense_cfg)))
    dense_report, dense_s = _bundle(src, dense_dir, dense_json)

    t0 = time.perf_counter()
    sparse_sim = simulate_bundle(sparse_dir, list(LAYERS))
    sparse_sim_s = round(time.perf_counter() - t0, 1)
    dense_sim = simulate_bundle(dense_dir, [LAYERS[0]])

    def per_multiplier(sim_layer: dict, report: dict) -> float:
        macs = sim_layer["k"] * sim_layer["rows"] * sim_layer["tokens"]
        return macs / sim_layer["measured_cycles"] / report["design"]["physical_multipliers"]

    s0, d0 = sparse_sim["layers"][0], dense_sim["layers"][0]
    result = {
        "model": model, "source": str(src), "threads_note": "Verilator single-threaded; 2-core machine",
        "bundle_seconds": {"2:4": sparse_s, "dense": dense_s},
        "designs": {"2:4": sparse_report["design"], "dense": dense_report["design"]},
        "per_token": {"2:4": sparse_report["per_token"], "dense": dense_report["per_token"]},
        "resources": {"2:4": sparse_report["resources"], "dense": dense_report["resources"]},
        "layers": sparse_sim["layers"], "dense_layer": d0, "sim_seconds_2of4_three_layers": sparse_sim_s,
        "measured_macs_per_cycle_per_multiplier": {"2:4": round(per_multiplier(s0, sparse_report), 4),
                                                   "dense": round(per_multiplier(d0, dense_report), 4)},
    }
    m = result["measured_macs_per_cycle_per_multiplier"]
    result["sparse_over_dense"] = round(m["2:4"] / m["dense"], 4)
    return save_result(out_dir, "fpga", model, result, fpga_table)


def fpga_table(r: dict) -> str:
    lines = ["# FPGA benchmark: smollm2", "",
             "Input: SmolLM2-135M, Wanda 2:4 + GPTQ 4-bit g64 (the export benchmark's model). 8 captured tokens "
             "of held-out pydoc text per layer. Every row of each layer.", "",
             "| layer | design | rows x K | bit-exact (RTL, back-pressure + full rate; HLS C-sim) | outputs | "
             "measured cycles | formula | utilisation | sim cycles/s | layer wall s | golden vs float (rel. RMS) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for design, layers in (("2:4", r["layers"]), ("dense", [r["dense_layer"]])):
        for x in layers:
            lines.append(f"| {x['layer']} | {design} | {x['rows']} x {x['k']} | "
                         f"{'yes' if x['bit_exact'] else 'NO'} | {x['outputs_compared'] + x['hls_csim']['outputs']:,} | "
                         f"{x['measured_cycles']:,} | {x['ideal_cycles']:,} | {x['utilisation']} | "
                         f"{x['sim_cycles_per_s']:,} | {x['seconds']} | {x['golden_vs_float']['relative_rms']:.2e} |")
    m = r["measured_macs_per_cycle_per_multiplier"]
    lines += ["", f"Dense-equivalent MACs per cycle per physical multiplier, measured on q_proj: 2:4 {m['2:4']}, "
                  f"dense {m['dense']}: **{r['sparse_over_dense']}x**.", ""]
    lines += ["| design | multipliers | dense-eq. MACs/cycle | cycles/token | tokens/s (200 MHz, 19.2 GB/s) | "
              "UltraScale+ array LUT / FF / DSP | iCE40 array LUT / FF / DSP |", "|---|---|---|---|---|---|---|"]
    for design in ("2:4", "dense"):
        d, t, res = r["designs"][design], r["per_token"][design], r["resources"][design]
        x, i = res.get("xcup", {}).get("array", {}), res.get("ice40", {}).get("array", {})
        lines.append(f"| {design} | {d['physical_multipliers']} | {d['dense_equivalent_macs_per_cycle']} | "
                     f"{t['cycles']:,} | {t['tokens_per_s_estimate']} ({t['bound_by']}) | "
                     f"{x.get('lut', '-')} / {x.get('ff', '-')} / {x.get('dsp', '-')} | "
                     f"{i.get('lut', '-')} / {i.get('ff', '-')} / {i.get('dsp', '-')} |")
    lines += ["", f"Bundles written in {r['bundle_seconds']['2:4']} s (2:4) and {r['bundle_seconds']['dense']} s "
                  f"(dense), Yosys estimates included. Simulating the three 2:4 layers took "
                  f"{r['sim_seconds_2of4_three_layers']} s.", ""]
    return "\n".join(lines)


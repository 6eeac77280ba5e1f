"""`toolchain bench fpga-dram`: the DRAM-fed system on SmolLM2-135M's real layers.

The input is the export benchmark's model (Wanda 2:4 + GPTQ 4-bit g64); its FPGA bundle ships the DRAM image
(`dram/model.dram`). The seven linears of decoder layer 0 (q, k, v, o, gate, up, down: four shapes) run
consecutively in one start of the sequencer, the first ROWS rows of each (whole row passes of the shipped
regions), on 8 captured tokens, in Verilator with cocotbext-axi's AxiRamRead as DRAM:

- random memory (random latency per burst, AR and R stalls) with activation gaps and result back-pressure:
  bit-exact against the golden model;
- adequate bandwidth (the 512-bit bus at full rate, a fixed latency): measured cycles against the compute
  formula (utilisation);
- a slow memory (R data one cycle in four): measured cycles against the bandwidth formula.

Tokens/s follow from the measured cycles at the configured clock (compute bound) and from the measured bytes per
token at the configured DRAM bandwidth (memory bound); the whole model's bytes per token come from its
descriptor table.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .common import save_result, work_dir
from .export import compressed_source

LAYERS = tuple(f"model.layers.0.{s}" for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
ROWS = 128


def run_fpga_dram_bench(model: str, out_dir: str | Path) -> dict:
    from toolchain.fpga.bundle import write_bundle
    from toolchain.fpga.config import load_config
    from toolchain.sim.dram_sim import MEMORIES, simulate_system, throughput_report

    work = work_dir(out_dir)
    src = compressed_source(model, work)
    bundle = work / "fpga-dram-2of4"
    t0 = time.perf_counter()
    write_bundle(src, bundle, synth=False)
    bundle_s = round(time.perf_counter() - t0, 1)
    cfg = load_config(bundle / "accel.json")
    layout = json.loads((bundle / "dram" / "layout.json").read_text())

    runs = {}
    for label, memory, backpressure, seed in (("random memory, back-pressure", MEMORIES["random"], 0.25, 1),
                                              ("adequate bandwidth", MEMORIES["adequate"], 0.0, 0),
                                              ("slow memory (R 1 cycle in 4)", MEMORIES["slow"], 0.0, 0)):
        t0 = time.perf_counter()
        r = simulate_system(bundle, list(LAYERS), rows=ROWS, seed=seed, memory=memory, gap=backpressure,
                            stall=backpressure)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        r["throughput"] = throughput_report(cfg, r)
        runs[label] = r

    # the whole model: bytes per token from its descriptor table, cycles per token from the formula over the
    # utilisation measured with adequate bandwidth
    whole_bytes = sum(e["region_bytes"] for e in layout["layers"]) + 64 * len(layout["layers"])
    formula_cycles = sum(cfg.layer_cycles(e["k"], e["rows"]) for e in layout["layers"])
    utilisation = runs["adequate bandwidth"]["utilisation"]
    clock_hz = cfg.clock_mhz * 1e6
    whole = {"layers": len(layout["layers"]), "bytes_per_token": whole_bytes, "formula_cycles": formula_cycles,
             "cycles_at_measured_utilisation": round(formula_cycles / utilisation),
             "tokens_per_s_compute_bound": round(clock_hz * utilisation / formula_cycles, 1),
             "tokens_per_s_memory_bound": round(cfg.mem_gbps * 1e9 / whole_bytes, 1),
             "bus_gbps": round(layout["config"]["data_bits"] / 8 * clock_hz / 1e9, 2)}
    whole["bound_by"] = ("compute" if whole["tokens_per_s_compute_bound"] < whole["tokens_per_s_memory_bound"]
                         else "memory bandwidth")
    result = {"model": model, "source": str(src), "bundle_seconds": bundle_s, "rows": ROWS,
              "clock_mhz": cfg.clock_mhz, "mem_gbps": cfg.mem_gbps, "dram": layout["config"], "runs": runs,
              "whole_model": whole,
              "command": f"toolchain bench fpga-dram --model {model}"}
    return save_result(out_dir, "fpga_dram", model, result, fpga_dram_table)


def fpga_dram_table(r: dict) -> str:
    d = r["dram"]
    lines = ["# FPGA DRAM-fed system: smollm2", "",
             f"Input: SmolLM2-135M, Wanda 2:4 + GPTQ 4-bit g64. Decoder layer 0's seven linears in one run of the "
             f"sequencer, the first {r['rows']} rows of each, 8 captured tokens; AXI4 {d['data_bits']}-bit bus, "
             f"bursts of {d['max_burst']}, {d['outstanding']} outstanding, a {d['fifo_words']}-word weight FIFO. "
             f"DRAM: cocotbext-axi AxiRamRead. Command: `{r['command']}`.", "",
             "| run | bit-exact | outputs | measured cycles | compute formula | utilisation | bytes read | "
             "bandwidth formula (cycles) | measured / bandwidth | sim s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, x in r["runs"].items():
        lines.append(f"| {label} | {'yes' if x['bit_exact'] else 'NO'} | {x['outputs']:,} | {x['cycles']:,} | "
                     f"{x['ideal_cycles']:,} | {x['utilisation']} | {x['bytes_read']:,} | "
                     f"{x['memory_bound_cycles']:,.0f} | {x['cycles_over_memory_bound']} | {x['seconds']} |")
    a = r["runs"]["adequate bandwidth"]["throughput"]
    w = r["whole_model"]
    lines += ["", f"Measured with adequate bandwidth, the seven cut layers: {a['bytes_per_token']:,.0f} bytes and "
                  f"{a['cycles_per_token']:,.0f} cycles per token: {a['tokens_per_s_compute_bound']} tokens/s compute "
                  f"bound at {a['clock_mhz']} MHz, {a['tokens_per_s_memory_bound']} tokens/s memory bound at "
                  f"{a['mem_gbps']} GB/s ({a['bound_by']} bound).", "",
              f"The whole model ({w['layers']} linears) streams {w['bytes_per_token']:,} bytes per token (its descriptor "
              f"table): {w['tokens_per_s_memory_bound']} tokens/s memory bound at {r['mem_gbps']} GB/s; "
              f"{w['formula_cycles']:,} cycles per token by the formula, {w['cycles_at_measured_utilisation']:,} at the "
              f"measured utilisation: {w['tokens_per_s_compute_bound']} tokens/s compute bound at {r['clock_mhz']} MHz "
              f"({w['bound_by']} bound; the {d['data_bits']}-bit bus itself moves {w['bus_gbps']} GB/s at that clock).",
              ""]
    return "\n".join(lines)

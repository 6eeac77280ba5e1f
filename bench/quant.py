"""`toolchain bench quant`: RTN, GPTQ and APTQ at 4 and 3 bits, APTQ at 3.5 and 3.0 average bits, the prune
benchmark's 2:4 Barber model with 4-bit GPTQ and APTQ, and llm-compressor's GPTQ and RTN as peers, on a real model.

Each configuration quantizes in its own process (`toolchain quantize`, symmetric, GROUP_SIZE groups; the peers in
llm-compressor's own environment, bench/peers.py, on the same calibration windows and grid); perplexity is then
measured on the held-out pydoc split and on the out-of-domain texts (docs/data.md).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from toolchain.reference_runs import (CALIB_SAMPLES, EVAL_DATASETS, GROUP_SIZE, SEED, SEQLEN, dense_hf_dir,
                                      heldout_perplexities, loaded_perplexities, prune_in_subprocess,
                                      quantize_in_subprocess)

from .common import check_only, result_stem, slug, work_dir, write_result

QUANT_CONFIGS = [
    # name, input ("dense" or a pruned model from the prune bench), method, bits, extra flags
    ("rtn 4-bit", "dense", "rtn", "4", []),
    ("gptq 4-bit", "dense", "gptq", "4", []),
    ("gptq 4-bit natural order", "dense", "gptq", "4", ["--no-act-order"]),
    ("gptq 4-bit damp 0.1", "dense", "gptq", "4", ["--damp", "0.1"]),
    ("aptq 4-bit", "dense", "aptq", "4", []),
    ("rtn 3-bit", "dense", "rtn", "3", []),
    ("gptq 3-bit", "dense", "gptq", "3", []),
    ("gptq 3-bit natural order", "dense", "gptq", "3", ["--no-act-order"]),
    ("gptq 3-bit damp 0.1", "dense", "gptq", "3", ["--damp", "0.1"]),
    ("aptq 3-bit", "dense", "aptq", "3", []),
    ("aptq 3.5 avg (2/4)", "dense", "aptq", "3.5", ["--candidates", "2,4"]),
    ("aptq 3.0 avg (2/4)", "dense", "aptq", "3.0", ["--candidates", "2,4"]),
    ("aptq 3.5 avg (2/3/4)", "dense", "aptq", "3.5", ["--candidates", "2,3,4"]),
    ("aptq 3.0 avg (2/3/4)", "dense", "aptq", "3.0", ["--candidates", "2,3,4"]),
    ("barber 2:4 + gptq 4-bit", "barber-sparsegpt-2of4", "gptq", "4", []),
    ("barber 2:4 + aptq 4-bit", "barber-sparsegpt-2of4", "aptq", "4", []),
    # peers: method "llm-compressor <gptq|rtn>" runs in llm-compressor's own environment (bench/peers.py)
    ("llm-compressor gptq 4-bit", "dense", "llm-compressor gptq", "4", []),
    ("llm-compressor rtn 4-bit", "dense", "llm-compressor rtn", "4", []),
    ("llm-compressor gptq 3-bit", "dense", "llm-compressor gptq", "3", []),
    ("llm-compressor rtn 3-bit", "dense", "llm-compressor rtn", "3", []),
]
PEER_PREFIX = "llm-compressor "


def quant_runs(only: list[str] | None = None) -> list[tuple[str, str, str, str, list[str]]]:
    """(name, input, method, bits, extra flags) of every configuration `--only` selects (all without it)."""
    check_only("quant", only, ["dense", *(c[0] for c in QUANT_CONFIGS)])
    if not only:
        return list(QUANT_CONFIGS)
    by_name = {c[0]: c for c in QUANT_CONFIGS}
    return [by_name[name] for name in only if name in by_name]   # in the order asked for


def run_quant_bench(model: str, out_dir: str | Path, only: list[str] | None = None) -> dict:
    """Quantization table: RTN/GPTQ/APTQ at 4 and 3 bits, APTQ at 3.5 and 3.0 average, and the 2:4 Barber
    model (from the prune benchmark, pruned here if missing) with 4-bit GPTQ and APTQ."""
    from toolchain.machine import library_versions

    runs = quant_runs(only)
    out_dir = Path(out_dir)
    work = work_dir(out_dir)
    src = dense_hf_dir(model, work)
    rows = []
    dense_rows = [c[0] for c in QUANT_CONFIGS if c[1] == "dense"]
    order = ["dense (fp32)", *dense_rows, "barber 2:4 (unquantized)", *(c[0] for c in QUANT_CONFIGS if c[1] != "dense")]

    def write(partial: bool) -> dict:
        result = {"benchmark": "quant", "model": str(model), "group_size": GROUP_SIZE,
                  "calibration": f"pydoc {CALIB_SAMPLES}x{SEQLEN}, seed {SEED}",
                  "eval": f"held-out splits {', '.join(EVAL_DATASETS)}, seqlen {SEQLEN}",
                  "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                  "versions": library_versions(), "rows": list(rows),
                  "partial": partial}
        write_result(result_stem(out_dir, "quant", model), result, order, lambda r: r["name"], quant_table)
        return result

    if not only or "dense" in only:
        rows.append({"name": "dense (fp32)", "ppl": heldout_perplexities(src)})
    # The peers first, then ours; the file is rewritten after every row, so a stopped run keeps what it measured
    # (and, rerun, reuses the models it had finished: quantize_in_subprocess(reuse=True)).
    for name, source, method, bits, extra in sorted(runs, key=lambda c: not c[2].startswith(PEER_PREFIX)):
        if method.startswith(PEER_PREFIX):
            rows.append(peer_row(name, src, work, method[len(PEER_PREFIX):], int(bits)))
            write(partial=True)
            continue
        model_dir = src
        if source != "dense":
            model_dir = work / source
            if not (model_dir / "compression.json").is_file():
                prune_in_subprocess(src, model_dir, "barber", "sparsegpt", "2:4", [])
            if not any(r["name"] == "barber 2:4 (unquantized)" for r in rows):
                rows.append({"name": "barber 2:4 (unquantized)", "ppl": heldout_perplexities(model_dir)})
        target = work / "quant" / slug(name)
        row = {"name": name, **quantize_in_subprocess(model_dir, target, method, bits, extra, reuse=True)}
        row["ppl"] = heldout_perplexities(target)
        rows.append(row)
        write(partial=True)
        print(f"{name}: ppl {_ppl_text(row)}, {row['quant_seconds']:.1f} s, {row['avg_bits']} bits", flush=True)
    return write(partial=bool(only))


def peer_row(name: str, src: Path, work: Path, method: str, bits: int) -> dict:
    """llm-compressor's `method` at `bits` on the dense model and the reference calibration windows, evaluated
    here like every other row."""
    from toolchain.data import calibration_data
    from toolchain.models import load_model

    from .peers import llmcompressor_env, llmcompressor_quantize, with_weights

    python = llmcompressor_env(work)
    loaded = load_model(src)
    calib, _ = calibration_data(loaded, CALIB_SAMPLES, SEQLEN, SEED)
    weights, facts = llmcompressor_quantize(python, src, calib, method, bits, GROUP_SIZE, work / "llmcompressor")
    row = {"name": name, "peer": f"llmcompressor {facts['llmcompressor']}", "quant_seconds": facts["seconds"],
           "peak_rss_mib": facts.get("peak_rss_mib", "-"), "avg_bits": bits,
           "ppl": loaded_perplexities(with_weights(loaded, weights))}
    print(f"{name}: ppl {_ppl_text(row)}, {row['quant_seconds']:.1f} s", flush=True)
    return row


def _ppl_text(row: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in row["ppl"].items())


def _ppl_by_text(row: dict) -> dict[str, float]:
    """A row's perplexities by evaluation text (rows measured before the out-of-domain texts hold a number: pydoc)."""
    return row["ppl"] if isinstance(row["ppl"], dict) else {"pydoc": row["ppl"]}


def quant_table(result: dict) -> str:
    names = list(dict.fromkeys(k for r in result["rows"] for k in _ppl_by_text(r)))
    lines = [f"Model: {result['model']}; symmetric, group size {result['group_size']}; calibration "
             f"{result['calibration']}; eval {result['eval']} (wiki and science are out of the calibration domain). "
             "Weight MiB = codes at their width plus fp16 scales of the quantized decoder linears (pruned weights "
             "counted as codes). Peers run in their own environment on the same windows and grid.", "",
             "| configuration | " + " | ".join(f"ppl {n}" for n in names) + " | avg bits | avg bits incl. scales | "
             "weight MiB | quantize time (s) | peak RSS (MiB) |", "|---" * (len(names) + 6) + "|"]
    for r in result["rows"]:
        ppl = _ppl_by_text(r)
        cells = [f"{ppl[n]:.2f}" if n in ppl else "-" for n in names]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r.get('avg_bits', '-')} | "
                     f"{r.get('avg_bits_with_params', '-')} | {r.get('weight_mib', '-')} | "
                     f"{r.get('quant_seconds', '-')} | {r.get('peak_rss_mib', '-')} |")
    return "\n".join(lines) + "\n"

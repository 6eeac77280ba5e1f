"""`toolchain bench export --only genai`: our fused ONNX export against onnxruntime-genai's own model builder,
both run by onnxruntime-genai.

Both graphs come from the same compressed model directory (the export benchmark's input: its float
checkpoint holds the dequantized weights). Ours carries its GPTQ codes (`toolchain export --target onnx
--onnx-graph fused`); the builder quantizes that float checkpoint itself, offline (`python -m
onnxruntime_genai.models.builder -p int4 -e cpu --extra_options block_size=64 accuracy_level=L`). Each
setting (accuracy level, LM head form) is matched between the two. The candidates of a setting are loaded
once and timed in alternated rounds in this one process (AB, BA, AB, ...), so drift of the machine falls on
both. Each round is a 128-token prompt and 64 greedy tokens: the prefill (`append_tokens`) and the median
decode step (`generate_next_token`). Agreement is the number of leading greedy tokens equal to PyTorch's on
the same (dequantized) weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

PROMPT, NEW_TOKENS, ROUNDS, THREADS, BLOCK = 128, 64, 31, 2, 64
#: (accuracy level, LM head form) pairs, each timed for both graphs
SETTINGS = ((0, "float"), (0, "int4"), (1, "float"), (1, "int4"))
BUILDER = "genai builder"


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".onnx", ".data"))


def _set_threads(model_dir: Path, threads: int) -> None:
    """Both graphs run with the same intra-op thread count, set where onnxruntime-genai reads it."""
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    path.write_text(json.dumps(config, indent=4) + "\n")


def builder_command(src: Path, out: Path, level: int, head: str) -> list[str]:
    """onnxruntime-genai's builder on the float checkpoint `src`; a float head keeps the LM head (and so
    the embedding, which it would otherwise share) out of the int4 quantization."""
    extra = [f"block_size={BLOCK}", f"accuracy_level={level}"]
    if head == "float":
        extra += ["nodes_to_exclude=/lm_head/MatMul", "shared_embeddings=false"]
    return [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(src), "-o", str(out), "-p",
            "int4", "-e", "cpu", "-c", str(out.parent / "hf-cache"), "--extra_options", *extra]


def build_candidates(src: Path, work: Path, level: int, head: str) -> dict[str, dict]:
    """Our fused export and the builder's graph for one setting, each in its own directory."""
    from toolchain.export.onnx import export_onnx

    ours, theirs = work / f"ours-acc{level}-{head}", work / f"builder-acc{level}-{head}"
    if not (ours / "genai_config.json").is_file():
        ours.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(src, ours / "model.onnx", "matmulnbits", accuracy_level=level, graph="fused", genai=True,
                        lm_head=head)
    cmd = builder_command(src, theirs, level, head)
    if not (theirs / "genai_config.json").is_file():
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    for d in (ours, theirs):
        _set_threads(d, THREADS)
    return {"toolchain fused": {"dir": ours, "command": f"toolchain export --model SRC --target onnx --onnx-graph "
                                                         f"fused --accuracy-level {level} --lm-head {head}"},
            BUILDER: {"dir": theirs, "command": "python -m onnxruntime_genai.models.builder " +
                              " ".join(cmd[3:]).replace(str(src), "SRC").replace(str(theirs.parent), "WORK")}}


def timed_generation(model, ids: np.ndarray) -> tuple[float, float, list[int]]:
    """Prefill ms, median decode ms per token and the greedy tokens of one generation."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    t0 = time.perf_counter()
    generator.append_tokens(ids.astype(np.int32))
    prefill = time.perf_counter() - t0
    steps, tokens = [], []
    while not generator.is_done() and len(tokens) < NEW_TOKENS:
        t0 = time.perf_counter()
        generator.generate_next_token()
        steps.append(time.perf_counter() - t0)
        tokens.append(int(generator.get_next_tokens()[0]))
    return 1000 * prefill, 1000 * float(np.median(steps)), tokens


def compare_setting(candidates: dict[str, dict], ids: np.ndarray, reference: list[int], rounds: int) -> list[dict]:
    """Alternated rounds of the setting's candidates (loaded once); one row per candidate."""
    import onnxruntime_genai as og

    from toolchain.sim.model_eval import agreeing_prefix

    names = list(candidates)
    models = {n: og.Model(str(candidates[n]["dir"])) for n in names}
    for n in names:
        timed_generation(models[n], ids)   # warm-up: first-run allocations and kernel selection
    times: dict[str, list] = {n: [] for n in names}
    tokens: dict[str, list[int]] = {}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            prefill, decode, tokens[n] = timed_generation(models[n], ids)
            times[n].append((prefill, decode))
    rows = []
    base = np.array(times[BUILDER])   # the reference of the ratio
    for n in names:
        t = np.array(times[n])
        # paired by round: each round times both graphs back to back, so a slow spell of the machine falls on
        # both sides of the ratio; the median of the per-round ratios is the comparison
        paired = np.median(t / base, axis=0)
        rows.append({"graph": n, "bytes": _dir_bytes(candidates[n]["dir"]),
                     "prefill_ms": round(float(np.median(t[:, 0])), 1),
                     "decode_ms_per_token": round(float(np.median(t[:, 1])), 2),
                     # the spread of the rounds, so that a ratio near 1 can be read against the noise
                     "decode_iqr_ms": round(float(np.subtract(*np.percentile(t[:, 1], [75, 25]))), 2),
                     "paired_ratio_prefill": round(float(paired[0]), 3),
                     "paired_ratio_decode": round(float(paired[1]), 3),
                     "tokens_agree": f"{agreeing_prefix(tokens[n], reference)}/{len(reference)}",
                     "command": candidates[n]["command"]})
    return rows


def reference_tokens(model, ids, head: str) -> list[int]:
    """PyTorch's greedy tokens with the LM head our export writes for `head`: the float head, or the
    dequantized codes of `--lm-head int8|int4` (`lm_head_codes`) on an untied copy, so that agreement measures
    the graph and not the head's own rounding."""
    import copy

    import torch

    from toolchain.export.onnx.weights import lm_head_codes
    from toolchain.export.onnx_check import torch_greedy

    if head != "float":
        model = copy.deepcopy(model)
        out = model.get_output_embeddings()
        codes, _ = lm_head_codes(out.weight.detach().float(), head)
        out.weight = torch.nn.Parameter(codes.dequantize().to(out.weight.dtype), requires_grad=False)
    tokens, _ = torch_greedy(model, ids, NEW_TOKENS)
    return tokens


def run_genai_comparison(src: Path, work: Path, rounds: int = ROUNDS) -> dict:
    """Every setting of SETTINGS: build both graphs, then time them in alternated rounds."""
    from toolchain.data import sample_tokens
    from toolchain.models import load_model

    loaded = load_model(str(src))
    ids = sample_tokens(loaded, PROMPT)
    references = {head: reference_tokens(loaded.model, ids, head) for head in sorted({h for _, h in SETTINGS})}
    del loaded
    rows = []
    for level, head in SETTINGS:
        candidates = build_candidates(src, work / "genai", level, head)
        for row in compare_setting(candidates, ids.numpy(), references[head], rounds):
            rows.append({"accuracy_level": level, "lm_head": head, **row})
            print(json.dumps(rows[-1]), flush=True)
    import onnxruntime_genai as og

    return {"rows": rows, "prompt_tokens": PROMPT, "new_tokens": NEW_TOKENS, "rounds": rounds,
            "threads": THREADS, "block_size": BLOCK, "onnxruntime_genai": og.__version__}


def genai_table(g: dict) -> str:
    lines = ["## onnxruntime-genai: our fused export against its model builder", "",
             f"onnxruntime-genai {g['onnxruntime_genai']}, CPU, {g['threads']} threads; {g['prompt_tokens']}-token "
             f"prompt, {g['new_tokens']} greedy tokens; medians of {g['rounds']} alternated rounds (one warm-up). "
             f"Builder: int4, block {g['block_size']}, from the same float checkpoint. Agreement: leading greedy "
             "tokens equal to PyTorch's on the dequantized weights (with the same int4 LM head where the graph has one).", "",
             "| accuracy level | lm_head | graph | MB | prefill ms | decode ms/token (IQR) | ours / builder, prefill "
             "and decode (median of per-round ratios) | greedy tokens = PyTorch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in g["rows"]:
        ratio = (f"{r['paired_ratio_prefill']:.3f}, {r['paired_ratio_decode']:.3f}"
                 if "paired_ratio_decode" in r and r["graph"] != BUILDER else "")
        iqr = f" ({r['decode_iqr_ms']})" if "decode_iqr_ms" in r else ""
        lines.append(f"| {r['accuracy_level']} | {r['lm_head']} | {r['graph']} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['prefill_ms']} | {r['decode_ms_per_token']}{iqr} | {ratio} | {r['tokens_agree']} |")
    lines += ["", "Commands (SRC: the benchmark's compressed model; WORK: its work directory):", ""]
    seen = set()
    for r in g["rows"]:
        if r["command"] not in seen:
            seen.add(r["command"])
            lines.append(f"- `{r['command']}`")
    return "\n".join(lines) + "\n"

"""`toolchain bench scale` (`make bench-scale`): peak memory and wall time of the streamed jobs and exporters on a
model that does not fit in this machine's RAM as float32.

The model is made here, tensor by tensor, and never shipped: a Llama-3-8B-shaped checkpoint (hidden 4096, 32
layers, 32/8 heads, MLP 14336, untied embeddings) with random bf16 weights N(0, 0.02), norms 1, and the
tokenizer and vocabulary (49,152) of `--model` (SmolLM2's by default), so calibration text tokenizes: 7.9B
parameters, 15.8 GB in bf16, 31.6 GB in float32. It goes to <out>/work/scale-<layers>l as HF shards and is deleted
after the runs, and so is each run's output. The same shape with 8 layers shows how peak memory grows with depth.

Per depth, one chain of subprocesses, each streamed (`STEPS`):
  sparsegpt `prune --method sparsegpt --sparsity 2:4 --calib-samples 4 --seqlen 128` of the checkpoint; checked:
          bf16, every decoder linear valid 2:4;
  gptq    `quantize --method gptq --bits 4 --group-size 128 --calib-samples 4 --seqlen 128` of the checkpoint;
          checked: the quantization state is there;
  wanda   `prune --method wanda --sparsity 2:4 --calib-samples 4 --seqlen 128` of the checkpoint; checked as
          sparsegpt's;
  rtn     `quantize --method rtn --bits 4 --group-size 128` of the pruned output (the exporters' input: codes in
          quant_state.safetensors); checked: the quantization state is there;
  blob    `export --target blob` of the quantized model; checked: the blob reads back (header, manifest, CRCs);
  onnx    `export --target onnx` (MatMulNBits, fused graph) of it; checked: `onnx.checker` by path.
The steps that read the checkpoint run first and every output is deleted as soon as no later step reads it, so
at most two model-sized folders are on disk at once. `--only` picks steps as STEP or STEP@LAYERS (sparsegpt@8,
onnx@32); the steps they read from run too. Rows are written as each step finishes, so a long run that is
stopped keeps what it measured.
Peak RSS (VmHWM) and the anonymous peak come from each run's compression.json or export manifest, wall time from
here.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from toolchain.reference_runs import run_command

from .common import check_only, result_stem, work_dir, write_result

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
             max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
DEPTHS = (8, 32)
CALIB = ["--calib-samples", "4", "--seqlen", "128"]
#: step -> (the step whose output it reads, or None for the checkpoint; its command), in the order they run
STEPS = {
    "sparsegpt": (None, ["prune", "--method", "sparsegpt", "--sparsity", "2:4", *CALIB, "--streaming"]),
    "gptq": (None, ["quantize", "--method", "gptq", "--bits", "4", "--group-size", "128", *CALIB, "--streaming"]),
    "wanda": (None, ["prune", "--method", "wanda", "--sparsity", "2:4", *CALIB, "--streaming"]),
    "rtn": ("wanda", ["quantize", "--method", "rtn", "--bits", "4", "--group-size", "128", "--streaming"]),
    "blob": ("rtn", ["export", "--target", "blob", "--streaming"]),
    "onnx": ("rtn", ["export", "--target", "onnx", "--streaming"]),
}
PRUNE_STEPS, QUANT_STEPS = ("sparsegpt", "wanda"), ("gptq", "rtn")


def scale_plan(only: list[str] | None) -> dict[int, list[str]]:
    """Depth -> the steps to run there, in `STEPS` order: those `--only` names (STEP or STEP@LAYERS) and the
    steps they read from; every step at every depth without it."""
    known = [*STEPS, *(f"{step}@{layers}" for layers in DEPTHS for step in STEPS)]
    check_only("scale", only, known)
    plan = {}
    for layers in DEPTHS:
        wanted = {step for step in STEPS if not only or step in only or f"{step}@{layers}" in only}
        for step in list(wanted):
            while STEPS[step][0] is not None:
                step = STEPS[step][0]
                wanted.add(step)
        if wanted:
            plan[layers] = [step for step in STEPS if step in wanted]
    return plan


def write_llama3_shaped(directory: Path, layers: int, tokenizer, seed: int = 0, shape: dict = SHAPE) -> Path:
    """A Llama-3-8B-shaped bf16 checkpoint with `layers` decoder layers, written one tensor at a time (`shape`
    replaces the 8B widths, for a test)."""
    from transformers import LlamaConfig

    from toolchain.models.shards import ShardWriter

    config = LlamaConfig(num_hidden_layers=layers, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **shape)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    d, f, v = shape["hidden_size"], shape["intermediate_size"], len(tokenizer)
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.empty(shape).normal_(0.0, 0.02, generator=gen).to(torch.bfloat16)

    if directory.exists():
        shutil.rmtree(directory)
    shards = ShardWriter(directory, torch.bfloat16, max_shard_bytes=4 << 30)
    shards.add({"model.embed_tokens.weight": normal(v, d)})
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (kv, d)), ("self_attn.v_proj", (kv, d)),
                            ("self_attn.o_proj", (d, d)), ("mlp.gate_proj", (f, d)), ("mlp.up_proj", (f, d)),
                            ("mlp.down_proj", (d, f))):
            shards.add({f"{p}{name}.weight": normal(*shape)})
        shards.add({f"{p}input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
                    f"{p}post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16)})
    shards.add({"model.norm.weight": torch.ones(d, dtype=torch.bfloat16), "lm_head.weight": normal(v, d)})
    shards.close()
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def check_output(out: Path) -> dict:
    """Every decoder linear of the output is bf16 and valid 2:4 (read one tensor at a time)."""
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())
    dtypes, checked, invalid = set(), 0, 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(out / shard), framework="pt") as h:
            for name in h.keys():
                t = h.get_tensor(name)
                dtypes.add(str(t.dtype).removeprefix("torch."))
                if ".layers." in name and t.dim() == 2:
                    checked += 1
                    invalid += int(((t.reshape(-1, 4) == 0).sum(dim=1) < 2).any())
    return {"dtypes": sorted(dtypes), "linears_checked": checked, "linears_not_2of4": invalid}


def tokenizer_of(model: str):
    """The tokenizer of a named model (from its GGUF, without dequantizing the weights) or a directory."""
    from transformers import AutoTokenizer

    from toolchain.models.loading import is_named_model, named_model_path

    if is_named_model(model):
        path = named_model_path(model)
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(model)


def check_export(out: Path, step: str) -> dict:
    """The exported artifact read back by its consumer: the blob's reader validates header, manifest and every
    section's CRC;
    the ONNX graph passes `onnx.checker` by path (its weights in the external-data file)."""
    if step == "blob":
        from toolchain.export.blob import read_blob

        blob = read_blob(out / "model.tcblob", verify=True)
        return {"blob_tensors": len(blob.names()), "artifact_gb": round((out / "model.tcblob").stat().st_size / 1e9, 2)}
    import onnx

    graph = next((out / "onnx").glob("model.*.onnx"))
    onnx.checker.check_model(str(graph))
    size = sum(f.stat().st_size for f in (out / "onnx").glob("model.*.onnx*"))
    return {"onnx_checker": "ok", "artifact_gb": round(size / 1e9, 2)}


def run_step(step: str, src: Path, out: Path) -> dict:
    """Run one step in a subprocess; its peak memory from what it wrote, its wall time from here."""
    cmd = [sys.executable, "-m", "toolchain.cli", *STEPS[step][1], "--model", str(src), "--out", str(out), "--quiet"]
    if step in ("blob", "onnx"):
        cmd.remove("--quiet")   # export prints its artifacts and has no --quiet
    t0 = time.perf_counter()
    run_command(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    report = json.loads((out / ("manifest.json" if step in ("blob", "onnx") else "compression.json")).read_text())
    row = {"step": step, "command": "toolchain " + " ".join(STEPS[step][1]), "wall_seconds": round(wall, 1),
           "peak_rss_mib": report["peak_rss_mib"], "peak_anon_mib": report["peak_anon_mib"]}
    if step in PRUNE_STEPS:
        row.update(threads=report["machine"]["threads"], **check_output(out))
    elif step in QUANT_STEPS:
        row["quant_state"] = (out / "quant_state.safetensors").is_file()
    else:
        row.update(check_export(out, step))
    return row


def run_scale_bench(model: str, out_dir: str | Path, only: list[str] | None = None, shape: dict = SHAPE) -> dict:
    plan = scale_plan(only)
    out_dir = Path(out_dir)
    work = work_dir(out_dir)
    tokenizer = tokenizer_of(model)
    stem = result_stem(out_dir, "scale", "llama3-8b-shape")
    order = [f"{layers}@{step}" for layers in DEPTHS for step in STEPS]
    rows: list[dict] = []

    def save(partial: bool) -> dict:
        result = {"model": "Llama-3-8B shape, random bf16 N(0, 0.02), tokenizer of " + str(model),
                  "shape": {k: v for k, v in shape.items() if isinstance(v, int)}, "rows": list(rows),
                  "partial": partial}
        write_result(stem, result, order, lambda r: f"{r['layers']}@{r.get('step', 'wanda')}", table)
        return result

    for layers, steps in plan.items():
        ckpt = work / f"scale-{layers}l"
        t0 = time.perf_counter()
        write_llama3_shaped(ckpt, layers, tokenizer, shape=shape)
        made = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        outputs = {None: ckpt}
        try:
            for n, step in enumerate(steps):
                outputs[step] = work / f"scale-{layers}l-{step}"
                rows.append({"layers": layers, "checkpoint_gb": round(size / 1e9, 2), "write_seconds": round(made, 1),
                             **run_step(step, outputs[STEPS[step][0]], outputs[step])})
                save(partial=True)
                later = {STEPS[s][0] for s in steps[n + 1:]}
                for done in [k for k in outputs if k not in later]:   # no later step reads it: free the disk
                    shutil.rmtree(outputs.pop(done), ignore_errors=True)
        finally:
            for path in outputs.values():
                shutil.rmtree(path, ignore_errors=True)
    return save(partial=bool(only))


def table(result: dict) -> str:
    lines = [f"# Streamed jobs and exporters on a {result['model']}", "",
             "| layers | step | checkpoint GB | wall s | peak RSS MiB | peak anon MiB | checked |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        step = r.get("step", "wanda")   # rows written before the exporters were measured are the prune's
        if step in PRUNE_STEPS:
            checked = f"{','.join(r['dtypes'])}, not 2:4 {r['linears_not_2of4']}/{r['linears_checked']}"
        elif step in QUANT_STEPS:
            checked = "quant_state.safetensors" if r["quant_state"] else "no quant state"
        elif step == "blob":
            checked = f"blob reads back, {r['blob_tensors']} tensors, {r['artifact_gb']} GB"
        else:
            checked = f"onnx.checker {r['onnx_checker']}, {r['artifact_gb']} GB"
        lines.append(f"| {r['layers']} | {step} | {r['checkpoint_gb']} | {r['wall_seconds']} | {r['peak_rss_mib']} | "
                     f"{r['peak_anon_mib']} | {checked} |")
    return "\n".join(lines) + "\n"

"""`toolchain fpga-eval BUNDLE`: the whole model under the accelerator's arithmetic, end to end.

Held-out perplexity and greedy generation three ways: the dense model, the float quantized model the bundle was
exported from, and that model with every accelerated linear computed by the contract (`sim.contract_model`).
Inside the contract run a sample of layers keeps its real inputs (the first tokens of the first evaluation
window); those layers then run through the RTL in Verilator on the bundle's shipped images, and the
evaluator's integer outputs, the golden model's and the RTL's must agree bit for bit. So the perplexity
reported is the hardware's.

The result goes to BUNDLE/model_eval.json, and its summary into the bundle's report.json and report.md."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..fpga.config import AccelConfig, load_config

DEFAULT_PROMPT = "The three most common states of matter are"


def rtl_sample(bundle: Path, seed: int) -> list[str]:
    """One attention and one MLP projection, each from a decoder layer drawn with `seed`."""
    table = json.loads((bundle / "layers.json").read_text())["layers"]
    rng = np.random.default_rng(seed)
    picked = []
    for block in ("attn", "mlp"):
        names = [e["name"] for e in table if e.get("block") == block]
        if names:
            picked.append(names[int(rng.integers(len(names)))])
    return picked or [table[int(rng.integers(len(table)))]["name"]]


def dense_model_of(model_dir: Path) -> str | None:
    """The model the compressed directory was made from (its compression.json's source), as load_model takes it."""
    path = model_dir / "compression.json"
    if not path.is_file():
        return None
    source = json.loads(path.read_text()).get("source") or {}
    if source.get("kind") == "smollm2":
        return "smollm2"
    if source.get("kind") == "bundled":
        return source.get("name")
    return source.get("path")


def greedy(loaded, prompt_ids: torch.Tensor, new_tokens: int) -> dict:
    from ..export.onnx_check import torch_greedy

    t0 = time.perf_counter()
    tokens, _ = torch_greedy(loaded.model, prompt_ids, new_tokens)
    return {"tokens": tokens, "text": loaded.tokenizer.decode(tokens), "seconds": round(time.perf_counter() - t0, 2)}


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def measure(loaded, datasets: tuple[str, ...], seqlen: int, max_windows: int | None, prompt_ids, new_tokens: int,
            progress: bool) -> dict:
    from ..evaluate import evaluate

    t0 = time.perf_counter()
    result = evaluate(loaded, seqlen, datasets, max_windows=max_windows, progress=progress)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if new_tokens:
        result["generation"] = greedy(loaded, prompt_ids, new_tokens)
    return result


def cross_check(bundle: Path, cfg: AccelConfig, installed: dict, names: list[str], rows: int | None, seed: int,
                simulator: str = "verilator") -> list[dict]:
    """Each sampled layer's captured inputs through the RTL (the shipped images, with back-pressure): the
    evaluator's outputs against the golden model, and the RTL's against the golden model."""
    from ..export.blob import read_blob
    from ..fpga.layers import for_design, read_layer
    from .bundle_sim import shipped_images
    from .runner import expected_outputs, simulate_layer

    entries = {e["name"]: e for e in json.loads((bundle / "layers.json").read_text())["layers"]}
    results = []
    with read_blob(bundle / "model.tcblob") as blob:
        for name in names:
            captured = installed[name].captured
            if captured is None:
                raise ConfigError(f"{name} saw no tokens in the contract run; nothing to cross-check")
            whole = for_design(read_layer(blob, name), cfg)
            layer = whole if rows is None else whole.first_rows(rows)
            acts = captured["acts"]
            golden = expected_outputs(cfg, layer, acts).reshape(acts.shape[0], -1)[:, : layer.rows]
            evaluator = captured["out"][:, : layer.rows]
            images = shipped_images(bundle, entries[name], cfg, whole, layer.rows, bundle / "sim_build")
            t0 = time.perf_counter()
            sim = simulate_layer(cfg, layer, acts, bundle / "rtl", bundle / "sim_build", gap=0.25, stall=0.25,
                                 seed=seed, simulator=simulator, images=images)
            evaluator_mismatches = int((evaluator != golden).sum())
            results.append({"layer": name, "tokens": int(acts.shape[0]), "rows": layer.rows, "k": layer.k,
                            "evaluator_vs_golden_mismatches": evaluator_mismatches,
                            "rtl_vs_golden_mismatches": sim["mismatches"], "rtl_outputs": sim["outputs"],
                            "rtl_timed_out": sim["timed_out"],
                            "bit_exact": evaluator_mismatches == 0 and sim["bit_exact"],
                            "seconds": round(time.perf_counter() - t0, 1)})
    return results


def model_eval(bundle: str | os.PathLike, model: str | None = None, dense: str | None = None,
               datasets: tuple[str, ...] = ("pydoc", "wiki", "science"), seqlen: int = 512,
               max_windows: int | None = 16, prompt: str = DEFAULT_PROMPT, new_tokens: int = 32,
               rtl_layers: list[str] | None = None, rtl_tokens: int = 4, rtl_rows: int | None = None,
               rtl: bool = True, seed: int = 0, act_bits: dict[str, int] | None = None, skip_dense: bool = False,
               write: bool = True, progress: bool = True, rounding: str = "half_up") -> dict:
    """Perplexity and greedy generation of the dense, float quantized and contract models; the RTL cross-check
    of sampled layers; with `write`, model_eval.json and the bundle's report. `rounding` other than the
    contract's half up exists to prove that the cross-check catches a wrong evaluator."""
    from ..models import load_model
    from .bundle_sim import require_bundle
    from .contract_model import install_contract

    bundle = Path(bundle)
    require_bundle(bundle)
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"--max-windows must be >= 1, got {max_windows}")
    if new_tokens < 0 or rtl_tokens < 1:
        raise ConfigError(f"--new-tokens must be >= 0 and --rtl-tokens >= 1 (got {new_tokens}, {rtl_tokens})")
    cfg = load_config(bundle / "accel.json")
    report = json.loads((bundle / "report.json").read_text())
    model_dir = Path(model or report["source"])
    known = {e["name"] for e in json.loads((bundle / "layers.json").read_text())["layers"]}
    sampled = list(rtl_layers) if rtl_layers else rtl_sample(bundle, seed)
    unknown = [n for n in sampled if n not in known]
    if unknown:
        raise ConfigError(f"--rtl-layer {', '.join(unknown)}: not a layer of the bundle (layers.json)")
    t0 = time.perf_counter()
    loaded = load_model(str(model_dir))
    if loaded.tokenizer is None:
        raise ConfigError(f"{model_dir} has no tokenizer; perplexity and generation need one")
    prompt_ids = loaded.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    args = (tuple(datasets), seqlen, max_windows, prompt_ids, new_tokens, progress)
    runs = {"float": measure(loaded, *args)}
    installed = install_contract(loaded.model, bundle, cfg, rounding=rounding, act_bits=act_bits)
    for name in sampled:
        installed[name].capture = rtl_tokens
    runs["contract"] = measure(loaded, *args)
    saturated = sum(m.saturated for m in installed.values())
    outputs = sum(m.outputs for m in installed.values())
    checks = cross_check(bundle, cfg, installed, sampled, rtl_rows, seed) if rtl else []
    del loaded, installed
    dense = dense or dense_model_of(model_dir)
    if dense and not skip_dense:
        runs["dense"] = measure(load_model(dense), *args)
    result = {
        "bundle": str(bundle.resolve()), "model": str(model_dir.resolve()), "dense_model": dense if "dense" in runs
        else None, "seqlen": runs["float"]["seqlen"], "max_windows": max_windows, "prompt": prompt,
        "act_bits": {"design": cfg.act_bits, **({"overrides": act_bits} if act_bits else {})},
        **({"rounding_not_the_contract": rounding} if rounding != "half_up" else {}),
        "runs": runs, "perplexity": summary(runs),
        "saturated_outputs": saturated, "contract_outputs": outputs,
        "rtl_cross_check": {"layers": checks, "bit_exact": all(c["bit_exact"] for c in checks) if checks else None},
        "seconds": round(time.perf_counter() - t0, 1)}
    if new_tokens:
        result["generation_agreement"] = {
            "contract_vs_float": agreeing_prefix(runs["contract"]["generation"]["tokens"],
                                                 runs["float"]["generation"]["tokens"]),
            **({"float_vs_dense": agreeing_prefix(runs["float"]["generation"]["tokens"],
                                                  runs["dense"]["generation"]["tokens"])} if "dense" in runs else {}),
            "new_tokens": new_tokens}
    if write:
        from ..atomic import atomic_file
        from ..fpga.bundle import add_to_report

        with atomic_file(bundle / "model_eval.json") as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
        add_to_report(bundle, "model_eval", report_summary(result))
    return result


def summary(runs: dict) -> dict:
    """Per dataset: each model's perplexity and the contract's change against the float quantized model."""
    out = {}
    for name, ppl in runs["float"]["perplexity"].items():
        row = {kind: runs[kind]["perplexity"][name] for kind in ("dense", "float", "contract") if kind in runs}
        row["contract_vs_float_pct"] = round(100 * (row["contract"] / row["float"] - 1), 3)
        out[name] = row
    return out


def report_summary(result: dict) -> dict:
    """What the bundle's report keeps of a model evaluation."""
    keep = ("model", "dense_model", "seqlen", "max_windows", "act_bits", "perplexity", "saturated_outputs",
            "contract_outputs", "prompt", "generation_agreement")
    out = {k: result[k] for k in keep if k in result}
    out["tokens"] = result["runs"]["contract"]["tokens"]
    out["rtl_cross_check"] = [{k: c[k] for k in ("layer", "tokens", "rows", "bit_exact")}
                              for c in result["rtl_cross_check"]["layers"]]
    out["generation"] = {kind: run["generation"]["text"] for kind, run in result["runs"].items() if "generation" in run}
    return out

"""The commands that read a model or a bundle without writing one: eval, sim, onnx-check, gpu-run."""
from __future__ import annotations

import os


def run_eval(model: str, seqlen: int = 2048, datasets: tuple[str, ...] = ("pydoc",), device: str | None = None,
             progress: bool = True, tasks: str | None = None, limit: int | None = None, seed: int = 0,
             max_gen_toks: int | None = None, out: str | os.PathLike | None = None, heldout: bool = False,
             streaming: bool | None = None) -> dict:
    """Perplexity of `model` on each named evaluation split (unavailable ones reported, not failed), and with
    `tasks` the lm-eval task metrics (written with every item's output to `out` when given).

    Items a recovered model was trained on (its compression.json's `recovery` record) are never scored; with
    `heldout`, any model is scored on GSM8K's held-out half only, the same pool as a recovered model.

    `streaming` (None: decided by `resolve_streaming`, as for the jobs): perplexity is measured layer by layer
    from the checkpoint (`evaluate.perplexity_streamed`), never holding the whole model; lm-eval tasks need the
    whole model, so with `tasks` the default stays in memory and an explicit `streaming` is refused."""
    from ..evaluate import evaluate
    from ..models import load_model
    from .config import EvalStreaming, resolve_streaming

    task_names = ()
    if tasks:
        from ..tasks import parse_tasks

        task_names = parse_tasks(tasks)  # refuse a bad name before the model loads
    streamed = resolve_streaming(model, EvalStreaming(streaming, bool(task_names)))
    if streamed:
        from .streamed import open_streamed

        loaded = open_streamed(model, with_head=True)
    else:
        loaded = load_model(model)
    result = evaluate(loaded, seqlen, tuple(datasets), device=device or "cpu", progress=progress,
                      stream=loaded.stream if streamed else None)
    result["streaming"] = streamed
    if task_names:
        from ..tasks.run import evaluate_tasks, write_task_results

        exclude = _trained_items(model, heldout)
        result["tasks"] = evaluate_tasks(loaded, task_names, limit=limit, seed=seed, max_gen_toks=max_gen_toks,
                                         progress=progress, exclude=exclude)
        if out is not None:
            write_task_results(result["tasks"], out, extra={"model": loaded.source,
                                                            "perplexity": result["perplexity"]})
        result["tasks"] = {**result["tasks"], "tasks": {n: {k: v for k, v in t.items() if k != "samples"}
                                                        for n, t in result["tasks"]["tasks"].items()}}
    return result


def _trained_items(model: str, heldout: bool) -> dict[str, list[int]]:
    """Per task, the items not to score: those the model's recoveries trained on, and with `heldout` the whole
    GSM8K training half."""
    import json
    from pathlib import Path

    from ..errors import ModelLoadError
    from ..tasks.splits import SPLIT_TASK, excluded_items, gsm8k_split

    record = Path(str(model)) / "compression.json"
    compression = {}
    if record.is_file():
        try:
            compression = json.loads(record.read_text())
        except ValueError as exc:
            raise ModelLoadError(f"{record} is not valid JSON: {exc}") from None
    exclude = excluded_items(compression)
    if heldout:
        exclude[SPLIT_TASK] = sorted(set(exclude.get(SPLIT_TASK, ())) | set(gsm8k_split()[0]))
    return exclude


def run_sim(bundle: str | os.PathLike, layers: list[str] | None = None, rows: int | None = None,
            simulator: str = "verilator", seed: int = 0, tokens: int | None = None) -> dict:
    """Simulate layers of an FPGA bundle bit-exactly against the golden model."""
    from ..sim.bundle_sim import simulate_bundle

    return simulate_bundle(bundle, layers, rows, simulator, seed, tokens)


def run_sim_system(bundle: str | os.PathLike, layers: list[str] | None = None, rows: int | None = None,
                   seed: int = 0, tokens: int | None = None, memory: str = "random") -> dict:
    """Run layers of an FPGA bundle on its DRAM-fed system, from its DRAM image, bit-exactly against the golden
    model (default: every linear of the first decoder layer). `memory`: a name of `sim.dram_sim.MEMORIES`; the
    random memory runs with activation gaps and result back-pressure, the others at full rate (for cycles)."""
    from ..sim.dram_sim import MEMORIES, first_block_layers, simulate_system, throughput_report

    if memory not in MEMORIES:
        from ..errors import ConfigError

        raise ConfigError(f"--memory {memory!r}: choose one of {', '.join(MEMORIES)}")
    backpressure = 0.25 if memory == "random" else 0.0
    result = simulate_system(bundle, layers or first_block_layers(bundle), rows=rows, tokens=tokens, seed=seed,
                             memory=MEMORIES[memory], gap=backpressure, stall=backpressure)
    if result["cycles"]:
        from ..fpga.config import load_config

        result["throughput"] = throughput_report(load_config(os.path.join(bundle, "accel.json")), result)
    return result


def parse_act_bits(text: str | None) -> dict[str, int] | None:
    """`down_proj=16,o_proj=12` -> {"down_proj": 16, "o_proj": 12}."""
    from ..errors import ConfigError

    if not text:
        return None
    out = {}
    for part in text.split(","):
        key, _, bits = part.strip().partition("=")
        if not key or not bits.isdigit() or not 2 <= int(bits) <= 16:
            raise ConfigError(f"--act-bits {text!r}: expected NAME=BITS pairs with BITS in 2..16 (e.g. down_proj=16)")
        out[key] = int(bits)
    return out


def run_fpga_eval(bundle: str | os.PathLike, model: str | None = None, dense: str | None = None,
                  no_dense: bool = False, datasets: str = "pydoc,wiki,science", seqlen: int = 512,
                  max_windows: int | None = 16, prompt: str | None = None, new_tokens: int = 32,
                  rtl_layers: list[str] | None = None, rtl_tokens: int = 4, rtl_rows: int | None = None,
                  rtl: bool = True, act_bits: str | None = None, seed: int = 0, progress: bool = True) -> dict:
    """The whole model under an FPGA bundle's contract: perplexity and generation against the float quantized and
    dense models, and a Verilator cross-check of sampled layers (`sim.model_eval`)."""
    from ..sim.model_eval import DEFAULT_PROMPT, model_eval

    names = tuple(n.strip() for n in datasets.split(",") if n.strip())
    return model_eval(bundle, model=model, dense=dense, datasets=names, seqlen=seqlen,
                      max_windows=max_windows or None, prompt=prompt or DEFAULT_PROMPT, new_tokens=new_tokens,
                      rtl_layers=rtl_layers, rtl_tokens=rtl_tokens, rtl_rows=rtl_rows, rtl=rtl, seed=seed,
                      act_bits=parse_act_bits(act_bits), skip_dense=no_dense, progress=progress)


def run_check_images(bundle: str | os.PathLike) -> dict:
    """Every word of every image an FPGA bundle ships against its blob, without simulation."""
    from ..sim.bundle_sim import check_images

    return check_images(bundle)


def run_pnr(bundle: str | os.PathLike, **options) -> dict:
    """Place and route an FPGA bundle's array on a real ECP5 part (toolchain.fpga.pnr.place_and_route)."""
    from ..fpga.pnr import place_and_route

    return place_and_route(bundle, **options)


def run_onnx_check(model_dir: str | os.PathLike, onnx_path: str | os.PathLike, tokens: int = 64,
                   new_tokens: int = 16, rtol: float | None = None) -> dict:
    """An exported graph in onnxruntime against the PyTorch model: prefill logits and greedy tokens."""
    from ..export.onnx_check import RTOL_LOGITS, check_onnx

    return check_onnx(model_dir, onnx_path, tokens=tokens, new_tokens=new_tokens,
                      rtol=rtol if rtol is not None else RTOL_LOGITS)


def run_gpu_run(bundle: str | os.PathLike, prompt: str, max_new_tokens: int = 32, backend: str = "auto") -> dict:
    """Greedy generation through a GPU bundle's graph, with tokens/s."""
    from ..gpu.run import gpu_run

    return gpu_run(bundle, prompt, max_new_tokens, backend)

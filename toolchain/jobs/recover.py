"""`toolchain recover`: tune a quantized model's scales, norms and biases on a few hundred examples, keeping its
integer codes and prune masks bit-identical (`toolchain.quant.recover`), and write the recovered directory.

The output is the input directory's format, whole: the float weights re-derived from the codes and the new
fp16 scales, quant_state.safetensors with the same codes, zeros and masks and the new scales, and
compression.json with the input's records plus a `recovery` record (what was trained, on which items, the loss
before and after). The input is only read.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import distributed
from ..data import calibration_data
from ..errors import ConfigError, ModelLoadError
from ..machine import library_versions, machine_description, peak_rss_mib
from ..models import load_model, save_model
from ..models.loading import check_out_dir
from .common import check_disk_space, output_bytes_at_least
from ..quant import QuantizedWeight, read_quant_state, write_quant_state
from ..quant.recover import Examples, RecoverSettings, pad_examples, recover_scales
from .config import RecoverConfig

QUANT_STATE = "quant_state.safetensors"


def read_quantized(model_dir: str | Path) -> tuple[dict[str, QuantizedWeight], dict]:
    """The integer state and compression record of a directory written by quantize or compress."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"--model {path}: recover needs a quantized model directory (written by `toolchain "
                             f"quantize` or `compress`), not a named model or a file")
    if not (path / QUANT_STATE).is_file():
        raise ModelLoadError(f"{path} has no {QUANT_STATE}: recover tunes the scales of a quantized model; run "
                             f"`toolchain quantize` (or `compress`) on it first")
    state = read_quant_state(path / QUANT_STATE)
    compression = {}
    if (path / "compression.json").is_file():
        try:
            compression = json.loads((path / "compression.json").read_text())
        except ValueError as exc:
            raise ModelLoadError(f"{path / 'compression.json'} is not valid JSON: {exc}") from None
    return state, compression


def check_in_step(model: torch.nn.Module, state: dict[str, QuantizedWeight]) -> None:
    """Refuse a directory whose float weights are not scale * (code - zero) of its quant state."""
    modules = dict(model.named_modules())
    for name, qw in state.items():
        if name not in modules:
            raise ModelLoadError(f"{QUANT_STATE} names {name}, which the model does not have")
        if not torch.equal(modules[name].weight.detach().float(), qw.dequantize()):
            raise ModelLoadError(f"{name}: the float weight is not scale * (code - zero) of {QUANT_STATE}; the "
                                 f"two files are out of step (re-run quantize)")


def gsm8k_examples(tokenizer, cfg: RecoverConfig) -> tuple[Examples, dict]:
    """The seeded draw of training-half GSM8K items, tokenized as prompt + scored answer."""
    from ..tasks.splits import gsm8k_split, gsm8k_training_texts, split_record

    train = gsm8k_split()[0]
    drawn = sorted(random.Random(cfg.seed).sample(train, min(cfg.examples, len(train))))
    sequences, used, too_long = [], [], 0
    for index, (prompt, target) in zip(drawn, gsm8k_training_texts(drawn)):
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        t = tokenizer(target, add_special_tokens=False).input_ids
        if len(p) + len(t) > cfg.max_tokens:
            too_long += 1
            continue
        sequences.append((p + t, [0] * len(p) + [1] * len(t)))
        used.append(index)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    record = {**split_record(used), "left_out_too_long": too_long, "scored": "answer tokens (prompt masked)"}
    return pad_examples(sequences, pad), record


def corpus_examples(loaded, cfg: RecoverConfig) -> tuple[Examples, dict]:
    """Windows of a corpus's calibration split, every token scored."""
    windows, info = calibration_data(loaded, cfg.examples, cfg.max_tokens, cfg.seed, cfg.data)
    ones = torch.ones_like(windows)
    return Examples(windows, ones, ones), {**info, "scored": "every token"}


def run_recover(model_dir: str, out: str | Path, cfg: RecoverConfig, device=None, progress: bool = True,
                given: set[str] | None = None) -> dict:
    """Load a quantized model, tune its scales, norms and biases, and write the recovered directory atomically."""
    cfg.validate(given)
    if distributed.env_world_size() > 1:
        raise ConfigError("recover runs in one process: its Adam steps are not averaged across torchrun ranks")
    check_out_dir(model_dir, out)
    state, previous = read_quantized(model_dir)
    t0 = time.perf_counter()
    loaded = load_model(model_dir)
    if loaded.tokenizer is None:
        raise ModelLoadError(f"{model_dir} has no tokenizer; recover tokenizes its training text")
    check_in_step(loaded.model, state)
    check_disk_space(out, output_bytes_at_least(loaded.model, next(loaded.model.parameters()).dtype, codes=True))
    teacher = None
    if cfg.teacher is not None:
        teacher = load_model(cfg.teacher, with_tokenizer=False).model
        if teacher.config.vocab_size != loaded.model.config.vocab_size:
            raise ConfigError(f"--teacher {cfg.teacher} has a vocabulary of {teacher.config.vocab_size}, the model "
                              f"{loaded.model.config.vocab_size}: the teacher must be the model before quantization")
    examples, data = (gsm8k_examples(loaded.tokenizer, cfg) if cfg.data == "gsm8k"
                      else corpus_examples(loaded, cfg))
    settings = RecoverSettings(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    report, new_state = recover_scales(loaded.model, state, examples, settings, teacher=teacher, device=device,
                                       progress=progress)
    loaded.model.to("cpu")
    report = {"data": {"name": cfg.data, "examples": len(examples), **data}, **report,
              "input": str(Path(model_dir).resolve()),
              "teacher": None if cfg.teacher is None else str(cfg.teacher),
              "unchanged": "integer codes, zeros and prune masks (bit-identical); embeddings and LM head",
              "config": asdict(cfg), "total_seconds": round(time.perf_counter() - t0, 3),
              "peak_rss_mib": round(peak_rss_mib(), 1)}
    if previous.get("recovery"):
        report["previous"] = previous["recovery"]   # eval skips the training items of every recovery
    compression = {**previous, "recovery": report,
                   "recovery_versions": {"versions": library_versions(), "machine": machine_description()}}
    path = save_model(loaded, out, extra_json={"compression.json": compression},
                      extra_files={QUANT_STATE: lambda p: write_quant_state(p, new_state)})
    compression["out"] = str(path)
    return compression

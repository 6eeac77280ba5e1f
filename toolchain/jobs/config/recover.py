"""`toolchain recover`: tuning a quantized model's scales, norms and biases."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from ..options import option, refuse_inapplicable

RECOVER_DATA = ("gsm8k", "pydoc", "wiki", "science")


@dataclass
class RecoverConfig:
    """`toolchain recover`: tune a quantized model's scales, norms and biases (codes and masks fixed)."""

    data: str = option("gsm8k", "--data", "training text: gsm8k (reference solutions of the training half of "
                       "GSM8K's test set, in the 8-shot CoT answer format; the other half is held out and `toolchain "
                       "eval` skips the training half) or a corpus's calibration split (pydoc, wiki, science; their "
                       "held-out split stays unseen)", choices=RECOVER_DATA)
    examples: int = option(300, "--examples", "training examples: GSM8K items drawn (seeded) from the training "
                           "half, or windows of the corpus", type=int)
    steps: int = option(200, "--steps", "Adam steps (batches)", type=int)
    lr: float = option(1e-3, "--lr", "Adam learning rate; a scale moves as scale0 * (1 + delta), so this is a "
                       "relative step for every layer", type=float)
    batch_size: int = option(4, "--batch-size", "examples per step", type=int)
    max_tokens: int = option(512, "--max-tokens", "longest example in tokens (longer GSM8K items are left out; "
                             "corpus windows have this length)", type=int)
    seed: int = option(0, "--seed", "seed for the examples drawn and their order", type=int)
    teacher: str | None = option(None, "--teacher", "the dense model (directory or named model): train on "
                                 "KL(teacher || model) of the next-token distributions instead of the next-token "
                                 "loss on the reference text", metavar="MODEL")

    def validate(self, given: set[str] | None = None) -> None:
        if self.data not in RECOVER_DATA:
            raise ConfigError(f"--data {self.data!r}: choose one of {', '.join(RECOVER_DATA)}")
        for flag, value in (("--examples", self.examples), ("--steps", self.steps),
                            ("--batch-size", self.batch_size)):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if self.max_tokens < 8:
            raise ConfigError(f"--max-tokens must be >= 8, got {self.max_tokens}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        refuse_inapplicable(self, given)

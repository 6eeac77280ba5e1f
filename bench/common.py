"""What every benchmark shares: where it writes, how it picks its `--only` rows, and how it saves a result.

A benchmark writes its result files <out>/<what>_<model>.{json,md} and keeps the models it makes on the way
under <out>/work/ (`work_dir`), where the next benchmark reuses them (the quantization benchmark starts from
the prune benchmark's 2:4 model, the FPGA benchmark from the export benchmark's model). Nothing is written
relative to the working directory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from toolchain.atomic import atomic_file
from toolchain.errors import ConfigError


def work_dir(out_dir: str | Path) -> Path:
    """The folder for the intermediate models of the benchmarks writing to `out_dir`."""
    path = Path(out_dir) / "work"
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_only(what: str, only: Iterable[str] | None, known: Iterable[str]) -> None:
    """Refuse `--only` names that select no configuration of benchmark `what`, naming them."""
    known = list(dict.fromkeys(known))
    unknown = [name for name in only or () if name not in known]
    if unknown:
        raise ConfigError(f"bench {what} --only: unknown configuration {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(known)}")


def slug(text: str) -> str:
    """`text` as a file name: every character other than letters, digits, '.' and '-' becomes '-'."""
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text).strip("-")


def result_stem(out_dir: Path, what: str, model: str) -> Path:
    """<out_dir>/<what>_<model name>, the path of a result without its suffix."""
    return out_dir / (f"{what}_smollm2" if str(model) == "smollm2" else f"{what}_{Path(model).name}")


def model_fp32_mib(model_dir: Path) -> float:
    """Size of the model's weights in float32, MiB (4 bytes per value of every safetensors tensor)."""
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                shape = h.get_slice(k).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n * 4
    return total / 2**20


def merge_rows(kept: list[dict], fresh: list[dict], order: list[str], key: Callable[[dict], str]) -> list[dict]:
    """The rows of a partial run (`fresh`) replace the same rows of an earlier result (`kept`); the others stay,
    in the benchmark's `order` (unknown keys last)."""
    fresh_keys = {key(r) for r in fresh}
    rows = [r for r in kept if key(r) not in fresh_keys] + fresh
    return sorted(rows, key=lambda r: order.index(key(r)) if key(r) in order else len(order))


def _write(stem: Path, result: dict, table: Callable[[dict], str]) -> None:
    """The JSON and its table, each through a temporary file (a stopped run never leaves half a result, and
    the earlier one it merges with stays whole)."""
    text = table(result)
    for suffix, content in ((".json", json.dumps(result, indent=2) + "\n"), (".md", text)):
        with atomic_file(f"{stem}{suffix}") as tmp:
            tmp.write_text(content)
    print(text)


def write_result(stem: Path, result: dict, order: list[str], key: Callable[[dict], str],
                 table: Callable[[dict], str], rows: str = "rows") -> None:
    """Write JSON + markdown; a partial run (`--only`) replaces its own `rows` and keeps the others."""
    if result.get("partial") and Path(f"{stem}.json").is_file():
        earlier = json.loads(Path(f"{stem}.json").read_text()).get(rows, [])
        result[rows] = merge_rows(earlier, result[rows], order, key)
    result.pop("partial", None)
    _write(stem, result, table)


def save_result(out_dir: str | Path, what: str, model: str, result: dict, table: Callable[[dict], str]) -> dict:
    """Write <out_dir>/<what>_<model>.{json,md} and print the table."""
    _write(result_stem(Path(out_dir), what, model), result, table)
    return result

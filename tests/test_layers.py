"""The package's layers: a lower layer never imports a higher one, and quant never imports prune.

Every module of the `toolchain` package (the folders pyproject.toml maps into it: toolchain/, export/, sim/,
...) is parsed, and every import in it, at module level or inside a function, is resolved to the module it
names. `python tests/test_layers.py` prints every upward import, allowed or not.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:          # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent

# Low -> high. A module belongs to the layer of the longest listed prefix of its dotted name (under `toolchain.`).
LAYERS = [
    ("base", ["errors", "atomic", "machine", "numerics", "rtl_templates", "hls"]),
    ("models/data", ["models", "data"]),
    ("engine", ["engine", "distributed", "input_stats", "sensitivity", "evaluate", "tasks"]),
    ("methods", ["prune", "quant"]),
    ("export", ["export"]),
    ("targets", ["fpga", "gpu"]),
    ("sim", ["sim"]),
    ("orchestration", ["jobs"]),
    ("entry points", ["cli", "demo", "reference_runs", "__main__"]),
    ("bench", ["bench"]),
]
# Same-layer imports that are still refused: (importer prefix, imported prefix).
FORBIDDEN_PEERS = [("quant", "prune")]

# Upward imports that other engineers of the restructure are removing in parallel. Once their branches are
# merged, delete each entry here (test_allow_list_has_no_stale_entries names the ones nobody needs any more);
# the list should end up empty. (importer module, imported module or package)
ALLOWED = {
    # `toolchain bench ...` and `toolchain gpu-bench` are thin entry points into the benchmarks, which sit
    # above everything they measure: the one sanctioned upward import.
    ("toolchain.cli.commands", "toolchain.bench"),
}


def package_dirs() -> dict[str, Path]:
    """Package name -> folder, from pyproject.toml's setuptools package-dir."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in tool["package-dir"].items()}


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package's name maps to its __init__.py)."""
    found = {}
    dirs = package_dirs()
    for package, folder in dirs.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if any(p.startswith(".") for p in parts[:-1]):
                continue
            found[".".join((package, *parts)).removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, relative ones resolved."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from pkg import sub` imports the submodule pkg.sub
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            out += [(s, node.lineno) for s in subs] or [(target, node.lineno)]
    return [(m, line) for m, line in out if m == "toolchain" or m.startswith("toolchain.")]


def layer_of(module: str) -> tuple[int, str] | None:
    """(layer index, matched prefix) of a toolchain module; None for the package root."""
    rest = module.removeprefix("toolchain").removeprefix(".")
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (rest == prefix or rest.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (index, prefix)
    return best


def upward_imports() -> list[dict]:
    found = modules()
    known = set(found)
    bad = []
    for name, path in sorted(found.items()):
        source = layer_of(name)
        if source is None:
            continue
        for target, line in imports_of(name, path, known):
            dest = layer_of(target)
            if dest is None:
                continue
            upward = dest[0] > source[0]
            peer = dest[0] == source[0] and (source[1], dest[1]) in FORBIDDEN_PEERS
            if upward or peer:
                allowed = any(name == a and (target == b or target.startswith(b + ".")) for a, b in ALLOWED)
                bad.append({"importer": name, "imported": target, "where": f"{path.relative_to(ROOT)}:{line}",
                            "from": LAYERS[source[0]][0], "to": LAYERS[dest[0]][0], "allowed": allowed})
    return bad


def test_every_module_has_a_layer():
    unplaced = [name for name in modules() if name != "toolchain" and layer_of(name) is None]
    assert not unplaced, f"modules outside every layer (add them to LAYERS in tests/test_layers.py): {unplaced}"


def test_no_upward_imports():
    refused = [f"{b['where']}: {b['importer']} ({b['from']}) imports {b['imported']} ({b['to']})"
               for b in upward_imports() if not b["allowed"]]
    assert not refused, "lower layers import higher ones:\n" + "\n".join(refused)


def test_allow_list_has_no_stale_entries():
    """An allow-list entry nobody needs any more is removed, so the list only shrinks."""
    used = {(b["importer"], a[1]) for b in upward_imports() for a in ALLOWED
            if b["importer"] == a[0] and (b["imported"] == a[1] or b["imported"].startswith(a[1] + "."))}
    stale = sorted(ALLOWED - used)
    assert not stale, f"allow-list entries with no such import left (delete them): {stale}"


def test_checker_sees_an_upward_import(tmp_path):
    """The resolver finds relative, function-level and `from pkg import submodule` imports."""
    path = tmp_path / "generate.py"
    path.write_text("def lint():\n    from ..sim.runner import build\n    from .. import sim\n")
    got = imports_of("toolchain.fpga.generate", path, {"toolchain.sim", "toolchain.sim.runner"})
    assert got == [("toolchain.sim.runner", 2), ("toolchain.sim", 3)]
    assert layer_of("toolchain.sim.runner")[0] > layer_of("toolchain.fpga.generate")[0]


if __name__ == "__main__":
    for b in upward_imports():
        print(f"{'allowed ' if b['allowed'] else 'REFUSED '} {b['where']}: {b['importer']} ({b['from']}) -> "
              f"{b['imported']} ({b['to']})")
    sys.exit(0)

"""Render the accelerator's SystemVerilog from rtl_templates/ (templates only render: every number comes
from the AccelConfig), and lint it with Verilator."""
from __future__ import annotations

import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import ToolchainError
from ..numerics.geometry import row_passes
from .config import AccelConfig
from .tools import RTL_SOURCES, simulator_env

def template_dir(kind: str = "rtl") -> Path:
    """rtl_templates/ or hls/ (installed as toolchain.rtl_templates / toolchain.hls)."""
    import importlib

    module = importlib.import_module("toolchain.rtl_templates" if kind == "rtl" else "toolchain.hls")
    return Path(module.__file__).resolve().parent


@dataclass(frozen=True)
class LayerShape:
    """The array parameters of one layer (defaults rendered into the array module; simulation overrides)."""

    name: str
    k: int
    rows: int
    beats_per_row: int
    beats_per_group: int
    passes: int
    shift: int
    weight_file: str
    scale_file: str

    @classmethod
    def of(cls, cfg: AccelConfig, name: str, k: int, rows: int, group_size: int, shift: int, stem: str) -> "LayerShape":
        return cls(name, k, rows, k // cfg.beat_k, group_size // cfg.beat_k, row_passes(rows, cfg.pes), shift,
                   f"{stem}.weights.mem", f"{stem}.scales.mem")


def _environment(kind: str):
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_dir(kind))),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


def render_rtl(cfg: AccelConfig, layer: LayerShape, out_dir: Path, generator: str = "toolchain") -> list[Path]:
    """Write spmac_pe.sv, axis_skid.sv and spmac_array.sv for `cfg` (array defaults from `layer`)."""
    env = _environment("rtl")
    out_dir.mkdir(parents=True, exist_ok=True)
    common = {"cfg": cfg, "w": cfg.widths, "generator": generator}
    files = {
        "spmac_pe.sv": env.get_template("spmac_pe.sv.j2").render(
            **common, tree_levels=max(1, math.ceil(math.log2(cfg.slots_per_beat)))),
        "axis_skid.sv": env.get_template("axis_skid.sv.j2").render(**common, width=cfg.pes * cfg.out_bits),
        "spmac_array.sv": env.get_template("spmac_array.sv.j2").render(**common, layer=layer, top="spmac_array"),
    }
    written = []
    for name, text in files.items():
        (out_dir / name).write_text(text)
        written.append(out_dir / name)
    return written


def render_hls(cfg: AccelConfig, out_dir: Path, wdepth: int, sdepth: int, generator: str = "toolchain") -> list[Path]:
    """Write spmac.h, spmac.cpp and the C-simulation testbench tb_spmac.cpp; memories sized for the largest
    layer (`wdepth` weight words, `sdepth` scale words)."""
    env = _environment("hls")
    out_dir.mkdir(parents=True, exist_ok=True)
    values = {"cfg": cfg, "w": cfg.widths, "generator": generator, "wdepth": wdepth, "sdepth": sdepth}
    written = []
    for name in ("spmac.h", "spmac.cpp", "tb_spmac.cpp"):
        (out_dir / name).write_text(env.get_template(f"{name}.j2").render(**values))
        written.append(out_dir / name)
    return written


def lint(rtl_dir: Path, top: str = "spmac_array") -> str:
    """`verilator --lint-only -Wall` over the generated RTL; raises with Verilator's messages on any warning."""
    simulator_env()
    cmd = ["verilator", "--lint-only", "-Wall", "--top-module", top, *RTL_SOURCES]
    proc = subprocess.run(cmd, cwd=rtl_dir, capture_output=True, text=True)
    messages = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 or "%Warning" in messages or "%Error" in messages:
        raise ToolchainError(f"verilator lint of {rtl_dir} failed:\n{messages}")
    return messages

"""Write the accelerator's SystemVerilog (rtl_templates/) and HLS C++ (hls/) for one design, and lint the RTL
with Verilator.

Only the design's constants are rendered, from the AccelConfig: the SystemVerilog package spmac_pkg.sv and the
C++ header spmac.h. The modules and the kernel are plain parameterised sources, copied as they are."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import ToolchainError
from ..numerics.geometry import row_passes
from .config import AccelConfig
from .tools import RTL_SOURCES, simulator_env

RTL_MODULES = ("axis_skid.sv", "spmac_pe.sv", "spmac_array.sv")   # their defaults come from spmac_pkg
HLS_SOURCES = ("spmac.cpp", "tb_spmac.cpp")                       # their constants come from spmac.h
# the DRAM-fed system (rtl_templates/dram/, shipped in BUNDLE/dram/rtl/); it reuses the array's package and PE
SYSTEM_MODULES = ("axis_fifo.sv", "axi_read_master.sv", "axis_resize.sv", "spmac_fetch.sv", "spmac_wsplit.sv",
                  "spmac_core.sv", "spmac_system.sv")
SYSTEM_FROM_ARRAY = ("spmac_pkg.sv", "axis_skid.sv", "spmac_pe.sv")
SYSTEM_HLS = ("spmac_dram.cpp", "tb_spmac_dram.cpp")   # hls/dram/: the same interface in HLS C++ (m_axi, axis)


def template_dir(kind: str = "rtl") -> Path:
    """rtl_templates/ or hls/ (installed as toolchain.rtl_templates / toolchain.hls)."""
    import importlib

    module = importlib.import_module("toolchain.rtl_templates" if kind == "rtl" else "toolchain.hls")
    return Path(module.__file__).resolve().parent


@dataclass(frozen=True)
class LayerShape:
    """The array parameters of one layer (the first layer's are the array's defaults; simulation overrides)."""

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


def _write(kind: str, out_dir: Path, rendered: str, plain: tuple[str, ...], values: dict) -> list[Path]:
    """Render `rendered` from its .j2 template with `values`, and copy the `plain` sources beside it."""
    import jinja2

    source = template_dir(kind)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(source)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / rendered).write_text(env.get_template(f"{rendered}.j2").render(**values))
    for name in plain:
        shutil.copyfile(source / name, out_dir / name)
    return [out_dir / rendered, *(out_dir / name for name in plain)]


def render_rtl(cfg: AccelConfig, layer: LayerShape, out_dir: Path) -> list[Path]:
    """Write spmac_pkg.sv (the design's constants; `layer` is the array's default layer) and the modules."""
    return _write("rtl", out_dir, "spmac_pkg.sv", RTL_MODULES, {"cfg": cfg, "w": cfg.widths, "layer": layer})


def render_hls(cfg: AccelConfig, out_dir: Path, wdepth: int, sdepth: int) -> list[Path]:
    """Write spmac.h (the design's constants; memories sized for the largest layer: `wdepth` weight words,
    `sdepth` scale words), the kernel spmac.cpp and the C-simulation testbench tb_spmac.cpp."""
    values = {"cfg": cfg, "w": cfg.widths, "wdepth": wdepth, "sdepth": sdepth}
    return _write("hls", out_dir, "spmac.h", HLS_SOURCES, values)


def render_system(out_dir: Path, hls_dir: Path | None = None) -> list[Path]:
    """Copy the DRAM-fed system's modules (plain parameterised SystemVerilog) into `out_dir`, and its HLS C++
    kernel and C-simulation testbench (they include the design's spmac.h and spmac.cpp) into `hls_dir`."""
    written = []
    for kind, names, directory in (("rtl", SYSTEM_MODULES, out_dir), ("hls", SYSTEM_HLS, hls_dir)):
        if directory is None:
            continue
        source = template_dir(kind) / "dram"
        directory.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(source / name, directory / name)
            written.append(directory / name)
    return written


def system_sources(rtl_dir: Path, system_dir: Path) -> list[Path]:
    """The system's sources in compile order: the array's package, skid buffer and PE, then its own modules."""
    return [rtl_dir / name for name in SYSTEM_FROM_ARRAY] + [system_dir / name for name in SYSTEM_MODULES]


def system_parameters(cfg: AccelConfig, dram) -> dict[str, int]:
    """spmac_system's parameters for a design and its memory system (`fpga.dram.DramConfig`)."""
    return {"BPR_MAX": cfg.k_max // cfg.beat_k, "DATA_W": dram.data_bits,
            "ADDR_W": dram.addr_bits, "MAX_BURST": dram.max_burst, "MAX_OUTSTANDING": dram.outstanding,
            "FIFO_DEPTH": dram.fifo_words}


def lint_system(rtl_dir: Path, system_dir: Path, params: dict[str, int]) -> str:
    """`verilator --lint-only -Wall` over the DRAM-fed system with its parameters; raises on any warning."""
    simulator_env()
    sources = [str(path.resolve()) for path in system_sources(rtl_dir, system_dir)]
    cmd = ["verilator", "--lint-only", "-Wall", "--top-module", "spmac_system",
           *(f"-G{key}={value}" for key, value in params.items()), *sources]
    proc = subprocess.run(cmd, cwd=system_dir, capture_output=True, text=True)
    messages = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 or "%Warning" in messages or "%Error" in messages:
        raise ToolchainError(f"verilator lint of {system_dir} failed:\n{messages}")
    return messages


def lint(rtl_dir: Path, top: str = "spmac_array") -> str:
    """`verilator --lint-only -Wall` over the generated RTL; raises with Verilator's messages on any warning."""
    simulator_env()
    cmd = ["verilator", "--lint-only", "-Wall", "--top-module", top, *RTL_SOURCES]
    proc = subprocess.run(cmd, cwd=rtl_dir, capture_output=True, text=True)
    messages = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 or "%Warning" in messages or "%Error" in messages:
        raise ToolchainError(f"verilator lint of {rtl_dir} failed:\n{messages}")
    return messages

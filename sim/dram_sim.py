"""Simulate the DRAM-fed system of a bundle (`dram/`): consecutive layers run from the bundle's DRAM image by
the sequencer alone, under a random memory, bit-exactly against the golden model; cycles and bytes read are
measured and set against the compute and bandwidth formulas.

The image the simulated DRAM holds is cut from the shipped `dram/model.dram` (`fpga.dram.cut_image`: the
chosen layers' descriptors, each region cut to its first row passes), so every weight byte the RTL reads is a
shipped one; the golden outputs come from model.tcblob."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..fpga.config import AccelConfig, load_config
from ..fpga.dram import ALIGN, DESCRIPTOR_BYTES, DramConfig, cut_image, read_table
from ..fpga.generate import system_parameters, system_sources
from ..fpga.layers import for_design, read_layer
from ..fpga.tools import SimulationError
from ..numerics.geometry import row_passes
from .golden import quantize_activations
from .runner import _runner, expected_outputs

TESTBENCH = "toolchain.sim.tb_spmac_system"

# the memory the tests run against unless told otherwise: random latency per burst, random AR acceptance and
# random R stalls
RANDOM_MEMORY = {"latency": (4, 40), "ar_stall": 0.2, "r_stall": 0.1}
# `toolchain sim --system --memory NAME` and the benchmark: a random memory with long latencies; adequate
# bandwidth (the bus at full rate, 200 ns latency at 200 MHz, bursts pipelined); a slow memory (R data one
# cycle in four)
MEMORIES = {"random": {"latency": (4, 80), "ar_stall": 0.2, "r_stall": 0.2},
            "adequate": {"latency": (40, 40)},
            "slow": {"latency": (40, 40), "r_duty": (1, 4)}}


def first_block_layers(bundle: str | Path) -> list[str]:
    """Every linear of the first decoder layer, in the bundle's (model) order."""
    names = [e["name"] for e in json.loads((Path(bundle) / "layers.json").read_text())["layers"]]
    parts = names[0].split(".")
    number = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts) - 1)
    prefix = ".".join(parts[: number + 1]) + "."
    return [n for n in names if n.startswith(prefix)]


def build_system(bundle: Path, params: dict, work: Path):
    """Build (or reuse) the Verilator simulation of the bundle's spmac_system with `params`."""
    sources = system_sources(bundle / "rtl", bundle / "dram" / "rtl")
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise SimulationError(f"RTL missing from the bundle: {', '.join(missing)}")
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for s in sources:
        digest.update(s.read_bytes())
    build_dir = work / f"build-system-{digest.hexdigest()[:12]}"
    runner = _runner("verilator")
    log = work / "build-system.log"
    try:
        runner.build(sources=[str(s.resolve()) for s in sources], hdl_toplevel="spmac_system",
                     build_dir=str(build_dir), parameters=params, timescale=("1ns", "1ps"), always=False,
                     log_file=str(log))
    except Exception as exc:
        raise SimulationError(f"building the system simulation failed ({exc}); see {log}") from None
    return runner, build_dir


def memory_bound_cycles(bytes_read: int, dram: DramConfig, duty: float = 1.0) -> float:
    """Cycles to move `bytes_read` at the bus's width and the memory's duty cycle (R beats per cycle)."""
    return bytes_read / (dram.bus_bytes * duty)


@dataclass
class SystemRun:
    """The inputs of one run of the DRAM-fed system: the image the DRAM holds, its table, and per layer the
    activation codes (`acts_<i>`) and golden outputs (`expected_<i>`)."""

    bundle: Path
    cfg: AccelConfig
    dram: DramConfig
    image: bytes
    table: list[dict]
    arrays: dict
    ideal_cycles: int
    tokens: int


def prepare_run(bundle: str | Path, names: list[str], rows: int | None = None, tokens: int | None = None,
                corrupt: tuple[int, int] | None = None, dram: DramConfig | None = None,
                corrupt_descriptor: int | None = None) -> SystemRun:
    """Cut the chosen layers from the shipped DRAM image (whole row passes covering `rows`), and compute their
    golden outputs from model.tcblob on the captured activations. `corrupt`: (layer position, byte of its first
    weight section) to complement; `corrupt_descriptor`: a layer position whose descriptor magic to break."""
    from ..export.blob import read_blob

    bundle = Path(bundle).resolve()
    layout_path = bundle / "dram" / "layout.json"
    if not layout_path.is_file():
        raise ConfigError(f"{bundle} has no DRAM image (dram/layout.json); re-export it with toolchain export "
                          f"--target fpga")
    cfg = load_config(bundle / "accel.json")
    layout = json.loads(layout_path.read_text())
    dram = dram or DramConfig(**layout["config"])
    image = (bundle / "dram" / layout["image"]).read_bytes()
    table = read_table(image)
    index = {entry["name"]: i for i, entry in enumerate(layout["layers"])}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise ConfigError(f"no layer {', '.join(unknown)} in the bundle's DRAM image")
    if rows is not None and rows < 1:
        raise ConfigError(f"--rows must be >= 1, got {rows}")
    picks = [(index[n], row_passes(rows, cfg.pes) if rows else table[index[n]]["passes"]) for n in names]
    sub, sub_table = cut_image(image, table, picks, cfg.pes)
    if corrupt is not None:
        position, byte = corrupt
        at = sub_table[position]["base"] + sub_table[position]["scale_stride"] + byte
        sub = sub[:at] + bytes([sub[at] ^ 0xFF]) + sub[at + 1:]
    if corrupt_descriptor is not None:
        at = ALIGN + corrupt_descriptor * DESCRIPTOR_BYTES + 48
        sub = sub[:at] + bytes([sub[at] ^ 0xFF]) + sub[at + 1:]

    captured = np.load(bundle / "activations.npz")
    arrays: dict[str, np.ndarray] = {}
    ideal, counted_tokens = 0, None
    with read_blob(bundle / "model.tcblob") as blob:
        for i, (name, entry) in enumerate(zip(names, sub_table)):
            layer = for_design(read_layer(blob, name), cfg).first_rows(entry["rows"])
            x = captured[name][: tokens or None].astype(np.float64)
            acts, _ = quantize_activations(x, cfg.act_bits)
            counted_tokens = acts.shape[0] if counted_tokens is None else counted_tokens
            if acts.shape[0] != counted_tokens:
                raise ConfigError(f"{name} has {acts.shape[0]} captured tokens; the others {counted_tokens}")
            arrays[f"acts_{i}"] = acts
            arrays[f"expected_{i}"] = expected_outputs(cfg, layer, acts).reshape(acts.shape[0], -1)
            ideal += acts.shape[0] * cfg.layer_cycles(layer.k, layer.rows)

    return SystemRun(bundle, cfg, dram, sub, sub_table, arrays, ideal, counted_tokens)


def simulate_system(bundle: str | Path, names: list[str], rows: int | None = None, tokens: int | None = None,
                    seed: int = 0, memory: dict | None = None, gap: float = 0.0, stall: float = 0.0,
                    corrupt: tuple[int, int] | None = None, dram: DramConfig | None = None,
                    corrupt_descriptor: int | None = None) -> dict:
    """Run `names` (in that order) on the bundle's DRAM-fed system, the first `rows` rows of each (whole row
    passes), `tokens` captured tokens per layer.

    `memory`: the DRAM's behaviour (tb_spmac_system: latency range, ar_stall, r_stall, or r_duty = (on,
    period)); `gap` / `stall`: activation idle and result back-pressure probabilities; `corrupt`: (layer
    position, byte in its first weight section) to complement in the simulated DRAM, to prove the check fails;
    `corrupt_descriptor`: a layer position whose descriptor the sequencer must refuse.
    `dram` overrides the bundle's memory system (e.g. a narrower bus)."""
    run = prepare_run(bundle, names, rows, tokens, corrupt, dram, corrupt_descriptor)
    bundle, cfg, dram, sub, sub_table = run.bundle, run.cfg, run.dram, run.image, run.table
    arrays, ideal, counted_tokens = run.arrays, run.ideal_cycles, run.tokens
    work = bundle / "sim_build"
    work.mkdir(parents=True, exist_ok=True)
    params = system_parameters(cfg, dram)
    runner, build_dir = build_system(bundle, params, work)
    duty = (memory or {}).get("r_duty")
    bytes_estimate = len(sub) * counted_tokens
    limit = int(4 * (ideal + memory_bound_cycles(bytes_estimate, dram, duty[0] / duty[1] if duty else 1.0)
                     * (1 + 40 / dram.max_burst)) + 20000)
    vectors, result_file = work / "system.vectors.npz", work / "system.result.json"
    np.savez(vectors, image=np.frombuffer(sub, np.uint8), table=ALIGN, layers=len(names), tokens=counted_tokens,
             act_bits=cfg.act_bits, out_bits=cfg.out_bits, pes=cfg.pes, beat_k=cfg.beat_k, cycle_limit=limit,
             **arrays)
    result_file.unlink(missing_ok=True)
    memory = RANDOM_MEMORY if memory is None else memory
    env = {"SPMAC_VECTORS": str(vectors), "SPMAC_RESULT": str(result_file), "SPMAC_MEMORY": json.dumps(memory),
           "SPMAC_GAP": str(gap), "SPMAC_STALL": str(stall), "SPMAC_SEED": str(seed)}
    t0 = time.perf_counter()
    log = work / "system.sim.log"
    try:
        runner.test(test_module=TESTBENCH, hdl_toplevel="spmac_system", build_dir=str(build_dir),
                    test_dir=str(work), extra_env=env, seed=seed, log_file=str(log))
    except (Exception, SystemExit) as exc:
        if not result_file.is_file():
            raise SimulationError(f"the system simulation failed to run ({exc}); see {log}") from None
    if not result_file.is_file():
        raise SimulationError(f"the system testbench wrote no result; see {log}")
    result = json.loads(result_file.read_text())
    bytes_read = result["rd_beats"] * dram.bus_bytes
    weight_bytes = sum(e["region_bytes"] for e in sub_table) * counted_tokens
    bound = memory_bound_cycles(bytes_read, dram, duty[0] / duty[1] if duty else 1.0)
    result.update({
        "layers": [{"name": n, "rows": e["rows"], "k": e["k"], "passes": e["passes"],
                    "region_bytes": e["region_bytes"]} for n, e in zip(names, sub_table)],
        "tokens": counted_tokens, "memory": memory, "gap": gap, "stall": stall, "seed": seed,
        "dram": {"data_bits": dram.data_bits, "max_burst": dram.max_burst, "outstanding": dram.outstanding,
                 "fifo_words": dram.fifo_words},
        "bit_exact": result["mismatches"] == 0 and not result["timed_out"] and result["err"] == 0,
        "ideal_cycles": ideal, "bytes_read": bytes_read, "weight_bytes": weight_bytes,
        "bytes_per_token": bytes_read / counted_tokens, "memory_bound_cycles": round(bound, 1),
        "process_seconds": round(time.perf_counter() - t0, 2)})
    if result["cycles"]:
        result["utilisation"] = round(ideal / result["cycles"], 4)
        result["cycles_over_memory_bound"] = round(result["cycles"] / bound, 4)
    return result


def throughput_report(cfg: AccelConfig, result: dict, mem_gbps: float | None = None) -> dict:
    """Tokens/s of a measured run: compute bound from its cycles at the clock, memory bound from its measured
    bytes per token at the configured DRAM bandwidth."""
    gbps = mem_gbps or cfg.mem_gbps
    clock_hz = cfg.clock_mhz * 1e6
    compute = clock_hz * result["tokens"] / result["cycles"]
    memory = gbps * 1e9 / result["bytes_per_token"]
    return {"clock_mhz": cfg.clock_mhz, "mem_gbps": gbps, "bytes_per_token": result["bytes_per_token"],
            "cycles_per_token": result["cycles"] / result["tokens"],
            "tokens_per_s_compute_bound": round(compute, 1), "tokens_per_s_memory_bound": round(memory, 1),
            "bound_by": "compute" if compute < memory else "memory bandwidth"}

"""C-simulation of the generated HLS C++: compiled with g++ against the ap_types headers that ship in the
PyPI hls4ml wheel (what hls4ml's own `compile()` does), run on a layer's real images, compared with the
golden model's outputs by the C++ testbench itself."""
from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from ..fpga.config import AccelConfig
from ..fpga.layers import LayerData, write_images
from ..fpga.tools import SimulationError
from .runner import expected_outputs


def ap_types_dir() -> Path:
    spec = importlib.util.find_spec("hls4ml")
    if spec is None or not spec.submodule_search_locations:
        raise SimulationError("the ap_types headers come from the hls4ml wheel: pip install --no-deps hls4ml==1.3.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "templates" / "vivado" / "ap_types"
    if not (path / "ap_int.h").is_file():
        raise SimulationError(f"no ap_int.h under {path}")
    return path


def compile_csim(hls_dir: Path, work: Path) -> Path:
    """g++ the testbench and the kernel (cached by a hash of the sources)."""
    if shutil.which("g++") is None:
        raise SimulationError("g++ is not installed")
    sources = [hls_dir / "spmac.cpp", hls_dir / "tb_spmac.cpp"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in [*sources, hls_dir / "spmac.h"])).hexdigest()[:12]
    exe = work / f"tb_spmac-{digest}"
    if not exe.is_file():
        work.mkdir(parents=True, exist_ok=True)
        cmd = ["g++", "-std=c++17", "-O1", "-w", f"-I{hls_dir}", f"-I{ap_types_dir()}", *map(str, sources), "-o", str(exe)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SimulationError(f"compiling the HLS C-simulation failed:\n{proc.stderr[-3000:]}")
    return exe


def csim_layer(cfg: AccelConfig, layer: LayerData, acts: np.ndarray, hls_dir: Path, work: Path,
               rounding: str = "half_up", images: tuple[Path, Path] | None = None) -> dict:
    """Run the HLS kernel on `layer` for activation codes `acts` [T, K]; mismatches against the golden model.

    `images`: the weight and scale images the kernel loads (a bundle's shipped ones); without them the images
    of `layer` are written into `work`. The golden outputs always come from `layer`."""
    work = Path(work)
    exe = compile_csim(Path(hls_dir), work)
    wfile, sfile = images or write_images(work, f"{layer.name}.hls", cfg, layer)
    expected = expected_outputs(cfg, layer, acts, rounding)                      # [T, passes, P]
    tokens, passes, _ = expected.shape
    bpr, bpg = layer.k // cfg.beat_k, layer.group_size // cfg.beat_k
    beats = acts.reshape(tokens, bpr, cfg.beat_k)
    lines = [f"{tokens} {passes} {bpr} {bpg} {layer.shift}"]
    for t in range(tokens):
        token_beats = "\n".join(" ".join(map(str, beat)) for beat in beats[t].tolist())   # every pass re-reads them
        for q in range(passes):
            lines += [token_beats, " ".join(map(str, expected[t, q].tolist()))]
    vectors = work / f"{layer.name}.hls.vectors.txt"
    vectors.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([str(exe), str(wfile), str(sfile), str(vectors)], capture_output=True, text=True)
    found = re.search(r"compared (\d+) outputs, (\d+) mismatches", proc.stdout)
    if proc.returncode not in (0, 1) or found is None:
        raise SimulationError(f"the HLS C-simulation failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    compared, mismatches = int(found.group(1)), int(found.group(2))
    return {"layer": layer.name, "outputs": compared, "mismatches": mismatches, "bit_exact": mismatches == 0,
            "log": proc.stdout.strip().splitlines()[-6:]}


def compile_system_csim(hls_dir: Path, system_dir: Path, work: Path) -> Path:
    """g++ the DRAM-fed kernel and its testbench (the kernel includes the design's spmac.h and spmac.cpp)."""
    if shutil.which("g++") is None:
        raise SimulationError("g++ is not installed")
    sources = [system_dir / "spmac_dram.cpp", system_dir / "tb_spmac_dram.cpp"]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise SimulationError(f"HLS sources missing from the bundle: {', '.join(missing)}")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in [*sources, hls_dir / "spmac.h", hls_dir / "spmac.cpp"]))
    exe = work / f"tb_spmac_dram-{digest.hexdigest()[:12]}"
    if not exe.is_file():
        work.mkdir(parents=True, exist_ok=True)
        cmd = ["g++", "-std=c++17", "-O1", "-w", f"-I{hls_dir}", f"-I{ap_types_dir()}", *map(str, sources), "-o", str(exe)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SimulationError(f"compiling the DRAM-fed HLS C-simulation failed:\n{proc.stderr[-3000:]}")
    return exe


def csim_system(bundle: str | Path, names: list[str], rows: int | None = None, tokens: int | None = None,
                corrupt: tuple[int, int] | None = None, corrupt_descriptor: int | None = None) -> dict:
    """The DRAM-fed HLS kernel (m_axi DRAM, axis activations and results) on the same cut of the shipped DRAM
    image as `dram_sim.simulate_system`, compared with the golden model by its C++ testbench."""
    from ..fpga.dram import ALIGN
    from .dram_sim import prepare_run

    run = prepare_run(bundle, names, rows, tokens, corrupt, corrupt_descriptor=corrupt_descriptor)
    work = run.bundle / "hls_build"
    exe = compile_system_csim(run.bundle / "hls", run.bundle / "dram" / "hls", work)
    image_path, vectors = work / "system.dram", work / "system.hls.vectors.txt"
    image_path.write_bytes(run.image)
    lines = [f"{len(names)} {run.tokens} {ALIGN}"]
    for i, entry in enumerate(run.table):
        lines.append(f"{entry['passes']} {entry['beats_per_row']}")
        acts, expected = run.arrays[f"acts_{i}"], run.arrays[f"expected_{i}"]
        for t in range(run.tokens):
            lines += [" ".join(map(str, acts[t].tolist())), " ".join(map(str, expected[t].tolist()))]
    vectors.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([str(exe), str(image_path), str(vectors)], capture_output=True, text=True)
    found = re.search(r"status (\d+), compared (\d+) outputs, (\d+) mismatches", proc.stdout)
    if proc.returncode not in (0, 1) or found is None:
        raise SimulationError(f"the DRAM-fed HLS C-simulation failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    status, compared, mismatches = (int(g) for g in found.groups())
    return {"layers": names, "tokens": run.tokens, "outputs": compared, "mismatches": mismatches, "status": status,
            "bit_exact": mismatches == 0 and status == 0, "log": proc.stdout.strip().splitlines()[-6:]}

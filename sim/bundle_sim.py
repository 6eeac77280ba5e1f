"""`toolchain sim BUNDLE`: simulate layers of an FPGA bundle on their real weights and captured activations,
bit-exactly against the golden model, and measure cycles against the throughput formula."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..fpga.config import load_config
from ..fpga.layers import for_design, read_layer
from .golden import float_error, quantize_activations
from .hls_csim import csim_layer
from .runner import expected_outputs, simulate_layer


def default_layers(layers: list[dict]) -> list[str]:
    """The first attention and the first MLP projection of the bundle (by the family adapter's blocks)."""
    picked = []
    for block in ("attn", "mlp"):
        name = next((layer["name"] for layer in layers if layer.get("block") == block), None)
        if name:
            picked.append(name)
    return picked or [layers[0]["name"]]


def simulate_bundle(bundle: str | os.PathLike, layers: list[str] | None = None, rows: int | None = None,
                    simulator: str = "verilator", seed: int = 0, tokens: int | None = None,
                    backpressure: float = 0.25) -> dict:
    from ..export.blob import read_blob

    bundle = Path(bundle)
    for required in ("accel.json", "layers.json", "model.tcblob", "activations.npz", "rtl", "hls"):
        if not (bundle / required).exists():
            raise ConfigError(f"{bundle} is not an FPGA bundle: {required} is missing "
                              f"(write one with toolchain export --target fpga)")
    cfg = load_config(bundle / "accel.json")
    table = json.loads((bundle / "layers.json").read_text())["layers"]
    known = {layer["name"] for layer in table}
    names = layers or default_layers(table)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"no layer {', '.join(unknown)} in the bundle; layers.json lists {len(known)}, "
                          f"e.g. {sorted(known)[0]}")
    if rows is not None and rows < 1:
        raise ConfigError(f"--rows must be >= 1, got {rows}")
    captured = np.load(bundle / "activations.npz")
    results = []
    with read_blob(bundle / "model.tcblob") as blob:
        for name in names:
            layer = for_design(read_layer(blob, name), cfg)
            if rows is not None:
                layer = layer.first_rows(rows)
            x = captured[name][: tokens or None].astype(np.float64)
            acts, act_scale = quantize_activations(x, cfg.act_bits)
            work = bundle / "sim_build"
            t0 = time.perf_counter()
            checked = simulate_layer(cfg, layer, acts, bundle / "rtl", work, gap=backpressure, stall=backpressure,
                                     seed=seed, simulator=simulator)
            timed = simulate_layer(cfg, layer, acts, bundle / "rtl", work, seed=seed, simulator=simulator)
            hls = csim_layer(cfg, layer, acts, bundle / "hls", work)
            reference = x @ blob.dequantized(name)[: layer.rows].astype(np.float64).T
            golden = expected_outputs(cfg, layer, acts).reshape(acts.shape[0], -1)[:, : layer.rows]
            results.append({
                "layer": name, "rows": layer.rows, "k": layer.k, "tokens": int(acts.shape[0]),
                "bit_exact": checked["bit_exact"] and timed["bit_exact"] and hls["bit_exact"],
                "hls_csim": {"outputs": hls["outputs"], "mismatches": hls["mismatches"]},
                "outputs_compared": checked["outputs"] + timed["outputs"],
                "mismatches": checked["mismatches"] + timed["mismatches"],
                "backpressure": {"gap": backpressure, "stall": backpressure, "cycles": checked["cycles"]},
                "ideal_cycles": timed["ideal_cycles"], "measured_cycles": timed["active_cycles"],
                "utilisation": timed.get("utilisation"),
                "sim_cycles_per_s": round((checked["cycles"] + timed["cycles"])
                                          / max(checked["wall_seconds"] + timed["wall_seconds"], 1e-9)),
                "seconds": round(time.perf_counter() - t0, 2),
                "golden_vs_float": float_error(golden, act_scale, reference, cfg.out_bits),
            })
    return {"bundle": str(bundle.resolve()), "simulator": simulator, "seed": seed, "layers": results,
            "bit_exact": all(r["bit_exact"] for r in results)}

"""`toolchain sim BUNDLE`: simulate layers of an FPGA bundle on the images it ships (mem/) and its captured
activations, bit-exactly against the golden model, and measure cycles against the throughput formula.

The RTL and the HLS C-sim load the shipped images (or, with --rows, a cut of them); the golden model is computed
independently from model.tcblob, so a word of an image that disagrees with the blob shows as a mismatch."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..fpga.config import AccelConfig, load_config
from ..fpga.images import ImageMismatchError, check_bundle_images, image_paths, write_first_rows_images
from ..fpga.layers import LayerData, for_design, read_layer
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


def shipped_images(bundle: Path, entry: dict, cfg: AccelConfig, whole: LayerData, rows: int,
                   work: Path) -> tuple[Path, Path]:
    """The layer's shipped images; for fewer rows than the layer has, their cut to those rows (in `work`)."""
    shipped = tuple(path.resolve() for path in image_paths(bundle, entry))
    missing = [str(path) for path in shipped if not path.is_file()]
    if missing:   # named here: a simulator would read a missing image as X or zeros, or stop its own way
        raise ImageMismatchError(f"{entry['name']}: the shipped image {missing[0]} is missing")
    if rows >= whole.rows:
        return shipped
    return write_first_rows_images(cfg, whole, rows, shipped, work.resolve())


def check_images(bundle: str | os.PathLike) -> dict:
    """`toolchain sim BUNDLE --check-images`: every word of every shipped image against the blob."""
    bundle = Path(bundle)
    require_bundle(bundle)
    return {"bundle": str(bundle.resolve()), **check_bundle_images(bundle)}


def require_bundle(bundle: Path) -> None:
    for required in ("accel.json", "layers.json", "model.tcblob", "activations.npz", "rtl", "hls", "mem"):
        if not (bundle / required).exists():
            raise ConfigError(f"{bundle} is not an FPGA bundle: {required} is missing "
                              f"(write one with toolchain export --target fpga)")


def simulate_bundle(bundle: str | os.PathLike, layers: list[str] | None = None, rows: int | None = None,
                    simulator: str = "verilator", seed: int = 0, tokens: int | None = None,
                    backpressure: float = 0.25) -> dict:
    from ..export.blob import read_blob

    bundle = Path(bundle)
    require_bundle(bundle)
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
    entries = {layer["name"]: layer for layer in table}
    captured = np.load(bundle / "activations.npz")
    results = []
    with read_blob(bundle / "model.tcblob") as blob:
        for name in names:
            whole = for_design(read_layer(blob, name), cfg)
            layer = whole if rows is None else whole.first_rows(rows)
            x = captured[name][: tokens or None].astype(np.float64)
            acts, act_scale = quantize_activations(x, cfg.act_bits)
            work = bundle / "sim_build"
            images = shipped_images(bundle, entries[name], cfg, whole, layer.rows, work)
            t0 = time.perf_counter()
            checked = simulate_layer(cfg, layer, acts, bundle / "rtl", work, gap=backpressure, stall=backpressure,
                                     seed=seed, simulator=simulator, images=images)
            timed = simulate_layer(cfg, layer, acts, bundle / "rtl", work, seed=seed, simulator=simulator,
                                   images=images)
            hls = csim_layer(cfg, layer, acts, bundle / "hls", work, images=images)
            reference = x @ blob.dequantized(name)[: layer.rows].astype(np.float64).T
            golden = expected_outputs(cfg, layer, acts).reshape(acts.shape[0], -1)[:, : layer.rows]
            results.append({
                "layer": name, "rows": layer.rows, "k": layer.k, "tokens": int(acts.shape[0]),
                "images": [str(path) for path in images],
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

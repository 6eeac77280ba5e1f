"""`toolchain export --target fpga`: the accelerator bundle of a compressed model.

    BUNDLE/
      README.md            what is here and how to simulate it
      accel.json           the accelerator config, with every derived width and its bound
      contract.json        the numeric contract the RTL, the HLS C++ and the golden model implement
      layers.json          every layer: shape, N:M, bits, scale shift, array parameters, images, ideal cycles
      model.tcblob         the packed blob the images are built from (every word checked against it)
      sim/                 the cocotb testbench (tb_spmac_array.py) and run.py (= toolchain sim BUNDLE)
      rtl/                 spmac_pkg.sv, spmac_pe.sv, axis_skid.sv, spmac_array.sv (lint-clean under verilator -Wall)
      hls/                 spmac.h, spmac.cpp (the same datapath in HLS C++), tb_spmac.cpp (C-simulation)
      mem/<layer>.weights.mem, mem/<layer>.scales.mem   $readmemh images, one pair per layer
      dram/                model.dram (every layer's words and the descriptor table), layout.json, rtl/ (the
                           DRAM-fed system spmac_system), hls/ (spmac_dram.cpp: the same interface in HLS C++)
      activations.npz      real inputs of every layer, captured on text from the held-out pydoc split
      report.json, report.md   cycles per layer, MACs/cycle, tokens/s at the configured clock and bandwidth
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..atomic import atomic_dir
from ..errors import ConfigError
from ..models.loading import check_out_dir
from .config import AccelConfig, load_config
from .dram import DramConfig, build_image, layer_region, layout_json
from .generate import LayerShape, lint, lint_system, render_hls, render_rtl, render_system, system_parameters
from .images import check_bundle_images
from .layers import for_design, memory_images, read_layer, write_images
from .tools import testbench_source

CONTRACT_FORMAT = "toolchain.fpga.contract/1"
CAPTURE_TOKENS = 8


def default_config(layers: list[dict], nm: tuple[int, int] | None) -> dict:
    """A design that runs every layer of the model: its N:M (or dense), its widest codes, its group size and
    its largest K; 8 PEs of 4 groups per beat."""
    group_sizes = {e["group_size"] for e in layers}
    if len(group_sizes) != 1:
        raise ConfigError(f"layers use several group sizes {sorted(group_sizes)}; give --config with one")
    n, m = nm or (4, 4)
    return {"n": n, "m": m, "groups_per_beat": 4, "pes": 8, "weight_bits": max(e["bits"] for e in layers),
            "group_size": group_sizes.pop(), "k_max": max(e["shape"][1] for e in layers)}


def contract(cfg: AccelConfig) -> dict:
    w = cfg.widths
    return {
        "format": CONTRACT_FORMAT,
        "activations": {"bits": cfg.act_bits, "encoding": "two's complement",
                        "quantization": "per token, symmetric: scale = max|x| / (2^(AB-1)-1); "
                                        "a = clamp(floor(x / scale + 0.5), -(2^(AB-1)-1), 2^(AB-1)-1)"},
        "weights": {"bits": cfg.weight_bits, "encoding": "two's complement, the quantizer's symmetric codes "
                    "(narrower codes sign-extended); pruned weights are not stored",
                    "sparsity": f"{cfg.n}:{cfg.m} along K; per group of M, N slots with ascending positions of "
                                f"{w.idx} bits; a group with fewer kept weights is padded with zero weights"},
        "scales": {"bits": cfg.scale_bits, "encoding": "unsigned mantissa, scale = mantissa / 2^shift, one "
                   "shift per layer (the blob's scales_fixed, converted offline from fp16)"},
        "accumulation": {"group_bits": w.gacc, "scaled_bits": w.scaled, "row_bits": w.total,
                         "bounds": w.bounds, "overflow": "impossible: widths hold the bounds (proof in "
                                                         "toolchain.fpga.config); registers are two's complement"},
        "output": {"bits": cfg.out_bits, "rounding": "round half up: floor((row + 2^(shift-1)) / 2^shift)",
                   "saturation": "clamp to [-2^(OUTW-1), 2^(OUTW-1)-1], at the output only",
                   "float_estimate": "output * the token's activation scale"},
        "order": "results in row order: pass q carries rows q*P .. q*P+P-1 (rows past the layer's end are 0)",
    }


def capture_activations(model_dir: Path, names: list[str], tokens: int = CAPTURE_TOKENS) -> dict[str, np.ndarray]:
    """Inputs [tokens, K] of each named linear on the first `tokens` tokens of the held-out pydoc split."""
    import torch

    from ..data import sample_tokens
    from ..models import load_model

    loaded = load_model(str(model_dir))
    ids = sample_tokens(loaded, tokens)
    captured: dict[str, np.ndarray] = {}
    handles = []
    for name in names:
        module = loaded.model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(
            lambda mod, args, name=name: captured.__setitem__(name, args[0][0].detach().float().numpy().copy())))
    try:
        with torch.no_grad():
            loaded.model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return captured


def _model_order(module: str, linears: list[str]) -> tuple:
    """Sort key: decoder layer number, then the adapter's order of linears (q, k, v, o, gate, up, down)."""
    numbers = [int(part) for part in module.split(".") if part.isdigit()]
    position = next((i for i, s in enumerate(linears) if module.endswith("." + s)), len(linears))
    return (numbers[0] if numbers else -1, position, module)


def block_of(config: dict) -> dict[str, str]:
    """Linear name suffix -> its sub-block ("attn", "mlp"), from the family's adapter."""
    from ..models import adapter_for

    adapter = adapter_for(SimpleNamespace(model_type=config.get("model_type")))
    return {linear: sb.name for sb in adapter.subblocks(None) for linear in sb.linears}


def write_bundle(model_dir: str | os.PathLike, out: str | os.PathLike, config_path: str | None = None,
                 lint_rtl: bool = True, synth: bool = True) -> dict:
    from ..export.blob import read_blob, write_blob
    from ..export.source import read_compressed

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    source = read_compressed(model_dir, require_quant=True)
    check_out_dir(model_dir, out)
    blocks = block_of(source.config)
    with atomic_dir(out) as tmp:
        write_blob(model_dir, tmp / "model.tcblob")
        blob = read_blob(tmp / "model.tcblob")
        order = list(blocks)   # the adapter's linears, attention first
        entries = sorted((blob.entry(n) for n in blob.names() if blob.entry(n)["kind"] == "quant"),
                         key=lambda e: _model_order(e["module"], order))
        cfg = load_config(config_path, **({} if config_path else default_config(entries, source.nm)))
        (tmp / "mem").mkdir()
        layers, shapes, dram_layers = [], [], []
        for e in entries:
            layer = for_design(read_layer(blob, e["name"]), cfg)
            stem = layer.name
            write_images(tmp / "mem", stem, cfg, layer)
            region, geometry = layer_region(cfg, layer.k, layer.rows, layer.group_size, *memory_images(cfg, layer))
            dram_layers.append({"name": layer.name, "shift": layer.shift, "region": region, "geometry": geometry})
            shape = LayerShape.of(cfg, layer.name, layer.k, layer.rows, layer.group_size, layer.shift, stem)
            shapes.append(shape)
            suffix = next((s for s in blocks if layer.name.endswith("." + s)), None)
            layers.append({**asdict(shape), "bits": layer.bits, "nm": list(e["nm"]) if e["nm"] else None,
                           "block": blocks.get(suffix), "ideal_cycles": cfg.layer_cycles(layer.k, layer.rows),
                           "weight_bits_streamed": int(shape.passes * shape.beats_per_row * cfg.pes
                                                       * cfg.slots_per_beat * (cfg.weight_bits + cfg.widths.idx)
                                                       + shape.passes * (layer.k // layer.group_size)
                                                       * cfg.pes * cfg.scale_bits)})
        blob.close()
        render_rtl(cfg, shapes[0], tmp / "rtl")
        render_hls(cfg, tmp / "hls", wdepth=max(sh.passes * sh.beats_per_row for sh in shapes),
                   sdepth=max(sh.passes * sh.beats_per_row // sh.beats_per_group for sh in shapes))
        lint_messages = lint(tmp / "rtl") if lint_rtl else None
        dram = write_dram(tmp / "dram", cfg, dram_layers)
        if lint_rtl:
            lint_system(tmp / "rtl", tmp / "dram" / "rtl", system_parameters(cfg, dram))
        acts = capture_activations(model_dir, [layer["name"] for layer in layers])
        np.savez_compressed(tmp / "activations.npz", **acts)
        (tmp / "accel.json").write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
        (tmp / "contract.json").write_text(json.dumps(contract(cfg), indent=2) + "\n")
        (tmp / "layers.json").write_text(json.dumps({"layers": layers}, indent=2) + "\n")
        images = check_bundle_images(tmp)   # never ship an image that disagrees with the blob
        report = performance_report(cfg, layers)
        report["resources"] = resources(tmp / "rtl", cfg, layers) if synth else {"skipped": "synthesis not asked for"}
        report["images"] = {"check": "every word of every image equals the blob's", **images}
        report["dram"] = dram_report(cfg, dram, tmp / "dram")
        report.update({"lint": "verilator --lint-only -Wall: clean" if lint_messages is not None else "skipped",
                       "source": str(model_dir.resolve()), "seconds": round(time.perf_counter() - t0, 2)})
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "report.md").write_text(report_markdown(report))
        (tmp / "README.md").write_text(bundle_readme(cfg, report))
        write_sim_dir(tmp / "sim")
    return report


def write_dram(directory: Path, cfg: AccelConfig, dram_layers: list[dict], dram: DramConfig | None = None
               ) -> DramConfig:
    """dram/: the DRAM image of every layer (model.dram), its layout and descriptor table (layout.json), the
    DRAM-fed system's RTL (rtl/) and its HLS C++ (hls/)."""
    dram = dram or DramConfig()
    image, table = build_image(dram_layers)
    directory.mkdir()
    (directory / "model.dram").write_bytes(image)
    (directory / "layout.json").write_text(json.dumps(layout_json(cfg, dram, table, len(image)), indent=2) + "\n")
    render_system(directory / "rtl", directory / "hls")
    return dram


def dram_report(cfg: AccelConfig, dram: DramConfig, directory: Path) -> dict:
    """What the DRAM-fed system reads per token (every region once, every descriptor once, padding included)
    and the memory-bound tokens/s at the configured bandwidth; measured cycles come from `toolchain sim
    --system` and `toolchain bench fpga-dram`."""
    layout = json.loads((directory / "layout.json").read_text())
    per_token = sum(e["region_bytes"] for e in layout["layers"]) + layout["descriptor_bytes"] * len(layout["layers"])
    padding = sum(e["passes"] * (e["scale_stride"] - e["scale_bytes"] + e["weight_stride"] - e["weight_bytes"])
                  for e in layout["layers"])
    return {"image_bytes": layout["image_bytes"], "bytes_per_token": per_token, "padding_bytes_per_token": padding,
            "bus_bits": dram.data_bits, "bus_gbps_at_clock": round(dram.bus_bytes * cfg.clock_mhz * 1e6 / 1e9, 2),
            "tokens_per_s_memory_bound": round(cfg.mem_gbps * 1e9 / per_token, 2)}


def resources(rtl_dir: Path, cfg: AccelConfig, layers: list[dict]) -> dict:
    from .synth import estimate, yosys_binary

    if yosys_binary() is None:
        import warnings

        warnings.warn("yosys is not installed: the bundle's report has no resource estimate "
                      "(Debian: apt-get install yosys)", stacklevel=3)
        return {"skipped": "yosys is not installed (Debian: apt-get install yosys)"}
    return estimate(rtl_dir, cfg, max(layer["weight_bits_streamed"] for layer in layers))


RUN_SIM = '''"""Simulate this bundle: the cocotb testbench beside this file (a copy of toolchain.sim.tb_spmac_array)
driven by toolchain's runner, through Verilator, bit-exactly against the golden model. Same as
`toolchain sim BUNDLE`; arguments are passed on (e.g. --layer NAME --rows 64)."""
import sys
from pathlib import Path

from toolchain.cli import main

sys.exit(main(["sim", str(Path(__file__).resolve().parent.parent), *sys.argv[1:]]))
'''


def write_sim_dir(directory: Path) -> None:
    """The bundle's testbench (a copy, for reading and reuse) and a runner script."""
    directory.mkdir()
    (directory / "tb_spmac_array.py").write_text(testbench_source().read_text())
    (directory / "run.py").write_text(RUN_SIM)


def performance_report(cfg: AccelConfig, layers: list[dict]) -> dict:
    """Cycles per layer from the throughput formula, and tokens/s bounds at the configured clock and memory."""
    cycles = sum(layer["ideal_cycles"] for layer in layers)
    streamed_bytes = sum(layer["weight_bits_streamed"] for layer in layers) / 8
    clock_hz = cfg.clock_mhz * 1e6
    compute_tps = clock_hz / cycles
    memory_tps = cfg.mem_gbps * 1e9 / streamed_bytes
    dense_macs = sum(layer["k"] * layer["rows"] for layer in layers)
    return {
        "design": {"nm": f"{cfg.n}:{cfg.m}", "pes": cfg.pes, "groups_per_beat": cfg.groups_per_beat,
                   "weight_bits": cfg.weight_bits, "physical_multipliers": cfg.multipliers,
                   "dense_equivalent_macs_per_cycle": cfg.dense_macs_per_cycle,
                   "dense_macs_per_cycle_per_multiplier": cfg.dense_macs_per_cycle / cfg.multipliers,
                   "clock_mhz": cfg.clock_mhz, "mem_gbps": cfg.mem_gbps},
        "per_token": {"cycles": cycles, "dense_macs": dense_macs, "utilisation": dense_macs / (cycles * cfg.dense_macs_per_cycle),
                      "weight_bytes_streamed": streamed_bytes,
                      "tokens_per_s_compute_bound": round(compute_tps, 2),
                      "tokens_per_s_memory_bound": round(memory_tps, 2),
                      "tokens_per_s_estimate": round(min(compute_tps, memory_tps), 2),
                      "bound_by": "compute" if compute_tps < memory_tps else "memory bandwidth"},
        "layers": [{"name": layer["name"], "k": layer["k"], "rows": layer["rows"], "nm": layer["nm"],
                    "bits": layer["bits"], "cycles": layer["ideal_cycles"],
                    "microseconds": round(layer["ideal_cycles"] / cfg.clock_mhz, 2)} for layer in layers],
    }


def report_markdown(r: dict) -> str:
    d, t = r["design"], r["per_token"]
    lines = ["# Accelerator report", "",
             f"Design: {d['nm']} sparse, {d['pes']} PEs x {d['groups_per_beat']} groups per beat, "
             f"{d['weight_bits']}-bit weights: {d['physical_multipliers']} multipliers, "
             f"{d['dense_equivalent_macs_per_cycle']} dense-equivalent MACs/cycle "
             f"({d['dense_macs_per_cycle_per_multiplier']:.2f} per multiplier), {d['clock_mhz']} MHz, "
             f"{d['mem_gbps']} GB/s weight memory. RTL lint: {r['lint']}.", "",
             *([f"Images: every one of the {r['images']['words']:,} words of mem/ checked against model.tcblob.", ""]
               if "images" in r else []),
             "| per token | |", "|---|---|",
             f"| cycles (throughput formula: sum of ceil(rows/P) x K/(G*M)) | {t['cycles']:,} |",
             f"| utilisation of the dense-equivalent MACs | {t['utilisation']:.4f} |",
             f"| weight + index + scale bytes streamed | {t['weight_bytes_streamed']:,.0f} |",
             f"| tokens/s, compute bound at the configured {d['clock_mhz']} MHz | {t['tokens_per_s_compute_bound']} |",
             f"| tokens/s, memory bound | {t['tokens_per_s_memory_bound']} |",
             f"| **tokens/s estimate** ({t['bound_by']}; the configured clock, not placed and routed) | "
             f"**{t['tokens_per_s_estimate']}** |", "",
             ]
    if r.get("place_and_route"):   # the clock a real part achieved
        from .pnr import markdown

        lines += markdown(r["place_and_route"])
    if "dram" in r:
        x = r["dram"]
        lines += [f"DRAM-fed system (dram/): the image is {x['image_bytes']:,} bytes; a token reads "
                  f"{x['bytes_per_token']:,} bytes ({x['padding_bytes_per_token']:,} of them 64-byte padding): "
                  f"{x['tokens_per_s_memory_bound']} tokens/s memory bound at {d['mem_gbps']} GB/s. Its "
                  f"{x['bus_bits']}-bit AXI bus carries {x['bus_gbps_at_clock']} GB/s at {d['clock_mhz']} MHz.", ""]
    if "model_eval" in r:
        lines += model_eval_markdown(r["model_eval"])
    res = r.get("resources", {})
    if "xcup" in res:
        lines += [f"Resources, pre-route estimates ({res['tool']}; {res['note']}):", "",
                  "| target | unit | LUT | carry | FF | DSP |", "|---|---|---|---|---|---|"]
        for target, label in (("xcup", "UltraScale+"), ("ice40", "iCE40")):
            for unit in ("pe", "array"):
                c = res[target][unit]
                lines.append(f"| {label} | {unit} | {c.get('lut', 0):,} | {c.get('carry', 0):,} | {c.get('ff', 0):,} | "
                             f"{c.get('dsp', 0)} |")
        lines += ["", f"The largest layer's weight, index and scale memory: {res['largest_layer_memory_bits']:,} bits "
                      f"({res['largest_layer_bram36']} x 36 Kb block RAM).", ""]
    else:
        lines += [f"Resources: {res.get('skipped', 'not estimated')}.", ""]
    lines += ["| layer | K | rows | N:M | bits | cycles | us |", "|---|---|---|---|---|---|---|"]
    for layer in r["layers"]:
        nm = f"{layer['nm'][0]}:{layer['nm'][1]}" if layer["nm"] else "dense"
        lines.append(f"| {layer['name']} | {layer['k']} | {layer['rows']} | {nm} | {layer['bits']} | "
                     f"{layer['cycles']:,} | {layer['microseconds']} |")
    return "\n".join(lines) + "\n"


def model_eval_markdown(m: dict) -> list[str]:
    """The report's section on the whole model under the contract (`toolchain fpga-eval`)."""
    bits = m["act_bits"]
    over = f", overridden: {bits['overrides']}" if bits.get("overrides") else ""
    lines = ["## The whole model under the contract", "",
             f"`toolchain fpga-eval`: every accelerated linear computed as contract.json says ({bits['design']}-bit "
             f"activations per token{over}), the rest of the decoder in float. Windows of {m['seqlen']} tokens, at "
             f"most {m['max_windows']} per split; {m['saturated_outputs']:,} of {m['contract_outputs']:,} outputs "
             f"saturated.", "",
             "| split | tokens | dense | float quantized | under the contract | contract vs float |",
             "|---|---|---|---|---|---|"]
    for name, row in m["perplexity"].items():
        dense = f"{row['dense']:.3f}" if "dense" in row else "-"
        lines.append(f"| {name} | {m['tokens'].get(name, 0):,} | {dense} | {row['float']:.3f} | {row['contract']:.3f} "
                     f"| {row['contract_vs_float_pct']:+.2f}% |")
    checks = m.get("rtl_cross_check") or []
    if checks:
        lines += ["", "RTL cross-check (Verilator, the shipped images, inputs captured in the contract run): " + "; ".join(
            f"{c['layer']} ({c['tokens']} tokens x {c['rows']} rows): {'bit-exact' if c['bit_exact'] else 'MISMATCH'}"
            for c in checks) + "."]
    if m.get("generation"):
        agree = m.get("generation_agreement", {})
        lines += ["", f"Greedy generation from \"{m['prompt']}\" ({agree.get('new_tokens')} tokens; the contract agrees "
                      f"with the float quantized model on the first {agree.get('contract_vs_float')}):", ""]
        lines += [f"- {kind}: {json.dumps(text)}" for kind, text in m["generation"].items()]
    return lines + [""]


def add_to_report(bundle: Path, key: str, section: dict) -> None:
    """Put `section` under `key` of the bundle's report.json and re-render report.md (both atomically)."""
    from ..atomic import atomic_file

    report = json.loads((Path(bundle) / "report.json").read_text())
    report[key] = section
    with atomic_file(Path(bundle) / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    with atomic_file(Path(bundle) / "report.md") as tmp:
        tmp.write_text(report_markdown(report))


def bundle_readme(cfg: AccelConfig, report: dict) -> str:
    return f"""# FPGA accelerator bundle

A {cfg.n}:{cfg.m} sparse multiply-accumulate array ({cfg.pes} PEs, {cfg.weight_bits}-bit weights,
{cfg.act_bits}-bit activations) generated by toolchain for the model in `{report['source']}`.

- `rtl/`: SystemVerilog. `spmac_array` is the top: AXI-Stream activations in, one P-wide result beat per
  row pass out. Its parameters BPR/BPG/PASSES/SHIFT and the image files are per layer (`layers.json`).
- `hls/`: the same datapath in HLS C++ (`ap_int`, AXI-Stream ports, AP_RND/AP_SAT output) and its
  C-simulation testbench; `toolchain sim` compiles it with g++ against hls4ml's ap_types headers.
- `mem/`: `$readmemh` images of each layer's weight/index words and scale words.
- `dram/`: `model.dram`, every layer's words in the DRAM layout with a descriptor table (layout in
  `layout.json` and toolchain's docs/fpga.md); `rtl/spmac_system.sv` and its modules, which stream it over
  AXI4 and run a sequence of layers without the host; `hls/spmac_dram.cpp`, the same interface in HLS C++.
- `contract.json`: the integer arithmetic, exactly; `accel.json`: the config and its derived widths.
- `report.md`: cycles and tokens/s from the throughput formula, and Yosys resource estimates.
- `sim/`: the cocotb testbench and `run.py`, which runs it (same as `toolchain sim`).

Simulate real layers on the images in `mem/`, bit-exactly against the golden model computed from
`model.tcblob` (Verilator through cocotb, and the HLS C-sim); check every image word against the blob:

    toolchain sim BUNDLE --layer {report['layers'][0]['name']} --rows 64
    toolchain sim BUNDLE          # the first attention and the first MLP projection, every row
    toolchain sim BUNDLE --check-images
    toolchain sim BUNDLE --system --rows 64   # the DRAM-fed system: the first decoder layer's linears in one run
"""

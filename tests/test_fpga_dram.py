"""The DRAM-fed FPGA system: the DRAM image and its descriptor table, and the RTL (AXI4 read master, weight
FIFO, descriptor sequencer, streaming array) simulated with cocotbext-axi's AxiRamRead as the DRAM and its
AXI-Stream source and sink, bit-exactly against the golden model.

Every simulation shares one bundle and one Verilator build of spmac_system."""
from __future__ import annotations

import json

import numpy as np
import pytest

from toolchain.fpga.config import AccelConfig, load_config
from toolchain.fpga.dram import (DESCRIPTOR_MAGIC, DramConfig, build_image, cut_image, layer_region, read_table,
                                 word_bytes)
from toolchain.fpga.layers import LayerData, memory_images

ATTN_MLP = [f"model.layers.0.{s}" for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def test_region_layout_and_descriptor_by_hand():
    """2 PEs, one 2:4 group per beat, 4-bit codes: a weight word is 2 x 12 bits = 3 bytes, a scale word 4 bytes;
    3 rows make 2 passes of 2 beats and 1 group."""
    cfg = AccelConfig(n=2, m=4, groups_per_beat=1, pes=2, weight_bits=4, group_size=8, k_max=8)
    slots = np.array([[-1, 3, 2, -8], [1, 1, 1, 1], [7, -7, 0, 5]], np.int8)
    index = np.array([[0, 2, 1, 3], [0, 1, 2, 3], [1, 3, 0, 2]], np.uint8)
    layer = LayerData("l", 3, 8, 4, (2, 4), 8, slots, index, np.array([[0x1234], [0xBEEF], [0x0F0F]], np.uint16), 12)
    weight_lines, scale_lines = memory_images(cfg, layer)
    region, geo = layer_region(cfg, 8, 3, 8, weight_lines, scale_lines)
    assert word_bytes(cfg) == (3, 4)
    assert geo == {"k": 8, "rows": 3, "passes": 2, "beats_per_row": 2, "scale_bytes": 4, "scale_stride": 64,
                   "weight_bytes": 6, "weight_stride": 64, "region_bytes": 256}
    # pass 0: scale word (row 0 | row 1 << 16) little-endian, then beat 0's word: row 0 codes F,3 idx 0,2 -> 0x83f;
    # row 1 codes 1,1 idx 0,1 -> 0x411 at bit 12
    assert region[0:4] == bytes([0x34, 0x12, 0xEF, 0xBE]) and region[4:64] == bytes(60)
    assert region[64:67] == (0x411 << 12 | 0x83F).to_bytes(3, "little")
    assert region[128:132] == bytes([0x0F, 0x0F, 0, 0])             # pass 1: row 2, PE 1 past the end is zero
    image, table = build_image([{"name": "l", "shift": 12, "region": region, "geometry": geo}] * 2)
    parsed = read_table(image)
    assert [d["base"] for d in parsed] == [e["base"] for e in table] == [192, 448]
    assert parsed[1]["magic"] == DESCRIPTOR_MAGIC and parsed[1]["shift"] == 12 and parsed[1]["passes"] == 2
    cut, cut_table = cut_image(image, parsed, [(1, 1)], cfg.pes)    # the first pass of the second layer
    assert cut_table[0]["passes"] == 1 and cut_table[0]["rows"] == 2
    assert cut[cut_table[0]["base"]:][:128] == region[:128]
    with pytest.raises(Exception, match="data_bits"):
        DramConfig(data_bits=1024)


@pytest.fixture(scope="module")
def tiny_bundle(compressed_dir, tmp_path_factory):
    from toolchain.fpga.bundle import write_bundle

    out = tmp_path_factory.mktemp("fpga-dram") / "bundle"
    write_bundle(compressed_dir("llama", "2:4", "4"), out, synth=False)
    return out


def test_bundle_ships_a_dram_image_checked_against_the_blob(tiny_bundle, tmp_path):
    import shutil

    from toolchain.fpga.images import ImageMismatchError, check_bundle_images

    layout = json.loads((tiny_bundle / "dram" / "layout.json").read_text())
    assert [e["name"] for e in layout["layers"]][:7] == ATTN_MLP and len(layout["layers"]) == 14
    assert (tiny_bundle / "dram" / "rtl" / "spmac_system.sv").is_file()
    report = json.loads((tiny_bundle / "report.json").read_text())["dram"]
    assert report["bytes_per_token"] == sum(e["region_bytes"] + 64 for e in layout["layers"])
    assert report["image_bytes"] == (tiny_bundle / "dram" / "model.dram").stat().st_size
    check_bundle_images(tiny_bundle)
    copy = shutil.copytree(tiny_bundle, tmp_path / "b", ignore=shutil.ignore_patterns("sim_build"))
    entry = layout["layers"][3]
    image = bytearray((copy / "dram" / "model.dram").read_bytes())
    image[entry["base"] + entry["scale_stride"] + 5] ^= 0x10
    (copy / "dram" / "model.dram").write_bytes(bytes(image))
    with pytest.raises(ImageMismatchError, match=f"{entry['name']}: .*model.dram byte {entry['base'] + entry['scale_stride'] + 5} "):
        check_bundle_images(copy)


def test_system_runs_consecutive_layers_of_different_shapes_bit_exact_under_a_random_memory(tiny_bundle):
    """Seven consecutive layers (q, k, v, o, gate, up, down: four shapes) in one run of the sequencer, with random
    read latency, AR and R stalls, activation gaps and result back-pressure."""
    from toolchain.sim.dram_sim import simulate_system

    r = simulate_system(tiny_bundle, ATTN_MLP, tokens=3, seed=1, gap=0.2, stall=0.3)
    assert r["bit_exact"] and r["err"] == 0, r
    assert r["outputs"] == r["expected_outputs"] == 3 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    assert r["most_bursts_in_flight"] > 1                           # reads overlap their latencies
    assert r["bytes_read"] == r["weight_bytes"] + len(ATTN_MLP) * 64   # every region per token, each descriptor once
    assert r["cycles"] > r["ideal_cycles"]


def test_corrupted_dram_word_is_caught_and_a_bad_descriptor_stops_the_run(tiny_bundle):
    from toolchain.sim.dram_sim import simulate_system

    r = simulate_system(tiny_bundle, ATTN_MLP[:3], tokens=2, seed=3, corrupt=(1, 7))
    assert not r["bit_exact"] and r["timed_out"] is False and r["err"] == 0
    assert r["mismatches_per_layer"][0] == 0 and r["mismatches_per_layer"][1] > 0 and r["mismatches_per_layer"][2] == 0
    refused = simulate_system(tiny_bundle, ATTN_MLP[:3], tokens=1, seed=3, corrupt_descriptor=1)
    assert refused["err"] == 0b1000 and not refused["bit_exact"]      # err_desc; layer 0 still ran
    assert refused["mismatches_per_layer"][0] == 0 and refused["frames"] == 1


def test_slow_memory_makes_the_run_bandwidth_bound(tiny_bundle):
    """R data one cycle in four: the measured cycles follow bytes / (bus bytes x 1/4) within 5%."""
    from toolchain.sim.dram_sim import simulate_system

    r = simulate_system(tiny_bundle, ATTN_MLP[4:7], tokens=2, memory={"latency": (2, 2), "r_duty": (1, 4)})
    assert r["bit_exact"], r
    assert r["memory_bound_cycles"] > 1.5 * r["ideal_cycles"]
    assert abs(r["cycles_over_memory_bound"] - 1) < 0.05, r


def test_sim_system_command(tiny_bundle, capsys):
    from toolchain.cli import main

    assert main(["sim", str(tiny_bundle), "--system", "--rows", "16", "--tokens", "2", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert "system: 7 layers in one run" in out and "bit-exact: 0 of" in out and "tokens/s compute bound" in out
    assert main(["sim", str(tiny_bundle), "--system", "--memory", "slow", "--layer", ATTN_MLP[0], "--tokens", "1"]) == 0
    assert "'r_duty': (1, 4)" in capsys.readouterr().out
    assert main(["sim", str(tiny_bundle), "--system", "--layer", "nope"]) == 2
    assert "no layer nope" in capsys.readouterr().err
    assert main(["sim", str(tiny_bundle), "--check-images", "--system"]) == 2


def test_hls_dram_kernel_matches_the_golden_model_and_catches_a_corrupted_word(tiny_bundle):
    """The HLS C++ with the system's interface (m_axi DRAM, axis activations and results) runs the same seven
    layers from the same cut of the shipped DRAM image in one call, bit-exactly; a corrupted byte is caught."""
    from toolchain.sim.hls_csim import csim_system

    assert (tiny_bundle / "dram" / "hls" / "spmac_dram.cpp").is_file()
    good = csim_system(tiny_bundle, ATTN_MLP, tokens=3)
    assert good["bit_exact"] and good["outputs"] == 3 * (64 + 32 + 32 + 64 + 128 + 128 + 64), good
    bad = csim_system(tiny_bundle, ATTN_MLP[:3], tokens=2, corrupt=(1, 7))
    assert not bad["bit_exact"] and bad["mismatches"] > 0 and bad["status"] == 0
    refused = csim_system(tiny_bundle, ATTN_MLP[:3], tokens=2, corrupt_descriptor=2)
    assert refused["status"] == 1 and not refused["bit_exact"]

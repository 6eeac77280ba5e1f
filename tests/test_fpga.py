"""FPGA target: config proofs, golden model, lint-clean generation, and bit-exact Verilator runs.

Verilator builds are the slow part (about 15-25 s each here): every simulation below shares one bundle and
one layer shape, so the whole module builds once."""
from __future__ import annotations

import json

import numpy as np
import pytest

from toolchain.errors import ConfigError
from toolchain.fpga.config import AccelConfig, load_config
from toolchain.fpga.generate import RTL_MODULES, LayerShape, lint, render_rtl, template_dir
from toolchain.fpga.layers import LayerData, for_design, memory_images
from toolchain.sim.golden import layer_outputs, quantize_activations, round_shift, wrap


# ---------------------------------------------------------------------------------------------- config
def test_accumulator_widths_hold_the_worst_case():
    cfg = AccelConfig(n=2, m=4, groups_per_beat=4, weight_bits=4, act_bits=8, group_size=64, k_max=1536)
    w = cfg.widths
    worst_group = (cfg.group_size // cfg.m * cfg.n) * 8 * 127        # every kept weight -8, every act -127
    assert worst_group < 2 ** (w.gacc - 1) and worst_group >= 2 ** (w.gacc - 2)   # holds it, and tight
    worst_row = (1536 // 64) * worst_group * (2 ** 16 - 1) + 2 ** 30
    assert worst_row < 2 ** (w.total - 1)


def test_overflowing_accumulator_config_is_rejected():
    need = AccelConfig().widths.gacc
    with pytest.raises(ConfigError, match="gacc_bits .* overflows"):
        AccelConfig(gacc_bits=need - 1)
    AccelConfig(gacc_bits=need)                                         # exactly enough is fine
    with pytest.raises(ConfigError, match="total_bits .* overflows"):
        AccelConfig(total_bits=20)
    with pytest.raises(ConfigError, match="row accumulator would need"):
        AccelConfig(k_max=1 << 22, group_size=64, scale_bits=24, weight_bits=8, act_bits=16)


@pytest.mark.parametrize("bad, message", [
    ({"n": 5, "m": 4}, "N must be in 1..M"),
    ({"weight_bits": 5}, "weight_bits must be one of"),
    ({"group_size": 24}, "multiple of the beat"),
    ({"pes": 0}, "pes must be in"),
    ({"clock_mhz": -1}, "clock_mhz must be a positive"),
    ({"m": "4"}, "m must be an integer"),
])
def test_bad_configs_name_the_problem(bad, message):
    with pytest.raises(ConfigError, match=message):
        AccelConfig(**bad)


def test_config_json_round_trip_and_unknown_keys(tmp_path):
    cfg = AccelConfig(n=4, m=8, groups_per_beat=2, pes=4, weight_bits=2)
    path = tmp_path / "accel.json"
    path.write_text(json.dumps(cfg.to_json()))
    assert load_config(path) == cfg
    path.write_text(json.dumps({"pe": 4}))
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json")


def test_layer_checks():
    cfg = AccelConfig(group_size=64, k_max=1536)
    with pytest.raises(ConfigError, match="not a multiple of the beat"):
        cfg.check_layer("x", 72, 8, 4, (2, 4), 64)
    with pytest.raises(ConfigError, match="exceeds the design's k_max"):
        cfg.check_layer("x", 2048, 8, 4, (2, 4), 64)
    with pytest.raises(ConfigError, match="8-bit codes do not fit"):
        cfg.check_layer("x", 64, 8, 8, (2, 4), 64)
    with pytest.raises(ConfigError, match="sparse but the layer is dense"):
        cfg.check_layer("x", 64, 8, 4, None, 64)
    shorter = AccelConfig(group_size=128, k_max=1536)
    with pytest.raises(ConfigError, match="K = 576 is not a multiple of the quantization group 128"):
        shorter.check_layer("x", 576, 8, 4, (2, 4), 128)


# ---------------------------------------------------------------------------------------------- golden
def test_round_half_up_and_wrap():
    t = np.array([5, 6, 7, -5, -6, -7, 4, -4], dtype=np.int64)          # /4: 1.25 1.5 1.75 -1.25 -1.5 ...
    assert round_shift(t, 2).tolist() == [1, 2, 2, -1, -1, -2, 1, -1]  # ties go toward +inf
    assert round_shift(t, 2, "half_even").tolist() == [1, 2, 2, -1, -2, -2, 1, -1]
    assert wrap(np.array([127, 128, -129, 255]), 8).tolist() == [127, -128, 127, -1]


def test_activation_quantization_is_symmetric_round_half_up():
    codes, scale = quantize_activations(np.array([[1.0, -2.0, 0.5 * 2 / 127, 0.0]]))
    assert scale[0] == pytest.approx(2 / 127)
    assert codes.tolist() == [[64, -127, 1, 0]]                         # 63.5 -> 64, 0.5 -> 1


def test_golden_matches_a_per_element_reference():
    """The vectorised golden model against the contract written out in plain Python integers."""
    rng = np.random.default_rng(0)
    rows, k, gs, shift = 5, 32, 16, 13
    codes = rng.integers(-8, 8, (rows, k))
    scales = rng.integers(1, 2 ** 16, (rows, k // gs))
    acts = rng.integers(-127, 128, (3, k))
    got = layer_outputs(codes, scales, shift, acts, gs, 20, 40, 16)
    for t in range(3):
        for r in range(rows):
            total = 0
            for g in range(k // gs):
                total += sum(int(codes[r, j]) * int(acts[t, j]) for j in range(g * gs, (g + 1) * gs)) * int(scales[r, g])
            expect = max(-32768, min(32767, (total + (1 << (shift - 1))) >> shift))
            assert got[t, r] == expect


# ---------------------------------------------------------------------------------------------- RTL
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (4, 4)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_generated_rtl_is_lint_clean(tmp_path, nm, bits):
    cfg = AccelConfig(n=nm[0], m=nm[1], groups_per_beat=2, pes=3, weight_bits=bits, group_size=64, k_max=256)
    render_rtl(cfg, LayerShape.of(cfg, "layer", 128, 7, 64, 18, "layer"), tmp_path)
    lint(tmp_path)
    package = (tmp_path / "spmac_pkg.sv").read_text()
    assert f"localparam int N         = {nm[0]};" in package and f"localparam int WB        = {bits};" in package
    for module in RTL_MODULES:   # plain parameterised SystemVerilog, the same for every design
        assert (tmp_path / module).read_text() == (template_dir("rtl") / module).read_text()


def test_memory_image_layout():
    """Hand-checked words: 1 PE, 1 group of 2:4 per beat, 4-bit codes then 2-bit positions."""
    cfg = AccelConfig(n=2, m=4, groups_per_beat=1, pes=1, weight_bits=4, group_size=4, k_max=8)
    layer = LayerData("l", 1, 8, 4, (2, 4), 4, np.array([[-1, 3, 2, -8]], np.int8),
                      np.array([[0, 2, 1, 3]], np.uint8), np.array([[0x1234, 0xBEEF]], np.uint16), 12)
    words, scales = memory_images(cfg, layer)
    # beat 0: codes 0xF, 0x3 -> bits 0..7 = 0x3F; positions 0, 2 -> bits 8..11 = 0b1000 -> 0x83F
    assert words == ["83f", "d82"]            # beat 1: codes 2, -8 -> 0x82; positions 1, 3 -> 0b1101
    assert scales == ["1234", "beef"]


def test_sparser_layer_is_padded_to_the_design():
    cfg = AccelConfig(n=2, m=4, groups_per_beat=1, pes=1, weight_bits=4, group_size=4, k_max=8)
    layer = LayerData("l", 1, 8, 4, (1, 4), 4, np.array([[5, -3]], np.int8), np.array([[2, 0]], np.uint8),
                      np.array([[1, 1]], np.uint16), 1)
    padded = for_design(layer, cfg)
    assert padded.index.tolist() == [[0, 2, 0, 1]] and padded.slots.tolist() == [[0, 5, -3, 0]]
    assert np.array_equal(padded.dense_codes(), layer.dense_codes())


# ---------------------------------------------------------------------------------------------- bundle + sim
@pytest.fixture(scope="module")
def tiny_bundle(compressed_dir, tmp_path_factory):
    from toolchain.fpga.bundle import write_bundle

    out = tmp_path_factory.mktemp("fpga") / "bundle"
    report = write_bundle(compressed_dir("llama", "2:4", "4"), out, synth=False)
    return out, report


def test_bundle_contents(tiny_bundle):
    out, report = tiny_bundle
    for name in ("README.md", "accel.json", "contract.json", "layers.json", "model.tcblob", "activations.npz",
                 "report.json", "report.md", "rtl/spmac_array.sv", "rtl/spmac_pe.sv", "rtl/axis_skid.sv",
                 "hls/spmac.h", "hls/spmac.cpp", "hls/tb_spmac.cpp", "sim/tb_spmac_array.py", "sim/run.py"):
        assert (out / name).is_file(), name
    layers = json.loads((out / "layers.json").read_text())["layers"]
    assert len(layers) == 14 and layers[0]["name"] == "model.layers.0.self_attn.q_proj"
    assert [layer["block"] for layer in layers[:7]] == ["attn"] * 4 + ["mlp"] * 3
    for layer in layers:
        assert (out / "mem" / layer["weight_file"]).is_file()
        assert layer["ideal_cycles"] == -(-layer["rows"] // 8) * layer["k"] // 16
    assert report["per_token"]["cycles"] == sum(layer["ideal_cycles"] for layer in layers)
    assert report["lint"].endswith("clean")
    assert json.loads((out / "contract.json").read_text())["output"]["rounding"].startswith("round half up")


def test_bundle_refuses_a_float_model(tiny_llama_dir, tmp_path):
    from toolchain.errors import ModelLoadError
    from toolchain.fpga.bundle import write_bundle

    with pytest.raises(ModelLoadError, match="quant_state"):
        write_bundle(tiny_llama_dir, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_simulation_is_bit_exact_with_backpressure_and_catches_wrong_rounding(tiny_bundle):
    """One Verilator build: a real 2:4 layer (q_proj and o_proj share its shape) streams with random valid
    gaps and ready stalls under two seeds, bit-exact; a golden model that truncates instead of rounding half
    up is caught; without back-pressure the measured cycles are within 5% of the formula."""
    from toolchain.export.blob import read_blob
    from toolchain.fpga.layers import read_layer
    from toolchain.sim.runner import simulate_layer

    out, _ = tiny_bundle
    cfg = load_config(out / "accel.json")
    captured = np.load(out / "activations.npz")
    work = out / "sim_build"
    with read_blob(out / "model.tcblob") as blob:
        for name, seed in (("model.layers.0.self_attn.q_proj", 1), ("model.layers.1.self_attn.o_proj", 2)):
            layer = for_design(read_layer(blob, name), cfg)
            acts, _ = quantize_activations(captured[name].astype(np.float64))
            r = simulate_layer(cfg, layer, acts, out / "rtl", work, gap=0.3, stall=0.4, seed=seed)
            assert r["bit_exact"] and r["outputs"] == acts.shape[0] * 64, r
            assert r["active_cycles"] > r["ideal_cycles"]                     # back-pressure really stalled it
        wrong = simulate_layer(cfg, layer, acts, out / "rtl", work, seed=3, rounding="truncate")
        assert not wrong["bit_exact"] and wrong["mismatches"] > 0
        fast = simulate_layer(cfg, layer, acts, out / "rtl", work, seed=3)
        assert fast["bit_exact"] and fast["utilisation"] >= 0.95
    assert len(list(work.glob("build-*"))) == 1                                   # one build served them all


def test_hls_csim_matches_the_golden_model_and_catches_wrong_rounding(tiny_bundle):
    from toolchain.export.blob import read_blob
    from toolchain.fpga.layers import read_layer
    from toolchain.sim.hls_csim import csim_layer

    out, _ = tiny_bundle
    cfg = load_config(out / "accel.json")
    name = "model.layers.1.mlp.down_proj"
    with read_blob(out / "model.tcblob") as blob:
        layer = for_design(read_layer(blob, name), cfg)
    acts, _ = quantize_activations(np.load(out / "activations.npz")[name].astype(np.float64))
    good = csim_layer(cfg, layer, acts, out / "hls", out / "hls_build")
    assert good["bit_exact"] and good["outputs"] == acts.shape[0] * 64
    wrong = csim_layer(cfg, layer, acts, out / "hls", out / "hls_build", rounding="truncate")
    # mantissas >= 0x8000 put a hex digit >= 8 at the top of a scale word (ap_uint's string parser misread it)
    layer.scales_fixed = layer.scales_fixed | np.uint16(0x8000)
    assert csim_layer(cfg, layer, acts, out / "hls", out / "hls_build")["bit_exact"]
    assert not wrong["bit_exact"] and wrong["mismatches"] > 0


def test_sim_command_on_the_bundle(tiny_bundle, capsys):
    from toolchain.cli import main

    out, _ = tiny_bundle
    assert main(["sim", str(out), "--layer", "model.layers.0.self_attn.q_proj", "--rows", "16", "--tokens", "2",
                 "--seed", "5"]) == 0
    text = capsys.readouterr().out
    assert "16 rows x K 64, 2 tokens: bit-exact" in text and "HLS C-sim: 0 of" in text
    assert main(["sim", str(out), "--layer", "nope"]) == 2
    assert "no layer nope" in capsys.readouterr().err
    assert main(["sim", str(out), "--check-images"]) == 0
    assert "words of 14 layers equal the blob's" in capsys.readouterr().out
    assert main(["sim", str(out), "--check-images", "--rows", "4"]) == 2
    assert "--rows would be ignored" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- shipped images
def _flip(path, word: int, bits: int) -> None:
    """Complement the low `bits` bits of one word of a $readmemh image (every field of every PE in it)."""
    lines = path.read_text().splitlines()
    lines[word] = f"{int(lines[word], 16) ^ ((1 << bits) - 1):0{len(lines[word])}x}"
    path.write_text("\n".join(lines) + "\n")


def _copy(bundle, to):
    import shutil

    shutil.copytree(bundle, to, ignore=shutil.ignore_patterns("sim_build", "hls_build"))
    return to


def test_shipped_images_equal_the_blob_and_cut_to_rows(tiny_bundle):
    """The bundle's images pass the word-by-word check, and a cut to the first rows is exactly the images of
    those rows (the PEs past them in the last pass zeroed) for every remainder of rows by PEs."""
    from toolchain.export.blob import read_blob
    from toolchain.fpga.images import check_bundle_images, first_rows_images, read_image
    from toolchain.fpga.layers import read_layer

    out, report = tiny_bundle
    checked = check_bundle_images(out)
    assert checked["layers"] == 14 and checked["words"] == report["images"]["words"] > 0
    cfg = load_config(out / "accel.json")
    name = "model.layers.0.mlp.down_proj"
    with read_blob(out / "model.tcblob") as blob:
        whole = for_design(read_layer(blob, name), cfg)
    shipped = read_image(out / "mem" / f"{name}.weights.mem"), read_image(out / "mem" / f"{name}.scales.mem")
    for rows in (1, 5, 8, 12, 17, whole.rows - 1, whole.rows, whole.rows + 3):
        assert first_rows_images(cfg, whole, rows, *shipped) == memory_images(cfg, whole.first_rows(rows)), rows


def test_check_images_names_the_corrupted_layer_file_and_word(tiny_bundle, tmp_path, capsys):
    from toolchain.cli import main
    from toolchain.fpga.images import ImageMismatchError, check_bundle_images

    out, _ = tiny_bundle
    cfg = load_config(out / "accel.json")
    weights = {"bits": cfg.pes * cfg.slots_per_beat * (cfg.weight_bits + cfg.widths.idx), "file": "weights"}
    scales = {"bits": cfg.pes * cfg.scale_bits, "file": "scales"}
    for layer, image, word in (("model.layers.1.self_attn.v_proj", weights, 3),
                               ("model.layers.0.mlp.up_proj", scales, 5)):
        bundle = _copy(out, tmp_path / f"{layer}.{image['file']}")
        path = bundle / "mem" / f"{layer}.{image['file']}.mem"
        _flip(path, word, 1)
        with pytest.raises(ImageMismatchError, match=f"{layer}: .*{path.name} word {word} "):
            check_bundle_images(bundle)
        assert main(["sim", str(bundle), "--check-images"]) == 1
        err = capsys.readouterr().err
        assert layer in err and path.name in err and f"word {word} (line {word + 1})" in err
    path.unlink()
    assert main(["sim", str(bundle), "--check-images"]) == 1
    assert "is missing" in capsys.readouterr().err


def test_bundle_writer_refuses_an_image_that_disagrees_with_the_blob(compressed_dir, tmp_path, monkeypatch):
    from toolchain.fpga import bundle as bundle_module
    from toolchain.fpga.images import ImageMismatchError

    def write_wrong_images(directory, stem, cfg, layer):
        paths = write_images(directory, stem, cfg, layer)
        if stem.endswith("layers.1.mlp.down_proj"):
            _flip(paths[1], 0, 1)
        return paths

    write_images = bundle_module.write_images
    monkeypatch.setattr(bundle_module, "write_images", write_wrong_images)
    with pytest.raises(ImageMismatchError, match="layers.1.mlp.down_proj: .*scales.mem word 0 "):
        bundle_module.write_bundle(compressed_dir("llama", "2:4", "4"), tmp_path / "b", lint_rtl=False, synth=False)
    assert not (tmp_path / "b").exists()


def test_sim_runs_the_shipped_images_and_fails_on_a_corrupted_word(tiny_bundle, capsys):
    """A word complemented in the first attention layer's weight image and one in the first MLP layer's
    scale image (the layers `toolchain sim` runs by default): each layer fails in the RTL and the HLS C-sim,
    with --rows cutting the shipped images (12 rows: part of the second pass masked off)."""
    from toolchain.cli import main
    from toolchain.sim.bundle_sim import default_layers

    out, _ = tiny_bundle
    cfg = load_config(out / "accel.json")
    attn, mlp = default_layers(json.loads((out / "layers.json").read_text())["layers"])
    weights, scales = out / "mem" / f"{attn}.weights.mem", out / "mem" / f"{mlp}.scales.mem"
    shipped = {path: path.read_text() for path in (weights, scales)}
    try:   # in place, so the Verilator build of this shape (2 passes) is reused
        _flip(weights, 0, cfg.pes * cfg.slots_per_beat * (cfg.weight_bits + cfg.widths.idx))
        _flip(scales, 0, cfg.pes * cfg.scale_bits)
        assert main(["sim", str(out), "--rows", "12", "--tokens", "2", "--seed", "5", "--json"]) == 1
    finally:
        for path, text in shipped.items():
            path.write_text(text)
    result = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in result["layers"]] == [attn, mlp] and not result["bit_exact"]
    for r in result["layers"]:
        assert not r["bit_exact"] and r["mismatches"] > 0 and r["hls_csim"]["mismatches"] > 0, r
        assert all(path.startswith(str((out / "sim_build").resolve())) for path in r["images"])


@pytest.mark.skipif(__import__("shutil").which("yosys") is None, reason="Debian yosys not installed (.ci/run installs it)")
def test_yosys_resource_estimate(tiny_bundle):
    from toolchain.fpga.synth import SynthesisError, estimate, synth_module

    out, _ = tiny_bundle
    cfg = load_config(out / "accel.json")
    res = estimate(out / "rtl", cfg, 10 ** 6)
    pe = res["xcup"]["pe"]
    assert pe["lut"] > 50 and pe["ff"] > 50 and pe["dsp"] >= 1            # a real mapped netlist
    assert res["xcup"]["array"]["dsp"] == cfg.pes * pe["dsp"]
    assert res["ice40"]["pe"]["lut"] > 50
    with pytest.raises(SynthesisError):
        synth_module(out / "rtl", "no_such_module", "xcup")


def test_dense_design_runs_a_sparse_layer_as_zeros():
    dense = AccelConfig(n=2, m=2, groups_per_beat=1, pes=1, weight_bits=4, group_size=4, k_max=8)
    layer = LayerData("l", 1, 8, 4, (2, 4), 4, np.array([[-1, 3, 2, -8]], np.int8),
                      np.array([[0, 2, 1, 3]], np.uint8), np.array([[1, 1]], np.uint16), 1)
    on_dense = for_design(layer, dense)
    assert on_dense.slots.tolist() == [[-1, 0, 3, 0, 0, 2, 0, -8]] and on_dense.index.tolist() == [[0, 1] * 4]
    assert np.array_equal(on_dense.dense_codes(), layer.dense_codes())


@pytest.mark.skipif(__import__("shutil").which("iverilog") is None, reason="Icarus Verilog not installed (.ci/run installs it)")
def test_icarus_runs_the_same_rtl(tiny_bundle):
    from toolchain.sim.bundle_sim import simulate_bundle

    out, _ = tiny_bundle
    result = simulate_bundle(out, ["model.layers.1.mlp.up_proj"], rows=8, tokens=2, simulator="icarus", seed=4)
    assert result["bit_exact"] and result["layers"][0]["outputs_compared"] == 2 * 2 * 8

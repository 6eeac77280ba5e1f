"""`toolchain gpu-bench` (toolchain.bench.gpu): the roofline estimate, the GPU table, the shapes, and the
labelling of everything written without CUDA as an estimate. The CUDA measurement runs only on a GPU."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_loaded
from toolchain.errors import ConfigError
from toolchain.bench.gpu import (GPUS, TOKENS, NoCudaError, get_gpu, linear_shapes, match_gpu, measure_cuda,
                                 report, roofline, run, run_gpu_bench, weight_bytes)
from toolchain.bench.gpu.measure import _two_four_mask

# H100 SXM vendor peak figures, restated here so the hand computations below do not read them from the code
# under test: NVIDIA H100 Tensor Core GPU Architecture whitepaper V1.04, Table 3, "Peak FP16 Tensor TFLOPS"
# 989.4 dense / 1978.9 with sparsity (https://resources.nvidia.com/en-us-tensor-core/gtc22-whitepaper-hopper);
# H100 datasheet "GPU Memory Bandwidth 3.35TB/s" (https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet).
H100_DENSE, H100_SPARSE, H100_BW = 989.4e12, 1978.9e12, 3350e9


def test_roofline_decode_is_memory_bound_hand_computed():
    # SmolLM2's gate/up projection [N=1536, K=576] at 1 token (decode), fp16 weights and activations
    n, k = 1536, 576
    flops = 2 * n * k
    acts = (k + n) * 2                              # 1 x 576 in, 1 x 1536 out, 2 bytes each = 4224
    dense_bytes = n * k * 2 + acts                  # 1,773,696
    sparse_bytes = n * k // 2 * 2 + n * k // 2 * 2 // 8 + acts   # 884,736 + 110,592 + 4224 = 999,552
    assert (dense_bytes, sparse_bytes) == (1_773_696, 999_552)

    d = roofline((n, k), 1, "H100-SXM", sparse=False)
    assert d["kind"] == "estimate" and "estimate" in d["label"].lower()
    assert d["flops"] == flops and d["bytes"] == dense_bytes
    assert d["bound"] == "memory"
    assert d["compute_time_s"] == pytest.approx(flops / H100_DENSE)          # 1.79 ns
    assert d["time_s"] == pytest.approx(dense_bytes / H100_BW)               # 529 ns
    assert d["speedup_vs_dense"] == 1.0

    s = roofline((n, k), 1, "H100-SXM", sparse=True)
    assert s["bound"] == "memory" and s["bytes"] == sparse_bytes
    assert s["time_s"] == pytest.approx(sparse_bytes / H100_BW)              # 298 ns
    assert s["speedup_vs_dense"] == pytest.approx(dense_bytes / sparse_bytes)
    assert s["speedup_vs_dense"] == pytest.approx(1.7745, abs=1e-4)


def test_roofline_prefill_is_compute_bound_hand_computed():
    # a [4096, 4096] weight at 2048 tokens: both variants compute-bound, so 2:4 gains exactly the peak ratio
    n = k = 4096
    t = 2048
    flops = 2 * n * k * t                           # 68,719,476,736
    dense_bytes = n * k * 2 + (t * k + t * n) * 2   # 67,108,864
    d = roofline((n, k), t, "H100-SXM", sparse=False)
    assert d["bound"] == "compute" and d["flops"] == flops and d["bytes"] == dense_bytes
    assert d["time_s"] == pytest.approx(flops / H100_DENSE)                  # 69.5 us
    assert d["memory_time_s"] == pytest.approx(dense_bytes / H100_BW)        # 20.0 us
    s = roofline((n, k), t, "H100-SXM", sparse=True)
    assert s["bound"] == "compute"
    assert s["time_s"] == pytest.approx(flops / H100_SPARSE)                 # 34.7 us
    assert s["speedup_vs_dense"] == pytest.approx(H100_SPARSE / H100_DENSE)

    # SmolLM2's gate/up at 2048 tokens: dense is compute-bound, but 2:4 halves the math and becomes memory-bound
    # on the activations, so it gains less than the peak ratio
    n, k = 1536, 576
    flops = 2 * n * k * t
    sparse_bytes = n * k // 2 * 2 + n * k // 8 + (t * k + t * n) * 2       # 9,646,080
    d = roofline((n, k), t, "H100-SXM", sparse=False)
    s = roofline((n, k), t, "H100-SXM", sparse=True)
    assert d["bound"] == "compute" and s["bound"] == "memory"
    assert s["time_s"] == pytest.approx(sparse_bytes / H100_BW)
    assert s["speedup_vs_dense"] == pytest.approx((flops / H100_DENSE) / (sparse_bytes / H100_BW))
    assert 1.0 < s["speedup_vs_dense"] < H100_SPARSE / H100_DENSE


def test_sparse_weight_bytes_match_pytorchs_2_4_layout():
    # the kept half plus a 2-bit index per kept value: 9/16 of dense fp16, 10/16 of dense int8
    assert weight_bytes(1536, 576, sparse=True) / weight_bytes(1536, 576, sparse=False) == 9 / 16
    assert weight_bytes(64, 64, True, bytes_per_weight=1) / weight_bytes(64, 64, False, bytes_per_weight=1) == 10 / 16
    # ... which is what PyTorch's own 2:4 compression (the CUTLASS layout, computable on the CPU) produces
    conversions = pytest.importorskip("torch.sparse._semi_structured_conversions")
    w = _two_four_mask(torch.randn(64, 128, generator=torch.Generator().manual_seed(0)))
    for dtype, width in ((torch.float16, 2), (torch.int8, 1)):
        values, meta = conversions.sparse_semi_structured_from_dense_cutlass((w * 8).to(dtype))
        stored = values.numel() * values.element_size() + meta.numel() * meta.element_size()
        assert stored == weight_bytes(64, 128, sparse=True, bytes_per_weight=width), dtype


@pytest.mark.parametrize("name", sorted(GPUS))
def test_sparse_speedup_never_exceeds_the_peak_ratio(name):
    spec = GPUS[name]
    dense_peak, _ = spec.dense_peak()
    ratio = spec.sparse_fp16_tflops / dense_peak
    for shape in [(1536, 576), (576, 1536), (192, 576), (4096, 4096), (14336, 4096), (8, 4), (32000, 4096)]:
        for t in (1, 3, 16, 64, 100, 256, 2048, 65536):
            s = roofline(shape, t, name, sparse=True)
            assert s["kind"] == "estimate"
            assert 1.0 <= s["speedup_vs_dense"] <= ratio * (1 + 1e-12), (shape, t, s)


def test_every_gpu_entry_has_the_three_figures_and_sources():
    assert {"H100-SXM", "H100-PCIe", "A100-SXM-80GB", "L40S", "Jetson-AGX-Orin-64GB"} <= set(GPUS)
    for name, spec in GPUS.items():
        dense, provenance = spec.dense_peak()
        assert dense > 0 and spec.sparse_fp16_tflops > dense and spec.mem_bw_gbs > 0, name
        assert spec.sources and all("http" in s for s in spec.sources), name
        assert spec.accumulate, name
        if spec.dense_fp16_tflops is None:
            # a derived dense peak must say so and name where the factor is stated
            assert provenance.startswith("derived") and spec.sparse_over_dense_source
        else:
            assert provenance == "published vendor peak"
        f = spec.figures()
        assert f["label"] == "vendor peak figures (not measurements)"
        assert {"dense_fp16_tensor_tflops", "sparse24_fp16_tensor_tflops", "memory_bandwidth_gbs"} <= set(f)
    # Jetson AGX Orin 64GB publishes only the sparse FP16 tensor figure (85); dense is derived, and labelled so
    orin, provenance = GPUS["Jetson-AGX-Orin-64GB"].dense_peak()
    assert orin == GPUS["Jetson-AGX-Orin-64GB"].sparse_fp16_tflops / 2 and "derived" in provenance
    assert get_gpu("h100-sxm") is GPUS["H100-SXM"]
    with pytest.raises(ConfigError, match="H100-SXM.*L40S"):
        get_gpu("B200")


def test_match_gpu_by_device_name():
    assert match_gpu("NVIDIA H100 80GB HBM3").name == "H100-SXM"
    assert match_gpu("NVIDIA H100 PCIe").name == "H100-PCIe"
    assert match_gpu("NVIDIA A100-SXM4-80GB").name == "A100-SXM-80GB"
    assert match_gpu("NVIDIA L40S").name == "L40S"
    # different bandwidth or unknown: not silently mapped onto an entry
    assert match_gpu("NVIDIA A100-SXM4-40GB") is None
    assert match_gpu("NVIDIA A100 80GB PCIe") is None
    assert match_gpu("NVIDIA GeForce RTX 4090") is None
    assert match_gpu("Orin") is None


def test_roofline_rejects_bad_input():
    with pytest.raises(ConfigError, match="divisible by 4"):
        roofline((64, 66), 1, "H100-SXM", sparse=True)
    assert roofline((64, 66), 1, "H100-SXM", sparse=False)["bound"] == "memory"  # dense has no K constraint
    with pytest.raises(ConfigError, match="tokens"):
        roofline((64, 64), 0, "H100-SXM", sparse=False)
    with pytest.raises(ConfigError, match="positive"):
        roofline((0, 64), 1, "H100-SXM", sparse=False)
    with pytest.raises(ConfigError, match="unknown GPU"):
        roofline((64, 64), 1, "TPU", sparse=False)


def test_linear_shapes_of_a_tiny_llama_with_counts():
    loaded = tiny_loaded("llama")   # hidden 64, intermediate 128, 4 heads of 16, 2 KV heads, 2 layers
    shapes = {(s["n"], s["k"]): s for s in linear_shapes(loaded)}
    assert set(shapes) == {(64, 64), (32, 64), (128, 64), (64, 128)}
    assert shapes[(64, 64)]["count"] == 4 and shapes[(64, 64)]["linears"] == ["self_attn.q_proj", "self_attn.o_proj"]
    assert shapes[(32, 64)]["count"] == 4 and shapes[(32, 64)]["blocks"] == ["attn"]
    assert shapes[(128, 64)]["count"] == 4 and shapes[(128, 64)]["linears"] == ["mlp.gate_proj", "mlp.up_proj"]
    assert shapes[(64, 128)]["count"] == 2 and shapes[(64, 128)]["blocks"] == ["mlp"]
    assert sum(s["count"] for s in shapes.values()) == 2 * 7
    # the same from the bare module and from its config alone (no weights)
    assert linear_shapes(loaded.model) == linear_shapes(loaded)
    assert linear_shapes(loaded.model.config) == linear_shapes(loaded)


def test_linear_shapes_of_opt_and_config_limits():
    loaded = tiny_loaded("opt")     # hidden 64, ffn 128, 2 layers
    shapes = {(s["n"], s["k"]): s for s in linear_shapes(loaded)}
    assert shapes[(64, 64)]["count"] == 8 and shapes[(64, 64)]["blocks"] == ["attn"]
    assert shapes[(128, 64)]["blocks"] == ["mlp"] and shapes[(64, 128)]["blocks"] == ["mlp"]
    with pytest.raises(ConfigError, match="LLaMA family only"):
        linear_shapes(loaded.model.config)


def test_measure_cuda_raises_a_clear_error_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NoCudaError, match="needs a CUDA device.*ESTIMATE"):
        measure_cuda([{"n": 64, "k": 64, "count": 1, "linears": ["x"], "blocks": ["mlp"]}])


def _table_rows(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| kind")]


def test_run_gpu_bench_without_cuda_writes_only_labelled_estimates(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(report, "_import_pyplot", lambda: None)     # as on a machine without matplotlib
    r = run_gpu_bench("tiny", out_dir=tmp_path, gpu="A100-SXM-80GB", source=tiny_loaded("llama"))
    out = capsys.readouterr()
    assert "no CUDA device: writing a roofline ESTIMATE for A100-SXM-80GB, not a measurement" in out.out
    assert "no plot written" in out.err and r["plot"] is None and "matplotlib" in r["plot_note"]
    assert not (tmp_path / "gpu_tiny.png").exists()

    data = json.loads((tmp_path / "gpu_tiny.json").read_text())
    assert data["cuda"] is False and data["measured"] is None
    est = data["estimate"]
    assert est["kind"] == "estimate" and "not a measurement" in est["label"]
    assert est["gpu"]["name"] == "A100-SXM-80GB" and est["gpu"]["label"] == "vendor peak figures (not measurements)"
    assert len(est["rows"]) == 4 * len(TOKENS)
    identity = {"kind", "gpu", "n", "k", "linears", "blocks", "count", "tokens"}
    for row in est["rows"]:
        assert row["kind"] == "estimate"
        assert all(key.endswith("_estimate") for key in set(row) - identity), row
        assert row["speedup_estimate"] >= 1.0
    assert est["summary"]["kind"] == "estimate" and "target_met_by_estimate" in est["summary"]

    md = (tmp_path / "gpu_tiny.md").read_text()
    assert "not a measurement" in md and "measured" not in md.lower().replace("not a measurement", "") \
        .replace("none is measured", "")
    rows = _table_rows(md)
    assert len(rows) == len(est["rows"])
    assert all(row.startswith("| estimate |") and row.count("(estimate)") == 3 for row in rows)
    header = next(line for line in md.splitlines() if line.startswith("| kind"))
    numeric_columns = header.split("|")[6:-1]
    assert numeric_columns and all("(estimate)" in c for c in numeric_columns)


def test_run_gpu_bench_checks_its_arguments(tmp_path):
    with pytest.raises(ConfigError, match="unknown GPU"):
        run_gpu_bench("tiny", out_dir=tmp_path, gpu="RTX-9090", source=tiny_loaded("llama"))
    with pytest.raises(ConfigError, match="tokens"):
        run_gpu_bench("tiny", out_dir=tmp_path, source=tiny_loaded("llama"), tokens=(0, 16))
    assert not list(tmp_path.iterdir())


def test_plot_is_written_when_matplotlib_is_present(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = run_gpu_bench("tiny", out_dir=tmp_path, source=tiny_loaded("llama"))
    assert r["plot"] == str(tmp_path / "gpu_tiny.png")
    assert (tmp_path / "gpu_tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measure_cuda_on_a_gpu():
    shapes = [{"n": 128, "k": 128, "count": 1, "linears": ["x"], "blocks": ["mlp"]},
              {"n": 64, "k": 66, "count": 1, "linears": ["y"], "blocks": ["mlp"]}]
    r = measure_cuda(shapes, tokens=(1, 64), warmup=2, repeats=3, inner=4, cold_weights=False)
    assert r["kind"] == "measured"
    assert any(s["k"] == 66 for s in r["skipped"])
    assert {(row["n"], row["tokens"]) for row in r["rows"]} == {(128, 1), (128, 64)}
    for row in r["rows"]:
        assert row["kind"] == "measured" and row["outputs_match"]
        assert row["dense_us_measured"] > 0 and row["sparse24_us_measured"] > 0


def _fake_measure(device):
    def fake(shapes, tokens=TOKENS, **kwargs):
        rows = [{"kind": "measured", "n": s["n"], "k": s["k"], "linears": s["linears"], "blocks": s["blocks"],
                 "count": s["count"], "tokens": t, "dense_us_measured": 2.0, "sparse24_us_measured": 1.0,
                 "speedup_measured": 2.0, "timing_dense": "CUDA graph replay", "timing_sparse": "CUDA graph replay",
                 "sparse_backend": "SparseSemiStructuredTensorCUTLASS", "max_abs_err_vs_dense": 0.0,
                 "outputs_match": True, "weight_copies": 1, "calls_per_run": 1}
                for s in shapes for t in tokens]
        return {"kind": "measured", "device": device, "capability": [9, 0], "torch": "x", "cuda": "y",
                "l2_bytes": 0, "method": "fake", "rows": rows, "skipped": [{"n": 1, "k": 2, "reason": "why"}]}
    return fake


def test_run_gpu_bench_on_cuda_keeps_measurements_and_estimates_apart(tmp_path, monkeypatch, capsys):
    # the CUDA branch's bookkeeping, with the measurement itself replaced (no GPU here)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(report, "_import_pyplot", lambda: None)
    monkeypatch.setattr(run, "measure_cuda", _fake_measure("NVIDIA H100 80GB HBM3"))
    r = run_gpu_bench("tiny", out_dir=tmp_path, gpu="L40S", source=tiny_loaded("llama"), tokens=(64, 256))
    assert "no CUDA device" not in capsys.readouterr().out
    assert r["measured"]["summary"]["target_met_by_measured"] is True
    assert r["estimate"]["gpu"]["name"] == "H100-SXM"          # the detected device, not the gpu argument
    md = (tmp_path / "gpu_tiny.md").read_text()
    rows = _table_rows(md)
    assert sum(row.startswith("| measured |") for row in rows) == 8
    assert sum(row.startswith("| estimate |") for row in rows) == 8
    assert "skipped 1 x 2: why" in md and "smallest MEASURED 2:4 speedup 2.00x" in md

    monkeypatch.setattr(run, "measure_cuda", _fake_measure("NVIDIA GeForce RTX 4090"))
    r = run_gpu_bench("tiny", out_dir=tmp_path, source=tiny_loaded("llama"), tokens=(64,))
    assert r["estimate"] is None and "matches no entry" in r["estimate_note"]
    assert "No roofline estimate" in (tmp_path / "gpu_tiny.md").read_text()


def test_two_four_mask_keeps_the_two_largest_of_every_four():
    from toolchain.gpu.sparsity import two_four_status

    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    pruned = _two_four_mask(w)
    assert two_four_status(pruned) == {"two_four": True, "reason": None}
    groups, kept = w.abs().reshape(32, 16, 4), pruned.abs().reshape(32, 16, 4)
    assert torch.equal(kept.sum(-1), groups.topk(2, dim=-1).values.sum(-1))

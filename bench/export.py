"""`toolchain bench export`: blob packing speed and size, ONNX sizes, onnxruntime CPU latency, on SmolLM2.

The input is SmolLM2-135M pruned 2:4 (Wanda) and quantized 4-bit g64 (GPTQ), made once by `toolchain
compress` into the benchmarks' work dir under --out. Every artifact is then written by `toolchain export` in
its own process. The blob is measured through its public API: `pack_codes` / `unpack_codes` per width, and
`write_blob` / `read_blob` on the whole model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from toolchain.reference_runs import CALIB_SAMPLES, SEQLEN, dense_hf_dir, run_command

from .common import check_only, result_stem, work_dir, write_result

PREFILL, DECODE_STEPS, REPEATS = 128, 32, 5
# The ONNX forms checked and timed, in the table's order; `--only` picks some of them, and `genai` the
# comparison with onnxruntime-genai's model builder (bench/export_genai.py).
FORMS = ("float", "qdq", "matmulnbits", "matmulnbits acc4")
GENAI = "genai"


def compressed_source(model: str, work: Path) -> Path:
    """The benchmark's input model (Wanda 2:4 + GPTQ 4-bit g64) under `work`, compressed once."""
    out = work / "export-src-wanda2of4-gptq4g64"
    if not (out / "quant_state.safetensors").is_file():
        src = dense_hf_dir(model, work)
        run_command([sys.executable, "-m", "toolchain.cli", "compress", "--model", str(src), "--prune", "wanda",
                     "--sparsity", "2:4", "--quant", "gptq", "--bits", "4", "--group-size", "64",
                     "--calib-samples", str(CALIB_SAMPLES), "--seqlen", str(SEQLEN), "--quiet", "--out", str(out)])
    return out


def export_forms(only: list[str] | None = None) -> list[str]:
    """The ONNX forms `--only` selects (all without it), in the table's order."""
    check_only("export", only, FORMS + (GENAI,))
    return [f for f in FORMS if not only or f in only]


def _best_seconds(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def pack_throughput(state_path: Path) -> list[dict]:
    """Pack and unpack every linear's codes of the model at each width (codes clipped into the width's
    range, so each row packs the model's real shapes). MB/s counts the source as fp16 weights (2 bytes each)."""
    from toolchain.export.blob import pack_codes, unpack_codes
    from toolchain.numerics.widths import SUPPORTED_BITS
    from toolchain.quant import read_quant_state

    state = read_quant_state(state_path)
    flat = np.concatenate([qw.codes.numpy().reshape(-1) for qw in state.values()]).astype(np.int32)
    rows = []
    for bits in SUPPORTED_BITS:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        codes = np.clip(flat, lo, hi).astype(np.int8)
        packed = pack_codes(codes, bits)
        t_pack = _best_seconds(lambda: pack_codes(codes, bits))
        t_unpack = _best_seconds(lambda: unpack_codes(packed, bits, codes.size, True))
        assert np.array_equal(unpack_codes(packed, bits, codes.size, True), codes)
        mb = codes.size * 2 / 1e6
        rows.append({"bits": bits, "weights": int(codes.size), "packed_bytes": int(packed.nbytes),
                     "pack_mb_per_s": round(mb / t_pack, 1), "unpack_mb_per_s": round(mb / t_unpack, 1),
                     "pack_mweights_per_s": round(codes.size / t_pack / 1e6, 1)})
        print(f"pack {bits}-bit: {rows[-1]['pack_mb_per_s']} MB/s, unpack {rows[-1]['unpack_mb_per_s']} MB/s",
              flush=True)
    return rows


def writer_throughput(model_dir: Path, scratch: Path) -> dict:
    """`write_blob` on the whole compressed model (reading it, N:M slot selection, zero-code checks, packing
    codes and metadata, fixed-point scales, writing the file), and `read_blob` decoding every quantized linear
    back to dense codes. The blob goes to a temporary folder under `scratch`, removed afterwards. MB/s counts
    the quantized weights as an fp16 source (2 bytes each)."""
    from toolchain.export.blob import read_blob, write_blob

    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        blob_path = Path(tmp) / "model.tcblob"
        t_enc = _best_seconds(lambda: write_blob(model_dir, blob_path))
        with read_blob(blob_path) as b:
            quantized = [name for name in b.names() if b.entry(name)["kind"] == "quant"]
            weights = sum(int(np.prod(b.entry(name)["shape"])) for name in quantized)

        def decode():
            with read_blob(blob_path) as blob:
                for name in quantized:
                    blob.quantized(name)

        t_dec = _best_seconds(decode)
    return {"weights": int(weights), "encode_mb_per_s": round(2 * weights / t_enc / 1e6, 1),
            "decode_mb_per_s": round(2 * weights / t_dec / 1e6, 1)}


def ort_latency(path: Path, threads: int) -> dict:
    """Prefill of PREFILL tokens (median of REPEATS) and the median decode step after it (DECODE_STEPS),
    batch 1, onnxruntime CPU with all graph optimizations."""
    from toolchain.export.ort_runtime import OrtDecoder, ort_session, time_decoder

    t0 = time.perf_counter()
    dec = OrtDecoder(ort_session(path, "all", threads=threads))
    load = time.perf_counter() - t0
    t = time_decoder(dec, PREFILL, DECODE_STEPS, REPEATS)
    return {"session_load_s": round(load, 2), "prefill_ms": round(t["prefill_ms"], 1),
            "decode_ms_per_token": round(t["decode_ms_per_token"], 2)}


def run_export_bench(model: str, out_dir: str | Path, only: list[str] | None = None) -> dict:
    """Every artifact by `toolchain export`, then the ONNX forms `--only` selects (all without it) checked
    against PyTorch and timed in onnxruntime; a partial run replaces those forms' rows and keeps the others."""
    from toolchain.export.onnx import export_onnx
    from toolchain.export.onnx_check import check_onnx

    forms = export_forms(only)
    out_dir = Path(out_dir)
    work = work_dir(out_dir)
    src = compressed_source(model, work)
    if only and set(only) == {GENAI}:
        return genai_comparison(model, out_dir, src, work)
    threads = os.cpu_count() or 1
    result: dict = {"model": model, "source": str(src), "source_recipe":
                    "toolchain compress --prune wanda --sparsity 2:4 --quant gptq --bits 4 --group-size 64 "
                    f"--calib-samples {CALIB_SAMPLES} --seqlen {SEQLEN}", "threads": threads}

    # every target, in one `toolchain export` process
    out = work / "export-all"
    cmd = [sys.executable, "-m", "toolchain.cli", "export", "--model", str(src), "--target", "all",
           "--onnx-weights", "float,qdq,matmulnbits", "--out", str(out)]
    t0 = time.perf_counter()
    run_command(cmd, stdout=subprocess.DEVNULL)
    result["export_seconds"] = round(time.perf_counter() - t0, 1)
    result["export_command"] = "toolchain " + " ".join(cmd[3:])
    manifest = json.loads((out / "manifest.json").read_text())
    result["artifacts"] = {a["path"]: a["bytes"] for a in manifest["artifacts"]}
    result["blob"] = {k: v for k, v in manifest["results"]["blob"].items() if not isinstance(v, (dict, list))}

    graphs = {"float": out / "onnx" / "model.float.onnx", "qdq": out / "onnx" / "model.qdq.onnx",
              "matmulnbits": out / "onnx" / "model.matmulnbits.onnx",
              # MatMulNBits with int8 activations (accuracy level 4): faster, approximate. Written beside the
              # export, not in it, so the export's manifest stays true.
              "matmulnbits acc4": work / "export-matmulnbits-acc4.onnx"}
    if "matmulnbits acc4" in forms:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(src, graphs["matmulnbits acc4"], "matmulnbits", accuracy_level=4)
    float_bytes = graphs["float"].stat().st_size
    rows = []
    for name in forms:
        path = graphs[name]
        check = check_onnx(src, path, tokens=64, new_tokens=16)
        row = {"form": name, "bytes": path.stat().st_size,
               "x_float": round(path.stat().st_size / float_bytes, 4),
               "relative_logit_diff": check["relative_diff"], "tokens_match": f"{check['tokens_matched']}/16",
               **ort_latency(path, threads)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result["onnx"] = rows
    result["pack"] = pack_throughput(src / "quant_state.safetensors")
    result["writer"] = writer_throughput(src, work)
    print(f"blob writer encode {result['writer']['encode_mb_per_s']} MB/s, "
          f"reader decode {result['writer']['decode_mb_per_s']} MB/s", flush=True)
    result["partial"] = bool(only)
    write_result(result_stem(out_dir, "export", model), result, list(FORMS), lambda r: r["form"], export_table,
                 rows="onnx")
    if not only or GENAI in only:
        result["genai"] = genai_comparison(model, out_dir, src, work)
    return result


def genai_comparison(model: str, out_dir: Path, src: Path, work: Path) -> dict:
    """Our fused export against onnxruntime-genai's builder (bench/export_genai.py), written to
    export_genai_<model>.{json,md}; skipped, saying so, where onnxruntime-genai is not installed."""
    from toolchain.export.ort_runtime import genai_available

    from .common import save_result
    from .export_genai import genai_table, run_genai_comparison

    if not genai_available():
        print("export genai: skipped: onnxruntime-genai is not installed (pip install 'toolchain[genai]')")
        return {"skipped": "onnxruntime-genai is not installed"}
    result = {"model": model, "source": str(src), **run_genai_comparison(src, work)}
    return save_result(out_dir, "export_genai", model, result, lambda r: f"# Export benchmark: {r['model']}\n\n" +
                       genai_table(r))


def export_table(r: dict) -> str:
    lines = [f"# Export benchmark: {r['model']}", "", f"Input: `{r['source_recipe']}`.", "",
             f"`{r['export_command']}`: {r['export_seconds']} s.", "",
             "| ONNX form | file MB | x float | max logit diff (rel.) | greedy tokens | prefill 128 ms | decode ms/token |",
             "|---|---|---|---|---|---|---|"]
    for row in r["onnx"]:
        lines.append(f"| {row['form']} | {row['bytes'] / 1e6:.1f} | {row['x_float']:.3f} | "
                     f"{row['relative_logit_diff']:.2e} | {row['tokens_match']} | {row['prefill_ms']} | "
                     f"{row['decode_ms_per_token']} |")
    b = r["blob"]
    once = b["file_size"] * 8 / b["theoretical_min_bits_fp16_scales_only"]
    lines += ["", "| blob | |", "|---|---|",
              f"| file | {b['file_size']:,} bytes ({b['manifest_bytes']:,} of them the JSON manifest) |",
              f"| theoretical minimum: kept codes + N:M metadata + fp16 and fixed-point scales | "
              f"{int(b['theoretical_min_bytes']):,} bytes: file is {b['ratio']:.4f}x, payload {b['payload_ratio']:.5f}x |",
              f"| theoretical minimum counting the scales once (fp16 only) | file is {once:.4f}x |",
              f"| write_blob end to end (reads the model, encodes, writes) | {b['seconds']} s |"]
    lines += ["", "| width | weights | packed MB | pack MB/s (fp16 source) | unpack MB/s | pack Mweights/s |",
              "|---|---|---|---|---|---|"]
    for p in r["pack"]:
        lines.append(f"| {p['bits']} | {p['weights']} | {p['packed_bytes'] / 1e6:.1f} | {p['pack_mb_per_s']} | "
                     f"{p['unpack_mb_per_s']} | {p['pack_mweights_per_s']} |")
    w = r["writer"]
    lines += ["", f"Blob writer, `write_blob` on the whole model (reading it, N:M slot selection, zero-code checks, "
              f"packing codes and metadata, fixed-point scales, writing the file): {w['encode_mb_per_s']} MB/s; "
              f"`read_blob` decoding every quantized layer back to dense codes: {w['decode_mb_per_s']} MB/s "
              f"({w['weights']} quantized weights, fp16 source = 2 bytes per weight)."]
    lines += ["", f"onnxruntime CPU, {r['threads']} threads, ORT_ENABLE_ALL, batch 1; prefill median of {REPEATS}, "
              f"decode median of {DECODE_STEPS} steps after a {PREFILL}-token prefill. Logit differences against "
              "the PyTorch model on 64 real tokens (onnx-check).", ""]
    return "\n".join(lines)

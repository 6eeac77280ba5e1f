"""The gpu-bench report: markdown with estimates and measurements in separate, labelled tables, and the plot."""
from __future__ import annotations

from pathlib import Path

from toolchain.atomic import atomic_file

from .specs import TARGET_MIN_TOKENS, TARGET_SPEEDUP


def _us(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:,.0f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def gpu_table(r: dict) -> str:
    """Markdown for a gpu-bench result: estimates and measurements in separate, labelled tables."""
    lines = [f"# GPU benchmark: {r['model']}", ""]
    if not r["cuda"]:
        lines += [f"**No CUDA device: every number below is a roofline ESTIMATE for {r['estimate']['gpu']['name']} "
                  "from vendor peak figures, not a measurement.**", ""]
    engines = r.get("engines")
    if engines:
        lines += ["## TensorRT engines, end to end (measured)", "",
                  "| engine | prefill 128 tokens ms (measured) | decode ms/token (measured) |", "|---|---|---|"]
        for kind in ("dense", "sparse"):
            lines.append(f"| {kind} | {engines[kind]['prefill_ms']} | {engines[kind]['decode_ms_per_token']} |")
        sp = engines["sparse_speedup"]
        lines += ["", f"Sparse over dense: prefill {sp['prefill_ms']}x, decode {sp['decode_ms_per_token']}x "
                      f"(measured).", ""]
    elif r.get("engines_note"):
        lines += [r["engines_note"] + ".", ""]
    m = r.get("measured")
    if m:
        lines += [f"## Measured on {m['device']} (torch {m['torch']}, CUDA {m['cuda']})", "", m["method"], "",
                  "| kind | N x K | linears | count | tokens | dense us (measured) | 2:4 us (measured) | "
                  "speedup (measured) | outputs match | backend | timing |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in m["rows"]:
            timing = (x["timing_dense"] if x["timing_dense"] == x["timing_sparse"]
                      else f"dense: {x['timing_dense']}; 2:4: {x['timing_sparse']}")
            lines.append(f"| measured | {x['n']} x {x['k']} | {', '.join(x['linears'])} | {x['count']} | "
                         f"{x['tokens']} | {_us(x['dense_us_measured'])} | {_us(x['sparse24_us_measured'])} | "
                         f"{_x(x['speedup_measured'])} | {'yes' if x['outputs_match'] else 'NO'} | "
                         f"{x['sparse_backend']} | {timing} |")
        ms = m.get("summary", {})
        mkey = f"mlp_min_speedup_measured_at_{TARGET_MIN_TOKENS}plus_tokens"
        if mkey in ms:
            lines += ["", f"MLP shapes, >= {TARGET_MIN_TOKENS} tokens: smallest MEASURED 2:4 speedup {ms[mkey]:.2f}x; "
                      f"the target is {TARGET_SPEEDUP}x: {'met' if ms['target_met_by_measured'] else 'NOT met'}."]
        lines.append("")
        for x in m["skipped"]:
            lines.append(f"- skipped {x['n']} x {x['k']}" + (f" at {x['tokens']} tokens" if "tokens" in x else "")
                         + f": {x['reason']}")
        lines.append("")
    e = r.get("estimate")
    if e:
        g = e["gpu"]
        lines += [f"## Roofline ESTIMATE for {g['name']} (not a measurement)", "", e["model_of_time"], "",
                  "Vendor peak figures used (estimates rest on these, none is measured here):", "",
                  f"- dense FP16 tensor: {g['dense_fp16_tensor_tflops']:g} TFLOPS ({g['dense_provenance']})",
                  f"- 2:4 sparse FP16 tensor: {g['sparse24_fp16_tensor_tflops']:g} TFLOPS (published, with sparsity)",
                  f"- memory bandwidth: {g['memory_bandwidth_gbs']:g} GB/s",
                  f"- accumulate: {g['accumulate']}", ""]
        lines += ["Sources:", ""] + [f"- {s}" for s in g["sources"]] + [""]
        lines += ["| kind | N x K | linears | count | tokens | dense us (estimate) | dense bound (estimate) | "
                  "2:4 us (estimate) | 2:4 bound (estimate) | 2:4 speedup (estimate) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for x in e["rows"]:
            lines.append(f"| estimate | {x['n']} x {x['k']} | {', '.join(x['linears'])} | {x['count']} | "
                         f"{x['tokens']} | {_us(x['dense_us_estimate'])} | {x['dense_bound_estimate']} (estimate) | "
                         f"{_us(x['sparse24_us_estimate'])} | {x['sparse24_bound_estimate'] or '-'} (estimate) | "
                         f"{_x(x['speedup_estimate'])} (estimate) |")
        s = e["summary"]
        key = f"mlp_min_speedup_estimate_at_{TARGET_MIN_TOKENS}plus_tokens"
        if key in s:
            lines += ["", f"MLP shapes, >= {TARGET_MIN_TOKENS} tokens: smallest 2:4 speedup ESTIMATE "
                      f"{s[key]:.2f}x against the target of {TARGET_SPEEDUP}x. An estimate cannot confirm "
                      "the target; only a measurement on the GPU can."]
    elif r["cuda"]:
        lines += ["", f"No roofline estimate: {r.get('estimate_note', '')}"]
    lines += ["", f"Plot: {r['plot'] or r['plot_note']}", ""]
    return "\n".join(lines)


def _import_pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(r: dict, path: Path) -> str | None:
    """Speedup against tokens per shape; returns a note when no plot is written."""
    plt = _import_pyplot()
    if plt is None:
        return "matplotlib is not installed: no plot written (pip install matplotlib for gpu_<model>.png)"
    fig, ax = plt.subplots()
    series = []
    if r.get("measured"):
        series.append(("measured", "speedup_measured", "-", r["measured"]["rows"]))
    if r.get("estimate"):
        series.append(("ESTIMATE", "speedup_estimate", "--", r["estimate"]["rows"]))
    for label, key, style, rows in series:
        for n, k in sorted({(x["n"], x["k"]) for x in rows}):
            pts = sorted((x["tokens"], x[key]) for x in rows if (x["n"], x["k"]) == (n, k) and x.get(key))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{n}x{k} ({label})")
    ax.axhline(TARGET_SPEEDUP, color="grey", linestyle=":", label=f"target {TARGET_SPEEDUP}x")
    ax.axhline(1.0, color="black")  # parity with dense
    ax.set_xscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("2:4 speedup over dense fp16")
    title = f"{r['model']}: 2:4 vs dense fp16 linears"
    if not r["cuda"]:
        title += f" - roofline ESTIMATE for {r['estimate']['gpu']['name']}, not measured"
    ax.set_title(title, fontsize="small")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
        tmp.chmod(0o644)
    plt.close(fig)
    return None

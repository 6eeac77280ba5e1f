"""GPTQ ablation out of the calibration domain: our GPTQ with one setting at a time moved towards llm-compressor's.

SmolLM2-135M (`--model smollm2`), symmetric codes, group 64, `--bits` 4 or 3, calibrated on the reference budget
(pydoc, 32 windows of 512 tokens, seed 0). Every configuration quantizes in its own process through the Python API
(`toolchain.jobs.quantize.quantize_loaded`) and is evaluated with `toolchain.evaluate.perplexity` at seqlen 512 on
the held-out splits of `--texts` (toolchain.data: pydoc in domain, wiki and science out of it) and, with
`--fortunes DIR`, on two more texts:

- licenses: Debian's /usr/share/common-licenses (legal English; the near-duplicate older versions left out);
- fortunes: English quotations and prose from Debian's `fortunes` package (wisdom, people, science, humorists,
  pratchett, love, men-women), extracted with `apt-get download fortunes && dpkg -x fortunes_*.deb DIR`; pass DIR.

Each text is cut into non-overlapping windows from its start, at most --windows of them, the same for every row.

    .venv/bin/python bench/scripts/gptq_ablation.py --bits 3 --out bench/results/gptq_ablation_3bit.json

`--only a,b` runs some rows (results merge into an existing --out). The configurations (CONFIGS) change one
setting each against `gptq`; the changes that are not options of `quantize` are applied by `patched` below.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from toolchain.reference_runs import EVAL_MAX_WINDOWS

LICENSES = Path("/usr/share/common-licenses")
# Older versions of licenses listed too, as near-copies of the newer text, would be scored twice.
LICENSE_FILES = ("Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.3", "GPL-2", "GPL-3", "LGPL-2.1", "LGPL-3",
                 "MPL-1.1", "MPL-2.0")
FORTUNE_FILES = ("wisdom", "people", "science", "humorists", "pratchett", "love", "men-women")
CALIB_SAMPLES, SEQLEN, GROUP_SIZE, SEED = 32, 512, 64, 0

# name: (method, QuantConfig overrides, patch names applied while quantizing, what it changes). "gptq" is the
# natural column order with groups fitted during the sweep (the reference's default, ours before activation
# order became the default); each other row changes one thing against it or against "gptq act-order".
CONFIGS = {
    "dense": (None, {}, (), "no quantization"),
    "rtn": ("rtn", {}, (), "round to nearest"),
    "gptq": ("gptq", {"act_order": False}, (), "natural column order, groups fitted during the sweep"),
    "gptq act-order": ("gptq", {"act_order": True}, (),
                       "llm-compressor's default: columns by decreasing diag H, group scales from the original "
                       "weights before the sweep (static groups)"),
    "gptq skip first token": ("gptq", {"act_order": False}, ("skip_first_token",),
                              "H without position 0 of every calibration window"),
    "gptq act-order + skip first token": ("gptq", {"act_order": True}, ("skip_first_token",),
                                          "both of the above"),
    "gptq damp 0.1": ("gptq", {"act_order": False, "percdamp": 0.1}, (),
                      "ten times the damping (less trust in H)"),
    "gptq act-order damp 0.1": ("gptq", {"act_order": True, "percdamp": 0.1}, (),
                                "activation order with ten times the damping"),
    "gptq fp64 hessian": ("gptq", {"act_order": False}, ("fp64_hessian",), "X X^T accumulated in float64"),
}


def _read_fortunes(directory: Path) -> str:
    parts = []
    for name in FORTUNE_FILES:
        path = directory / name
        if not path.is_file():
            raise SystemExit(f"--fortunes {directory}: {name} is missing (extract Debian's `fortunes` package)")
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.extend(p.strip() for p in text.split("\n%\n") if p.strip())
    return "\n\n".join(parts)


def eval_texts(texts: list[str], fortunes_dir: Path | None) -> dict[str, str]:
    from toolchain.data import get_corpus

    result = {name: get_corpus(name).eval_text for name in texts}
    if fortunes_dir is not None:
        result["licenses"] = "\n\n".join((LICENSES / name).read_text(encoding="utf-8", errors="replace")
                                          for name in LICENSE_FILES)
        result["fortunes"] = _read_fortunes(fortunes_dir)
    return result


@contextmanager
def patched(names: tuple[str, ...]):
    """Swap InputStats.add_batch for the variants that change how X X^T is gathered."""
    from toolchain.input_stats import InputStats

    original = InputStats.add_batch

    def add_batch(self, x: torch.Tensor) -> None:
        if "skip_first_token" in names and x.dim() == 3:
            x = x[:, 1:]   # [windows, tokens, cols]: drop each window's first token
        x = x.detach().reshape(-1, self.cols)
        if "fp64_hessian" in names:
            if self.xtx is not None and self.xtx.dtype != torch.float64:
                self.xtx = self.xtx.double()
            x64 = x.double()
            self.tokens += x64.shape[0]
            self.sq_sum += x64.square().sum(dim=0).float()
            if self.xtx is not None:
                self.xtx.addmm_(x64.T, x64)
            return
        original(self, x)

    InputStats.add_batch = add_batch
    try:
        yield
    finally:
        InputStats.add_batch = original


def run_one(name: str, bits: int, texts: list[str], fortunes_dir: Path | None, windows: int) -> dict:
    from toolchain.data import calibration_data, eval_windows, tokenize
    from toolchain.evaluate import perplexity
    from toolchain.jobs.config import QuantConfig
    from toolchain.jobs.quantize import quantize_loaded
    from toolchain.models import load_model

    method, overrides, patches, what = CONFIGS[name]
    loaded = load_model("smollm2")
    row = {"name": name, "change": what}
    if method is not None:
        cfg = QuantConfig(method=method, bits=bits, group_size=GROUP_SIZE, calib_samples=CALIB_SAMPLES, seqlen=SEQLEN,
                          seed=SEED, **overrides)
        calib, _ = calibration_data(loaded, CALIB_SAMPLES, SEQLEN, SEED)
        t0 = time.perf_counter()
        with patched(patches):
            quantize_loaded(loaded, calib, cfg, device="cpu", progress=False)
        row["quant_seconds"] = round(time.perf_counter() - t0, 1)
    row["ppl"], row["eval_tokens"] = {}, {}
    for text_name, text in eval_texts(texts, fortunes_dir).items():
        ids = eval_windows(tokenize(loaded.tokenizer, text), SEQLEN, windows)
        row["ppl"][text_name] = round(perplexity(loaded.model, ids, device="cpu", progress=False), 3)
        row["eval_tokens"][text_name] = int(ids.numel())
    return row


def table(rows: list[dict]) -> str:
    gptq = next((r for r in rows if r["name"] == "gptq"), None)
    texts = list(dict.fromkeys(t for r in rows for t in r["ppl"]))
    lines = ["| configuration | " + " | ".join(texts) + " | change |", "|---|" + "---|" * len(texts) + "---|"]
    for r in rows:
        cells = []
        for t in texts:
            if t not in r["ppl"]:
                cells.append("-")
                continue
            cell = f"{r['ppl'][t]:.2f}"
            if gptq is not None and r is not gptq and r["name"] != "dense" and t in gptq["ppl"]:
                cell += f" ({100 * (r['ppl'][t] / gptq['ppl'][t] - 1):+.1f}%)"
            cells.append(cell)
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['change']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    ap.add_argument("--texts", default="pydoc,wiki,science", help="held-out splits of toolchain.data to evaluate")
    ap.add_argument("--fortunes", type=Path, default=None, help="usr/share/games/fortunes of the extracted package "
                    "(or the DIR it was extracted to): adds the licenses and fortunes texts")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default=None, help="comma list of configurations (default: all)")
    ap.add_argument("--windows", type=int, default=EVAL_MAX_WINDOWS, help="most evaluation windows per text "
                    "(default: the quality benchmarks' %(default)s)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # the child process: run one configuration
    args = ap.parse_args()
    fortunes = args.fortunes
    if fortunes is not None and (fortunes / "usr/share/games/fortunes").is_dir():
        fortunes = fortunes / "usr/share/games/fortunes"
    texts = [t for t in args.texts.split(",") if t]
    if args.one:
        torch.manual_seed(0)
        print(json.dumps(run_one(args.one, args.bits, texts, fortunes, args.windows)))
        return
    names = args.only.split(",") if args.only else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    result.update({"model": "smollm2", "bits": args.bits, "group_size": GROUP_SIZE, "symmetric": True,
                   "calibration": f"pydoc {CALIB_SAMPLES}x{SEQLEN}, seed {SEED}",
                   "eval": f"seqlen {SEQLEN}, at most {args.windows} windows per text"})
    for name in names:
        child = [sys.executable, __file__, "--bits", str(args.bits), "--texts", ",".join(texts), "--windows",
                 str(args.windows), "--out", str(args.out), "--one", name]
        if fortunes is not None:
            child += ["--fortunes", str(fortunes)]
        out = subprocess.run(child, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        result["rows"] = [r for r in result["rows"] if r["name"] != name] + [row]
        result["rows"].sort(key=lambda r: list(CONFIGS).index(r["name"]) if r["name"] in CONFIGS else len(CONFIGS))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"{name}: {row['ppl']} ({row.get('quant_seconds', '-')} s)", flush=True)
    print(table(result["rows"]))


if __name__ == "__main__":
    main()

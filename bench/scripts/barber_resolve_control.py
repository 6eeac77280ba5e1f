"""Control for Barber on SparseGPT: is the gain the rebuilt mask, or the least-squares re-solve of its rows?

Barber(SparseGPT) re-solves every row whose mask it changed by exact least squares (`--rebuild-solver lstsq`,
the default). Least squares alone also lowers a row's error under SparseGPT's own mask, so part of Barber's
gain could come from the re-solve and not from the new mask. This runs the same flow (same gradients, same
rows, same solver, same loss guard) but re-solves those rows under their OLD mask. Compare its perplexity with
the `sparsegpt` and `barber(sparsegpt)` rows of bench/results/prune_smollm2.json (same budget and evaluation);
`--all` runs those two here as well.

    .venv/bin/python bench/scripts/barber_resolve_control.py --sparsity 2:4
writes bench/results/barber_control_smollm2.json (one entry per sparsity; the others are kept), or the same
file under --out; the dense model is cached under <out>/work as the benchmarks do.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from toolchain.bench.common import work_dir
from toolchain.jobs import prune as prune_job
from toolchain.jobs.common import calibration_for
from toolchain.jobs.config import PruneConfig
from toolchain.data import eval_windows, get_corpus, tokenize
from toolchain.evaluate import perplexity
from toolchain.models import load_model
from toolchain.prune.barber import Barber
from toolchain.reference_runs import CALIB_SAMPLES, SEQLEN, dense_hf_dir


class SameMaskBarber(Barber):
    """Barber's rows, re-solved under the mask they already had: the mask never changes."""

    def _rebuild_block(self, layer, dense_layer, block, rec, masks, targets, stats, solver, report) -> bool:
        dense, new_masks = self.scored_masks(dense_layer, block, rec, masks, targets)
        changed = False
        for name in block.linears:
            lin, old = layer.get_submodule(name), masks[name]
            current = lin.weight.detach().float()
            rows = (new_masks[name] != old).any(dim=1)
            weight = current.clone()
            if bool(rows.any()):
                weight[rows] = solver(dense[name][rows], stats[name], old[rows], start=current[rows])
            lin.weight.data.copy_(weight.masked_fill(old, 0.0))
            report["swaps"][name], report["resolved_rows"][name] = 0, int(rows.sum())
            changed = changed or bool(rows.any())
        return changed


def run(model_dir: Path, method: str, sparsity: str, barber_class=Barber) -> dict:
    loaded = load_model(model_dir)
    cfg = PruneConfig(method=method, init="sparsegpt" if method == "barber" else None, sparsity=sparsity,
                      calib_samples=CALIB_SAMPLES, seqlen=SEQLEN)
    calib, _ = calibration_for(loaded, cfg)
    saved, prune_job.Barber = prune_job.Barber, barber_class
    try:
        t0 = time.perf_counter()
        report = prune_job.prune_loaded(loaded, calib, cfg, progress=False)
        seconds = time.perf_counter() - t0
    finally:
        prune_job.Barber = saved
    windows = eval_windows(tokenize(loaded.tokenizer, get_corpus().eval_text), SEQLEN)
    resolved = sum(sum(e["barber"]["resolved_rows"].values()) for e in report["layers"] if "barber" in e)
    return {"ppl": round(perplexity(loaded.model, windows, progress=False), 3), "seconds": round(seconds, 1),
            "resolved_rows": resolved}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sparsity", default="2:4")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--all", action="store_true", help="also run SparseGPT and Barber(SparseGPT) here")
    args = ap.parse_args()
    model_dir = dense_hf_dir(args.model, work_dir(args.out))
    entry = {"same rows re-solved, old mask": run(model_dir, "barber", args.sparsity, SameMaskBarber)}
    if args.all:
        entry["sparsegpt"] = run(model_dir, "sparsegpt", args.sparsity)
        entry["barber(sparsegpt)"] = run(model_dir, "barber", args.sparsity)
    path = Path(args.out) / "barber_control_smollm2.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[args.sparsity] = entry
    path.write_text(json.dumps(results, indent=2) + "\n")
    for name, r in entry.items():
        print(f"{args.sparsity} {name}: ppl {r['ppl']}, {r['seconds']} s, re-solved rows {r['resolved_rows']}")


if __name__ == "__main__":
    main()

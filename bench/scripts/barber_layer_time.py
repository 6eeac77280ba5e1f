"""One decoder layer's Barber cost, with and without the dense attention recorded in the statistics pass.

Single whole-model runs vary by 5-10% on a shared 2-core machine, more than the change being measured, so this
times one layer in one process, alternating the two arrangements: (a) the init's statistics pass on the dense
copy with the attention recorded (`Barber.record_first_block`, the default), then `rebuild_layer` on the
recording; (b) the plain statistics pass, then `rebuild_layer` recomputing the dense attention. For each it
prints the statistics pass, the rebuild, and their sum; and the init's own output pass (the forward the walk
runs when there is no Barber) for scale.

    .venv/bin/python bench/scripts/barber_layer_time.py [--model bench/results/work/smollm2-hf] [--layer 5]
        [--sparsity 0.5] [--init wanda] [--repeats 4]

(`toolchain bench prune` leaves the dense SmolLM2 directory at bench/results/work/smollm2-hf.) Calibration: 32
windows of 512 pydoc tokens, as in the pruning benchmark.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from toolchain.engine import LayerEngine
from toolchain.models import load_model
from toolchain.engine import set_weight
from toolchain.jobs.common import calibration_for
from toolchain.jobs.config import PruneConfig
from toolchain.prune import Barber, make_method
from toolchain.prune.lstsq import lstsq_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bench/results/work/smollm2-hf")
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--sparsity", default="0.5")
    ap.add_argument("--init", default="wanda", choices=("magnitude", "wanda", "sparsegpt"))
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    loaded = load_model(args.model)
    cfg = PruneConfig(method="barber", init=args.init, sparsity=args.sparsity, calib_samples=32, seqlen=512)
    target, init = cfg.validate()
    calib, _ = calibration_for(loaded, cfg)
    engine = LayerEngine(loaded.model, loaded.adapter, calib, cfg.batch_size, "cpu")
    hidden = engine.capture_inputs()
    for layer in engine.layers[:args.layer]:
        hidden = engine.forward_layer(layer, hidden)
    source = engine.layers[args.layer]
    method = make_method(init)
    solver = lstsq_rows if method.needs_hessian else None
    times: dict[str, list[tuple[float, float, float]]] = {"recorded": [], "recomputed": []}
    for repeat in range(2 * args.repeats):
        arrangement = "recorded" if repeat % 2 == 0 else "recomputed"
        layer, dense = copy.deepcopy(source), copy.deepcopy(source)
        barber = Barber(score=cfg.rebuild_score)
        t0 = time.perf_counter()
        if arrangement == "recorded":
            with barber.record_first_block(engine, dense) as recorded:
                stats = engine.collect_stats(dense, hidden, method.needs_hessian)
        else:
            recorded, stats = None, engine.collect_stats(layer, hidden, method.needs_hessian)
        t1 = time.perf_counter()
        masks, targets = {}, {}
        for name, lin in loaded.adapter.linears(layer).items():
            weight, masks[name] = method.prune(lin.weight, stats.get(name), target)
            set_weight(lin, weight)
            targets[name] = target
        t2 = time.perf_counter()
        barber.rebuild_layer(engine, layer, dense, hidden, masks, targets, stats, solver, recorded)
        t3 = time.perf_counter()
        engine.forward_layer(layer, hidden)
        t4 = time.perf_counter()
        times[arrangement].append((t1 - t0, t3 - t2, t4 - t3))
        print(f"{arrangement:10s} statistics {t1 - t0:.2f} s, rebuild {t3 - t2:.2f} s, sum {t1 - t0 + t3 - t2:.2f} s"
              f" (output pass {t4 - t3:.2f} s)", flush=True)
    print(f"layer {args.layer}, {args.init} {args.sparsity}, {torch.backends.cpu.get_cpu_capability()}:")
    for arrangement, rows in times.items():
        sums = [s + r for s, r, _ in rows]
        print(f"  {arrangement:10s} statistics + rebuild: median {statistics.median(sums):.2f} s, "
              f"range {min(sums):.2f}-{max(sums):.2f} s over {len(sums)} runs")


if __name__ == "__main__":
    main()

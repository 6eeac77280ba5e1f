"""Each of Barber's speed mechanisms on its own: one decoder layer's statistics pass + rebuild, with the default
arrangement and with one mechanism switched off at a time, alternating arms within one process.

Arms (each switches one mechanism off; everything else stays the default):
- default: every mechanism on.
- recomputed-attention: the dense attention's forward is not recorded in the statistics pass; Barber's attention
  pass recomputes it (`Barber.record_first_block` not used).
- weight-grads: the backward also computes the tapped linears' weight gradients, as a backward to the weights
  would (the output taps skip them).
Two more mechanisms were timed this way and removed for not paying (docs/pruning.md, "Speed mechanisms"): the
loss guard's rerun of only the MLP channels a rebuild touched, and a sparse (CSR) product for a change of the exit
linear alone.
Per arm: statistics + rebuild seconds (median and range), the seconds inside `rerun_block`, how often the
exit-only path (`weight_change_product`) ran and whether the masks equal the default arm's.

    .venv/bin/python bench/scripts/barber_mechanisms_time.py [--model smollm2] [--layer 5] [--sparsity 0.5]
        [--init wanda] [--score taylor-exit] [--ratio 0.01] [--repeats 3] [--arms default,weight-grads,...]

Calibration: 32 windows of 512 pydoc tokens, as in the pruning benchmark.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch

import toolchain.prune.barber.rebuild as rebuild
import toolchain.prune.barber.taps as taps
from toolchain.engine import LayerEngine, set_weight
from toolchain.jobs.common import calibration_for
from toolchain.jobs.config import PruneConfig
from toolchain.models import load_model
from toolchain.prune import Barber, make_method
from toolchain.prune.lstsq import lstsq_rows

ARMS = ("default", "recomputed-attention", "weight-grads")


@contextlib.contextmanager
def _patched(obj, name: str, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def _with_weight_grads():
    """OutputTaps whose backward also computes the tapped linears' weight gradients."""
    init = taps.OutputTaps.__init__

    def patched_init(self, module, names):
        init(self, module, names)
        self.weights = [module.get_submodule(n).weight.requires_grad_(True) for n in names]

    def patched_backward(self, loss):
        self.grads = {}
        torch.autograd.grad(loss, [self.tap, *self.weights])
        return self.grads
    stack = contextlib.ExitStack()
    stack.enter_context(_patched(taps.OutputTaps, "__init__", patched_init))
    stack.enter_context(_patched(taps.OutputTaps, "backward", patched_backward))
    return stack


def _arm_context(arm: str):
    if arm == "weight-grads":
        return _with_weight_grads()
    return contextlib.nullcontext()


def _counting(counters: dict):
    """Wrap rerun_block (time) and weight_change_product (calls) of the rebuild module."""
    rerun, product = rebuild.rerun_block, rebuild.weight_change_product

    def timed_rerun(*a, **k):
        t0 = time.perf_counter()
        try:
            return rerun(*a, **k)
        finally:
            counters["rerun_s"] += time.perf_counter() - t0

    def counted_product(delta):
        counters["exit_only"] += 1
        return product(delta)
    stack = contextlib.ExitStack()
    stack.enter_context(_patched(rebuild, "rerun_block", timed_rerun))
    stack.enter_context(_patched(rebuild, "weight_change_product", counted_product))
    return stack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--sparsity", default="0.5")
    ap.add_argument("--init", default="wanda", choices=("magnitude", "wanda", "sparsegpt"))
    ap.add_argument("--score", default="taylor-exit", choices=("taylor-exit", "grad-rms"))
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--arms", default=",".join(ARMS))
    args = ap.parse_args()
    arms = args.arms.split(",")
    loaded = load_model(args.model)
    cfg = PruneConfig(method="barber", init=args.init, sparsity=args.sparsity, calib_samples=32, seqlen=512,
                      rebuild_score=args.score, rebuild_ratio=args.ratio)
    target, init = cfg.validate()
    calib, _ = calibration_for(loaded, cfg)
    engine = LayerEngine(loaded.model, loaded.adapter, calib, cfg.batch_size, "cpu")
    hidden = engine.capture_inputs()
    for layer in engine.layers[:args.layer]:
        hidden = engine.forward_layer(layer, hidden)
    source = engine.layers[args.layer]
    method = make_method(init)
    solver = lstsq_rows if method.needs_hessian else None
    results = {arm: {"sums": [], "rerun_s": [], "exit_only": 0, "same_masks": True} for arm in arms}
    reference_masks = None
    for repeat in range(args.repeats):
        for arm in arms:
            layer, dense = copy.deepcopy(source), copy.deepcopy(source)
            barber = Barber(cfg.rebuild_ratio, score=cfg.rebuild_score)
            counters = {"rerun_s": 0.0, "exit_only": 0}
            with _arm_context(arm), _counting(counters):
                t0 = time.perf_counter()
                if arm != "recomputed-attention":
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
            if reference_masks is None:
                reference_masks = masks
            r = results[arm]
            r["same_masks"] &= all(masks[n].equal(reference_masks[n]) for n in masks)
            r["sums"].append(t1 - t0 + t3 - t2)
            r["rerun_s"].append(counters["rerun_s"])
            r["exit_only"] = counters["exit_only"]
            print(f"{arm:22s} statistics {t1 - t0:.2f} s, rebuild {t3 - t2:.2f} s (rerun {counters['rerun_s']:.2f} s,"
                  f" exit-only reruns {counters['exit_only']})", flush=True)
    print(f"layer {args.layer}, {args.init} {args.sparsity}, score {cfg.rebuild_score}, ratio {cfg.rebuild_ratio}, "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads:")
    for arm, r in results.items():
        print(f"  {arm:22s} statistics + rebuild: median {statistics.median(r['sums']):.2f} s "
              f"(range {min(r['sums']):.2f}-{max(r['sums']):.2f}), "
              f"rerun median {statistics.median(r['rerun_s']):.2f} s, "
              f"exit-only reruns {r['exit_only']}, masks as default: {r['same_masks']}")


if __name__ == "__main__":
    main()

"""LLM-Barber (Su et al., 2024): block-aware mask rebuilding on top of an initial pruning.

Per decoder layer, attention sub-block first, then MLP (which sees the rebuilt attention):
1. Run the pruned layer on the calibration windows; at the sub-block boundary capture its input u (the
   pruned model's own normed hidden state) and its sparse output y_s.
2. Run the DENSE copy of the sub-block on the same u; loss per window n: L_n = mean((y_d - y_s)^2).
3. Per-window gradients with respect to the dense weights, G2 = mean_n (dL_n/dW)^2. For a linear layer the
   per-window gradient is g_n^T x_n (output gradient times input), so all windows of a batch come from one
   backward pass and a batched matmul instead of one backward per window.
4. Score S = |W_dense| * sqrt(G2). Per output row: R = number of pruned/kept pairs (best pruned against
   worst kept, and so on) in which the pruned weight scores higher; swap floor(ratio * R) of them.
   `granularity` widens the group from a row to a whole matrix (`layer`) or to all matrices of the
   sub-block (`block`), as the reference's options do; then only the group's total count is exact.
   With N:M, every group prunes as many of its weakest kept weights as it revived, so N:M holds.
   `score="taylor-exit"` (ours) scores each block's last linear (o_proj, down_proj / fc2) instead by the exact
   block-loss change of toggling each weight (`taylor_score`), from the gradient at the sparse weights.
Weights after the rebuild (`keep_updates`, our default): for magnitude and Wanda init, dense values on the
new mask; for SparseGPT init, every row whose mask changed is re-solved under the new mask by the `solver`
the pipeline hands in: the exact least-squares fit on the layer Hessian (`lstsq_rows`, default) or
SparseGPT's own OBS sweep (`--rebuild-solver obs`). Unchanged rows keep SparseGPT's weights.
`keep_updates=False` resets every kept weight to its dense value, as the reference code does by default.
Loss guard (ours, `loss_guard`): a block's rebuild is kept only if its block loss on the calibration windows
does not rise; otherwise the block keeps the init's masks and weights.
Cost: one pass per block. The attention's pass stops the sparse layer after the attention; the MLP's pass
replays the attention's (rebuilt) outputs instead of recomputing them and gathers the MLP's gradients; the
next layer's input is the recorded output plus the change of the last block's output (pre-norm decoders), so
no extra layer forward is needed. The attention's dense forward is not run by Barber at all: it is recorded, with
its graph, in the init method's statistics pass on the dense copy (`record_dense_block`), whose attention input
is the same, and Barber's attention pass only runs the backward on it.

Modules: `score` (the scores and the swap rule), `taps` (output-gradient taps), `gradients` (the gradient pass,
the recorded dense block, the block loss), `rebuild` (the `Barber` class: per-layer rebuild, loss guard, reruns).
"""
from __future__ import annotations

from .gradients import (ENTRY_INPUT, BlockRecord, PassOptions, RecordedBlock, Replay, block_loss, gradient_pass,
                        record_dense_block, reduced_precision)
from .rebuild import Barber, rerun_block, weight_change_product
from .score import (GRANULARITIES, SCORES, check_granularity, check_score, rebuild_mask, rebuild_masks,
                    taylor_score)

__all__ = ["Barber", "BlockRecord", "ENTRY_INPUT", "GRANULARITIES", "PassOptions", "RecordedBlock", "Replay", "SCORES",
           "block_loss", "check_granularity", "check_score", "gradient_pass", "rebuild_mask", "rebuild_masks",
           "record_dense_block", "reduced_precision", "rerun_block", "taylor_score", "weight_change_product"]

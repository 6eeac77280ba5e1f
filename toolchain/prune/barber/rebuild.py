"""The Barber rebuild of one decoder layer: score, swap, set weights, check the block loss, hand on the output.

Sub-blocks go in order (attention, then MLP on the rebuilt attention's output), one gradient pass each. After a
block's masks change, its new outputs and loss come from `rerun_block` on the pass's records (one product when
only the exit linear changed, else the block again); the loss guard keeps a rebuild only if the block loss does not rise.
"""
from __future__ import annotations

from typing import Callable

import torch

from ...models.base import SubBlock
from ..masks import SparsityTarget
from .gradients import (BlockRecord, PassOptions, RecordedBlock, Replay, gradient_pass, record_dense_block,
                        resolve_grad_dtype, window_losses)
from .score import check_granularity, check_score, grad_rms_score, rebuild_masks, taylor_score


def weight_change_product(delta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """h -> h @ delta^T for a weight change `delta` ([out, in]; h [tokens, in] -> [tokens, out]), over the columns
    the change touches only. (A sparse CSR product does not pay: docs/pruning.md, "Speed mechanisms".)"""
    touched = delta.ne(0).any(dim=0).nonzero().squeeze(1)
    dense = delta[:, touched].T
    return lambda h: h[:, touched] @ dense


def _mean_window_loss(outs: list[torch.Tensor], rec: BlockRecord) -> float:
    """The block loss of new sparse outputs against the recorded dense ones, mean over windows."""
    total, windows = 0.0, 0
    for y, y_dense, n in zip(outs, rec.dense_out, rec.sizes):
        total += float(window_losses(y_dense, y, n).sum())
        windows += n
    return total / max(windows, 1)


@torch.no_grad()
def rerun_block(layer, block: SubBlock, rec: BlockRecord, old_weights: dict[str, torch.Tensor] | None = None
                ) -> tuple[list[torch.Tensor], float]:
    """The (rebuilt) sparse block on its recorded inputs: outputs per batch and the mean block loss.

    With the block's weights before the rebuild (`old_weights`), a rebuild that changed only the exit linear,
    whose input is recorded (exit terms), costs one product: y_new = y_old + h (W_new - W_old)^T. Otherwise the
    whole block runs (recomputing only the channels a rebuild touched does not pay: docs/pruning.md)."""
    exit_name, firsts = block.linears[-1], block.linears[:-1]
    if old_weights is not None and rec.exit_in and all(
            layer.get_submodule(n).weight.equal(old_weights[n]) for n in firsts):
        change = weight_change_product(layer.get_submodule(exit_name).weight - old_weights[exit_name])
        outs = [y + change(h).reshape(y.shape) for h, y in zip(rec.exit_in, rec.sparse_out)]
        return outs, _mean_window_loss(outs, rec)
    outs = [block.run(layer, args, kwargs) for args, kwargs in rec.calls]
    return outs, _mean_window_loss(outs, rec)


class Barber:
    """Block-aware mask rebuilding of each pruned decoder layer (see the package docstring).

    ratio: the fraction of the beneficial swaps made; keep_updates: keep the init method's updated weights on
    kept positions (False: dense values, as the reference); loss_guard: keep a block's rebuild only if its block
    loss does not rise; granularity: the swap ranking group (`row`, `layer`, `block`); grad_dtype: the dense
    blocks' autocast type ("auto": `reduced_precision`); score: `taylor-exit` (ours, the CLI's default) or the
    reference's `grad-rms`."""

    def __init__(self, ratio: float = 0.01, keep_updates: bool = True, loss_guard: bool = True,
                 granularity: str = "row", grad_dtype: torch.dtype | str | None = "auto",
                 score: str = "taylor-exit"):
        check_granularity(granularity)
        check_score(score, granularity)
        self.score = score
        self.grad_dtype = grad_dtype
        self.ratio = ratio
        self.granularity = granularity
        self.keep_updates = keep_updates
        self.loss_guard = loss_guard

    @property
    def exit_terms(self) -> bool:
        """Whether the passes record the last linears' exit terms (the `taylor-exit` score needs them)."""
        return self.score == "taylor-exit"

    def rebuild_layer(self, engine, layer, dense_layer, hidden, masks: dict[str, torch.Tensor],
                      targets: dict[str, SparsityTarget], stats: dict | None = None,
                      solver: Callable | None = None, recorded: RecordedBlock | None = None
                      ) -> tuple[dict, torch.Tensor]:
        """Rebuild the masks of every linear in `layer` in place (`masks` is updated); returns a report and the
        layer's output for every window (the next layer's input).
        `recorded`: the dense attention's forward from the init's statistics pass (`record_first_block`), used
        instead of running it again.

        Sub-blocks go in order (attention, then MLP on the rebuilt attention's output), one pass each: the
        attention's pass runs the sparse layer only as far as the attention; a rebuilt block's new loss and
        outputs come from `rerun_block` on the pass's records; the MLP's pass runs the layer to its end with
        the attention replaying its (rebuilt, or kept) outputs. A rebuild is kept only if the block loss on
        the calibration windows does not rise (`loss_guard`, ours; the reference keeps every rebuild);
        otherwise the block's masks and weights go back to the init's. The layer's new output is the MLP
        pass's plus the change of the MLP's output, without another pass.
        With `keep_updates` and a `solver` (`solver(dense_rows, stats, prune_mask_rows, start=rows)`, given the
        init pass's `stats`: `lstsq_rows`, or SparseGPT's OBS sweep with a fixed mask), every row whose mask
        changed is re-solved under the new mask; unchanged rows keep the init method's weights.
        """
        grad_dtype = resolve_grad_dtype(self.grad_dtype, hidden.device)
        blocks = list(engine.adapter.subblocks(layer))
        if recorded is not None and recorded.block.name != blocks[0].name:
            raise ValueError(f"the recorded block {recorded.block.name!r} is not this layer's first, "
                             f"{blocks[0].name!r}")
        report = self._new_report(blocks, grad_dtype, recorded)

        def block_pass(i: int, replay: Replay | None = None):
            """Gradients of block i on the current layer; the sparse layer runs only as far as block i."""
            return gradient_pass(engine, layer, dense_layer, hidden, [blocks[i]], PassOptions(
                grad_dtype, self.exit_terms, to_end=i + 1 == len(blocks), replay=replay,
                recorded=recorded if i == 0 else None))
        records, layer_out = block_pass(0)
        recorded = None
        for i, block in enumerate(blocks):
            rec = records[block.name]
            saved = {n: (layer.get_submodule(n).weight.detach().clone(), masks[n]) for n in block.linears}
            changed = self._rebuild_block(layer, dense_layer, block, rec, masks, targets, stats, solver, report)
            outs = self._guarded_outputs(layer, block, rec, saved, masks, report, changed)
            if i + 1 < len(blocks):
                # The next block's pass replays this block's output instead of recomputing it; nothing else of
                # this block's records is needed, so it is freed first.
                replay = Replay(block, torch.cat(outs), rec.out_tail)
                outs = None
                rec.calls, rec.sparse_out, rec.exit_in, rec.dense_out = [], [], [], []
                records, layer_out = block_pass(i + 1, replay)
                del replay
            elif outs is not rec.sparse_out:
                layer_out = self._new_layer_output(engine, layer, hidden, layer_out, outs, rec)
        return report, layer_out

    def _new_report(self, blocks, grad_dtype, recorded) -> dict:
        # The recorded block's gradients come from the statistics pass, which runs in float32.
        dtypes = {b.name: str(torch.float32 if recorded is not None and i == 0 else grad_dtype or torch.float32
                              ).removeprefix("torch.") for i, b in enumerate(blocks)}
        return {"swaps": {}, "resolved_rows": {}, "reverted": [], "gradient_dtype": dtypes,
                "dense_forward_reused": [recorded.block.name] if recorded is not None else []}

    def _guarded_outputs(self, layer, block, rec: BlockRecord, saved, masks, report, changed: bool
                         ) -> list[torch.Tensor]:
        """The block's sparse outputs after its rebuild: the new ones (`rerun_block`), or the recorded ones
        when nothing changed or the loss guard reverted the rebuild. Records the block's losses."""
        report[f"{block.name}_loss_before"] = report[f"{block.name}_loss_after"] = rec.loss
        if not changed:
            return rec.sparse_out
        outs, loss_after = rerun_block(layer, block, rec, {n: w for n, (w, _) in saved.items()})
        if self.loss_guard and loss_after > rec.loss:
            self._revert(layer, block, saved, masks, report)
            return rec.sparse_out
        report[f"{block.name}_loss_after"] = loss_after
        return outs

    @staticmethod
    def _new_layer_output(engine, layer, hidden, layer_out, outs, rec: BlockRecord) -> torch.Tensor:
        """The layer's output after its last block changed: in a pre-norm decoder the output is the last
        block's residual plus the block's output, so it moves by exactly the block output's change; otherwise
        the layer runs again."""
        if not engine.adapter.output_adds_last_block(layer):
            return engine.forward_layer(layer, hidden)
        start = 0
        for y_new, y_old, n in zip(outs, rec.sparse_out, rec.sizes):
            layer_out[start:start + n] += (y_new - y_old).reshape(n, *layer_out.shape[1:])
            start += n
        return layer_out

    def record_first_block(self, engine, dense_layer):
        """`record_dense_block` for the layer's first sub-block, to wrap the init's statistics pass on `dense_layer`."""
        return record_dense_block(dense_layer, engine.adapter.subblocks(dense_layer)[0], self.exit_terms)

    @staticmethod
    def _revert(layer, block, saved, masks, report) -> None:
        """Give `block` back the init's masks and weights."""
        for n, (weight, mask) in saved.items():
            layer.get_submodule(n).weight.data.copy_(weight)
            masks[n] = mask
            report["swaps"][n] = report["resolved_rows"][n] = 0
        report["reverted"].append(block.name)

    def scored_masks(self, dense_layer, block, rec: BlockRecord, masks, targets) -> tuple[dict, dict]:
        """The block's dense weights and its rebuilt masks: score |W_dense| * RMS(grad) (with `taylor-exit`,
        the last linear gets `taylor_score`), then swap."""
        dense = {n: dense_layer.get_submodule(n).weight.detach().float() for n in block.linears}
        scores = {n: grad_rms_score(dense[n], rec.g2[n]) for n in block.linears}
        if self.score == "taylor-exit":
            last = block.linears[-1]
            scores[last] = taylor_score(dense[last], rec.exit_grad, rec.exit_in_sq, masks[last],
                                        1.0 / (rec.tokens * dense[last].shape[0]))
        return dense, rebuild_masks({n: masks[n] for n in block.linears}, scores,
                                    self.ratio, targets[block.linears[0]], self.granularity)

    def _rebuild_block(self, layer, dense_layer, block, rec, masks, targets, stats, solver, report) -> bool:
        """Score, swap and set new weights for the linears of `block`; True if any mask changed."""
        dense, new_masks = self.scored_masks(dense_layer, block, rec, masks, targets)
        changed = False
        for name in block.linears:
            lin = layer.get_submodule(name)
            dense_w, current, old, new = dense[name], lin.weight.detach().float(), masks[name], new_masks[name]
            rows = (new != old).any(dim=1)
            if not self.keep_updates:
                base = dense_w
            elif solver is not None and stats is not None:
                base = current.clone()
                if bool(rows.any()):
                    # Start from the init's weights, revived positions at their dense values.
                    start = torch.where(old, dense_w, current)[rows]
                    base[rows] = solver(dense_w[rows], stats[name], new[rows], start=start)
                report["resolved_rows"][name] = int(rows.sum())
            else:
                base = torch.where(old, dense_w, current)
            lin.weight.data.copy_(base.masked_fill(new, 0.0))
            masks[name] = new
            report["swaps"][name] = int((new & ~old).sum())
            changed = changed or bool(rows.any()) or not self.keep_updates
        return changed

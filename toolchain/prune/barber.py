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
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..errors import ConfigError
from ..models.base import SubBlock, first_tensor
from .masks import SparsityTarget


def _ranks(x: torch.Tensor, descending: bool) -> torch.Tensor:
    """Rank of each element along the last dimension (0 = first in the sort order; ties by position)."""
    order = torch.argsort(x, dim=-1, descending=descending, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))
    return ranks


def rebuild_mask(prune_mask: torch.Tensor, score: torch.Tensor, ratio: float, target: SparsityTarget
                 ) -> torch.Tensor:
    """Swap pruned<->kept weights per output row by score; the count per row (and N:M) is unchanged.

    The reference pairs the k-th best pruned weight with the k-th worst kept one and counts the pairs R in which
    the pruned one scores higher; it swaps floor(ratio * R) of them, best pairs first. One sort of each row
    (descending) gives it all: cutting the sorted row where the score strictly drops, with A pruned weights above
    the cut and B kept ones below it, the first min(A, B) pairs all win; and R is the largest such min(A, B).
    (Any win has its pruned weight above and its kept weight below the cut under the k-th pruned score, and
    vice versa.) Ties: pruned weights of equal score revive in position order, kept ones go in reverse order."""
    rows, cols = score.shape
    ordered, order = torch.sort(score, dim=1, descending=True, stable=True)
    pruned = prune_mask.gather(1, order)
    pruned_above = pruned.cumsum(1)                                   # pruned at sorted positions <= i
    kept_below = (~prune_mask).sum(1, keepdim=True) - (~pruned).cumsum(1)   # kept at positions > i
    strict_drop = torch.ones_like(pruned)
    strict_drop[:, :-1] = ordered[:, :-1] > ordered[:, 1:]
    wins = torch.where(strict_drop, torch.minimum(pruned_above, kept_below), 0).amax(dim=1)
    swaps = torch.floor(ratio * wins.double()).long()[:, None]
    grow = torch.zeros_like(prune_mask).scatter_(1, order, pruned & (pruned_above <= swaps))
    if not target.is_nm:
        cut = torch.zeros_like(prune_mask).scatter_(1, order, ~pruned & (kept_below < swaps))
        return (prune_mask & ~grow) | cut
    n, m = target.n, target.m
    shape = (rows, cols // m, m)
    s_g, grow_g, kept_g = score.reshape(shape), grow.reshape(shape), (~prune_mask).reshape(shape)
    # A group can give up at most its n kept weights: keep only its n best revivals; then every group prunes
    # as many of its weakest kept weights as it revived, so N:M holds.
    grow_g = grow_g & (_ranks(s_g.masked_fill(~grow_g, -math.inf), descending=True) < n)
    revived = grow_g.sum(-1, keepdim=True)
    cut_g = kept_g & (_ranks(s_g.masked_fill(~kept_g, math.inf), descending=False) < revived)
    return (prune_mask & ~grow_g.reshape(rows, cols)) | cut_g.reshape(rows, cols)


GRANULARITIES = ("row", "layer", "block")
SCORES = ("grad-rms", "taylor-exit")


def check_score(score: str, granularity: str = "row") -> None:
    if score not in SCORES:
        raise ConfigError(f"--rebuild-score {score!r}: choose one of {', '.join(SCORES)}")
    if score == "taylor-exit" and granularity == "block":
        # `block` ranks every matrix of a block in one list, and taylor-exit's loss changes are not in the same
        # units as |W| RMS(grad) on the other matrices.
        raise ConfigError("--rebuild-granularity block ranks all of a block's matrices together, which needs one "
                          "score for all of them: add --rebuild-score grad-rms")


def taylor_score(weight: torch.Tensor, grad: torch.Tensor, in_sq: torch.Tensor, prune_mask: torch.Tensor,
                 curvature: float) -> torch.Tensor:
    """The exact block-loss change of toggling each weight of a block's LAST linear (ours).

    The block output is linear in that weight, so the block loss L (a mean over T tokens and d_out outputs)
    is quadratic in it with curvature k = 1/(T d_out) times the input energy n_j = sum_t x_tj^2. With
    `grad` = -dL/dW_sparse at the current mask, toggling w = weight_rj changes L by exactly
        revive (pruned -> w):  -grad_rj w + k n_j w^2     (the score is minus this: the benefit)
        prune  (kept -> 0):     grad_rj w + k n_j w^2     (the score is this: the cost)
    so `rebuild_mask`, which pairs the best pruned with the worst kept weights, swaps a pair when the two
    single changes together lower the loss (their cross term, -2k w_ri w_rj H_ij, is left out). The
    reference's |W| RMS(grad) has no curvature term and takes the gradient at the dense weights: it can cut a
    strong kept weight whose error correlation happens to be small."""
    second = curvature * in_sq * weight.square()
    return grad * weight + torch.where(prune_mask, -second, second)


def check_granularity(granularity: str, target: SparsityTarget | None = None) -> None:
    if granularity not in GRANULARITIES:
        raise ConfigError(f"--rebuild-granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}")
    if target is not None and target.is_nm and granularity != "row":
        # A swap must stay inside its N:M group, so only a row's own pairs can be ranked together.
        raise ConfigError(f"--rebuild-granularity {granularity} does not apply to N:M sparsity; N:M uses row")


def rebuild_masks(masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], ratio: float,
                  target: SparsityTarget, granularity: str = "row") -> dict[str, torch.Tensor]:
    """`rebuild_mask` over the comparison group the granularity names (the reference's output1/layer/block):
    `row` ranks each output row on its own (exact per-row sparsity, N:M kept); `layer` ranks a whole matrix
    as one group (its total is exact, rows drift); `block` pools every matrix of the sub-block (only the
    sub-block's total is exact)."""
    if granularity == "row":
        return {n: rebuild_mask(masks[n], scores[n], ratio, target) for n in masks}
    check_granularity(granularity, target)
    if granularity == "layer":
        return {n: rebuild_mask(masks[n].reshape(1, -1), scores[n].reshape(1, -1), ratio, target
                                ).reshape(masks[n].shape) for n in masks}
    flat = rebuild_mask(torch.cat([m.reshape(-1) for m in masks.values()])[None],
                        torch.cat([scores[n].reshape(-1) for n in masks])[None], ratio, target)[0]
    out, start = {}, 0
    for n, m in masks.items():
        out[n] = flat[start:start + m.numel()].reshape(m.shape)
        start += m.numel()
    return out


def reduced_precision(device: torch.device | str) -> torch.dtype | None:
    """bfloat16 where `device` multiplies it natively, else None (plain float32).

    Barber's dense-block gradients only rank weights (the reference computes them in float16), so a narrower
    type is purely a speed choice, and which way it goes depends on the hardware: on an AVX512-BF16 CPU
    bfloat16 matmuls are 3x faster than float32, on an AVX2-only CPU (no bfloat16 kernels in oneDNN) PyTorch
    emulates them 80-120x slower (both measured at SmolLM2's shapes, `bench/matmul_dtype.py`). CUDA: bfloat16
    where the GPU supports it. The choice depends only on the hardware, so one machine always gives the same
    masks."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        try:
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
        except (AttributeError, RuntimeError):   # a build without oneDNN
            return None
    return None


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype | None:
    """`"auto"`: `reduced_precision(device)`; a dtype or None (float32) as given."""
    return reduced_precision(device) if dtype == "auto" else dtype


def _per_window_grad_sq(grad_out: torch.Tensor, x: torch.Tensor, batch: int,
                        dtype: torch.dtype | None) -> torch.Tensor:
    """sum_n (g_n^T x_n)^2 over the windows of a batch: the per-window weight gradients of a linear layer.

    The batched product runs in `dtype` (None: float32) with float32 accumulation: it only ranks weights."""
    dtype = dtype or torch.float32
    g = grad_out.detach().reshape(batch, -1, grad_out.shape[-1]).to(dtype)
    x = x.detach().reshape(batch, -1, x.shape[-1]).to(dtype)
    return torch.bmm(g.transpose(1, 2), x).float().square().sum(dim=0)


def _dense_autocast(device_type: str, dtype: torch.dtype | None):
    """Autocast for the dense blocks (None: plain float32)."""
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _window_losses(y_dense: torch.Tensor, y_sparse: torch.Tensor, windows: int) -> torch.Tensor:
    """Block loss per window: mean((y_dense - y_sparse)^2) over each window's outputs."""
    return (y_dense - y_sparse).reshape(windows, -1).square().mean(dim=1)


def _entry_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A block's input in its captured entry call: the first argument, or `hidden_states=`."""
    return args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))


def _batch_slice(call: tuple[tuple, dict], out: torch.Tensor, batch: int, lo: int, hi: int
                 ) -> tuple[tuple, dict, torch.Tensor]:
    """A captured block call and its output, cut to windows lo:hi of the `batch` windows. The block's input
    tells the layout: [batch, ...] or flattened [batch * T, ...] (OPT's MLP); every tensor with that first
    dimension is cut, shared ones (RoPE tables, broadcast masks) pass as they are."""
    args, kwargs = call
    x = _entry_input(args, kwargs)
    rows = x.shape[0]
    if rows % batch:
        raise RuntimeError(f"a block input of {rows} rows does not split into {batch} windows")
    if (lo, hi) == (0, batch):
        return args, kwargs, out
    per = rows // batch

    def cut(v):
        if isinstance(v, torch.Tensor):
            return v[lo * per:hi * per] if v.dim() > 0 and v.shape[0] == rows else v
        if isinstance(v, (tuple, list)):
            return type(v)(cut(u) for u in v)
        return v
    return cut(args), {k: cut(v) for k, v in kwargs.items()}, cut(out)


class _Tap(torch.autograd.Function):
    """The identity on a linear's output that hands the output's gradient to `taps` in the backward (and passes it
    on). Its other input, the scalar `tap` that requires grad, puts it in the graph whatever the weights'
    `requires_grad`."""

    @staticmethod
    def forward(ctx, out, tap, taps, name):
        ctx.taps, ctx.name, ctx.tap_dtype = taps, name, tap.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.taps.grads[ctx.name] = grad
        # The gradient goes on to the linears before this one (gate and up behind down_proj, say).
        return grad, torch.zeros((), dtype=ctx.tap_dtype, device=grad.device), None, None


class _OutputTaps:
    """d(loss)/d(output) of chosen linears, with no weight gradients and nothing kept beyond what the backward needs.

    A forward hook passes each tapped linear's output through `_Tap` (only while grad mode is on); a backward to
    `tap` then computes only what those outputs' gradients need. The linear's input is kept for the per-window
    product."""

    def __init__(self, module: torch.nn.Module, names: Sequence[str]):
        self.tap = torch.zeros((), requires_grad=True)
        self.inputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self._handles = [module.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: self._on_forward(n, a[0], o)) for n in names]

    def _on_forward(self, name: str, x: torch.Tensor, out: torch.Tensor):
        if not torch.is_grad_enabled():
            return None
        self.inputs[name] = x
        return _Tap.apply(out, self.tap, self, name)

    def backward(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the backward of `loss`; the tapped outputs' gradients by linear name."""
        self.grads = {}
        torch.autograd.grad(loss, self.tap)
        return self.grads

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def graded_linears(block: SubBlock, exit_terms: bool) -> tuple[str, ...]:
    """The linears scored by per-window gradients: all of the block's, or with the exit terms
    (`taylor-exit`) all but its last, which the exit terms score."""
    return block.linears[:-1] if exit_terms else block.linears


ENTRY_INPUT = "entry input"   # a recorded linear input that is the block's own input


@dataclass
class RecordedBlock:
    """A dense sub-block's forward on every calibration batch, with its autograd graph (`record_dense_block`)."""

    block: SubBlock
    taps: _OutputTaps
    batches: list = field(default_factory=list)    # per engine batch: (output with its graph, {linear: input})


@contextlib.contextmanager
def record_dense_block(dense_layer, block: SubBlock, exit_terms: bool):
    """While active, every forward of `dense_layer` records `block`'s output with its graph (`RecordedBlock`).

    Run around the init method's statistics pass on the dense layer: a decoder layer's FIRST sub-block (the
    attention) sees the layer input through a norm only, so its input in that pass is exactly the one Barber's
    attention pass gives it, and its forward there can stand in for Barber's dense forward, which is then not
    run again. The block runs in float32 with grad mode on; the rest of the layer does not see the graph.
    The graphs hold what the attention's backward needs (q, k, v, output per token, about the memory of the
    recomputed pass's records) until Barber's pass has used them."""
    taps = _OutputTaps(dense_layer, graded_linears(block, exit_terms))
    recorded = RecordedBlock(block, taps)
    grad_mode: list[bool] = []
    entry_input: list[torch.Tensor] = []

    def on_entry(module, args, kwargs):
        grad_mode.append(torch.is_grad_enabled())
        entry_input[:] = [_entry_input(args, kwargs)]
        torch.set_grad_enabled(True)

    def on_exit(module, args, output):
        torch.set_grad_enabled(grad_mode.pop())
        y = first_tensor(output)
        # A linear that reads the block input itself (q, k, v) is not kept: Barber's pass has the same values as
        # its own block input (`ENTRY_INPUT`).
        recorded.batches.append((y, {n: ENTRY_INPUT if x is entry_input[0] else x for n, x in taps.inputs.items()}))
        taps.inputs.clear()
        entry_input.clear()
        return (y.detach(), *output[1:]) if isinstance(output, tuple) else y.detach()

    hooks = [dense_layer.get_submodule(block.entry).register_forward_pre_hook(on_entry, with_kwargs=True),
             dense_layer.get_submodule(block.exit).register_forward_hook(on_exit)]
    try:
        yield recorded
    finally:
        for h in hooks:
            h.remove()
        taps.remove()
        if grad_mode:
            torch.set_grad_enabled(grad_mode[0])


@dataclass
class BlockRecord:
    """One sub-block's share of a pass over the calibration windows, batch by batch."""

    g2: dict[str, torch.Tensor]              # mean over windows of the squared per-window gradient, per linear
    loss: float                              # mean block loss, dense vs sparse, over windows
    # The block's last linear, at the sparse weights (`exit_terms`): -dL/dW_sparse and sum_t x_tj^2 of its
    # sparse input, both means over windows; tokens per window.
    exit_grad: torch.Tensor | None = None
    exit_in_sq: torch.Tensor | None = None
    tokens: int = 0
    # Kept for the last block of the pass only (Barber's passes have one block each):
    calls: list[tuple[tuple, dict]] = field(default_factory=list)    # the block's entry call (its input)
    dense_out: list[torch.Tensor] = field(default_factory=list)
    sparse_out: list[torch.Tensor] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)                   # windows per batch
    exit_in: list[torch.Tensor] = field(default_factory=list)        # with exit terms: the last linear's input
    out_tail: tuple | None = None    # the rest of the block module's output tuple (e.g. attention weights)


class _StopLayer(Exception):
    """Raised by a hook to end a layer's forward once the blocks a pass needs have run."""


def gradient_pass(engine, layer, dense_layer, hidden: torch.Tensor, blocks: Sequence[SubBlock],
                  grad_dtype: torch.dtype | str | None = "auto", exit_terms: bool = False,
                  to_end: bool = True, replay: tuple[SubBlock, torch.Tensor, tuple | None] | None = None,
                  recorded: RecordedBlock | None = None
                  ) -> tuple[dict[str, BlockRecord], torch.Tensor | None]:
    """One pass of the sparse `layer` over every window, capturing each block's input and output;
    each dense block runs on the captured input (the pruned model's own) with gradients, giving the block
    loss L_n = mean((y_dense - y_sparse)^2) per window n and G2 = mean_n (dL_n/dW)^2 for its linears.
    The dense blocks run under autocast to `grad_dtype` (None: float32; "auto": `reduced_precision`, bfloat16
    where the hardware has it). Their forward and backward are most of Barber's cost, and the result only ranks
    weights. The sparse layer stays float32: its output is the next layer's input.
    `recorded`: a block whose dense forward was recorded with its graph on these batches (`record_dense_block`)
    does not run again; its backward runs on the recorded graph.
    With `to_end=False` the sparse layer stops after the last block's exit and no layer output is returned.
    `replay=(block, outputs, tail)`: an earlier block of the layer does not run; its module returns `outputs`
    (every window's, in order; `tail` is the rest of its output tuple) so the blocks after it see an output
    the caller already has (Barber's rebuilt or unchanged attention), without recomputing it.
    `exit_terms` also records, for each graded block's last linear, the gradient at the SPARSE weights and its
    sparse input's energy (`taylor_score`): -dL_n/dW = 2/(T d_out) (y_dense - y_sparse)^T x_sparse, from the
    sparse layer's own forward, so it costs one product per batch and no backward.
    Returns the records per block name and the sparse layer's output for every window (None unless `to_end`)."""
    grad_dtype = _resolve_dtype(grad_dtype, hidden.device)
    records = {b.name: BlockRecord({
        n: torch.zeros_like(dense_layer.get_submodule(n).weight, dtype=torch.float32) for n in b.linears}, 0.0)
        for b in blocks}
    last = blocks[-1].name
    layer_out = torch.empty_like(hidden) if to_end else None
    if recorded is not None:
        n_batches = len(list(engine.batches()))
        if recorded.block.name not in records or len(recorded.batches) != n_batches:
            raise ValueError(f"the recorded block {recorded.block.name!r} ({len(recorded.batches)} batches) does not "
                             f"belong to this pass (blocks {list(records)}, {n_batches} batches)")
    seen: dict = {}
    hooks = []

    def on_exit(name, output):
        seen[("out", name)] = first_tensor(output)
        if name == last and isinstance(output, tuple) and not records[name].calls:
            records[name].out_tail = output[1:]
        if name == last and not to_end:
            raise _StopLayer
    for b in blocks:
        hooks.append(layer.get_submodule(b.entry).register_forward_pre_hook(
            lambda m, a, k, name=b.name: seen.__setitem__(("in", name), (a, k)), with_kwargs=True))
        hooks.append(layer.get_submodule(b.exit).register_forward_hook(
            lambda m, a, o, name=b.name: on_exit(name, o)))
    exit_inputs: dict[str, torch.Tensor] = {}
    if exit_terms:
        for b in blocks:
            hooks.append(layer.get_submodule(b.linears[-1]).register_forward_hook(
                lambda m, a, o, name=b.name: exit_inputs.__setitem__(name, a[0])))
    taps = _OutputTaps(dense_layer, [n for b in blocks if recorded is None or b.name != recorded.block.name
                                     for n in graded_linears(b, exit_terms)])
    windows = 0
    half = max(1, engine.batch_size // 2)
    try:
        # The sparse layer runs on the walk's own batches, so a rebuild that changes nothing hands the next
        # layer exactly what the init method alone would. The dense blocks run on half batches: a backward pass
        # keeps every activation of the block, and this bounds it near a plain forward at full batch. (A
        # recorded block's graph is a whole batch's, made by the statistics pass; it is used at full batch.)
        replayed = None
        if replay is not None:
            replayed = layer.get_submodule(replay[0].exit)
            replay_rows = replay[1].shape[0] // hidden.shape[0]   # rows per window
            current: list = [None]
            replayed.forward = lambda *a, **k: (current[0], *replay[2]) if replay[2] is not None else current[0]
        for index, s in enumerate(engine.batches()):
            if replayed is not None:
                current[0] = replay[1][s.start * replay_rows:s.stop * replay_rows]
            with torch.no_grad():
                try:
                    out = engine.call_layer(layer, hidden[s])
                    if layer_out is not None:
                        layer_out[s] = out
                except _StopLayer:
                    pass
            full = s.stop - s.start
            for b in blocks:
                rec = records[b.name]
                from_record = recorded is not None and b.name == recorded.block.name
                spans = [(0, full)] if from_record else [(lo, min(lo + half, full)) for lo in range(0, full, half)]
                for lo, hi in spans:
                    batch = hi - lo
                    args, kwargs, y_sparse = _batch_slice(seen[("in", b.name)], seen[("out", b.name)],
                                                          full, lo, hi)
                    if from_record:
                        y_dense, inputs = recorded.batches[index]
                        recorded.batches[index] = None          # the graph goes with this backward
                        inputs = {n: _entry_input(args, kwargs) if x is ENTRY_INPUT else x for n, x in inputs.items()}
                        per_window = _window_losses(y_dense, y_sparse, batch)
                        grads = recorded.taps.backward(per_window.sum())
                    else:
                        with torch.enable_grad(), _dense_autocast(hidden.device.type, grad_dtype):
                            y_dense = b.run(dense_layer, args, kwargs)
                            per_window = _window_losses(y_dense, y_sparse, batch)
                            grads = taps.backward(per_window.sum())
                        inputs, taps.inputs = taps.inputs, {}
                    for n in graded_linears(b, exit_terms):
                        if n in grads:
                            rec.g2[n] += _per_window_grad_sq(grads[n], inputs[n], batch, grad_dtype)
                    if exit_terms:
                        x = exit_inputs[b.name]
                        x = x.reshape(full, -1, x.shape[-1])[lo:hi].reshape(-1, x.shape[-1]).float()
                        residual = (y_dense.detach().float() - y_sparse).reshape(x.shape[0], -1)
                        if rec.exit_grad is None:
                            rec.exit_grad = torch.zeros(residual.shape[1], x.shape[1], device=x.device)
                            rec.exit_in_sq = torch.zeros(x.shape[1], device=x.device)
                        rec.tokens = x.shape[0] // batch
                        # grad_dtype product, float32 accumulation, as for the per-window gradients (it ranks weights)
                        low = grad_dtype or torch.float32
                        rec.exit_grad += (residual.T.to(low) @ x.to(low)).float() \
                            * (2.0 / (rec.tokens * residual.shape[1]))
                        rec.exit_in_sq += x.square().sum(dim=0)
                        if b.name == last:
                            rec.exit_in.append(x)
                    rec.loss += float(per_window.detach().sum())
                    if b.name == last:
                        rec.calls.append((args, kwargs))
                        rec.dense_out.append(y_dense.detach())
                        rec.sparse_out.append(y_sparse)
                        rec.sizes.append(batch)
                    del y_dense, per_window, grads, inputs
            windows += full
            seen.clear()
            exit_inputs.clear()
    finally:
        for h in hooks:
            h.remove()
        taps.remove()
        if replay is not None:
            del layer.get_submodule(replay[0].exit).forward   # the module's own forward again
    for rec in records.values():
        rec.g2 = {n: g / max(windows, 1) for n, g in rec.g2.items()}
        if rec.exit_grad is not None:
            rec.exit_grad /= max(windows, 1)
            rec.exit_in_sq /= max(windows, 1)
        rec.loss /= max(windows, 1)
    return records, layer_out


def weight_change_product(delta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """h -> h @ delta^T for a weight change `delta` ([out, in]; h [tokens, in] -> [tokens, out]).

    A Wanda rebuild changes a few weights per row, spread over most columns, so a dense product over the touched
    columns costs nearly a full one; a sparse (CSR) product does only the nonzeros, 1.9-2.8x faster at SmolLM2's
    shapes up to ~2% nonzeros. A re-solved row (SparseGPT init) changes the whole row: then the dense product
    over the touched columns is the faster one."""
    if int(delta.count_nonzero()) <= 0.02 * delta.numel():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            sparse = delta.to_sparse_csr()
        return lambda h: (sparse @ h.T).T
    touched = delta.ne(0).any(dim=0).nonzero().squeeze(1)
    dense = delta[:, touched].T
    return lambda h: h[:, touched] @ dense


@torch.no_grad()
def rerun_block(layer, block: SubBlock, rec: BlockRecord, old_weights: dict[str, torch.Tensor] | None = None
                ) -> tuple[list[torch.Tensor], float]:
    """The (rebuilt) sparse block on its recorded inputs: outputs per batch and the mean block loss.

    With the block's weights before the rebuild (`old_weights`) and an `exit_input` (MLP blocks), only what the
    rebuild touched is recomputed. With h the exit linear's input, W its weight, C the channels whose rows of
    the first linears changed and J the exit columns that changed:
        y_new - y_old = W_new h_new - W_old h_old = h_old[J] (W_new - W_old)[:, J]^T + (h_new - h_old)[C] W_new[:, C]^T
    so only h_old on J u C and h_new on C are needed, from the recorded block inputs. A Wanda rebuild swaps a
    weight or two per row, so that is a fraction of the block; past the cost of a full rerun the whole block
    runs instead (SparseGPT init, whose re-solved exit rows change every column)."""
    exit_name, firsts = block.linears[-1], block.linears[:-1]
    if old_weights is not None and rec.exit_in and all(
            layer.get_submodule(n).weight.equal(old_weights[n]) for n in firsts):
        # Only the last linear changed and its input is recorded: y_new = y_old + h (W_new - W_old)^T.
        change = weight_change_product(layer.get_submodule(exit_name).weight - old_weights[exit_name])
        outs = [y + change(h).reshape(y.shape) for h, y in zip(rec.exit_in, rec.sparse_out)]
        return outs, _mean_window_loss(outs, rec)
    plan = None
    if old_weights is not None and block.exit_input is not None and firsts:
        exit_w = layer.get_submodule(exit_name).weight
        cols = (exit_w != old_weights[exit_name]).any(dim=0)
        rows = torch.zeros_like(cols)
        for n in firsts:
            rows |= (layer.get_submodule(n).weight != old_weights[n]).any(dim=1)
        if int((cols | rows).sum()) + int(rows.sum()) < cols.numel():
            plan = ((cols | rows).nonzero().squeeze(1), rows.nonzero().squeeze(1))
    if plan is None:
        outs = [block.run(layer, args, kwargs) for args, kwargs in rec.calls]
    else:
        touched, changed = plan
        delta_w = (exit_w - old_weights[exit_name])[:, touched]
        new_exit_c = exit_w[:, changed]
        h_new = [block.exit_input(layer, args, kwargs, changed) for args, kwargs in rec.calls] if len(changed) else []
        in_changed = torch.isin(touched, changed)   # where C sits among the touched channels
        new = {n: layer.get_submodule(n).weight.detach().clone() for n in firsts}
        outs = []
        try:
            for n in firsts:   # the old weights, for h_old
                layer.get_submodule(n).weight.copy_(old_weights[n])
            for i, ((args, kwargs), y) in enumerate(zip(rec.calls, rec.sparse_out)):
                h_old = block.exit_input(layer, args, kwargs, touched)
                y = y + torch.nn.functional.linear(h_old, delta_w)
                if len(changed):
                    y = y + torch.nn.functional.linear(h_new[i] - h_old[..., in_changed], new_exit_c)
                outs.append(y)
        finally:
            for n in firsts:
                layer.get_submodule(n).weight.copy_(new[n])
    return outs, _mean_window_loss(outs, rec)


def _mean_window_loss(outs: list[torch.Tensor], rec: BlockRecord) -> float:
    """The block loss of new sparse outputs against the recorded dense ones, mean over windows."""
    total, windows = 0.0, 0
    for y, y_dense, n in zip(outs, rec.dense_out, rec.sizes):
        total += float(_window_losses(y_dense, y, n).sum())
        windows += n
    return total / max(windows, 1)


@torch.no_grad()
def block_loss(engine, layer, dense_layer, hidden: torch.Tensor, block: SubBlock,
               dense_dtype: torch.dtype | str | None = "auto") -> float:
    """Mean over windows of mean((dense block(u) - sparse block(u))^2), u = the pruned layer's block input; the
    dense block runs under autocast to `dense_dtype`, as in `gradient_pass`, so the two losses compare."""
    dense_dtype = _resolve_dtype(dense_dtype, hidden.device)
    total, windows = 0.0, 0
    for s in engine.batches():
        args, kwargs, y_sparse = engine.capture_block(layer, hidden[s], block)
        with _dense_autocast(hidden.device.type, dense_dtype):
            y_dense = block.run(dense_layer, args, kwargs)
        total += float(_window_losses(y_dense, y_sparse, s.stop - s.start).sum())
        windows += s.stop - s.start
    return total / max(windows, 1)


class Barber:
    def __init__(self, ratio: float = 0.01, keep_updates: bool = True, loss_guard: bool = True,
                 granularity: str = "row", grad_dtype: torch.dtype | str | None = "auto",
                 score: str = "grad-rms"):
        check_granularity(granularity)
        check_score(score, granularity)
        self.score = score
        self.grad_dtype = grad_dtype
        self.ratio = ratio
        self.granularity = granularity
        self.keep_updates = keep_updates
        self.loss_guard = loss_guard

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
        grad_dtype = _resolve_dtype(self.grad_dtype, hidden.device)
        blocks = list(engine.adapter.subblocks(layer))
        if recorded is not None and recorded.block.name != blocks[0].name:
            raise ValueError(f"the recorded block {recorded.block.name!r} is not this layer's first, {blocks[0].name!r}")
        # The recorded block's gradients come from the statistics pass, which runs in float32.
        report: dict = {"swaps": {}, "resolved_rows": {}, "reverted": [],
                        "gradient_dtype": {b.name: str(torch.float32 if recorded is not None and i == 0
                                                       else grad_dtype or torch.float32).removeprefix("torch.")
                                           for i, b in enumerate(blocks)},
                        "dense_forward_reused": [recorded.block.name] if recorded is not None else []}
        exit_terms = self.score == "taylor-exit"

        def block_pass(i: int, replay=None):
            """Gradients of block i on the current layer; the sparse layer runs only as far as block i."""
            return gradient_pass(engine, layer, dense_layer, hidden, [blocks[i]], grad_dtype, exit_terms,
                                 to_end=i + 1 == len(blocks), replay=replay,
                                 recorded=recorded if i == 0 else None)
        records, layer_out = block_pass(0)
        recorded = None
        for i, block in enumerate(blocks):
            rec = records[block.name]
            report[f"{block.name}_loss_before"] = report[f"{block.name}_loss_after"] = rec.loss
            saved = {n: (layer.get_submodule(n).weight.detach().clone(), masks[n]) for n in block.linears}
            changed = self._rebuild_block(layer, dense_layer, block, rec, masks, targets, stats, solver, report)
            if i + 1 < len(blocks):
                outs = new_outs = rec.sparse_out
                if changed:
                    new_outs, loss_after = rerun_block(layer, block, rec, {n: w for n, (w, _) in saved.items()})
                    if self.loss_guard and loss_after > rec.loss:
                        self._revert(layer, block, saved, masks, report)
                    else:
                        outs = new_outs
                        report[f"{block.name}_loss_after"] = loss_after
                # The next block's pass replays this block's output instead of recomputing it; nothing else of
                # this block's records is needed, so it is freed first.
                replay = (block, torch.cat(outs), rec.out_tail)
                outs = new_outs = None
                rec.calls, rec.sparse_out, rec.exit_in, rec.dense_out = [], [], [], []
                records, layer_out = block_pass(i + 1, replay)
                del replay
                continue
            if not changed:
                continue
            outs, loss_after = rerun_block(layer, block, rec, {n: w for n, (w, _) in saved.items()})
            if self.loss_guard and loss_after > rec.loss:
                self._revert(layer, block, saved, masks, report)
                continue
            report[f"{block.name}_loss_after"] = loss_after
            if engine.adapter.output_adds_last_block(layer):
                # The layer's output is the last block's residual plus the block's output.
                start = 0
                for y_new, y_old, n in zip(outs, rec.sparse_out, rec.sizes):
                    layer_out[start:start + n] += (y_new - y_old).reshape(n, *layer_out.shape[1:])
                    start += n
            else:
                layer_out = engine.forward_layer(layer, hidden)
        return report, layer_out

    def record_first_block(self, engine, dense_layer):
        """`record_dense_block` for the layer's first sub-block, to wrap the init's statistics pass on `dense_layer`."""
        return record_dense_block(dense_layer, engine.adapter.subblocks(dense_layer)[0], self.score == "taylor-exit")

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
        scores = {n: dense[n].abs() * rec.g2[n].sqrt() for n in block.linears}
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
